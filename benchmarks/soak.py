"""Overload soak: the service driven at twice its capacity for minutes, then left alone. Does it hold?

    python benchmarks/soak.py --model demo_out/model.onnx --images demo_out/data/images --minutes 10

1. Capacity: `medvision serve` (its own process, its defaults) driven closed-loop at 4 x cores requests in flight
   for ``--capacity-seconds``: the images/s it answers 200 is its capacity C.
2. Soak: requests sent open-loop at ``--factor`` x C (default 2) for ``--minutes``, whatever the answers. Every
   answer is classified: 200; 429 / 503 with Retry-After (acceptable refusals of an overloaded service); anything
   else, a 503 without Retry-After, or a dropped connection is unacceptable. Each second: answers, p99 of the
   accepted, the service's resident memory (its process and its decoding workers), the queue depth (/metrics).
3. Recovery: one request at a time after the load stops, until the median of five answers is within 1.5 x the
   single-request latency measured before the soak: the seconds that took.
Printed: answers by status, unacceptable count, p50 / p99 of accepted requests (first and last minute), resident
memory after the first minute and at the end (growth %), deepest queue, recovery time; a plot (soak.png) and the
per-second series (soak.json) in ``--out``. The client shares the machine with the service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import _Connection, service_process  # noqa: E402

from medvision.cores import usable_cores

console = Console(width=140)


def _rss_mb(pid: int) -> float:
    import psutil

    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
    except psutil.NoSuchProcess:
        return float("nan")


async def _queue_depth(client) -> float:
    try:
        text = (await client.get("/metrics", timeout=2)).text
    except Exception:
        return float("nan")
    m = re.search(r"^medvision_queue_depth (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else float("nan")


class Pool:
    """Bare HTTP/1.1 keep-alive connections (``serve_load._Connection``), opened as needed and reused newest first:
    the load generator shares the service's cores and must not be the bottleneck (httpx spends ~3 ms of a core per
    request here, more with a thousand connections open, and its waits would be billed to the service)."""

    def __init__(self, url: str, key: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port, self.key = host, int(port), key
        self.idle: list[_Connection] = []

    async def post(self, body: bytes) -> tuple[int, dict[str, str]]:
        conn = self.idle.pop() if self.idle else _Connection(self.host, self.port, self.key)
        try:
            answer = await conn.request("/v1/predict", body, retry=False)
        except BaseException:
            await conn.close()
            raise
        self.idle.append(conn)
        return answer

    async def close(self) -> None:
        for conn in self.idle:
            await conn.close()


async def capacity(client, payloads: list[bytes], seconds: float, inflight: int) -> float:
    ok, deadline = 0, time.monotonic() + seconds

    async def worker(k: int) -> None:
        nonlocal ok
        i = k
        while time.monotonic() < deadline:
            status, _ = await client.post(payloads[i % len(payloads)])
            ok += status == 200
            i += inflight

    start = time.monotonic()
    await asyncio.gather(*(worker(k) for k in range(inflight)))
    return ok / (time.monotonic() - start)


async def single_latency(client, payload: bytes, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await client.post(payload)
        out.append(1000 * (time.perf_counter() - t))
    return out


async def soak(client, monitor, payloads: list[bytes], rate: float, seconds: float, pid: int,
               max_inflight: int) -> dict:
    """Open loop at ``rate`` requests/s for ``seconds``; per-second series (``monitor``: a client of its own for
    /metrics, so sampling never waits behind the load)."""
    series: list[dict] = []
    current = {"t": 0, "200": 0, "429": 0, "503": 0, "bad": 0, "lat": []}
    bad_examples: list[str] = []
    tasks: set[asyncio.Task] = set()
    skipped = 0

    async def one(n: int) -> None:
        t = time.perf_counter()
        try:
            code, headers = await asyncio.wait_for(client.post(payloads[n % len(payloads)]), 120)
        except Exception as exc:  # a dropped connection or a hang (TimeoutError) is unacceptable
            current["bad"] += 1
            if len(bad_examples) < 10:
                bad_examples.append(type(exc).__name__)
            return
        if code == 200:
            current["200"] += 1
            current["lat"].append(1000 * (time.perf_counter() - t))
        elif code in (429, 503) and headers.get("retry-after"):
            current[str(code)] += 1
        else:
            current["bad"] += 1
            if len(bad_examples) < 10:
                bad_examples.append(str(code))

    async def sampler() -> None:
        nonlocal current
        begun, second, depth = time.monotonic(), 0, float("nan")
        polling = None
        while True:
            second += 1
            await asyncio.sleep(max(0.0, begun + second - time.monotonic()))
            if polling is not None and polling.done():
                depth = polling.result()
            if polling is None or polling.done():
                polling = asyncio.create_task(_queue_depth(monitor))
            done, current = current, {"t": second, "200": 0, "429": 0, "503": 0, "bad": 0, "lat": []}
            lat = done.pop("lat")
            done.update(p99_ms=float(np.percentile(lat, 99)) if lat else None, lat=lat, rss_mb=_rss_mb(pid),
                        queue=depth, inflight=len(tasks))
            series.append(done)

    sampling = asyncio.create_task(sampler())
    start, n = time.perf_counter(), 0
    while (now := time.perf_counter() - start) < seconds:
        due = int(now * rate)
        while n < due:
            if len(tasks) >= max_inflight:  # the client's own bound: counted, never silently dropped
                skipped += 1
            else:
                task = asyncio.create_task(one(n))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            n += 1
        await asyncio.sleep(0.002)
    if tasks:
        await asyncio.wait(tasks, timeout=180)
    await asyncio.sleep(1.05)
    sampling.cancel()
    return {"series": series, "sent": n - skipped, "client_skipped": skipped, "bad_examples": bad_examples}


async def recovery(client, payload: bytes, baseline_ms: float, limit_s: float) -> float | None:
    """Seconds after the load stopped until the median of the last five single requests is within 1.5 x baseline."""
    start, recent = time.perf_counter(), []
    while time.perf_counter() - start < limit_s:
        t = time.perf_counter()
        await client.post(payload)
        recent = [*recent[-4:], 1000 * (time.perf_counter() - t)]
        if len(recent) == 5 and np.median(recent) <= 1.5 * baseline_ms:
            return time.perf_counter() - start
    return None


def plot(series: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in series]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(t, [s["200"] for s in series], label="200")
    axes[0].plot(t, [s["429"] + s["503"] for s in series], label="429 / 503 + Retry-After")
    axes[0].plot(t, [s["bad"] for s in series], label="unacceptable", color="red")
    axes[0].set_ylabel("answers / s")
    axes[0].legend()
    axes[1].plot(t, [s["p99_ms"] if s["p99_ms"] is not None else np.nan for s in series])
    axes[1].set_ylabel("p99 accepted (ms)")
    axes[2].plot(t, [s["rss_mb"] for s in series])
    axes[2].set_ylabel("service RSS (MB)")
    axes[2].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--images", required=True, help="a folder of DICOM files to send (e.g. demo_out/data/images)")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--factor", type=float, default=2.0, help="offered load, as a multiple of the measured capacity")
    p.add_argument("--capacity-seconds", type=float, default=30)
    p.add_argument("--max-inflight", type=int, default=1024)
    p.add_argument("--out", default="soak_out")
    args = p.parse_args()
    import httpx

    files = sorted(Path(args.images).rglob("*.dcm"))[:200]
    if not files:
        raise SystemExit(f"no .dcm files under {args.images}")
    payloads = [f.read_bytes() for f in files]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cores = usable_cores()

    async def run(url: str, key: str, pid: int) -> dict:
        auth = {"Authorization": f"Bearer {key}"}
        client = Pool(url, key)
        async with httpx.AsyncClient(base_url=url, headers=auth, timeout=5) as monitor:
            await single_latency(client, payloads[0], 5)  # warm up
            base = float(np.median(await single_latency(client, payloads[0], 20)))
            cap = await capacity(client, payloads, args.capacity_seconds, 4 * cores)
            console.print(f"capacity {cap:.1f} images/s; single-request latency {base:.1f} ms; soaking at "
                          f"{args.factor:g} x = {args.factor * cap:.1f} requests/s for {args.minutes:g} min")
            result = await soak(client, monitor, payloads, args.factor * cap, 60 * args.minutes, pid,
                                args.max_inflight)
            rec = await recovery(client, payloads[0], base, 120)
            await client.close()
            return {"capacity_images_per_s": cap, "baseline_ms": base, "recovery_s": rec, **result}

    with service_process(args.model, {}, scopes="score,admin") as (url, key, proc):
        rss_start = _rss_mb(proc.pid)
        report = asyncio.run(run(url, key, proc.pid))
    series = report["series"]
    totals = {k: sum(s[k] for s in series) for k in ("200", "429", "503", "bad")}
    lat_first = [x for s in series[:60] for x in s["lat"]]
    lat_last = [x for s in series[-60:] for x in s["lat"]]
    rss_warm = series[min(59, len(series) - 1)]["rss_mb"]
    rss_end = series[-1]["rss_mb"]
    report.update(totals=totals, rss_at_start_mb=rss_start, rss_after_first_minute_mb=rss_warm, rss_end_mb=rss_end,
                  rss_growth_pct=100 * (rss_end - rss_warm) / rss_warm,
                  max_queue=max((s["queue"] for s in series if s["queue"] == s["queue"]), default=None))
    table = Table(title=f"soak: {args.factor:g} x capacity for {args.minutes:g} min")
    for col in ("what", "value"):
        table.add_column(col)
    table.add_row("capacity (200/s, closed loop)", f"{report['capacity_images_per_s']:.1f}")
    table.add_row("requests sent / client-skipped", f"{report['sent']:,} / {report['client_skipped']:,}")
    table.add_row("200 / 429 / 503 (with Retry-After)", f"{totals['200']:,} / {totals['429']:,} / {totals['503']:,}")
    table.add_row("unacceptable (other status, no Retry-After, dropped)", f"{totals['bad']:,} {report['bad_examples'][:3]}")
    for name, lat in (("first minute", lat_first), ("last minute", lat_last)):
        if lat:
            table.add_row(f"accepted p50 / p99, {name} (ms)", f"{np.percentile(lat, 50):.0f} / {np.percentile(lat, 99):.0f}")
    table.add_row("service RSS after 1 min -> end (MB)", f"{rss_warm:.0f} -> {rss_end:.0f} ({report['rss_growth_pct']:+.1f} %)")
    table.add_row("deepest queue (images)", str(report["max_queue"]))
    table.add_row("recovery to 1.5 x single-request latency", "not within 120 s" if report["recovery_s"] is None
                  else f"{report['recovery_s']:.1f} s (baseline {report['baseline_ms']:.1f} ms)")
    console.print(table)
    plot(series, out / "soak.png")
    for s in series:
        s.pop("lat")
    (out / "soak.json").write_text(json.dumps(report, indent=2))
    console.print(f"per-second series: {out / 'soak.json'}; plot: {out / 'soak.png'}")


if __name__ == "__main__":
    main()
