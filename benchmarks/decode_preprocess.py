"""Decode + preprocess throughput: per transfer syntax, over cores, and with the decode-once cache.

    python benchmarks/decode_preprocess.py                 # 8 mammograms of 3328 x 2560, 14-bit
    python benchmarks/decode_preprocess.py --quick         # 4 smaller ones, for a smoke run
    python benchmarks/decode_preprocess.py --json out.json --plot scaling.png

Measures, side by side in one run on this machine:
1. synthetic mammograms at realistic size, each stored uncompressed, RLE, JPEG-LS and JPEG 2000
   lossless: images/s and megapixels/s through ``read_dicom`` + ``Preprocess`` (the shared path);
2. the real corpus (pydicom's and pydicom-data's image files that medvision reads): images/s per
   transfer syntax;
3. parallel scaling over 1..N worker processes and threads, for JPEG 2000, JPEG-LS and uncompressed;
4. the decode-once cache: a cold load (decode + write) against a warm load (memory-mapped read).
HTJ2K is decoded by pylibjpeg-openjpeg but no installed plugin encodes it, so it is absent from (1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless
from rich.console import Console
from rich.table import Table

from medvision.cache import ImageCache, decode_many
from medvision.cores import usable_cores
from medvision.dicom_io import read_dicom
from medvision.errors import DicomError
from medvision.plots import pyplot
from medvision.preprocess import Preprocess, PreprocessConfig
from medvision.synth.dataset import SynthConfig, generate_dataset
from medvision.synth.dicom_writer import save

SYNTAXES = {"uncompressed": ExplicitVRLittleEndian, "RLE": RLELossless, "JPEG-LS lossless": JPEGLSLossless,
            "JPEG 2000 lossless": JPEG2000Lossless}
# Scaled over workers: JPEG 2000 (openjpeg already threads one decode), JPEG-LS (CharLS, one thread),
# uncompressed (bound by preprocessing).
SCALED = ("JPEG 2000 lossless", "JPEG-LS lossless", "uncompressed")
console = Console(stderr=True)


def make_mammograms(work: Path, n: int, rows: int, cols: int) -> dict[str, list[str]]:
    """``n`` synthetic mammograms, each written in every transfer syntax of ``SYNTAXES``."""
    src = work / "synth"
    generate_dataset(SynthConfig(n_patients=max(1, n // 4), rows=rows, columns=cols, compressed_fraction=0.0,
                                 prevalence=0.5, seed=11), src, show_progress=False)
    files = sorted((src / "images").rglob("*.dcm"))[:n]
    out: dict[str, list[str]] = {}
    for name, ts in SYNTAXES.items():
        folder = work / name.replace(" ", "_")
        out[name] = []
        for i, f in enumerate(files):
            ds = pydicom.dcmread(f)
            path = folder / f"{i}.dcm"
            save(ds, path, ts)
            out[name].append(str(path))
    return out


def time_decode(paths: list[str], pre: Preprocess, workers: int, kind: str = "process", repeat: int = 1) -> float:
    """Best wall time (s) to decode + preprocess all ``paths``."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        results = decode_many(paths, pre, workers=workers, kind=kind, show_progress=False)
        best = min(best, time.perf_counter() - t)
        bad = [e for img, e in results if img is None]
        if bad:
            raise SystemExit(f"benchmark input failed to decode: {bad[0]}")
    return best


def corpus_files() -> list[str]:
    roots = []
    try:
        import data_store

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        console.print("[yellow]pydicom-data not installed: the real corpus is pydicom's bundled files only")
    roots.append(Path(pydicom.__file__).parent / "data" / "test_files")
    return sorted(str(p) for r in roots for p in r.rglob("*") if p.is_file() and p.suffix.lower() in ("", ".dcm"))


def bench_corpus(pre: Preprocess) -> dict[str, dict]:
    """Per transfer syntax: files medvision reads, their total megapixels, and images/s (one process)."""
    stats: dict[str, dict] = defaultdict(lambda: {"images": 0, "seconds": 0.0, "megapixels": 0.0})
    for f in corpus_files():
        t = time.perf_counter()
        try:
            stored, meta = read_dicom(f)
            pre(stored, meta)
        except (DicomError, OSError, ValueError):
            continue
        s = stats[pydicom.uid.UID(meta.transfer_syntax).name]
        s["images"] += 1
        s["seconds"] += time.perf_counter() - t
        s["megapixels"] += meta.rows * meta.columns / 1e6
    return {k: {**v, "images_per_s": v["images"] / v["seconds"]} for k, v in sorted(stats.items())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", default="3328x2560", help="rows x columns of the synthetic mammograms")
    ap.add_argument("--image-size", type=int, default=512, help="model input size after preprocessing")
    ap.add_argument("--quick", action="store_true", help="4 images of 1664 x 1280")
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--plot", help="write a scaling plot (PNG) here")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.size = 4, "1664x1280"
    rows, cols = (int(v) for v in args.size.lower().split("x"))
    cores = usable_cores()
    pre = Preprocess(PreprocessConfig(image_size=args.image_size))
    result: dict = {"machine": {"cores": cores, "python": sys.version.split()[0]},
                    "images": args.images, "size": [rows, cols], "model_input": args.image_size}
    work = Path(tempfile.mkdtemp(prefix="mv-bench-"))
    try:
        console.print(f"writing {args.images} synthetic mammograms of {rows} x {cols} in {len(SYNTAXES)} syntaxes ...")
        sets = make_mammograms(work, args.images, rows, cols)
        decode_many(sets["uncompressed"][:1], pre, workers=1, show_progress=False)  # warm imports

        per_syntax = {}
        for name, paths in sets.items():
            secs = time_decode(paths, pre, workers=1, repeat=2)
            mb = sum(os.path.getsize(p) for p in paths) / 1e6
            per_syntax[name] = {"images_per_s": len(paths) / secs, "megapixels_per_s": len(paths) * rows * cols / 1e6 / secs,
                                "file_mb": mb / len(paths)}
        result["synthetic_per_syntax_1_process"] = per_syntax

        scaling: dict[str, dict[str, dict[int, float]]] = {}
        for name in SCALED:
            paths = sets[name]
            scaling[name] = {"process": {}, "thread": {}}
            for kind in ("process", "thread"):
                for w in sorted({1, *range(2, cores + 1)}):
                    scaling[name][kind][w] = len(paths) / time_decode(paths, pre, workers=w, kind=kind)
        result["scaling_images_per_s"] = scaling
        j2k = sets["JPEG 2000 lossless"]

        cache_root = work / "cache"
        t = time.perf_counter()
        ImageCache(pre, cache_root).load(j2k, workers=cores, show_progress=False)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        images, _, _ = ImageCache(pre, cache_root).load(j2k, show_progress=False)
        arr = np.stack([images[i] for i in range(len(images))])
        warm = time.perf_counter() - t
        assert arr.shape[0] == len(j2k)
        result["cache"] = {"cold_s": cold, "warm_s": warm, "speedup": cold / warm, "workers": cores}

        console.print("reading the real corpus ...")
        result["corpus_1_process"] = bench_corpus(Preprocess(PreprocessConfig(image_size=args.image_size)))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    out = Console()
    t1 = Table(title=f"Synthetic mammograms {rows} x {cols} -> {args.image_size} px, 1 process")
    for c in ("transfer syntax", "images/s", "MP/s", "MB/file"):
        t1.add_column(c, justify="right")
    for name, v in per_syntax.items():
        t1.add_row(name, f"{v['images_per_s']:.2f}", f"{v['megapixels_per_s']:.1f}", f"{v['file_mb']:.1f}")
    out.print(t1)
    t2 = Table(title=f"Scaling over {cores} core(s), images/s (workers including their start-up)")
    t2.add_column("transfer syntax")
    t2.add_column("workers", justify="right")
    t2.add_column("processes", justify="right")
    t2.add_column("threads", justify="right")
    for name, by_kind in scaling.items():
        for w in by_kind["process"]:
            t2.add_row(name, str(w), f"{by_kind['process'][w]:.2f}", f"{by_kind['thread'][w]:.2f}")
    out.print(t2)
    c = result["cache"]
    out.print(f"decode-once cache, {len(j2k)} JPEG 2000 images: cold {c['cold_s']:.2f} s (decode + write, "
              f"{cores} processes), warm {c['warm_s']:.3f} s (memory-mapped read): {c['speedup']:.0f}x faster")
    t3 = Table(title="Real corpus (pydicom + pydicom-data files medvision reads), 1 process")
    for col in ("transfer syntax", "images", "images/s", "MP/s"):
        t3.add_column(col, justify="right")
    for name, v in result["corpus_1_process"].items():
        t3.add_row(name, str(v["images"]), f"{v['images_per_s']:.1f}", f"{v['megapixels'] / v['seconds']:.1f}")
    out.print(t3)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.plot:
        plt = pyplot()
        if plt is None:
            raise SystemExit("--plot needs matplotlib: pip install 'medvision[report]'")
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        for name, by_kind in scaling.items():
            for kind, style in (("process", "o-"), ("thread", "s--")):
                ws = list(by_kind[kind])
                ax.plot(ws, [by_kind[kind][w] for w in ws], style, label=f"{name}, {kind}es")
        ax.set_yscale("log")
        ax.set_xlabel("workers")
        ax.set_ylabel("images / s")
        ax.set_title(f"decode + preprocess, {rows} x {cols}")
        ax.legend(frameon=False)
        fig.tight_layout()
        fig.savefig(args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
