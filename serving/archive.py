"""``medvision score``: score whole archives with ONNX Runtime, resumably, on one machine (or Ray: ``archive_ray``).

Decoding and preprocessing run in a process pool (one file per task, a bounded window of tasks in flight)
while the main process runs the model on full batches, so decoding and inference overlap. Every file
gets a row: scored, or refused with the reader's error code and message (never fatal; a decoder that
crashes its worker process refuses only the files it held). Rows are written after every batch as a
Parquet part (or appended to a CSV and flushed), so an interruption loses at most the batch in flight;
rerunning the same command skips every file already in the output and appends the rest. At the end,
exam (study) and breast aggregates are rebuilt from all rows.

Rows carry identifiers of the image (path, SOP / Study / Series Instance UIDs, laterality, view), never
patient names or IDs; the model's name and artifact sha256; decode and inference times.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medvision.cores import usable_cores
from medvision.errors import ConfigError, MedvisionError
from medvision.parallel import decoder, decoding_pool
from medvision.progress import progress_bar

if TYPE_CHECKING:
    from medvision.serving.engine import ModelInfo

log = logging.getLogger(__name__)

FIELDS = ["path", "status", "sop_instance_uid", "study_instance_uid", "series_instance_uid", "laterality", "view",
          "transfer_syntax", "decode", "probability", "label", "above_threshold", "threshold", "model_name", "artifact_sha256",
          "decode_ms", "inference_ms", "error_code", "error", "scored_at"]
FLOAT_FIELDS = {"probability", "threshold", "decode_ms", "inference_ms"}


def list_inputs(inputs: Iterable[str] = (), manifest: str | None = None) -> list[str]:
    """Absolute paths of every file to score: all non-hidden files under the folders (non-DICOM ones get a
    refused row, so nothing in an archive goes unaccounted for), the files given, or a manifest's."""
    found: list[str] = []
    if manifest:
        from medvision.manifest import read_manifest

        found += [str(Path(r.path).resolve()) for r in read_manifest(manifest, check_files=False)]
    for item in inputs:
        p = Path(item)
        if p.is_file():
            found.append(str(p.resolve()))
        elif p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [str((Path(dirpath) / n).resolve()) for n in sorted(filenames) if not n.startswith(".")]
        else:
            raise ConfigError(f"no such file or folder: {item}")
    seen: set[str] = set()
    return [f for f in found if not (f in seen or seen.add(f))]


# -- decoding (process-pool workers, Ray tasks) ---------------------------------------------------------------

def decode(path: str) -> dict:
    """Read and preprocess one file: the model input and the row's identifiers, or the refusal."""
    start = time.perf_counter()
    out: dict = {"path": path}
    try:
        pre, limits = decoder()
        stored, meta = pre.read(path, limits)
        out["x"] = pre(stored, meta)
        out.update(sop_instance_uid=meta.sop_instance_uid or "", study_instance_uid=meta.study_instance_uid or "",
                   series_instance_uid=meta.series_instance_uid or "", laterality=meta.laterality or "",
                   view=meta.view or "", transfer_syntax=meta.transfer_syntax, decode=meta.decode)
    except MedvisionError as exc:
        out.update(error_code=exc.code, error=exc.message[:300])
    except Exception as exc:  # a codec's own exception: refuse the file, keep going
        out.update(error_code="unreadable", error=f"{type(exc).__name__}: {str(exc)[:200]}")
    out["decode_ms"] = (time.perf_counter() - start) * 1000
    return out


def to_rows(decoded: list[dict], probabilities: np.ndarray | None, inference_ms: float, model: ModelInfo) -> list[dict]:
    """Output rows for one batch (``probabilities`` in the order of the decoded files that have ``x``)."""
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    scored = [d for d in decoded if "x" in d]
    per_image = inference_ms / max(1, len(scored))
    probs = iter([] if probabilities is None else probabilities.tolist())
    rows = []
    for d in decoded:
        row = {f: "" for f in FIELDS} | {k: v for k, v in d.items() if k in FIELDS}
        row.update(model_name=model.name, artifact_sha256=model.artifact_sha256, threshold=model.threshold,
                   decode_ms=round(d["decode_ms"], 3), scored_at=now)
        if "x" in d:
            p = float(next(probs))
            above = p >= model.threshold
            row.update(status="scored", probability=p, above_threshold=int(above), label=model.labels[int(above)],
                       inference_ms=round(per_image, 3))
        else:
            row.update(status="refused", probability=None, above_threshold=None, inference_ms=None)
        rows.append(row)
    return rows


# -- the output: Parquet parts or one CSV, resumable ---------------------------------------------------------


class ResultStore:
    """Rows of one output folder. Parquet: ``images/part-*.parquet`` (one per batch, written atomically);
    CSV: ``images.csv`` (appended and flushed per batch; a torn last line is cut off on resume)."""

    def __init__(self, out: str | os.PathLike, fmt: str = "parquet") -> None:
        if fmt not in ("parquet", "csv"):
            raise ConfigError(f"--format must be parquet or csv, got {fmt!r}")
        self.out, self.fmt = Path(out), fmt
        self.out.mkdir(parents=True, exist_ok=True)
        self.parts = self.out / "images"
        self.csv = self.out / "images.csv"
        if fmt == "parquet":
            _pyarrow()
            self.parts.mkdir(exist_ok=True)
        other = self.csv.is_file() if fmt == "parquet" else any(self.parts.glob("*.parquet"))
        if other:
            raise ConfigError(f"{self.out} holds a previous run in the other format: resume with the same --format")
        self.run_id = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.count = 0

    def read(self) -> list[dict]:
        """Every row written so far (first row per path wins: a re-scored duplicate cannot appear twice)."""
        rows: list[dict] = []
        if self.fmt == "parquet":
            pq = _pyarrow()
            for part in sorted(self.parts.rglob("*.parquet")):
                try:
                    rows += pq.read_table(part).to_pylist()
                except Exception:  # a part torn by a crash mid-write: its images are simply scored again
                    log.warning("ignoring unreadable output part %s (an interrupted write)", part.name)
        elif self.csv.is_file():
            self._repair_csv()
            with self.csv.open(newline="") as fh:
                for r in csv.DictReader(fh):
                    rows.append({k: ((float(v) if v != "" else None) if k in FLOAT_FIELDS else v) for k, v in r.items()})
        seen: set[str] = set()
        return [r for r in rows if not (r["path"] in seen or seen.add(r["path"]))]

    def done(self) -> set[str]:
        return {r["path"] for r in self.read()}

    def _repair_csv(self) -> None:
        data = self.csv.read_bytes()
        if data and not data.endswith(b"\n"):  # killed mid-write: drop the torn row, it is scored again
            with self.csv.open("r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.count += 1
        if self.fmt == "parquet":
            pq = _pyarrow()
            import pyarrow as pa

            target = self.parts / f"part-{self.run_id}-{self.count:06d}.parquet"
            tmp = target.with_suffix(".tmp")
            pq.write_table(pa.Table.from_pylist(rows, schema=schema()), tmp)
            os.replace(tmp, target)
            return
        new = not self.csv.is_file() or self.csv.stat().st_size == 0
        with self.csv.open("a", newline="") as fh:
            w = csv.DictWriter(fh, FIELDS)
            if new:
                w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in FIELDS})
            fh.flush()
            os.fsync(fh.fileno())

    def write_aggregates(self, rows: list[dict]) -> dict[str, Path]:
        """Exam (study) and breast rows: the most suspicious image decides, as in the review UI."""
        exams: dict[str, dict] = {}
        breasts: dict[tuple[str, str], dict] = {}
        for r in rows:
            if r["status"] != "scored" or not r["study_instance_uid"]:
                continue
            for table, key in ((exams, r["study_instance_uid"]), (breasts, (r["study_instance_uid"], r["laterality"]))):
                agg = table.setdefault(key, {"images": 0, "probability": -1.0})
                agg["images"] += 1
                if r["probability"] > agg["probability"]:
                    agg.update(probability=r["probability"], above_threshold=int(r["probability"] >= r["threshold"]),
                               model_name=r["model_name"], artifact_sha256=r["artifact_sha256"])
        exam_rows = [{"study_instance_uid": k, **v} for k, v in sorted(exams.items())]
        breast_rows = [{"study_instance_uid": k[0], "laterality": k[1], **v} for k, v in sorted(breasts.items())]
        return {"exams": self._write_table("exams", exam_rows), "breasts": self._write_table("breasts", breast_rows)}

    def _write_table(self, name: str, rows: list[dict]) -> Path:
        path = self.out / f"{name}.{self.fmt}"
        tmp = path.with_suffix(".tmp")
        if self.fmt == "parquet":
            import pyarrow as pa

            _pyarrow().write_table(pa.Table.from_pylist(rows), tmp)
        else:
            with tmp.open("w", newline="") as fh:
                if rows:
                    w = csv.DictWriter(fh, list(rows[0]))
                    w.writeheader()
                    w.writerows(rows)
        os.replace(tmp, path)
        return path


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("Parquet output needs pyarrow: pip install 'medvision-radiology[batch]' (or use --format csv)") from None
    return pq


def schema():
    import pyarrow as pa

    types = {f: pa.string() for f in FIELDS}
    types.update({f: pa.float64() for f in FLOAT_FIELDS})
    types["above_threshold"] = pa.int8()
    return pa.schema([(f, types[f]) for f in FIELDS])


# -- the local engine --------------------------------------------------------------------------------------------


@dataclass
class Options:
    batch_size: int = 16
    workers: int = 0  # 0: one per core
    threads: int = 0  # ONNX Runtime intra-op threads, 0: one per physical core this process may run on
    show_progress: bool = True


def _decoded_stream(paths: list[str], engine, workers: int, window: int) -> Iterator[dict]:
    """Decoded files as they finish, with at most ``window`` in flight. If a decoder kills its process, the
    files that pool held are decoded again one per fresh process: only the culprit is refused."""
    spec = (engine.meta.preprocess, engine.limits)
    todo = list(reversed(paths))
    while todo:
        pool = decoding_pool(workers, *spec)
        running: dict = {}
        suspects: list[str] = []
        try:
            while todo or running:
                while todo and len(running) < window:
                    path = todo.pop()
                    try:
                        running[pool.submit(decode, path)] = path
                    except BrokenProcessPool:
                        todo.append(path)
                        raise
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    result = fut.result()  # BrokenProcessPool leaves fut in running: a suspect
                    running.pop(fut)
                    yield result
        except BrokenProcessPool:
            suspects = list(running.values())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        for path in suspects:
            yield _isolated(path, spec)


def _isolated(path: str, spec: tuple) -> dict:
    pool = decoding_pool(1, *spec)
    try:
        return pool.submit(decode, path).result()
    except BrokenProcessPool:
        return {"path": path, "error_code": "decoder_crashed", "decode_ms": 0.0,
                "error": "the decoder crashed its process on this file"}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def score_archive(paths: list[str], artifact: str, out: str | os.PathLike, fmt: str = "parquet",
                  options: Options = Options()) -> dict:
    """Score what is not in ``out`` yet; returns the summary (also written to ``out/summary.json``)."""
    from medvision.serving.engine import Engine

    # the decoding processes need the cores between model calls: ONNX Runtime's idle threads sleep, not spin
    # (measured on the full-field mix, 8 x 36 files: 36.1-37.1 -> 38.4-38.7 images/s)
    engine = Engine(artifact, threads=options.threads, spinning=False)
    model = engine.model_info()
    store = ResultStore(out, fmt)
    done = store.done()
    todo = [p for p in paths if p not in done]
    workers = options.workers or usable_cores()
    start = time.perf_counter()
    counts: Counter = Counter()
    decode_ms = inference_ms = 0.0
    batch: list[dict] = []

    def flush() -> None:
        nonlocal inference_ms
        ready = [d for d in batch if "x" in d]
        probs, ms = None, 0.0
        if ready:
            t = time.perf_counter()
            probs = engine.run(np.stack([d["x"] for d in ready]))
            ms = (time.perf_counter() - t) * 1000
        rows = to_rows(batch, probs, ms, model)
        store.append(rows)  # written before the next batch starts: an interruption loses this batch at most
        inference_ms += ms
        counts.update(r["status"] if r["status"] == "scored" else f"refused:{r['error_code']}" for r in rows)
        batch.clear()

    with progress_bar("score", total=len(todo), enabled=options.show_progress) as advance:
        for d in _decoded_stream(todo, engine, workers, window=max(2 * options.batch_size, 4 * workers)):
            decode_ms += d["decode_ms"]
            batch.append(d)
            if len(batch) >= options.batch_size:
                flush()
            elapsed = time.perf_counter() - start
            advance(status=f"{sum(counts.values()) / elapsed:.1f} img/s" if elapsed > 0 else "")
        if batch:
            flush()
    wall = time.perf_counter() - start
    rows = store.read()
    outputs = store.write_aggregates(rows)
    summary = summarise(rows, counts, len(paths), len(paths) - len(todo), wall, decode_ms, inference_ms, workers,
                        "local", model)
    summary["outputs"] = {"images": str(store.parts if fmt == "parquet" else store.csv),
                          **{k: str(v) for k, v in outputs.items()}}
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summarise(rows: list[dict], counts: Counter, listed: int, skipped: int, wall: float, decode_ms: float,
              inference_ms: float, workers: int, engine: str, model: ModelInfo) -> dict:
    now_scored = counts.get("scored", 0)
    now_refused = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("refused:")}
    done_now = now_scored + sum(now_refused.values())
    return {
        "engine": engine, "model": model.name, "artifact_sha256": model.artifact_sha256,
        "files_listed": listed, "already_done": skipped, "processed_now": done_now, "scored_now": now_scored,
        "refused_now": now_refused, "seconds": round(wall, 2),
        "images_per_s": round(done_now / wall, 2) if wall > 0 else None,
        "decode_ms_per_image": round(decode_ms / done_now, 2) if done_now else None,
        "inference_ms_per_image": round(inference_ms / max(1, now_scored), 3) if now_scored else None,
        "decode_workers": workers,
        "total": {"rows": len(rows), "scored": sum(r["status"] == "scored" for r in rows),
                  "refused": dict(Counter(r["error_code"] for r in rows if r["status"] != "scored")),
                  "exams": len({r["study_instance_uid"] for r in rows if r["status"] == "scored" and r["study_instance_uid"]})},
    }
