"""The PACS path under load: studies pushed by STOW-RS until every one is scored and its SR written.

    python benchmarks/stow_load.py --images demo_out/data/images --studies 30

One configuration after the other, each a fresh `medvision serve` on loopback: the defaults (one job thread,
decoding in threads), then two job threads with decoding in one worker process per core (and one ONNX Runtime
thread). Every study is sent as one multipart/related request, one after the other, as a PACS forwards them;
the clock stops when the last study reports 'scored'. Receiving alone (no job threads) is timed too.
"""

from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path

import httpx
import pydicom
from rich.console import Console
from rich.table import Table
from serve_load import service

from medvision.cores import usable_cores

console = Console()


def _stow_body(files: list[Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f.read_bytes() + b"\r\n"
                    for f in files) + f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def run(model: str, studies: list[tuple[str, list[Path]]], settings: dict[str, str], timeout: float) -> dict:
    with service(model, {"MEDVISION_STUDY_STABLE_SECONDS": "0", **settings}) as (url, key), \
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
        start = time.perf_counter()
        for _, files in studies:
            body, ctype = _stow_body(files)
            r = c.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
            if r.status_code != 200:
                raise SystemExit(f"STOW-RS answered {r.status_code}: {r.text[:300]}")
        received = time.perf_counter() - start
        receive_only = settings.get("MEDVISION_JOB_WORKERS") == "0"
        pending = set() if receive_only else {uid for uid, _ in studies}
        while pending:
            for uid in list(pending):
                if c.get(f"/v1/studies/{uid}").json()["status"] in ("scored", "failed"):
                    pending.discard(uid)
            if time.perf_counter() - start > timeout:
                raise SystemExit(f"{len(pending)} studies still unscored after {timeout:g} s")
            time.sleep(0.05)
        return {"received_s": received, "scored_s": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo_out/model.onnx")
    p.add_argument("--images", default="demo_out/data/images")
    p.add_argument("--studies", type=int, default=30, help="most studies to send")
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args()
    by_study: dict[str, list[Path]] = {}
    for f in sorted(Path(args.images).rglob("*.dcm")):
        by_study.setdefault(str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID), []).append(f)
    studies = list(by_study.items())[:args.studies]
    if not studies or not Path(args.model).is_file():
        raise SystemExit("give --model and --images (run 'make demo' first for demo_out/)")
    images = sum(len(fs) for _, fs in studies)
    cores = str(usable_cores())
    configs = {"receiving only (no job threads)": {"MEDVISION_JOB_WORKERS": "0"},
               "defaults: 1 job thread, decoding in threads": {},
               f"2 job threads, {cores} decoding processes": {"MEDVISION_JOB_WORKERS": "2",
                                                             "MEDVISION_DECODE_PROCESSES": cores,
                                                             "MEDVISION_THREADS": "1"}}
    table = Table(title=f"STOW-RS to scored with SR: {len(studies)} studies, {images} images, {cores} cores")
    for col in ("serving", "received in s", "all scored in s", "studies/s", "images/s"):
        table.add_column(col)
    for name, settings in configs.items():
        m = run(args.model, studies, settings, args.timeout)
        receive_only = settings.get("MEDVISION_JOB_WORKERS") == "0"
        wall = m["received_s"] if receive_only else m["scored_s"]
        table.add_row(name, f"{m['received_s']:.1f}", "-" if receive_only else f"{m['scored_s']:.1f}",
                      f"{len(studies) / wall:.2f}", f"{images / wall:.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
