"""A review UI view read in the service's own thread or by a decoding worker: its time, and what is left of the
service's process meanwhile.

    python benchmarks/view_read.py --archive fullfield_archive [--long-side 1024] [--rounds 3]

OpenJPEG through Pillow holds Python's GIL for the whole of a decode. Each JPEG 2000 and HTJ2K view of the archive
(``benchmarks/fullfield.py`` makes it) is read at ``--long-side`` (the viewer's 1024 px: 1/2 of a full-field image),
alternating by the round: in the calling thread with OpenJPEG on every core (as the service's own process decodes),
and by an idle ``DecodePool`` worker (as the service reads such a view now). Meanwhile an asyncio event loop in
another thread of the process wakes every millisecond, as the service's loop would to answer its other requests; the
longest it waited past its time during each read is printed (median and worst over the reads).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archive", default="fullfield_archive")
    p.add_argument("--long-side", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    from medvision.cores import usable_cores
    from medvision.dicom_io import ReadLimits, read_dicom
    from medvision.preprocess import PreprocessConfig
    from medvision.resolution import use_decode_threads
    from medvision.serving.decode_pool import DecodePool

    groups = {name: sorted((Path(args.archive) / folder).glob("*.dcm"))
              for name, folder in (("JPEG 2000", "JPEG_2000"), ("HTJ2K", "HTJ2K"))}
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        raise SystemExit(f"no JPEG_2000/ or HTJ2K/ views under {args.archive} (benchmarks/fullfield.py --htj2k makes them)")
    cores, limits = usable_cores(), ReadLimits()
    pool = DecodePool(PreprocessConfig(), limits, cores)
    late: list[tuple[float, float]] = []  # (when, how long past its time) of each wake-up
    stop = [False]

    async def tick() -> None:
        while not stop[0]:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            late.append((now, now - t - 0.001))

    loop = threading.Thread(target=lambda: asyncio.run(tick()), daemon=True)
    loop.start()
    time.sleep(0.2)

    def timed(read, path) -> tuple[float, float]:
        t = time.perf_counter()
        read(path)
        end = time.perf_counter()
        time.sleep(0.01)  # the wake-up the read held back, recorded once it happened
        waited = [w for at, w in late if t < at <= end + 0.01]
        return 1000 * (end - t), 1000 * max(waited, default=0.0)

    ways = {  # the reading process's OpenJPEG threads, and the read
        "in the service's thread, OpenJPEG on every core": (cores, lambda f: read_dicom(f, limits, long_side=args.long_side)),
        "by an idle worker": (1, lambda f: pool.read(f, limits, args.long_side))}
    table = Table(title=f"a view read at a long side of {args.long_side} px, {cores} cores: medians")
    for col in ("views", "read", "ms", "the event loop's longest wait, ms: median (worst)"):
        table.add_column(col)
    try:
        for name, files in groups.items():
            results: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
            for r in range(args.rounds):
                for way in (list(ways) if r % 2 == 0 else list(reversed(ways))):
                    threads, read = ways[way]
                    use_decode_threads(threads)
                    results[way] += [timed(read, f) for f in files]
            use_decode_threads(1)
            for way, rs in results.items():
                table.add_row(f"{name} ({len(files)})", way, f"{statistics.median(ms for ms, _ in rs):.0f}",
                              f"{statistics.median(w for _, w in rs):.1f} ({max(w for _, w in rs):.1f})")
    finally:
        stop[0] = True
        pool.close()
    Console().print(table)


if __name__ == "__main__":
    main()
