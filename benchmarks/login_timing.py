"""Sign-in timing: does the answer's time tell a known user name from an unknown, disabled or throttled one?

    python benchmarks/login_timing.py --rounds 8

Signs in over HTTP against a live service (SQLite, one uvicorn process on loopback), interleaving the cases
round by round so that drift of the machine's speed hits each alike, and prints each case's median and spread.
Every case but the throttled one should cost one scrypt (~0.5 s here); the throttled one costs none, whoever it
names (the throttle counts per client address and typed name, never per account).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()

    import httpx
    import uvicorn

    from medvision.serving.app import create_app
    from medvision.serving.db import open_database
    from medvision.serving.settings import Settings
    from medvision.serving.users import create_user, disable_user

    base = Path(tempfile.mkdtemp(prefix="medvision-login-"))
    url = f"sqlite:///{base / 'db.sqlite'}"
    with open_database(url)() as db:
        create_user(db, "reader1", "right-password-1", "reader")
        create_user(db, "gone1", "right-password-2", "reader")
        disable_user(db, "gone1")
    # the app without a model: only the sign-in route is used, and it needs none
    app = create_app(Settings(artifact=str(base / "none.onnx"), database_url=url, data_dir=str(base / "data")))
    app.router.lifespan_context = _database_only(app, url)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]

    cases = {
        "known user, wrong password": ("reader1", "wrong-password"),
        "unknown user": ("nobody", "wrong-password"),
        "disabled user": ("gone1", "right-password-2"),
        "known user, right password": ("reader1", "right-password-1"),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(args.rounds):
        for i, (name, (user, password)) in enumerate(cases.items()):
            # each attempt from an address of its own (loopback has all of 127/8): the throttle never counts it
            with httpx.Client(transport=httpx.HTTPTransport(local_address=f"127.0.{r + 1}.{i + 1}"), timeout=60) as c:
                t = time.perf_counter()
                c.post(f"http://127.0.0.1:{port}/ui/login", data={"username": user, "password": password})
                times[name].append(time.perf_counter() - t)
    throttled = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.200"), timeout=60)
    for i in range(5):
        throttled.post(f"http://127.0.0.1:{port}/ui/login", data={"username": "reader1", "password": f"x{i}"})
    times["throttled (any name)"] = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        r = throttled.post(f"http://127.0.0.1:{port}/ui/login", data={"username": "reader1", "password": "x"})
        times["throttled (any name)"].append(time.perf_counter() - t)
        assert r.status_code == 429
    server.should_exit = True
    print(f"{'case':<30} {'n':>3} {'median ms':>10} {'min':>8} {'max':>8}")
    for name, ts in times.items():
        ms = [1000 * t for t in ts]
        print(f"{name:<30} {len(ms):>3} {statistics.median(ms):>10.1f} {min(ms):>8.1f} {max(ms):>8.1f}")
    return 0


def _database_only(app, url):
    from contextlib import asynccontextmanager

    from medvision.serving.db import open_database
    from medvision.serving.storage import DataFolder

    @asynccontextmanager
    async def lifespan(_app):
        app.state.data = DataFolder(app.state.settings.data_dir)
        app.state.db = open_database(url)
        yield

    return lifespan


if __name__ == "__main__":
    raise SystemExit(main())
