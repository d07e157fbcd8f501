"""C-STORE reception: instances per second medvision's DICOM node acknowledges, against dcmtk's storescp writing to
the same disk, in one run.

    python benchmarks/dimse_receive.py --model demo_out/model.onnx --archive fullfield_archive

The same full-field files (the archive of benchmarks/fullfield.py: 3328 x 2560, mixed transfer syntaxes) are sent
by several storescu processes at once (one association each), first to storescp, then to `medvision serve` with
its DICOM node on, whose job workers score what arrives behind the reception. A sender's clock stops when its last
instance is acknowledged (for medvision: written, fsynced and recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fullfield import SHORT, build_archive  # noqa: E402
from serve_load import _free_port, wait_ready  # noqa: E402

console = Console()
FLAG = {"1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.5": "-xr",
        "1.2.840.10008.1.2.1": "-xe"}


def send(port: int, groups: list[list[Path]], called: str) -> float:
    """Each group over its own association, all at once; seconds until the last is acknowledged."""
    import pydicom

    flags = [FLAG[str(pydicom.dcmread(g[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)] for g in groups]
    start = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", "BENCH", "-aec", called, flag, "127.0.0.1", str(port),
                               *map(str, files)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for flag, files in zip(flags, groups, strict=True)]
    for p in procs:
        if p.wait(600) != 0:
            raise SystemExit(f"storescu failed: {p.stderr.read().decode()[-400:]}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo_out/model.onnx")
    p.add_argument("--archive", default="fullfield_archive")
    p.add_argument("--images", type=int, default=36)
    p.add_argument("--associations", type=int, default=4)
    p.add_argument("--json")
    args = p.parse_args()
    by_syntax = build_archive(Path(args.archive), args.images)
    # one association per transfer syntax group slice: storescu proposes one syntax per run
    groups = []
    for files in by_syntax.values():
        per = max(1, len(files) // max(1, args.associations // len(by_syntax) or 1))
        groups += [files[i:i + per] for i in range(0, len(files), per)]
    n = sum(len(g) for g in groups)
    work = Path(tempfile.mkdtemp(prefix="mv-dimse-bench-"))

    dcmtk = {}
    for mode in ("--single-process", "--fork"):  # storescp's default, and a process per association
        port = _free_port()
        out = work / f"storescp{mode}"
        out.mkdir()
        scp = subprocess.Popen(["storescp", mode, "-aet", "STORESCP", "-od", str(out), "+xa", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        try:
            dcmtk[mode] = send(port, groups, "STORESCP")
        finally:
            scp.terminate()
            scp.wait(30)
    dcmtk_s = min(dcmtk.values())  # the faster of the two is the bar

    port, http_port = _free_port(), _free_port()
    env = {**os.environ, "MEDVISION_DATABASE_URL": f"sqlite:///{work / 'db.sqlite'}",
           "MEDVISION_DATA_DIR": str(work / "data"), "MEDVISION_DIMSE_PORT": str(port),
           "MEDVISION_DIMSE_CALLERS": "BENCH=bench", "MEDVISION_LOG_LEVEL": "warning",
           "MEDVISION_DIMSE_MIN_FREE_BYTES": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "medvision.cli", "serve", "--model", args.model, "--port",
                             str(http_port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(f"http://127.0.0.1:{http_port}", proc, 90)
    try:
        medvision_s = send(port, groups, "MEDVISION")
    finally:
        proc.terminate()
        proc.wait(60)
    report = {"instances": n, "associations": len(groups),
              "storescp_single_process_per_s": n / dcmtk["--single-process"], "storescp_fork_per_s": n / dcmtk["--fork"],
              "medvision_per_s": n / medvision_s, "ratio": dcmtk_s / medvision_s,
              "mix": {SHORT[s]: len(f) for s, f in by_syntax.items()}}
    console.print(f"{n} full-field instances over {len(groups)} associations at once: dcmtk storescp "
                  f"{report['storescp_single_process_per_s']:.1f} instances/s (default, one process), "
                  f"{report['storescp_fork_per_s']:.1f} instances/s (--fork, no fsync); medvision "
                  f"{report['medvision_per_s']:.1f} instances/s (acknowledged after fsync and a database row; "
                  f"scoring behind) = {100 * report['ratio']:.0f} % of the faster storescp")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
