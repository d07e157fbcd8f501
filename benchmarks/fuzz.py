"""Fuzzing at scale: the byte-level targets under atheris, and every route of a live service from its OpenAPI
document under schemathesis. Prints inputs tried, findings (crashes, hangs over 10 s, 5xx), coverage; keeps each
finding under fuzz/regressions/ so the test suite replays it.

    python benchmarks/fuzz.py --runs 40000                  # each byte target, 40,000 inputs
    python benchmarks/fuzz.py --minutes 10 --api-minutes 10 --model demo_out/model.onnx

Byte targets (``fuzz/targets.py``): ``read`` (reader + preprocessing), ``stow`` (the STOW-RS multipart parser and
filing), ``dimse`` (a C-STORE data set through filing), seeded from the synthetic generator and the real corpus.
They run side by side, one per core. The corpus grows in ``--work`` and is reused by the next run.
The API run starts ``medvision serve`` on loopback with ``--model``, stores a few synthetic studies so the
study routes have real UIDs to find, and runs schemathesis (checks: not a server error, status code and content
type as documented) with an admin-scoped key.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import _free_port, wait_ready  # noqa: E402

from medvision.cores import usable_cores  # noqa: E402

console = Console(width=140)
FINDING = re.compile(r"^(crash|timeout|oom|leak)-")


def fuzz_target(target: str, work: Path, runs: int, seconds: int) -> dict:
    """One target until ``runs`` inputs (or ``seconds``) are spent; restarted after a finding, which is kept."""
    from fuzz import seeds

    seed_dir, corpus, found = work / "seeds" / target, work / "corpus" / target, work / "findings" / target
    if not seed_dir.is_dir():
        seeds.write(seed_dir, target)
    corpus.mkdir(parents=True, exist_ok=True)
    found.mkdir(parents=True, exist_ok=True)
    total, cov, ft, started, findings, slow = 0, 0, 0, time.monotonic(), [], 0
    log = (work / f"{target}.log").open("a")
    while total < runs and time.monotonic() - started < seconds:
        left_runs, left_s = runs - total, int(seconds - (time.monotonic() - started)) + 1
        cmd = [sys.executable, "-m", "fuzz.run", target, f"-runs={left_runs}", f"-max_total_time={left_s}",
               "-timeout=10", "-rss_limit_mb=4096", "-max_len=262144", "-report_slow_units=5",
               "-print_final_stats=1", f"-artifact_prefix={found}/", str(corpus), str(seed_dir)]
        before = set(found.iterdir())
        scratch = Path(tempfile.mkdtemp(prefix=f"medvision-fuzz-{target}-",
                                        dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "MEDVISION_FUZZ_TMP": str(scratch)})
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        log.write(done.stderr)
        counts = [int(n) for n in re.findall(r"stat::number_of_executed_units:\s*(\d+)", done.stderr)]
        total += counts[-1] if counts else 0
        if m := re.findall(r"cov: (\d+) ft: (\d+)", done.stderr):
            cov, ft = max(cov, int(m[-1][0])), max(ft, int(m[-1][1]))
        new = [p for p in set(found.iterdir()) - before]
        slow += sum(1 for p in new if p.name.startswith("slow-unit-"))
        for p in new:
            if FINDING.match(p.name):
                findings.append(p)
                keep = ROOT / "fuzz" / "regressions" / target / p.name
                keep.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(p, keep)
        if done.returncode == 0 or not counts:
            if not counts:
                console.print(f"[red]{target}: the fuzzer did not run[/red]\n{done.stderr[-2000:]}")
            break
    elapsed = time.monotonic() - started
    return {"target": target, "inputs": total, "seconds": round(elapsed), "per_second": round(total / max(elapsed, 1)),
            "coverage_edges": cov, "features": ft, "corpus": len(list(corpus.iterdir())),
            "crashes": sum(1 for p in findings if p.name.startswith(("crash-", "oom-", "leak-"))),
            "hangs": sum(1 for p in findings if p.name.startswith("timeout-")), "slow_over_5s": slow,
            "findings": [str(p.relative_to(work)) for p in findings]}


def fuzz_api(model: str, work: Path, seconds: int) -> dict:
    """schemathesis against a live ``medvision serve`` for ``seconds``; 5xx counted from its answers and its log."""
    import httpx
    import pydicom

    from medvision.synth.dataset import example_image
    from medvision.synth.dicom_writer import save
    from medvision.synth.vendors import VENDORS

    api = work / "api"
    shutil.rmtree(api, ignore_errors=True)
    api.mkdir(parents=True)
    env = {**os.environ, "MEDVISION_DATABASE_URL": f"sqlite:///{api / 'db.sqlite'}", "MEDVISION_DATA_DIR": str(api / "data"),
           "MEDVISION_DECODE_PROCESSES": "1", "MEDVISION_LOG_FORMAT": "text"}
    made = subprocess.run([sys.executable, "-m", "medvision.cli", "keys", "create", "fuzzer", "--scopes",
                           "score,pull,review,admin"], env=env, capture_output=True, text=True, check=True)
    key = json.loads(made.stdout)["key"]
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server_log = (api / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "medvision.cli", "serve", "--model", model, "--port", str(port)],
                            env=env, stdout=server_log, stderr=subprocess.STDOUT)
    try:
        wait_ready(base, proc, 120, f"the service (see {api / 'serve.log'})")
        # a stored study, so that the study, series and instance routes have something to find
        path = api / "seed.dcm"
        save(example_image(VENDORS[0], 128, 104, seed=3), path, "1.2.840.10008.1.2.1")
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        boundary = "seedboundary"
        body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes()
                + f"\r\n--{boundary}--\r\n".encode())
        r = httpx.post(f"{base}/dicomweb/studies", content=body, timeout=60, headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        r.raise_for_status()
        from fuzz import api as api_fuzz

        result = api_fuzz.run(base, key, api, {"study_uid": ds.StudyInstanceUID, "series_uid": ds.SeriesInstanceUID,
                                              "sop_uid": ds.SOPInstanceUID}, seconds=seconds, workers=2)
    finally:
        proc.terminate()
        proc.wait(30)
        server_log.close()
    logged_5xx = len(re.findall(r" 5\d\d [\d.]+ ms id=", (api / "serve.log").read_text()))
    return {"target": "api (schemathesis)", "inputs": result["generated"], "seconds": seconds,
            "failures": result["failures"], "server_5xx": logged_5xx, "operations": result["operations"],
            "log": str(api / "schemathesis.log")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", default="read,stow,dimse")
    p.add_argument("--runs", type=int, default=40_000, help="inputs per byte target")
    p.add_argument("--minutes", type=float, default=60, help="at most this long per byte target")
    p.add_argument("--jobs", type=int, default=usable_cores(), help="byte targets run side by side")
    p.add_argument("--model", help="an artifact to serve for the API run (none: no API run)")
    p.add_argument("--api-minutes", type=float, default=5)
    p.add_argument("--work", default="fuzz_out")
    p.add_argument("--json")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    targets = [t for t in args.targets.split(",") if t]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(lambda t: fuzz_target(t, work, args.runs, int(args.minutes * 60)), targets))
    table = Table(title="byte-level fuzzing (atheris / libFuzzer)")
    for col in ("target", "inputs", "s", "inputs/s", "coverage (edges)", "features", "corpus", "crashes",
                "hangs > 10 s", "slow > 5 s"):
        table.add_column(col)
    for r in results:
        table.add_row(r["target"], f"{r['inputs']:,}", str(r["seconds"]), str(r["per_second"]),
                      f"{r['coverage_edges']:,}", f"{r['features']:,}", str(r["corpus"]), str(r["crashes"]),
                      str(r["hangs"]), str(r["slow_over_5s"]))
    console.print(table)
    report = {"byte_targets": results, "inputs_total": sum(r["inputs"] for r in results)}
    if args.model:
        api = fuzz_api(args.model, work, int(args.api_minutes * 60))
        report["api"] = api
        report["inputs_total"] += api["inputs"]
        console.print(f"API: {api['inputs']:,} requests generated over {api['operations']} operations in "
                      f"{api['seconds']} s; failed checks: {api['failures'] or 'none'}; 5xx in the service log: "
                      f"{api['server_5xx']} (details: {api['log']})")
    found = [f for r in results for f in r["findings"]]
    console.print(f"total inputs: {report['inputs_total']:,}; findings: {len(found)} "
                  f"{'(kept under fuzz/regressions/: fix them, then tests/test_fuzz.py replays them)' if found else ''}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
