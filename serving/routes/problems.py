"""``GET /problems``: the problem types the service answers with, so that an error's ``type`` can be looked up."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Path

from medvision.serving.problems import CATALOGUE, ProblemType, problem_type

router = APIRouter(prefix="/problems", tags=["errors"])


@router.get("", summary="Every problem type (error code) the service answers with", response_model=list[ProblemType])
async def problem_types() -> list[ProblemType]:
    return [problem_type(code) for code in CATALOGUE]


@router.get("/{code}", summary="One problem type: its title and what to do about it", response_model=ProblemType,
            responses={404: {"description": "no such problem type"}})
async def one_problem_type(code: str = Path(max_length=64, pattern=r"^[a-z_]+$")) -> ProblemType:
    found = problem_type(code)
    if found is None:
        raise HTTPException(404, f"no problem type '{code}': GET /problems lists them")
    return found
