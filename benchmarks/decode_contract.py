"""The same model under two decode contracts: does decoding only the pixels the model sees change what it says?

    python benchmarks/decode_contract.py --model demo_out/model.onnx --labels demo_out/data/labels.csv \
        --split demo_out/run/split.csv
    python benchmarks/decode_contract.py --model demo_out/model.onnx --labels fullfield/labels.csv

Every image of the held-out split (``--split``, its ``test`` patients; or every image of ``--labels``) is scored by
the artifact twice with ONNX Runtime: decoded at full resolution, and under the artifact's own contract (or
``--long-side``). Printed: AUROC under each with the paired, patient-clustered bootstrap interval of the
difference, decisions agreeing at the artifact's threshold, the largest probability change, and decoding time per
image, overall and per transfer syntax. The targets: AUROC difference <= 0.005, decisions agreeing >= 99 %.

The control (``--controls``): the same full-resolution decode resized with another of Pillow's standard filters
(bicubic, box, Lanczos) instead of the preprocessing's antialiased bilinear, compared with the full decode the same
way. It measures how far the model's decisions move for a change of resampling no one would call a different
image: the yardstick for what the reduced decode changes.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

console = Console()


def _rows(labels: Path, split: Path | None) -> list[dict]:
    with labels.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if split:
        with split.open(newline="") as fh:
            test = {r["patient_id"] for r in csv.DictReader(fh) if r["split"] == "test"}
        rows = [r for r in rows if r["patient_id"] in test]
    images = labels.parent / "images"
    return [dict(r, path=str(images / r["patient_id"] / f"{r['image_id']}.dcm")) for r in rows]


def _score(engine, pre, paths: list[str]) -> tuple[np.ndarray, list[str], list[float], list[str]]:
    probs, plans, ms, syntaxes = [], [], [], []
    for p in paths:
        t = time.perf_counter()
        stored, meta = pre.read(p, engine.limits)
        x = pre(stored, meta)
        ms.append(1000 * (time.perf_counter() - t))
        probs.append(float(engine.run(x[None])[0]))
        plans.append(meta.decode)
        syntaxes.append(meta.transfer_syntax)
    return np.array(probs), plans, ms, syntaxes


def _resampled(cfg, resample):
    """A full-resolution ``Preprocess`` whose resize uses ``resample`` (a control: see the module's doc)."""
    from medvision.preprocess import Preprocess, resize_pad

    class Resampled(Preprocess):
        def steps(self, meta):
            return [*super().steps(meta)[:-1], ("resize_pad", lambda a: resize_pad(a, self.cfg.image_size, resample))]

    return Resampled(cfg.model_copy(update={"decode_long_side": 0}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--labels", required=True, help="labels.csv next to images/ (as 'medvision synth' writes)")
    p.add_argument("--split", help="split.csv of the training run: only its test patients")
    p.add_argument("--long-side", type=int, help="the reduced contract (default: the artifact's own)")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--controls", default="bicubic,box,lanczos",
                   help="Pillow filters for the control (full decode, another resize); '' for none")
    p.add_argument("--json")
    args = p.parse_args()

    from pydicom.uid import UID

    from medvision.evaluation import paired_difference
    from medvision.metrics import auroc
    from medvision.preprocess import Preprocess
    from medvision.serving.engine import Engine

    engine = Engine(args.model)
    cfg = engine.meta.preprocess
    long_side = args.long_side if args.long_side is not None else cfg.decode_long_side
    if not long_side:
        raise SystemExit("the artifact decodes at full resolution: give --long-side to compare a reduced contract")
    rows = _rows(Path(args.labels), Path(args.split) if args.split else None)
    paths = [r["path"] for r in rows]
    y = np.array([int(r["cancer"]) for r in rows])
    patients = [r["patient_id"] for r in rows]
    full = Preprocess(cfg.model_copy(update={"decode_long_side": 0}))
    reduced = Preprocess(cfg.model_copy(update={"decode_long_side": long_side}))
    p_full, _, ms_full, syntaxes = _score(engine, full, paths)
    p_red, plans, ms_red, _ = _score(engine, reduced, paths)
    thr = engine.meta.threshold
    agree = (p_full >= thr) == (p_red >= thr)
    diff, ci = paired_difference(y, p_full, p_red, auroc, clusters=patients, n=args.bootstrap)
    report = {"model": Path(args.model).name, "images": len(y), "patients": len(set(patients)),
              "positives": int(y.sum()), "threshold": thr, "long_side": long_side,
              "auroc_full": auroc(y, p_full), "auroc_reduced": auroc(y, p_red),
              "auroc_difference": diff, "auroc_difference_ci95": list(ci),
              "agreement": float(agree.mean()), "max_probability_change": float(np.abs(p_full - p_red).max()),
              "mean_probability_change": float(np.abs(p_full - p_red).mean()),
              "decode_ms_full": float(np.median(ms_full)), "decode_ms_reduced": float(np.median(ms_red)),
              "plans": dict(sorted({k: plans.count(k) for k in set(plans)}.items())), "by_syntax": {}}
    from PIL import Image

    for name in filter(None, args.controls.split(",")):
        if name.strip().upper() not in Image.Resampling.__members__:
            raise SystemExit(f"--controls: '{name}' is not one of Pillow's filters "
                             f"({', '.join(m.lower() for m in Image.Resampling.__members__)})")
        p_ctl = _score(engine, _resampled(cfg, Image.Resampling[name.strip().upper()]), paths)[0]
        report.setdefault("controls", {})[f"full decode, {name.strip()} resize"] = {
            "agreement": float(((p_ctl >= thr) == (p_full >= thr)).mean()),
            "max_probability_change": float(np.abs(p_full - p_ctl).max()),
            "mean_probability_change": float(np.abs(p_full - p_ctl).mean())}
    groups = defaultdict(list)
    for i, s in enumerate(syntaxes):
        groups[s].append(i)
    for s, idx in sorted(groups.items()):
        report["by_syntax"][UID(s).name] = {
            "images": len(idx), "agreement": float(agree[idx].mean()),
            "max_probability_change": float(np.abs(p_full[idx] - p_red[idx]).max()),
            "decode_ms_full": float(np.median([ms_full[i] for i in idx])),
            "decode_ms_reduced": float(np.median([ms_red[i] for i in idx]))}
    ok_auc = abs(diff) <= 0.005
    ok_agree = report["agreement"] >= 0.99
    console.print(f"{report['images']} images of {report['patients']} patients ({report['positives']} cancer); "
                  f"contract: decode_long_side {long_side} vs full resolution; plans: {report['plans']}")
    console.print(f"AUROC full {report['auroc_full']:.4f}, reduced {report['auroc_reduced']:.4f}: difference "
                  f"{diff:+.4f} (95 % CI {ci[0]:+.4f} to {ci[1]:+.4f}) -> {'PASS' if ok_auc else 'FAIL'} (<= 0.005)")
    console.print(f"decisions agreeing at threshold {thr:.4f}: {100 * report['agreement']:.2f} % -> "
                  f"{'PASS' if ok_agree else 'FAIL'} (>= 99 %); largest probability change "
                  f"{report['max_probability_change']:.4f}, mean {report['mean_probability_change']:.4f}")
    for name, c in report.get("controls", {}).items():
        console.print(f"control: {name} instead of bilinear: decisions agreeing {100 * c['agreement']:.2f} %, "
                      f"largest probability change {c['max_probability_change']:.4f}, mean "
                      f"{c['mean_probability_change']:.4f}")
    table = Table(title="per transfer syntax: decode + preprocess, median ms per image (one core)")
    for col in ("syntax", "images", "agree %", "max |dp|", "full ms", "reduced ms", "speed-up"):
        table.add_column(col)
    for name, g in report["by_syntax"].items():
        table.add_row(name, str(g["images"]), f"{100 * g['agreement']:.1f}", f"{g['max_probability_change']:.4f}",
                      f"{g['decode_ms_full']:.1f}", f"{g['decode_ms_reduced']:.1f}",
                      f"{g['decode_ms_full'] / g['decode_ms_reduced']:.1f}x")
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
