"""Load test of the service on loopback: served throughput and latency against raw ONNX Runtime, in one run.

    python benchmarks/serve_load.py --model demo_out/model.onnx --images demo_out/data/images
    python benchmarks/serve_load.py --model M --images DIR --concurrency 1,8,32 --seconds 15 --json out.json

Measured side by side on this machine, with the same artifact and images:
  raw model      ONNX Runtime alone on pre-decoded tensors, batch 1 and the batcher's maximum batch;
  raw pipeline   decode + preprocess + model, one image at a time (what one request costs without HTTP);
  served         `medvision serve` (a separate process) driven over HTTP by an asyncio client at each
                 concurrency, with micro-batching on (max batch 8) and off (max batch 1), decoding in threads;
                 then batching on with decoding in worker processes (MEDVISION_DECODE_PROCESSES, one per core: the
                 service's default); concurrency 1 (batching on, threads) alternates with the raw
                 pipeline in slices, so the latency comparison sees the same machine.
Every level is bounded in requests and seconds. The client shares the machine's cores with the service,
so served numbers on a 2-core box include the client's cost; the ratios say how much HTTP, decoding and
queueing cost on top of the model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from medvision.cores import usable_cores

console = Console()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, seconds: float, what: str = "the service") -> None:
    """Until ``url``/readyz answers 200; ``SystemExit`` if ``proc`` dies or ``seconds`` pass first."""
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start")
        time.sleep(0.2)


def raw(model: str, files: list[Path], max_batch: int, seconds: float) -> dict:
    from medvision.serving.engine import Engine

    engine = Engine(model)
    xs = np.stack([engine.prepare(f)[0] for f in files[:max_batch]])
    out = {}
    for bs in (1, max_batch):
        batch = np.resize(xs, (bs, *xs.shape[1:])).astype(np.float32)
        engine.run(batch)
        times, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds and len(times) < 5000:
            t = time.perf_counter()
            engine.run(batch)
            times.append(time.perf_counter() - t)
        out[f"model_b{bs}"] = {"images_per_s": bs * len(times) / sum(times),
                               "p50_ms": 1000 * float(np.median(times))}
    times, start, i = [], time.perf_counter(), 0
    while time.perf_counter() - start < seconds and i < 2000:
        t = time.perf_counter()
        engine.predict(files[i % len(files)])
        times.append(time.perf_counter() - t)
        i += 1
    out["pipeline_b1"] = {"images_per_s": len(times) / sum(times), "p50_ms": 1000 * float(np.median(times))}
    return out


class _Connection:
    """A bare HTTP/1.1 keep-alive connection on asyncio streams: the load generator shares the service's two
    cores, and httpx spends ~3 ms of them per request (measured here), which would be billed to the service."""

    def __init__(self, host: str, port: int, key: str, link_bytes_per_s: float = 0.0) -> None:
        self.host, self.port = host, port
        self.head = (f"Host: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
                     "Content-Type: application/dicom\r\n").encode()
        self.reader = self.writer = None
        self.used = time.monotonic()
        self.link = link_bytes_per_s  # > 0: the body is sent no faster than this, as over a network link
        self.sent = 0.0  # perf_counter when the last request's last byte was handed to the socket

    IDLE_S = 2.0  # reopened after this long unused: well inside the server's keep-alive timeout (uvicorn: 5 s)

    async def post(self, path: str, body: bytes) -> int:
        return (await self.request(path, body))[0]

    async def request(self, path: str, body: bytes, retry: bool = True) -> tuple[int, dict[str, str]]:
        """(status, response headers, lower-case names). ``retry``: when the server closed the connection before
        answering, open a new one and send again once (never for a soak, where that is a dropped request)."""
        if self.writer is not None and time.monotonic() - self.used > self.IDLE_S:
            await self.close()
        for attempt in (0, 1):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            try:
                self.writer.write(b"POST " + path.encode() + b" HTTP/1.1\r\n" + self.head
                                  + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
                if self.link:
                    await self._paced(body)
                else:
                    self.writer.write(body)  # not joined to the head: a 17 MB body is not copied on its way out
                    await self.writer.drain()
                self.sent = time.perf_counter()
                line = await self.reader.readline()
            except ConnectionError:
                line = b""
            if line or attempt or not retry:
                break
            self.writer.close()
            self.writer = None
        if not line:
            await self.close()
            raise ConnectionError("the server closed the connection without an answer")
        status = int(line.split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        await self.reader.readexactly(int(headers.get("content-length", 0)))
        self.used = time.monotonic()
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers

    LINK_CHUNK = 64 * 1024

    async def _paced(self, body: bytes) -> None:
        """``body`` at the link's rate: each 64 kB written when the link would have carried the ones before."""
        view, start = memoryview(body), time.perf_counter()
        for at in range(0, len(body), self.LINK_CHUNK):
            delay = start + at / self.link - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            self.writer.write(view[at:at + self.LINK_CHUNK])
            await self.writer.drain()
        delay = start + len(body) / self.link - time.perf_counter()  # the last chunk's own time on the link
        if delay > 0:
            await asyncio.sleep(delay)

    async def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass


def run_client(coro):
    """Run the load generator's coroutine on uvloop where it is installed (it comes with the service's extra):
    asyncio's own loop copies a large body twice on its way to the socket, and the client shares the service's
    cores (measured on 17 MB bodies: 14.7 ms of a core per request on asyncio's loop with the body joined to its
    head, 8.4 ms on uvloop, 5.0 ms on uvloop with the body written on its own)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _drive(url: str, key: str, payloads: list[bytes], concurrency: int, seconds: float, limit: int,
                 server_cpu=None, link_bytes_per_s: float = 0.0) -> dict:
    """``concurrency`` connections sending ``payloads`` in turn for ``seconds`` (at most ``limit`` requests), after one
    request each to open and warm them (sent one after another: not counted). The summary has the client's CPU seconds
    over the counted part (``client_cpu_s``) and, given ``server_cpu`` (a function: the server's CPU seconds so far),
    the server's (``server_cpu_s``). ``link_bytes_per_s``: each body sent at that rate, as from across a network;
    ``after_last_byte_p50_ms``: from the last byte sent to the answer."""
    host, port = url.removeprefix("http://").split(":")
    latencies, codes, after = [], {}, []
    counter = iter(range(limit))
    deadline = 0.0

    async def one(conn):
        for i in counter:
            if time.perf_counter() > deadline:
                return
            t = time.perf_counter()
            status = await conn.post("/v1/predict", payloads[i % len(payloads)])
            latencies.append(time.perf_counter() - t)
            after.append(time.perf_counter() - conn.sent)
            codes[status] = codes.get(status, 0) + 1

    conns = [_Connection(host, int(port), key, link_bytes_per_s) for _ in range(concurrency)]
    try:
        for conn, payload in zip(conns, payloads * concurrency, strict=False):  # connect and warm up
            await conn.post("/v1/predict", payload)
        start, cpu = time.perf_counter(), time.process_time()
        server = server_cpu() if server_cpu else None
        deadline = start + seconds
        await asyncio.gather(*(one(c) for c in conns))
        wall = time.perf_counter() - start
        out = _summary(1000 * np.asarray(latencies), codes, wall)
        out["client_cpu_s"] = time.process_time() - cpu
        out["after_last_byte_p50_ms"] = 1000 * float(np.median(after)) if after else float("nan")
        if server is not None:
            out["server_cpu_s"] = server_cpu() - server
    finally:
        for conn in conns:
            await conn.close()
    return out


def _summary(ms: np.ndarray, codes: dict, wall: float) -> dict:
    return {"requests": len(ms), "images_per_s": codes.get(200, 0) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "status": codes, "wall_s": wall, "latencies_ms": ms.tolist()}


def _interleaved_c1(url: str, key: str, engine, files: list[Path], payloads: list[bytes], seconds: float, limit: int,
                    rounds: int = 6) -> dict:
    """Concurrency 1 and the raw pipeline (decode + preprocess + model in this process) in alternating slices:
    this machine's speed drifts by ±20 % from one minute to the next, and the drift must hit both alike."""
    raw_ms, served, i = [], [], 0
    for _ in range(rounds):
        start = time.perf_counter()
        while time.perf_counter() - start < seconds / rounds:
            t = time.perf_counter()
            engine.predict(files[i % len(files)])
            raw_ms.append(1000 * (time.perf_counter() - t))
            i += 1
        served.append(run_client(_drive(url, key, payloads, 1, seconds / rounds, limit // rounds)))
    codes: dict = {}
    for part in served:
        for k, v in part["status"].items():
            codes[k] = codes.get(k, 0) + v
    out = _summary(np.concatenate([part["latencies_ms"] for part in served]), codes, sum(p["wall_s"] for p in served))
    out["raw_pipeline"] = {"images_per_s": 1000 * len(raw_ms) / sum(raw_ms), "p50_ms": float(np.median(raw_ms)),
                           "rounds": rounds}
    return out


@contextmanager
def service(model: str, settings: dict[str, str]):
    """`medvision serve` in a process of its own on a fresh SQLite database: (url, API key) once it is ready,
    stopped on leaving. ``settings``: MEDVISION_* variables on top of the environment."""
    with service_process(model, settings) as (url, key, _):
        yield url, key


@contextmanager
def service_process(model: str, settings: dict[str, str], scopes: str = "score"):
    """``service``, and its process (for its resident memory); the key has ``scopes``."""
    work = Path(tempfile.mkdtemp(prefix="mv-load-"))
    env = {**os.environ, "MEDVISION_DATABASE_URL": f"sqlite:///{work / 'db.sqlite'}",
           "MEDVISION_DATA_DIR": str(work / "data"), "MEDVISION_LOG_LEVEL": "warning", **settings}
    made = subprocess.run([sys.executable, "-m", "medvision.cli", "keys", "create", "load", "--scopes", scopes], env=env,
                          capture_output=True, text=True, check=True)
    key = json.loads(made.stdout)["key"]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "medvision.cli", "serve", "--model", model, "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, 90)
        yield url, key, proc
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)  # its database and data folder


def served(model: str, files: list[Path], max_batch: int, levels: list[int], seconds: float, limit: int,
           interleave: bool = False, decode_processes: int = 0) -> dict:
    settings = {"MEDVISION_BATCH_MAX_SIZE": str(max_batch), "MEDVISION_QUEUE_MAX": "256",
                "MEDVISION_DECODE_PROCESSES": str(decode_processes)}
    with service(model, settings) as (url, key):
        payloads = [f.read_bytes() for f in files]
        out = {}
        for c in levels:
            if c == 1 and interleave:
                from medvision.serving.engine import Engine

                out[c] = _interleaved_c1(url, key, Engine(model), files, payloads, seconds, limit)
            else:
                out[c] = run_client(_drive(url, key, payloads, c, seconds, limit))
            out[c].pop("latencies_ms")
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo_out/model.onnx")
    p.add_argument("--images", default="demo_out/data/images")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--seconds", type=float, default=10.0, help="per level")
    p.add_argument("--requests", type=int, default=2000, help="most requests per level")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--decode-processes", type=int, default=usable_cores(),
                   help="also serve with batching on and decoding in this many worker processes (0: skip)")
    p.add_argument("--json")
    args = p.parse_args()
    files = sorted(Path(args.images).rglob("*.dcm"))[:64]
    if not files or not Path(args.model).is_file():
        raise SystemExit("give --model and --images (run 'make demo' first for demo_out/)")
    levels = [int(c) for c in args.concurrency.split(",")]
    report = {"raw": raw(args.model, files, args.max_batch, args.seconds / 2),
              "batching_on": served(args.model, files, args.max_batch, levels, args.seconds, args.requests,
                                    interleave=True),
              "batching_off": served(args.model, files, 1, levels, args.seconds, args.requests),
              "processes": served(args.model, files, args.max_batch, levels, args.seconds, args.requests,
                                  decode_processes=args.decode_processes) if args.decode_processes else {},
              "cores": usable_cores(), "images": len(files)}
    r = report["raw"]
    table = Table(title=f"served vs raw ONNX Runtime ({report['cores']} cores, {len(files)} distinct images); "
                  f"× model: to the model alone at batch {args.max_batch}; × pipeline: to decode + model, one image")
    for col in ("batching", "conc.", "img/s", "p50 ms", "p99 ms", "× model", "× pipeline", "refused"):
        table.add_column(col, no_wrap=True)
    for name, label in (("batching_on", "on"), ("batching_off", "off"), ("processes", f"on, {args.decode_processes} proc.")):
        for c, m in report[name].items():
            refused = sum(v for k, v in m["status"].items() if k != 200)
            table.add_row(label, str(c), f"{m['images_per_s']:.1f}", f"{m['p50_ms']:.1f}",
                          f"{m['p99_ms']:.1f}", f"{m['images_per_s'] / r[f'model_b{args.max_batch}']['images_per_s']:.2f}",
                          f"{m['images_per_s'] / r['pipeline_b1']['images_per_s']:.2f}", str(refused))
    console.print(table)
    console.print(f"raw model: {r['model_b1']['images_per_s']:.1f} img/s at batch 1 (p50 {r['model_b1']['p50_ms']:.2f} ms), "
                  f"{r[f'model_b{args.max_batch}']['images_per_s']:.1f} at batch {args.max_batch}; raw decode + "
                  f"preprocess + model: {r['pipeline_b1']['images_per_s']:.1f} img/s (p50 {r['pipeline_b1']['p50_ms']:.1f} ms)")
    c1 = report["batching_on"].get(1)
    if c1:
        rp = c1["raw_pipeline"]
        console.print(f"concurrency 1, in {rp['rounds']} alternating slices with the raw pipeline: served p50 "
                      f"{c1['p50_ms']:.1f} ms vs raw {rp['p50_ms']:.1f} ms (+{c1['p50_ms'] - rp['p50_ms']:.1f} ms for HTTP, "
                      f"auth, records and batching); {c1['images_per_s']:.1f} vs {rp['images_per_s']:.1f} images/s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
