"""One full-field image at a time, as the service's own process decodes it: a request alone in the service, and the
review UI's renderings (opening an image, changing its window). Each transfer syntax, with OpenJPEG decoding on one
thread and on every core (``medvision.resolution.use_decode_threads``: what the service's process uses; its decoding
workers, one a core, use one each), side by side in one run, alternating, medians.

    python benchmarks/one_image_latency.py --archive fullfield_archive      # the archive of benchmarks/fullfield.py
    python benchmarks/one_image_latency.py --json out.json

Each step is timed as a run of its own (as a service answering such requests one after another). Columns: the model
input of a request alone (read + preprocess under the artifact's contract, ``--long-side``), the
viewer opening an image (``image_info`` and the 1024 px rendering, each a decode at 1/2) and a window change (one
1024 px rendering). Every rendering and model input is checked to be the same, byte for byte, on one thread and on
several.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fullfield import SHORT, build_archive, build_htj2k  # noqa: E402 - the full-field archive fullfield.py uses

from medvision.dicom_io import ReadLimits  # noqa: E402
from medvision.preprocess import Preprocess, PreprocessConfig  # noqa: E402
from medvision.resolution import OPENJPEG_THREADS, use_decode_threads  # noqa: E402
from medvision.serving.rendering import image_info, render  # noqa: E402

console = Console(width=150)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _steps(path: Path, long_side: int) -> dict:
    """What the service's process does with one image: name -> a call returning something comparable."""
    limits, data = ReadLimits(), path.read_bytes()
    model = Preprocess(PreprocessConfig(image_size=128, decode_long_side=long_side))
    view = PreprocessConfig()

    def request_alone():
        stored, meta = model.read(data, limits)
        return model(stored, meta).tobytes()

    def open_image():
        info = image_info(path, limits)
        return json.dumps(info, sort_keys=True).encode() + render(path, limits, view, 1024)

    def window_change():
        return render(path, limits, view, 1024, center=1800.0, width=2400.0)

    return {"request alone": request_alone, "open in the viewer": open_image, "window change": window_change}


def measure(path: Path, long_side: int, rounds: int, threads: list[int]) -> dict:
    """{step: {threads: median ms}}: each step on its own, as a run of such requests (a request alone 5x as many
    times), the threads taking turns; raises if any output differs between them."""
    out: dict = {}
    for name, step in _steps(path, long_side).items():
        times: dict = {t: [] for t in threads}
        first = None
        for r in range((5 if name == "request alone" else 1) * rounds + 1):  # the first round warms up, not counted
            for t in (threads if r % 2 else threads[::-1]):
                use_decode_threads(t)
                start = time.perf_counter()
                got = step()
                ms = 1000 * (time.perf_counter() - start)
                if (first := got if first is None else first) != got:
                    raise AssertionError(f"{path.name}: {name} differs with {t} OpenJPEG threads")
                if r:
                    times[t].append(ms)
        out[name] = {t: float(np.median(v)) for t, v in times.items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", default="fullfield_archive", help="folder of the synthetic archive (made if missing)")
    p.add_argument("--long-side", type=int, default=192, help="the model's decode contract (the demo student's)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--no-htj2k", action="store_true", help="skip the HTJ2K file (needs OpenJPH's ojph_compress)")
    p.add_argument("--json")
    args = p.parse_args()

    files = build_archive(Path(args.archive), 6)
    chosen = {SHORT[syntax]: paths[0] for syntax, paths in files.items()}
    if not args.no_htj2k:
        chosen["HTJ2K"] = build_htj2k(Path(args.archive), files["1.2.840.10008.1.2.4.90"][:1])[0]
    cores = _cores()
    threads = [1, cores] if cores > 1 else [1]
    before = os.environ.get(OPENJPEG_THREADS)
    results = {}
    try:
        for name, path in chosen.items():
            console.print(f"{name}: {path}")
            results[name] = measure(path, args.long_side, args.rounds, threads)
    finally:
        if before is None:
            os.environ.pop(OPENJPEG_THREADS, None)
        else:
            os.environ[OPENJPEG_THREADS] = before

    table = Table(title=f"one 3328 x 2560 image at a time, ms (median of {args.rounds}); OpenJPEG on 1 thread / "
                        f"{threads[-1]} (the service's process)")
    table.add_column("syntax")
    steps = list(next(iter(results.values())))
    for step in steps:
        table.add_column(step, justify="right")
    for name, by in results.items():
        table.add_row(name, *[" / ".join(f"{by[s][t]:.1f}" for t in threads)
                              + (f" ({by[s][threads[0]] / by[s][threads[-1]]:.2f}x)" if len(threads) > 1 else "")
                              for s in steps])
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": cores, "threads": threads, "long_side": args.long_side,
                                               "ms": results}, indent=1))


if __name__ == "__main__":
    main()
