"""Full-field mammograms, served: medvision against what a team would otherwise run, side by side in one run.

    python benchmarks/fullfield.py --model demo_out/model.onnx
    python benchmarks/fullfield.py --model M --archive fullfield_archive --images 48 --seconds 20 --json out.json
    python benchmarks/fullfield.py --model M --archive small_archive --rows 512 --columns 416   # the demo's size

The archive (made once, then reused): synthetic 3328 x 2560 mammograms, about half JPEG 2000 lossless and the rest
JPEG-LS, RLE and uncompressed, as a hospital archive holds them (``--htj2k``: its JPEG 2000 views also as HTJ2K, a
group of their own; ``--jpeg-lossless``: also as JPEG Lossless SV1, the syntax of many older archives). Measured on
this machine, one after the other:

  pipeline   medvision's decode + preprocess + model in this process, one image at a time (the limit per core),
             measured before and after the served run and averaged
  medvision  `medvision serve` with its defaults, driven over HTTP at each concurrency (bare HTTP/1.1 client)
  naive      FastAPI + pydicom pixel_array + timm ViT-S/16 (and ViT-B/16) in torch fp32, one forward per request
             (benchmarks/naive_service.py), driven the same way
  score      `medvision score` over the archive (batch scoring, default workers), against the pipeline measured
             again on both sides of it
  bare       an ASGI app that only reads the body (benchmarks/bare_upload.py), 1 at a time: the HTTP floor that
             the served latency holds on top of the pipeline whatever the service does; under plain uvicorn (what
             any Python service gets) and as `medvision serve` runs uvicorn (its HTTP protocol and allocator
             settings: the service's own floor). Under medvision's HTTP also at the top concurrency, for the CPU
             receiving a body costs: with the client's own CPU (it runs on the same cores here) it bounds what the
             cores can reach over HTTP, printed next to the limit

For the whole mix and per transfer syntax: images/s, p50 / p99 latency, core-seconds per 4-view study and the cost
of 1,000 studies at --core-hour-price (default $0.05, an on-demand x86 cloud vCPU hour).

``--server-cores N``: every server (medvision, the bare app, the naive peers, `medvision score`) and the pipeline run
on the first N cores of this process's CPU affinity and the client on the others, as a PACS sending from another
machine would: the limit is then N x pipeline, and the client's CPU no longer counts against the servers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import _drive, _free_port, run_client, service_process, wait_ready  # noqa: E402 - the same client and service start as serve_load

from medvision.cores import usable_cores

console = Console(width=170)
MIX = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless: half
       "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1")  # JPEG-LS, RLE, uncompressed
SHORT = {"1.2.840.10008.1.2.4.90": "JPEG 2000", "1.2.840.10008.1.2.4.80": "JPEG-LS", "1.2.840.10008.1.2.5": "RLE",
         "1.2.840.10008.1.2.1": "uncompressed"}
HTJ2K_RPCL = "1.2.840.10008.1.2.4.202"  # HTJ2K lossless, RPCL: not in the mix (--htj2k: a group of its own)
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"  # JPEG Lossless SV1: not in the mix (--jpeg-lossless: a group of its own)


def build_archive(folder: Path, images: int, rows: int = 3328, columns: int = 2560) -> dict[str, list[Path]]:
    """``folder/<syntax>/<n>.dcm``: synthetic views ('medvision synth', full-field by default, every vendor of the generator,
    written uncompressed into ``folder/source``), each re-encoded in the syntax its place in MIX gives it. Returns
    the files per syntax."""
    import shutil

    import pydicom
    from pydicom.uid import UID

    from medvision.synth.dataset import SynthConfig, generate_dataset
    from medvision.synth.dicom_writer import save

    source = folder / "source"
    if not (source / "labels.csv").is_file():
        console.print(f"archive: synthesising {images} views of {rows} x {columns} (once)")
        generate_dataset(SynthConfig(n_patients=-(-images // 4), rows=rows, columns=columns, compressed_fraction=0.0,
                                     prevalence=0.3, seed=5), source, show_progress=True)
    originals = sorted((source / "images").rglob("*.dcm"))[:images]
    files: dict[str, list[Path]] = {}
    for i, original in enumerate(originals):
        syntax = MIX[i % len(MIX)]
        path = folder / SHORT[syntax].replace(" ", "_") / f"{i:04d}.dcm"
        files.setdefault(syntax, []).append(path)
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if syntax == "1.2.840.10008.1.2.1":
            shutil.copy(original, path)
        else:
            save(pydicom.dcmread(original), path, UID(syntax))
    return files


def build_htj2k(folder: Path, originals: list[Path]) -> list[Path]:
    """``folder/HTJ2K/<n>.dcm``: ``originals`` (JPEG 2000 views of the archive) re-encoded as HTJ2K lossless (RPCL) by
    OpenJPH's ``ojph_compress`` (Debian ``openjph-tools``; no Python package here encodes HTJ2K)."""
    import pydicom
    from pydicom.uid import UID

    from medvision.synth.dicom_writer import save

    out = []
    for original in originals:
        path = folder / "HTJ2K" / original.name
        out.append(path)
        if not path.is_file():
            save(pydicom.dcmread(original), path, UID(HTJ2K_RPCL))
    return out


def build_jpeg_lossless(folder: Path, originals: list[Path]) -> list[Path]:
    """``folder/JPEG_lossless/<n>.dcm``: ``originals`` (JPEG 2000 views of the archive) re-encoded as JPEG Lossless
    SV1 by DCMTK's ``dcmcjpeg +e1`` (pydicom has no encoder for it)."""
    import shutil
    import tempfile

    import pydicom

    from medvision.synth.dicom_writer import save

    if shutil.which("dcmcjpeg") is None:
        sys.exit("--jpeg-lossless needs DCMTK's dcmcjpeg (Debian dcmtk; scripts/system_tools.sh installs it)")
    out = []
    for original in originals:
        path = folder / "JPEG_lossless" / original.name
        out.append(path)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                ds = pydicom.dcmread(original)
                ds.decompress()
                save(ds, Path(tmp) / "raw.dcm", "1.2.840.10008.1.2.1")
                subprocess.run(["dcmcjpeg", "+e1", str(Path(tmp) / "raw.dcm"), str(path)], check=True, timeout=300)
    return out


def pipeline_rate(model: str, files: list[Path], seconds: float) -> dict:
    """One image at a time in this process, as `medvision predict` does: bytes -> model input -> probability."""
    from medvision.memory import keep_freed_memory
    from medvision.serving.engine import Engine

    keep_freed_memory()  # as `medvision serve` and `medvision score` run
    engine = Engine(model, threads=1)
    payloads = [f.read_bytes() for f in files]
    engine.predict(payloads[0])
    times, i, start = [], 0, time.perf_counter()
    while time.perf_counter() - start < seconds or i < len(payloads):
        t = time.perf_counter()
        engine.predict(payloads[i % len(payloads)])
        times.append(time.perf_counter() - t)
        i += 1
    return {"images_per_s": len(times) / sum(times), "p50_ms": 1000 * float(np.median(times)),
            "decode": engine.prepare(payloads[0])[1].decode}


def _mean_of(before: dict, after: dict) -> dict:
    """One limit from the pipeline measured before and after the served run (a shared machine's speed drifts)."""
    return {"images_per_s": (before["images_per_s"] + after["images_per_s"]) / 2,
            "p50_ms": (before["p50_ms"] + after["p50_ms"]) / 2, "decode": before["decode"],
            "runs": [before["images_per_s"], after["images_per_s"]]}


@contextmanager
def naive(model_name: str):
    with peer("naive_service:app", {"NAIVE_MODEL": model_name}, "the naive service") as (url, key, _):
        yield url, key


@contextmanager
def peer(app: str, env: dict[str, str], what: str, medvision_http: bool = False):
    """An ASGI app of this folder under uvicorn in a process of its own: (url, key, process) once it answers. With
    ``medvision_http``, as `medvision serve` runs uvicorn: its HTTP protocol (``serving.http_server``) and its
    allocator settings (``medvision.memory``)."""
    port = _free_port()
    folder = str(Path(__file__).resolve().parent)
    if medvision_http:
        command = ["-c", "import uvicorn; from medvision.serving.http_server import chunked_body_protocol; "
                   "from medvision.memory import keep_freed_memory; keep_freed_memory(); "
                   f"uvicorn.run({app!r}, app_dir={folder!r}, port={port}, log_level='warning', "
                   "http=chunked_body_protocol() or 'auto')"]
    else:
        command = ["-m", "uvicorn", app, "--app-dir", folder, "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen([sys.executable, *command],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, 180, what)
        yield url, "none", proc
    finally:
        proc.terminate()
        proc.wait(30)


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of one process (not its children), from /proc; None where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drive(url: str, key: str, files: list[Path], levels: list[int], seconds: float, limit: int,
          server_pid: int | None = None) -> dict:
    """Each concurrency in turn, after a warm-up at it (not measured: a service's decoding processes, allocator and
    database come up to speed on their first requests, which a short level would otherwise be mostly made of):
    images/s, latencies, the client's share of the cores and, with ``server_pid``, the CPU that server process spent
    per request (its own, not its children's)."""
    payloads = [f.read_bytes() for f in files]
    out = {}
    for c in levels:
        run_client(_drive(url, key, payloads, c, min(3.0, seconds / 5), max(2 * c, len(payloads))))
        # CPU over the counted requests only: each connection's first request, sent one at a time (alone in the
        # service, so decoded in its own process), is not counted
        server_cpu = (lambda: _cpu_s(server_pid)) if server_pid and _cpu_s(server_pid) is not None else None
        r = run_client(_drive(url, key, payloads, c, seconds, limit, server_cpu))
        r["client_cores"] = r.pop("client_cpu_s") / r["wall_s"]  # what the client took of the machine's cores
        server = r.pop("server_cpu_s", None)
        if server is not None and r["requests"]:
            r["server_ms_per_request"] = 1000 * server / r["requests"]
        r.pop("latencies_ms")
        out[c] = r
    return out


def score_rate(model: str, files: list[Path], work: Path, copies: int = 8) -> dict:
    """`medvision score` over ``copies`` x the archive (hard links under new names: `score` resolves symbolic links
    and scores a file once, and a result under another name is not done yet): the rate it reports, from the first
    image decoded to the last row written (model loading not counted)."""
    import shutil

    links = work / "score_in"
    shutil.rmtree(links, ignore_errors=True)
    names = []
    for k in range(copies):
        for f in files:
            link = links / str(k) / f.parent.name / f.name
            link.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f.resolve(), link)
            except OSError:  # another file system: a copy
                shutil.copy(f, link)
            names.append(str(link))
    out = work / "score_out"
    shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run([sys.executable, "-m", "medvision.cli", "score", *names, "--model", model,
                           "--out", str(out), "--no-progress"], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr[-500:]}
    summary = json.loads(done.stdout)
    if summary.get("processed_now") != len(names):
        return {"error": f"score processed {summary.get('processed_now')} of the {len(names)} files given"}
    return {"images_per_s": summary["images_per_s"], "images": len(names), "scored": summary.get("scored_now"),
            "decode_ms_per_image": summary.get("decode_ms_per_image")}


def pin(cpus: set[int] | None) -> None:
    """This process, and what it starts from now on, on ``cpus`` (None: left as it is)."""
    if cpus:
        os.sched_setaffinity(0, cpus)


def split_cores(server_cores: int) -> tuple[set[int] | None, set[int] | None]:
    """(the servers' cores, the client's) for ``--server-cores``: the first ``server_cores`` of this process's
    affinity and the rest; (None, None) for 0 (everything shares every core)."""
    if not server_cores:
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if not 1 <= server_cores < len(cpus):
        raise SystemExit(f"--server-cores {server_cores}: give 1 to {len(cpus) - 1} (this process may run on "
                         f"{len(cpus)} cores, and the client needs at least one of its own)")
    return set(cpus[:server_cores]), set(cpus[server_cores:])


@contextmanager
def started_on(server: AbstractContextManager, cores: tuple[set[int] | None, set[int] | None]):
    """``server`` (a context manager that starts a server process) started on ``cores[0]``; the body (the client)
    runs on ``cores[1]``."""
    pin(cores[0])
    try:
        with server as value:
            pin(cores[1])
            yield value
    finally:
        pin(cores[0])


def costs(images_per_s: float, cores: int, price: float) -> dict:
    core_s_per_study = 4 * cores / images_per_s if images_per_s else float("inf")
    return {"core_s_per_study": core_s_per_study, "usd_per_1000_studies": core_s_per_study * 1000 / 3600 * price}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo_out/model.onnx", help="the served (promoted) artifact")
    p.add_argument("--archive", default="fullfield_archive", help="folder of the synthetic archive (made if missing)")
    p.add_argument("--images", type=int, default=36, help="archive size (a multiple of 6 keeps the mix exact)")
    p.add_argument("--rows", type=int, default=3328, help="image size of a new archive (the demo's: 512 x 416)")
    p.add_argument("--columns", type=int, default=2560)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--seconds", type=float, default=20.0, help="per level")
    p.add_argument("--requests", type=int, default=5000, help="most requests per level")
    p.add_argument("--naive-models", default="vit_small_patch16_224,vit_base_patch16_224")
    p.add_argument("--per-syntax", action="store_true", help="also drive each transfer syntax alone")
    p.add_argument("--only", help="comma-separated groups to run (mix, 'JPEG 2000', JPEG-LS, RLE, uncompressed, HTJ2K, "
                   "'JPEG lossless')")
    p.add_argument("--htj2k", action="store_true", help="also an HTJ2K group (not in the mix): the archive's JPEG 2000 "
                   "views re-encoded as HTJ2K lossless by ojph_compress (Debian openjph-tools)")
    p.add_argument("--jpeg-lossless", action="store_true", help="also a JPEG lossless group (not in the mix): the "
                   "archive's JPEG 2000 views re-encoded as JPEG Lossless SV1 by DCMTK's dcmcjpeg")
    p.add_argument("--naive-per-syntax", default="vit_small_patch16_224",
                   help="naive peers driven for each syntax alone (every --naive-models one: 'all')")
    p.add_argument("--core-hour-price", type=float, default=0.05)
    p.add_argument("--server-cores", type=int, default=0,
                   help="servers and pipeline on this many cores, the client on the others (0: all share every core)")
    p.add_argument("--json")
    args = p.parse_args()
    on = split_cores(args.server_cores)
    cores = args.server_cores or usable_cores()
    levels = [int(c) for c in args.concurrency.split(",")]
    archive = Path(args.archive)
    by_syntax = build_archive(archive, args.images, args.rows, args.columns)
    every = sorted(f for fs in by_syntax.values() for f in fs)
    groups = {"mix": every, **({SHORT[s]: fs for s, fs in by_syntax.items()} if args.per_syntax or args.only else {})}
    if args.htj2k:
        groups["HTJ2K"] = build_htj2k(archive, by_syntax["1.2.840.10008.1.2.4.90"])
    if args.jpeg_lossless:
        groups["JPEG lossless"] = build_jpeg_lossless(archive, by_syntax["1.2.840.10008.1.2.4.90"])
    if args.only:
        groups = {k: v for k, v in groups.items() if k in {g.strip() for g in args.only.split(",")}}
    per_syntax_peers = args.naive_models.split(",") if args.naive_per_syntax == "all" else \
        args.naive_per_syntax.split(",")

    report: dict = {"cores": cores, "images": len(every), "size": f"{args.rows} x {args.columns}",
                    "core_hour_price": args.core_hour_price, "client_on_other_cores": bool(args.server_cores),
                    **({"server_cpus": sorted(on[0]), "client_cpus": sorted(on[1])} if args.server_cores else {}),
                    "mix": {SHORT[s]: len(fs) for s, fs in by_syntax.items()}, "groups": {}}
    pin(on[0])  # the pipeline runs where the servers do
    for name, files in groups.items():
        before = pipeline_rate(args.model, files, args.seconds / 2)
        with started_on(service_process(args.model, {}), on) as (url, key, proc):
            medvision = drive(url, key, files, levels, args.seconds, args.requests, server_pid=proc.pid)
        after = pipeline_rate(args.model, files, args.seconds / 2)  # the limit on both sides of the served run
        g = report["groups"][name] = {"pipeline": _mean_of(before, after), "medvision": medvision}
        with started_on(peer("bare_upload:app", {}, "the bare upload app"), on) as (url, key, _):  # the HTTP floor
            g["bare upload"] = drive(url, key, files, [1], args.seconds / 2, args.requests)
        with started_on(peer("bare_upload:app", {}, "the bare upload app", medvision_http=True), on) as (url, key, proc):
            # at 1 at a time (its latency) and at the top concurrency (its CPU per request: what receiving costs)
            g["bare upload, medvision's HTTP"] = drive(url, key, files, sorted({1, levels[-1]}), args.seconds / 2,
                                                        args.requests, server_pid=proc.pid)
        for model_name in args.naive_models.split(","):
            if name != "mix" and model_name not in per_syntax_peers:
                continue  # per syntax: the ViT-S peer only unless asked (time)
            with started_on(naive(model_name), on) as (url, key):
                g[f"naive {model_name.split('_patch')[0]}"] = drive(url, key, files, levels, args.seconds,
                                                                     args.requests)
        if name == "mix":  # its own limit, measured on both sides of it: minutes after the served run's
            before = pipeline_rate(args.model, files, args.seconds / 2)
            g["score"] = score_rate(args.model, files, archive)
            g["score"]["pipeline"] = _mean_of(before, pipeline_rate(args.model, files, args.seconds / 2))
    _print(report, levels)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def _print(report: dict, levels: list[int]) -> None:
    cores, price = report["cores"], report["core_hour_price"]
    shared = not report.get("client_on_other_cores")  # the client's CPU is taken from the servers' cores
    for name, g in report["groups"].items():
        pipe = g["pipeline"]
        limit = cores * pipe["images_per_s"]
        table = Table(title=f"{name} ({'; '.join(f'{k} {v}' for k, v in report['mix'].items()) if name == 'mix' else name}"
                      f", {report['size']}): pipeline {pipe['images_per_s']:.1f} img/s per core "
                      f"({' / '.join(f'{r:.1f}' for r in pipe.get('runs', []))} before / after; p50 {pipe['p50_ms']:.1f} ms, "
                      f"decode {pipe['decode']}); limit {cores} cores x pipeline = {limit:.1f} img/s")
        for col in ("system", "conc.", "img/s", "p50 ms", "p99 ms", "core-s / study", "$ / 1,000 studies", "x naive ViT-S",
                    "% of limit", "client cores", "% of cores left"):
            table.add_column(col, no_wrap=True)
        base = g.get("naive vit_small", {})
        for system, runs in g.items():
            if system in ("pipeline", "score") or system.startswith("bare upload"):
                continue
            for c in levels:
                r = runs[c]
                cst = costs(r["images_per_s"], cores, price)
                ratio = r["images_per_s"] / base[c]["images_per_s"] if base.get(c, {}).get("images_per_s") else float("nan")
                table.add_row(system, str(c), f"{r['images_per_s']:.2f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}",
                              f"{cst['core_s_per_study']:.2f}", f"{cst['usd_per_1000_studies']:.4f}", f"{ratio:.1f}",
                              f"{100 * r['images_per_s'] / limit:.0f}", f"{r.get('client_cores', 0):.2f}",
                              f"{100 * r['images_per_s'] / ((cores - shared * r.get('client_cores', 0)) * pipe['images_per_s']):.0f}")
        if "score" in g and "images_per_s" in g["score"]:
            s = g["score"]
            cst = costs(s["images_per_s"], cores, price)
            own = s.get("pipeline", pipe)
            table.add_row("medvision score", "-", f"{s['images_per_s']:.2f}", "-", "-", f"{cst['core_s_per_study']:.2f}",
                          f"{cst['usd_per_1000_studies']:.4f}", "-",
                          f"{100 * s['images_per_s'] / (cores * own['images_per_s']):.0f} (limit "
                          f"{cores * own['images_per_s']:.1f})")
        console.print(table)
        if not shared:
            console.print(f"  the servers and the pipeline on {cores} core(s) ({', '.join(map(str, report['server_cpus']))}), "
                          f"the client on the others ({', '.join(map(str, report['client_cpus']))})")
        _print_reachable(g, pipe, cores, levels[-1], shared)
        own_floor = g.get("bare upload, medvision's HTTP", {}).get(1)
        if "bare upload" in g and own_floor and 1 in g["medvision"]:
            served, floor = g["medvision"][1]["p50_ms"], own_floor["p50_ms"]
            console.print(f"  1 at a time: medvision p50 {served:.1f} ms = pipeline {pipe['p50_ms']:.1f} + receiving the "
                          f"body over HTTP (a bare app on medvision's HTTP server: {floor:.1f}; on plain uvicorn: "
                          f"{g['bare upload'][1]['p50_ms']:.1f}) + {served - pipe['p50_ms'] - floor:+.1f} ms of its own "
                          "(keys, bookkeeping, answer)")


def _print_reachable(g: dict, pipe: dict, cores: int, c: int, shared: bool = True) -> None:
    """What the cores can reach over HTTP at concurrency ``c``: each image costs the pipeline, the server's CPU to
    receive its body (the bare app on medvision's HTTP, measured at ``c``) and, when the client runs on the same
    cores (``shared``), the client's CPU to send it."""
    bare, served = g.get("bare upload, medvision's HTTP", {}).get(c), g["medvision"].get(c)
    if not bare or not served or "server_ms_per_request" not in bare or not served.get("images_per_s"):
        return
    client_ms = 1000 * served["client_cores"] / served["images_per_s"] if shared else 0.0
    per_image_ms = 1000 / pipe["images_per_s"] + bare["server_ms_per_request"] + client_ms
    reachable = cores * 1000 / per_image_ms
    main_ms = served.get("server_ms_per_request", float("nan"))
    # on one core the service decodes in its own threads (no decoding processes): its process's CPU holds the pipeline
    inside = 1000 / pipe["images_per_s"] if cores == 1 else 0.0
    console.print(f"  {c} at once: the cores can reach {reachable:.1f} img/s over HTTP ({100 * reachable / (cores * pipe['images_per_s']):.0f} "
                  f"% of the limit: per image the pipeline {1000 / pipe['images_per_s']:.1f} ms + receiving the body "
                  f"{bare['server_ms_per_request']:.1f} (a bare app on medvision's HTTP)"
                  + (f" + the client sending it {client_ms:.1f} ms of a core" if shared else "; the client on other cores")
                  + f"); medvision {served['images_per_s']:.1f} = "
                  f"{100 * served['images_per_s'] / reachable:.0f} % of it. Its main process: {main_ms:.1f} ms of a core "
                  f"a request ({main_ms - bare['server_ms_per_request'] - inside:+.1f} over the bare app"
                  + (" and the pipeline, which it runs in its own threads on one core" if inside else "")
                  + ": keys, bookkeeping, batching, answer)")


if __name__ == "__main__":
    main()
