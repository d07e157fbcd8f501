"""Schema-driven fuzzing of every route of a live service: schemathesis (its CLI) generates valid and invalid
requests from the service's own OpenAPI document and checks each answer: not a server error, a status and a
content type the document lists for that route. Used by ``tests/serving/test_api_fuzz.py`` (a short run) and
``benchmarks/fuzz.py`` (minutes)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance"


def run(base_url: str, key: str, work: Path, uids: dict[str, str], *, seconds: int | None = None,
        max_examples: int | None = None, seed: int | None = None, workers: int = 1) -> dict:
    """Run schemathesis against ``base_url`` with ``key`` (use one with every scope, so that authorised paths are
    reached) and real ``uids`` (``study_uid``, ``series_uid``, ``sop_uid``) for the path parameters. Returns
    {"generated": cases, "operations": tested, "failures": {check: count}, "output": text}."""
    work.mkdir(parents=True, exist_ok=True)
    config = work / "schemathesis.toml"
    config.write_text("[parameters]\n" + "".join(f'{name} = "{value}"\n' for name, value in uids.items()))
    cmd = [str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(config), "run",
           f"{base_url}/openapi.json", "-H", f"Authorization: Bearer {key}", "--checks", CHECKS,
           "--workers", str(workers), "--request-timeout", "30", "--continue-on-failure", "--no-color"]
    if seconds:
        cmd += ["--max-time", str(seconds)]
    if max_examples:
        cmd += ["--max-examples", str(max_examples)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=(seconds or 600) + 300)
    out = done.stdout + done.stderr
    (work / "schemathesis.log").write_text(out)
    generated = re.findall(r"(\d+) generated", out)
    failures = {name.strip(): int(n) for name, n in re.findall(r"^\s*❌ (\S+ [^:\n]+): (\d+)", out, re.MULTILINE)}
    tested = re.findall(r"Tested: (\d+)", out)
    return {"generated": int(generated[-1]) if generated else 0, "operations": int(tested[-1]) if tested else 0,
            "failures": failures, "output": out, "returncode": done.returncode}
