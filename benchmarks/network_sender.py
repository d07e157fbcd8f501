"""Full-field mammograms sent one at a time from across a network: how long after its last byte an image is answered.

    python benchmarks/network_sender.py --model demo_out/model.onnx
    python benchmarks/network_sender.py --model M --archive fullfield_archive --gbps 1 --rounds 4 --seconds 8

A PACS or a modality sends each image over the hospital's network: a 6-9 MB JPEG 2000 mammogram takes 50-70 ms on a
1 Gb/s link, a 17 MB uncompressed one 136 ms. What the service adds is the time from the last byte to the answer.
The client here paces each body to ``--gbps`` (64 kB pieces, each written when the link would have carried the
ones before), on the same archive as benchmarks/fullfield.py, and measures, per transfer syntax and for the mix,
alternating in rounds (this machine's speed drifts):

  medvision             `medvision serve` with its defaults: a request alone has its image read while its body
                        arrives (JPEG 2000 / HTJ2K decoded from the first tens of kilobytes, an uncompressed band
                        computed as its rows come in)
  medvision, not ahead  the same with MEDVISION_DECODE_AHEAD=false: the image read once the whole body is in
  pipeline              decode + preprocess + model in this process from the file (what one image costs)
  plain ViT-S           FastAPI + pydicom pixel_array + timm ViT-S/16 fp32 (benchmarks/naive_service.py), over the
                        same link (--plain-seconds, fewer requests: each takes seconds)

and the two services at memory speed (no link), where the service must not read ahead (receiving the body keeps the
cores busy): their latencies side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fullfield import SHORT, build_archive, build_htj2k, build_jpeg_lossless, naive, pipeline_rate  # noqa: E402 - this folder's modules
from serve_load import _drive, run_client, service_process  # noqa: E402

console = Console(width=150)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo_out/model.onnx", help="the served (promoted) artifact")
    p.add_argument("--archive", default="fullfield_archive", help="folder of the synthetic archive (made if missing)")
    p.add_argument("--images", type=int, default=36)
    p.add_argument("--gbps", type=float, default=1.0, help="the link's rate, Gb/s")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=6.0, help="per system and round")
    p.add_argument("--plain-seconds", type=float, default=15.0, help="the plain service, per group (0: left out)")
    p.add_argument("--only", default="mix,JPEG 2000,HTJ2K,uncompressed",
                   help="groups (mix, 'JPEG 2000', HTJ2K, JPEG-LS, RLE, uncompressed, 'JPEG lossless')")
    p.add_argument("--json")
    args = p.parse_args()
    link = args.gbps * 1e9 / 8
    by_syntax = build_archive(Path(args.archive), args.images)
    groups = {"mix": sorted(f for fs in by_syntax.values() for f in fs),
              **{SHORT[s]: fs for s, fs in by_syntax.items()}}
    wanted = [g.strip() for g in args.only.split(",")]
    if "HTJ2K" in wanted:
        groups["HTJ2K"] = build_htj2k(Path(args.archive), by_syntax["1.2.840.10008.1.2.4.90"])
    if "JPEG lossless" in wanted:
        groups["JPEG lossless"] = build_jpeg_lossless(Path(args.archive), by_syntax["1.2.840.10008.1.2.4.90"])
    report = {"gbps": args.gbps, "groups": {}}
    with service_process(args.model, {}) as (ahead_url, ahead_key, _), \
            service_process(args.model, {"MEDVISION_DECODE_AHEAD": "false"}) as (whole_url, whole_key, _):
        systems = {"medvision": (ahead_url, ahead_key), "medvision, not ahead": (whole_url, whole_key)}
        for name in wanted:
            files = groups[name]
            payloads = [f.read_bytes() for f in files]
            g: dict = {"link_ms": 1000 * float(np.median([len(b) for b in payloads])) / link}
            for url, key in systems.values():  # warm: connections, decoding processes, database
                run_client(_drive(url, key, payloads, 1, 2, 1000, link_bytes_per_s=link))
            for r in range(args.rounds):
                order = list(systems.items()) if r % 2 == 0 else list(systems.items())[::-1]
                for system, (url, key) in order:
                    for where, rate in (("link", link), ("memory speed", 0.0)):
                        s = run_client(_drive(url, key, payloads, 1, args.seconds, 10000, link_bytes_per_s=rate))
                        g.setdefault(f"{system}, {where}", []).append(
                            {"p50_ms": s["p50_ms"], "after_ms": s["after_last_byte_p50_ms"], "n": s["requests"]})
                g.setdefault("pipeline", []).append(pipeline_rate(args.model, files, args.seconds / 2)["p50_ms"])
            if args.plain_seconds:
                with naive("vit_small_patch16_224") as (url, key):
                    run_client(_drive(url, key, payloads[:1], 1, 1, 1, link_bytes_per_s=link))
                    s = run_client(_drive(url, key, payloads, 1, args.plain_seconds, 1000, link_bytes_per_s=link))
                    g["plain ViT-S, link"] = [{"p50_ms": s["p50_ms"], "after_ms": s["after_last_byte_p50_ms"],
                                               "n": s["requests"]}]
            report["groups"][name] = g
            _print(name, g, args.gbps)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def _median(runs: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def _each(runs: list[dict], key: str) -> str:
    return " ".join(f"{r[key]:.1f}" for r in runs)


def _print(name: str, g: dict, gbps: float) -> None:
    pipe = float(np.median(g["pipeline"]))
    t = Table(title=f"{name}: one image at a time, {gbps:g} Gb/s link (its body: {g['link_ms']:.1f} ms on the link); "
              f"pipeline in process {pipe:.1f} ms")
    for col in ("system", "latency p50, ms", "after the last byte, p50 ms (rounds)", "at memory speed: latency p50"):
        t.add_column(col, justify="right" if col != "system" else "left")
    for system in ("medvision", "medvision, not ahead", "plain ViT-S"):
        runs = g.get(f"{system}, link")
        if not runs:
            continue
        fast = g.get(f"{system}, memory speed")
        t.add_row(system, f"{_median(runs, 'p50_ms'):.1f}", f"{_median(runs, 'after_ms'):.1f} ({_each(runs, 'after_ms')})",
                  f"{_median(fast, 'p50_ms'):.2f} ({_each(fast, 'p50_ms')})" if fast else "")
    console.print(t)


if __name__ == "__main__":
    main()
