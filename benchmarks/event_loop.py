"""How long the service's event loop stops while it scores one full-field image alone: every other request waits
that long (a health check, the next image's upload, the review UI). Several decoders hold Python's GIL for their
whole decode (CharLS for JPEG-LS, pylibjpeg-rle for RLE, pydicom's plugins for a full-size JPEG 2000): decoded in a
thread of the service's own process, they stop its event loop meanwhile. Two services side by side, each syntax:

  threads        MEDVISION_DECODE_PROCESSES=0: every image decoded in a thread of the service's process;
  the service    the default: a request alone decoded in its own thread only where the decoder lets go of the
                 GIL (uncompressed, JPEG 2000 at a reduced size), the others by a decoding worker process.

One client sends each image alone (one request at a time); another asks /healthz every 2 ms meanwhile. Printed: the
scoring request's p50 and the health check's p50 / p99 / worst, i.e. the longest the loop stood still.

    python benchmarks/event_loop.py --model demo_out/model.onnx --archive fullfield_archive
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fullfield import SHORT, build_archive  # noqa: E402 - the full-field archive fullfield.py uses
from serve_load import service  # noqa: E402

console = Console(width=150)
WAYS = {"threads": {"MEDVISION_DECODE_PROCESSES": "0"}, "the service": {}}


def measure(url: str, key: str, files: list[Path], requests: int) -> dict:
    """Each file scored alone, in turn, while /healthz is polled: latencies in ms."""
    payloads = [f.read_bytes() for f in files]
    polls: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                t = time.perf_counter()
                client.get("/healthz").raise_for_status()
                polls.append(time.perf_counter() - t)
                time.sleep(0.002)

    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/dicom"}
    scored = []
    with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
        for p in payloads:  # warm: each file once
            client.post("/v1/predict", content=p).raise_for_status()
        poller = threading.Thread(target=poll)
        poller.start()
        try:
            time.sleep(0.2)
            for i in range(requests):
                t = time.perf_counter()
                client.post("/v1/predict", content=payloads[i % len(payloads)]).raise_for_status()
                scored.append(time.perf_counter() - t)
                time.sleep(0.02)  # alone: the next one comes after a pause
        finally:
            stop.set()
            poller.join()
    ms = np.array(polls) * 1000
    return {"predict_p50_ms": 1000 * float(np.median(scored)), "health_p50_ms": float(np.median(ms)),
            "health_p99_ms": float(np.percentile(ms, 99)), "health_max_ms": float(ms.max()), "polls": len(ms)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the ONNX artifact to serve")
    ap.add_argument("--archive", default="fullfield_archive", help="full-field archive folder (made if missing)")
    ap.add_argument("--images", type=int, default=36, help="images in the archive, when it is made")
    ap.add_argument("--requests", type=int, default=24, help="scoring requests per syntax and way")
    ap.add_argument("--json", help="write the numbers here too")
    args = ap.parse_args()

    files = build_archive(Path(args.archive), args.images)
    groups = {SHORT[syntax]: sorted(paths)[:4] for syntax, paths in files.items() if paths}
    report: dict = {}
    for way, settings in WAYS.items():
        with service(args.model, settings) as (url, key):
            for name, paths in groups.items():
                console.print(f"[dim]{way}: {name}...[/dim]")
                report.setdefault(name, {})[way] = measure(url, key, paths, args.requests)
    table = Table(title="One full-field image scored alone, /healthz asked every 2 ms meanwhile (ms)")
    for col in ("transfer syntax", "way", "predict p50", "health p50", "health p99", "health worst"):
        table.add_column(col, justify="left" if col in ("transfer syntax", "way") else "right")
    for name, ways in report.items():
        for way, r in ways.items():
            table.add_row(name, way, f"{r['predict_p50_ms']:.1f}", f"{r['health_p50_ms']:.1f}",
                          f"{r['health_p99_ms']:.1f}", f"{r['health_max_ms']:.1f}")
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
