"""A model meets a site it was not validated on: what its sensitivity does, when the drift watch notices, how often
it cries wolf, and whether the site's own calibration brings the operating point back.

    python benchmarks/site_shift.py --model demo_out/teacher.onnx
    python benchmarks/site_shift.py --model M --patients 300 --fit-studies 100 --work site_shift --json out.json

Two synthetic sites of ``--patients`` four-view exams at the demo's size are made once (``medvision synth``): a new
draw of the reference site (the vendors and population the model was validated on) and a ``--site shifted`` one
(another vendor's processing, fainter findings, more noise, older patients, a lower cancer rate). Every image is
scored in this process by the service's engine (the same decode, model, calibration and drift quantities
``medvision serve`` records), in study order, and then:

- sensitivity / specificity at the artifact's operating point on each site, with study-clustered 95 % intervals;
- the drift watch (``medvision.drift.compare``, the service's default policy) on each site's first k studies, for
  growing k: the first k at which the shifted site alarms, and whether the reference site ever does;
- the false-alarm rate and the power over ``--draws`` windows of ``--window`` studies resampled from each site;
- ``recalibrate`` fitted on the shifted site's first ``--fit-studies`` studies and judged on the rest: held-out
  sensitivity at the site's new threshold against the target, and specificity against the model's threshold.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

console = Console(width=170)


def make_site(folder: Path, patients: int, site: str, seed: int, prevalence: float) -> Path:
    from medvision.synth.dataset import SynthConfig, generate_dataset

    if not (folder / "labels.csv").is_file():
        console.print(f"synthesising {patients} exams of the {site} site")
        generate_dataset(SynthConfig(n_patients=patients, site=site, seed=seed, prevalence=prevalence,
                                     difficulty=0.1), folder, show_progress=True)
    return folder


def score_site(engine, folder: Path) -> dict:
    """Every image of the site, in study order: study UID, label, the model's probability and drift quantities."""
    import pydicom

    from medvision.progress import progress_bar

    labels = list(csv.DictReader((folder / "labels.csv").open()))
    out = {"study": [], "label": [], "probability": [], "profile": []}
    with progress_bar(f"scoring {folder.name}", total=len(labels)) as advance:
        for row in labels:
            path = folder / "images" / row["patient_id"] / f"{row['image_id']}.dcm"
            x, meta = engine.prepare(path)
            result = engine.score(x, meta)
            out["study"].append(str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID))
            out["label"].append(int(row["cancer"]))
            out["probability"].append(result.probability)
            out["profile"].append(result.profile)
            advance()
    return out


def at_threshold(scores: dict, threshold: float, n_boot: int = 1000) -> dict:
    from medvision.evaluation import bootstrap_ci
    from medvision.metrics import auroc, sensitivity_specificity

    y, p, s = np.array(scores["label"]), np.array(scores["probability"]), np.array(scores["study"])
    sens, spec = sensitivity_specificity(y, p, threshold)
    return {"images": int(y.size), "cancer": int(y.sum()), "auroc": auroc(y, p),
            "sensitivity": sens, "specificity": spec,
            "sensitivity_ci95": bootstrap_ci(y, p, lambda a, b: sensitivity_specificity(a, b, threshold)[0], s,
                                             n_boot),
            "specificity_ci95": bootstrap_ci(y, p, lambda a, b: sensitivity_specificity(a, b, threshold)[1], s,
                                             n_boot)}


def studies_in_order(scores: dict) -> list[str]:
    return list(dict.fromkeys(scores["study"]))


def first_alarm(reference, scores: dict, step: int = 10) -> tuple[int | None, list[str]]:
    """The smallest number of the site's first studies (in steps) at which any quantity alarms."""
    from medvision.drift import compare

    order = studies_in_order(scores)
    for k in range(step, len(order) + 1, step):
        keep = set(order[:k])
        idx = [i for i, s in enumerate(scores["study"]) if s in keep]
        drifts = compare(reference, [scores["profile"][i] for i in idx], [scores["study"][i] for i in idx])
        if alarms := [d.quantity for d in drifts if d.alarm]:
            return k, alarms
    return None, []


def alarm_rate(reference, scores: dict, window: int, draws: int, seed: int = 0) -> float:
    """Share of ``draws`` windows of ``window`` studies (resampled from the site, with replacement) that alarm."""
    from medvision.drift import compare

    rng = np.random.default_rng(seed)
    order = studies_in_order(scores)
    members: dict[str, list[int]] = {}
    for i, s in enumerate(scores["study"]):
        members.setdefault(s, []).append(i)
    alarms = 0
    for d in range(draws):
        pick = rng.integers(0, len(order), window)
        idx = [i for k in pick for i in members[order[k]]]
        uids = [f"{d}-{n}" for n, k in enumerate(pick) for _ in members[order[k]]]  # a resampled study is a new one
        alarms += any(x.alarm for x in compare(reference, [scores["profile"][i] for i in idx], uids))
    return alarms / draws


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo_out/teacher.onnx", help="an artifact exported after 'medvision evaluate'")
    p.add_argument("--work", default="site_shift", help="folder for the two synthetic sites (made once)")
    p.add_argument("--patients", type=int, default=300)
    p.add_argument("--fit-studies", type=int, default=100, help="the shifted site's first studies used to recalibrate")
    p.add_argument("--window", type=int, default=100, help="studies per resampled drift window")
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--json")
    args = p.parse_args()

    from medvision.memory import keep_freed_memory
    from medvision.serving.engine import Engine
    from medvision.site_calibration import recalibrate

    keep_freed_memory()
    engine = Engine(args.model)
    meta = engine.meta
    if meta.reference is None:
        sys.exit(f"{args.model} carries no reference distributions: run 'medvision evaluate' before 'export'")
    work = Path(args.work)
    sites = {"reference": make_site(work / "reference", args.patients, "reference", 101, 0.3),
             "shifted": make_site(work / "shifted", args.patients, "shifted", 102, 0.2)}
    scores = {name: score_site(engine, folder) for name, folder in sites.items()}
    report: dict = {"model": meta.model_name, "threshold": meta.threshold, "rule": meta.operating.rule,
                    "patients": args.patients, "sites": {}}
    for name, sc in scores.items():
        k, alarms = first_alarm(meta.reference, sc)
        report["sites"][name] = {
            **at_threshold(sc, meta.threshold), "studies": len(studies_in_order(sc)),
            "first_alarm_after_studies": k, "first_alarms": alarms,
            f"alarm_rate_{args.window}_studies": alarm_rate(meta.reference, sc, args.window, args.draws)}
    ref, new = report["sites"]["reference"], report["sites"]["shifted"]
    report["sensitivity_drop"] = ref["sensitivity"] - new["sensitivity"]

    sc = scores["shifted"]
    first = set(studies_in_order(sc)[:args.fit_studies])
    held = np.array([s not in first for s in sc["study"]])
    rule = meta.operating.rule.replace(" on validation", "")
    overlay = recalibrate("shifted", engine.artifact_sha256, meta.threshold, sc["probability"], sc["label"],
                          sc["study"], rule=rule, held_out_mask=held, n_boot=1000, model_name=meta.model_name)
    report["recalibration"] = {"fit_studies": args.fit_studies, **json.loads(overlay.model_dump_json())}
    _print(report, args.window)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def _ci(pair) -> str:
    return f"{pair[0]:.3f}–{pair[1]:.3f}"


def _print(report: dict, window: int) -> None:
    t = Table(title=f"{report['model']} at its operating point ({report['rule']}, threshold {report['threshold']:.4f})")
    for col in ("site", "studies", "images (cancer)", "AUROC", "sensitivity (95 % CI)", "specificity (95 % CI)",
                "first alarm", f"alarm rate, {window}-study windows"):
        t.add_column(col)
    for name, s in report["sites"].items():
        t.add_row(name, str(s["studies"]), f"{s['images']} ({s['cancer']})", f"{s['auroc']:.3f}",
                  f"{s['sensitivity']:.3f} ({_ci(s['sensitivity_ci95'])})",
                  f"{s['specificity']:.3f} ({_ci(s['specificity_ci95'])})",
                  f"after {s['first_alarm_after_studies']} studies: {', '.join(s['first_alarms'])}"
                  if s["first_alarm_after_studies"] else "never",
                  f"{100 * s[f'alarm_rate_{window}_studies']:.1f} %")
    console.print(t)
    console.print(f"sensitivity drop at the model's threshold: {100 * report['sensitivity_drop']:.1f} points")
    r = report["recalibration"]
    ev = r["evidence"]
    for label, m in (("model's threshold", ev["model_threshold"]), ("site's threshold", ev["site_threshold"])):
        console.print(f"held-out ({ev['held_out_studies']} studies, {ev['held_out_cancer_images']} cancer images) at "
                      f"the {label} {m['threshold']:.4f}: sensitivity {m['sensitivity']:.3f} "
                      f"({_ci(m['sensitivity_ci95'])}), specificity {m['specificity']:.3f} ({_ci(m['specificity_ci95'])})")
    console.print(f"recalibrated on the first {r['fit_studies']} studies: "
                  + ("ACCEPTED" if r["accepted"] else "REFUSED") + " — " + "; ".join(r["reasons"]))


if __name__ == "__main__":
    main()
