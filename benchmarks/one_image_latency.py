"""One full-field image at a time, as the service's own process handles it: a request alone in the service, and the
review UI (opening an image in the viewer, changing its window). Each transfer syntax, two ways side by side in one
run, alternating, medians:

  each time, 1 thread   every step decodes the image again, OpenJPEG on one thread;
  the service           what the service does: OpenJPEG on every core in its own process
                        (``medvision.resolution.use_decode_threads``) and the review UI's decoded images kept in
                        memory (``serving.rendering.DecodedImages``: an image decoded once for its window presets,
                        its rendering and its heatmap; a window change decodes nothing).

    python benchmarks/one_image_latency.py --archive fullfield_archive --model demo_out/model.onnx
    python benchmarks/one_image_latency.py --json out.json          # no model: no heatmap, a 192 px contract

Steps: a request alone (read + preprocess under the model's contract), opening an image in the viewer (its window
presets, its 1024 px rendering and, with ``--model``, its heatmap; nothing decoded before) and a window change on an
image open in the viewer (one 1024 px rendering). Each step is timed as a run of its own, and every output is checked
to be the same, byte for byte, both ways.
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

from medvision.cores import usable_cores  # noqa: E402
from medvision.dicom_io import ReadLimits  # noqa: E402
from medvision.preprocess import Preprocess, PreprocessConfig  # noqa: E402
from medvision.resolution import OPENJPEG_THREADS, use_decode_threads  # noqa: E402
from medvision.serving.rendering import DecodedImages, image_info, render, render_heatmap  # noqa: E402

console = Console(width=150)
WAYS = ("each time, 1 thread", "the service")


def _steps(path: Path, engine, long_side: int) -> dict:
    """What the service's process does with one image: name -> call(images) returning something comparable."""
    limits, data = ReadLimits(), path.read_bytes()
    model = engine.preprocess if engine else Preprocess(PreprocessConfig(image_size=128, decode_long_side=long_side))
    view = model.cfg
    opened = DecodedImages(256 << 20)  # the image open in the viewer (filled by the first call)

    def request_alone(images):
        stored, meta = model.read(data, limits)
        return model(stored, meta).tobytes()

    def open_image(images):
        images = DecodedImages(256 << 20) if images else None  # nothing decoded before
        out = json.dumps(image_info(path, limits, images), sort_keys=True).encode()
        out += render(path, limits, view, 1024, images=images)
        return out + (render_heatmap(engine, path, 1024, images) if engine else b"")

    def window_change(images):
        return render(path, limits, view, 1024, 1800.0, 2400.0, opened if images else None)

    return {"request alone": request_alone, "open in the viewer": open_image, "window change": window_change}


def measure(path: Path, engine, long_side: int, rounds: int, cores: int) -> dict:
    """{step: {way: median ms}}: each step as a run of its own, the two ways taking turns by the round (a request
    alone 5 times in a row in a round, as a service answers lone requests one after another); raises if an output
    differs between them."""
    out: dict = {}
    for name, step in _steps(path, engine, long_side).items():
        times: dict = {way: [] for way in WAYS}
        first = None
        for r in range(rounds + 1):  # the first round warms up, not counted
            for way in (WAYS if r % 2 else WAYS[::-1]):
                service = way == "the service"
                use_decode_threads(cores if service else 1)
                for _ in range(5 if name == "request alone" else 1):
                    start = time.perf_counter()
                    got = step(service)
                    ms = 1000 * (time.perf_counter() - start)
                    if (first := got if first is None else first) != got:
                        raise AssertionError(f"{path.name}: {name} differs between the two ways")
                    if r:
                        times[way].append(ms)
        out[name] = {way: float(np.median(v)) for way, v in times.items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", default="fullfield_archive", help="folder of the synthetic archive (made if missing)")
    p.add_argument("--model", help="the served artifact: its contract, and heatmaps in the viewer (if it has them)")
    p.add_argument("--long-side", type=int, default=192, help="without --model: the contract (the demo student's)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--no-htj2k", action="store_true", help="skip the HTJ2K file (needs OpenJPH's ojph_compress)")
    p.add_argument("--json")
    args = p.parse_args()

    engine = None
    if args.model:
        from medvision.serving.engine import Engine

        engine = Engine(args.model)
        engine = engine if engine.has_heatmap else None
    files = build_archive(Path(args.archive), 6)
    chosen = {SHORT[syntax]: paths[0] for syntax, paths in files.items()}
    if not args.no_htj2k:
        chosen["HTJ2K"] = build_htj2k(Path(args.archive), files["1.2.840.10008.1.2.4.90"][:1])[0]
    cores = usable_cores()
    before = os.environ.get(OPENJPEG_THREADS)
    results = {}
    try:
        for name, path in chosen.items():
            console.print(f"{name}: {path}")
            results[name] = measure(path, engine, args.long_side, args.rounds, cores)
    finally:
        if before is None:
            os.environ.pop(OPENJPEG_THREADS, None)
        else:
            os.environ[OPENJPEG_THREADS] = before

    table = Table(title=f"one 3328 x 2560 image at a time, ms (median of {args.rounds}): decoded each time on 1 thread "
                        f"/ as the service does ({cores} OpenJPEG threads, the viewer's decodes kept)"
                        + ("" if engine else "; no heatmap (no --model with one)"))
    table.add_column("syntax")
    steps = list(next(iter(results.values())))
    for step in steps:
        table.add_column(step, justify="right")
    for name, by in results.items():
        table.add_row(name, *[f"{by[s][WAYS[0]]:.1f} / {by[s][WAYS[1]]:.1f} ({by[s][WAYS[0]] / by[s][WAYS[1]]:.1f}x)"
                              for s in steps])
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": cores, "heatmap": engine is not None, "ms": results}, indent=1))


if __name__ == "__main__":
    main()
