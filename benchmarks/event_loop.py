"""How long the service's event loop stops while it scores one full-field image alone: every other request waits
that long (a health check, the next image's upload, the review UI). Some decoders hold Python's GIL for their whole
decode (pydicom's plugins for a full-size JPEG 2000; OpenJPEG through Pillow for a reduced one; pyjpegls and
pylibjpeg-rle, pydicom's own JPEG-LS and RLE plugins, where imagecodecs is not installed): decoded in a thread of the
service's own process, they stop its event loop meanwhile. Two services run side by side, each syntax's requests alternating between them by the round:

  threads        MEDVISION_DECODE_PROCESSES=0: every image decoded in a thread of the service's process;
  the service    the default: a request alone decoded in its own thread only where the decoder lets go of the
                 GIL (uncompressed, JPEG-LS, RLE and JPEG through imagecodecs) or holds it briefly (JPEG 2000 at a
                 small reduced size: resolution.J2K_IN_THREAD_PIXELS), the others by a decoding worker process.

One client sends each image alone (one request at a time); each service is asked /healthz every 2 ms throughout, and
the answers that overlapped a scoring request of that service are kept. Printed: the health check's p50 / p99 /
worst while an image was being scored (the worst: the longest the loop stood still) and the scoring p50 (the two
services receive bodies differently: shared memory for the workers, in memory for threads, so it is not a like-for-
like comparison of scoring).

    python benchmarks/event_loop.py --model demo_out/model.onnx --archive fullfield_archive
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fullfield import SHORT, build_archive, build_jpeg_lossless  # noqa: E402 - the full-field archive fullfield.py uses
from serve_load import service  # noqa: E402

console = Console(width=150)
WAYS = {"threads": {"MEDVISION_DECODE_PROCESSES": "0"}, "the service": {}}


class Poller:
    """/healthz of one service asked every 2 ms in a thread of its own: (start, end) of each answer, seconds."""

    def __init__(self, url: str) -> None:
        self.url, self.answers, self.stop = url, [], threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                t = time.perf_counter()
                client.get("/healthz").raise_for_status()
                self.answers.append((t, time.perf_counter()))
                time.sleep(0.002)

    def during(self, spans: list[tuple[float, float]]) -> np.ndarray:
        """The latencies (ms) of the answers that overlapped one of ``spans``."""
        return np.array([1000 * (e - s) for s, e in self.answers if any(s < b and e > a for a, b in spans)])

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def measure(services: dict, files: list[Path], rounds: int) -> dict:
    """Each file scored alone, in turn, alternating between the services by the round: per service, the health
    checks' latencies while a request was in flight, and the scoring latencies (ms)."""
    payloads = [f.read_bytes() for f in files]
    spans: dict[str, list] = {way: [] for way in services}
    clients = {way: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}",
                                                        "Content-Type": "application/dicom"}, timeout=120)
               for way, (url, key, _) in services.items()}
    try:
        for client in clients.values():  # warm: each file once
            for p in payloads:
                client.post("/v1/predict", content=p).raise_for_status()
        order = list(services)
        for r in range(rounds):
            for way in (order if r % 2 == 0 else order[::-1]):
                time.sleep(0.02)  # alone: after a pause
                t = time.perf_counter()
                clients[way].post("/v1/predict", content=payloads[r % len(payloads)]).raise_for_status()
                spans[way].append((t, time.perf_counter()))
    finally:
        for client in clients.values():
            client.close()
    out = {}
    for way, (_, _, poller) in services.items():
        ms = poller.during(spans[way])
        scored = [1000 * (e - s) for s, e in spans[way]]
        out[way] = {"predict_p50_ms": float(np.median(scored)), "health_p50_ms": float(np.median(ms)),
                    "health_p99_ms": float(np.percentile(ms, 99)), "health_max_ms": float(ms.max()),
                    "polls": len(ms)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the ONNX artifact to serve")
    ap.add_argument("--archive", default="fullfield_archive", help="full-field archive folder (made if missing)")
    ap.add_argument("--images", type=int, default=36, help="images in the archive, when it is made")
    ap.add_argument("--requests", type=int, default=24, help="scoring requests per syntax and way (rounds)")
    ap.add_argument("--only", help="comma-separated groups (the archive's syntaxes, 'JPEG lossless': its JPEG 2000 "
                    "views re-encoded by DCMTK's dcmcjpeg); default: the archive's syntaxes")
    ap.add_argument("--json", help="write the numbers here too")
    args = ap.parse_args()

    files = build_archive(Path(args.archive), args.images)
    groups = {SHORT[syntax]: sorted(paths)[:4] for syntax, paths in files.items() if paths}
    if args.only:
        wanted = [g.strip() for g in args.only.split(",")]
        if "JPEG lossless" in wanted:
            groups["JPEG lossless"] = build_jpeg_lossless(Path(args.archive), files["1.2.840.10008.1.2.4.90"])[:4]
        groups = {name: groups[name] for name in wanted}
    with ExitStack() as stack:
        services = {}
        for way, settings in WAYS.items():
            url, key = stack.enter_context(service(args.model, settings))
            poller = Poller(url)
            stack.callback(poller.close)
            services[way] = (url, key, poller)
        report = {}
        for name, paths in groups.items():
            console.print(f"[dim]{name}...[/dim]")
            report[name] = measure(services, paths, args.requests)
    table = Table(title="One full-field image scored alone: /healthz, asked every 2 ms, while it was scored (ms)")
    for col in ("transfer syntax", "way", "health p50", "health p99", "health worst", "scoring p50"):
        table.add_column(col, justify="left" if col in ("transfer syntax", "way") else "right")
    for name, ways in report.items():
        for way, r in ways.items():
            table.add_row(name, way, f"{r['health_p50_ms']:.1f}", f"{r['health_p99_ms']:.1f}",
                          f"{r['health_max_ms']:.1f}", f"{r['predict_p50_ms']:.1f}")
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
