"""Training throughput (images/s) of every recipe: forward + backward + AdamW step on this machine.

    python benchmarks/train_throughput.py                       # all recipes, CPU (or the GPU if present)
    python benchmarks/train_throughput.py --recipes demo,student_vit_tiny --steps 5
    python benchmarks/train_throughput.py --device cuda --compile --json gpu.json

Inputs are random tensors at each recipe's image size, so the number is the model's cost alone (the
decode-once cache keeps real training close to it). FLOPs per image are counted with
``torch.utils.flop_counter``; on a GPU the run also times a large bf16 matmul and reports the fraction of
that measured peak the training step reaches (recipes run in their configured precision, bf16 on GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from medvision.config import load_config
from medvision.training.command import CONFIG_DIR
from medvision.training.models import create_model
from medvision.training.predict import autocast
from medvision.training.train import _param_groups

console = Console(stderr=True)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 20) -> float:
    """Measured FLOP/s of an n x n x n matmul (the practical peak to compare a training step with)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def step_flops(model, x, y, loss_fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn(model(x).float(), y).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def bench(recipe: str, device: torch.device, steps: int, batch: int | None, compile_: bool) -> dict:
    cfg = load_config(CONFIG_DIR / f"{recipe}.yaml")
    t = cfg.train
    size = cfg.preprocess.image_size
    bs = batch or t.batch_size
    model = create_model(cfg.model.model_copy(update={"pretrained": None}), size).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optim = torch.optim.AdamW(_param_groups(model, cfg), lr=t.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    x = torch.randn(bs, 1, size, size, device=device)
    if t.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (bs, 1), device=device).float()
    flops = step_flops(model, x, y, loss_fn) / bs
    fwd = torch.compile(model) if compile_ else model
    precision = t.precision

    def step():
        with autocast(device, precision):
            loss = loss_fn(fwd(x).float(), y)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    for _ in range(2 if not compile_ else 4):  # warm-up (and compilation)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    secs = time.perf_counter() - start
    ips = steps * bs / secs
    return {"recipe": recipe, "model": cfg.model.name, "image_size": size, "batch": bs,
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "gflop_per_image": flops / 1e9, "images_per_s": ips, "tflop_per_s": ips * flops / 1e12,
            "precision": precision if precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", help="comma-separated recipe names (default: all)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, help="override every recipe's batch size (CPU default: 8)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each model first")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    recipes = args.recipes.split(",") if args.recipes else sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    batch = args.batch or (8 if device.type == "cpu" else None)
    rows = []
    for r in recipes:
        console.print(f"[bold]{r}[/bold] ...")
        rows.append(bench(r, device, args.steps, batch, args.compile))
    peak = matmul_peak(device, torch.bfloat16) if device.type == "cuda" else None
    table = Table(title=f"Training throughput on {device} ({torch.get_num_threads()} threads)"
                  + (f", measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s" if peak else ""))
    cols = ["recipe", "model", "px", "batch", "M params", "GFLOP/img (fwd+bwd)", "images/s", "TFLOP/s"]
    if peak:
        cols.append("of peak")
    for c in cols:
        table.add_column(c, justify="right")
    for row in rows:
        cells = [row["recipe"], row["model"], str(row["image_size"]), str(row["batch"]), f"{row['parameters_m']:.1f}",
                 f"{row['gflop_per_image']:.2f}", f"{row['images_per_s']:.1f}", f"{row['tflop_per_s']:.3f}"]
        if peak:
            row["fraction_of_peak"] = row["tflop_per_s"] * 1e12 / peak
            cells.append(f"{100 * row['fraction_of_peak']:.0f} %")
        table.add_row(*cells)
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "peak_flops": peak, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
