"""Score many DICOM files, locally (ONNX Runtime) or against a running service, and summarise."""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvision.errors import ConfigError, MedvisionError
from medvision.metrics import auroc, sensitivity_specificity
from medvision.progress import progress_bar


@dataclass
class ScoreRow:
    path: str
    image_id: str
    sop_instance_uid: str | None = None
    probability: float | None = None
    label: str | None = None
    error_code: str | None = None
    error: str | None = None


def collect_files(inputs: Iterable[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")))
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"no such file or folder: {item}")
    return files


def score_local(files: list[Path], artifact: str, show_progress: bool = True) -> tuple[list[ScoreRow], float]:
    from medvision.serving.engine import Engine

    engine = Engine(artifact)
    rows = []
    with progress_bar("predict (local)", total=len(files), enabled=show_progress) as advance:
        for f in files:
            row = ScoreRow(str(f), f.stem)
            try:
                r = engine.predict(f)
                row.sop_instance_uid, row.probability, row.label = r.meta.sop_instance_uid, r.probability, r.label
            except MedvisionError as exc:
                row.error_code, row.error = exc.code, exc.message
            rows.append(row)
            advance()
    return rows, engine.meta.threshold


def score_remote(files: list[Path], url: str, api_key: str | None = None, show_progress: bool = True,
                 timeout: float = 120.0) -> tuple[list[ScoreRow], float | None]:
    import httpx

    headers = {"Content-Type": "application/dicom"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    rows, threshold = [], None
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout) as client, progress_bar(
        "predict (http)", total=len(files), enabled=show_progress
    ) as advance:
        for f in files:
            row = ScoreRow(str(f), f.stem)
            try:
                resp = client.post("/v1/predict", content=f.read_bytes(), headers=headers)
            except httpx.TransportError as exc:
                raise ConfigError(f"cannot reach the service at {url}: {type(exc).__name__}: {exc}") from None
            ctype = resp.headers.get("content-type", "")
            body = resp.json() if ctype.startswith(("application/json", "application/problem+json")) else {}
            if resp.status_code in (401, 403):  # every later file would fail the same way
                message = body.get("detail", resp.text[:200])
                raise ConfigError(f"the service refused the API key ({resp.status_code}): {message}")
            if resp.status_code == 200:
                row.sop_instance_uid, row.probability, row.label = (
                    body["sop_instance_uid"], body["probability"], body["label"])
                threshold = body["threshold"]
            else:
                row.error_code = body.get("code", f"http_{resp.status_code}")  # an RFC 9457 problem's stable code
                row.error = body.get("detail", resp.text[:200])
            rows.append(row)
            advance()
    return rows, threshold


def write_rows(rows: list[ScoreRow], path: str | os.PathLike) -> None:
    with Path(path).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "path", "sop_instance_uid", "probability", "label", "error_code", "error"])
        for r in rows:
            w.writerow([r.image_id, r.path, r.sop_instance_uid or "", "" if r.probability is None else f"{r.probability:.6f}",
                        r.label or "", r.error_code or "", r.error or ""])


def summarise(rows: list[ScoreRow], threshold: float | None, labels_csv: str | None = None,
              truth_by_path: dict[str, int] | None = None) -> dict:
    """Counts, refusals by reason and, given labels (an RSNA-style CSV by image id, or a mapping of
    resolved file paths to labels from a manifest), AUROC and the operating point."""
    scored = [r for r in rows if r.probability is not None]
    summary: dict = {
        "files": len(rows), "scored": len(scored),
        "refused": dict(Counter(r.error_code for r in rows if r.error_code)),
    }
    matched = []
    if truth_by_path is not None:
        matched = [(truth_by_path[str(Path(r.path).resolve())], r.probability) for r in scored
                   if str(Path(r.path).resolve()) in truth_by_path]
    elif labels_csv and scored:
        with open(labels_csv, newline="") as fh:
            truth = {r["image_id"]: int(float(r["cancer"])) for r in csv.DictReader(fh)}
        matched = [(truth[r.image_id], r.probability) for r in scored if r.image_id in truth]
    if matched:
        y = np.array([m[0] for m in matched])
        s = np.array([m[1] for m in matched])
        summary.update({"labelled": len(matched), "positives": int(y.sum()), "auroc": auroc(y, s)})
        if threshold is not None:
            sens, spec = sensitivity_specificity(y, s, threshold)
            summary.update({"threshold": threshold, "sensitivity": sens, "specificity": spec})
    return summary
