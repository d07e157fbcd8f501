"""``medvision evaluate RUN``: the clinical report of a trained run, and its calibration for export.

On the validation split: fit the calibration temperature and choose operating points by rule (stored in
``RUN/calibration.json``, which ``medvision export`` puts inside the ONNX graph and its metadata). On the
held-out split: AUROC and PR-AUC with patient-clustered bootstrap 95 % intervals, sensitivity /
specificity at each operating point (with intervals) and at fixed specificities / sensitivities, the
confusion matrix, calibration (ECE, reliability diagram) and per-subgroup results, at image level and at
breast level (the images of one breast aggregated, as screening is read). Written as ``report.md``,
``report.json`` and PNG plots.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from pathlib import Path

import numpy as np
import torch

from medvision import __version__
from medvision.artifact import sha256_file
from medvision.data import ImageRow, read_split
from medvision.datacard import parse_age
from medvision.drift import Reference, build_reference, header_of_index, image_statistics
from medvision.errors import ConfigError
from medvision.evaluation import (
    TEMPERATURE_RANGE,
    age_band,
    aggregate,
    bootstrap_ci,
    calibrate,
    fit_calibration,
    operating_point,
    paired_difference,
    reliability,
    summarise,
)
from medvision.manifest import load_rows
from medvision.metrics import auroc, sensitivity_specificity
from medvision.plots import pyplot
from medvision.preprocess import Preprocess
from medvision.scan import scan_files
from medvision.training.dataset import decode_all
from medvision.training.export import load_run
from medvision.training.onnx_scoring import split_rows
from medvision.training.predict import image_logits

log = logging.getLogger(__name__)
CALIBRATION = "calibration.json"
REFERENCE = "reference.json"  # the distributions the model was validated on (drift watch)
DEFAULT_SUBGROUPS = ("manufacturer", "view", "laterality", "density", "age_band")


def _subgroup_values(rows: list[ImageRow], headers) -> dict[str, list[str]]:
    ages = [parse_age(h.patient_age) if h.patient_age else parse_age(r.attributes.get("age", "")) for r, h in
            zip(rows, headers, strict=True)]
    return {
        "manufacturer": [h.manufacturer or "unknown" for h in headers],
        "view": [r.view or h.view or "unknown" for r, h in zip(rows, headers, strict=True)],
        "laterality": [r.laterality or h.laterality or "unknown" for r, h in zip(rows, headers, strict=True)],
        "density": [r.attributes.get("density") or "unknown" for r in rows],
        "age_band": [age_band(a) for a in ages],
        "site": [r.attributes.get("site_id") or "unknown" for r in rows],
    }


def pointing_game(model: torch.nn.Module, pre: Preprocess, rows: list[ImageRow], lesions_csv: Path,
                  n_boot: int = 1000) -> dict | None:
    """Does the heatmap's peak fall on a malignant lesion? Over the cancer images of ``rows`` that
    ``lesions_csv`` (written by ``medvision synth``) locates; None if the model has no exact heatmap."""
    import csv

    from medvision.heatmap import chance_rate, pointing_hit
    from medvision.training.models import class_activation_map, has_exact_heatmap

    if not has_exact_heatmap(model):
        return None
    found: dict[str, list[tuple[float, float, float, str]]] = {}
    with lesions_csv.open(newline="") as fh:
        for r in csv.DictReader(fh):
            if r.get("malignant") == "1":
                found.setdefault(r["image_id"], []).append((float(r["x"]), float(r["y"]), float(r["radius_px"]), r["kind"]))
    hits, chance, patients, kinds = [], [], [], []
    model.eval()
    for row in rows:
        if row.label != 1 or row.image_id not in found:
            continue
        stored, meta = pre.read(row.path)
        geom = pre.geometry(stored, meta)
        grey = pre.display(stored, meta)
        with torch.no_grad():
            x = torch.from_numpy(pre.finish(grey)[None])
            heat = class_activation_map(model, x)[0, 0].numpy()
        mapped = [(*geom.to_input(lx, ly), lr * geom.image_scale) for lx, ly, lr, _ in found[row.image_id]]
        hits.append(float(pointing_hit(heat, geom.size, mapped)))
        chance.append(chance_rate(grey > 0.08, heat.shape, mapped))
        patients.append(row.patient_id)
        kinds.append(found[row.image_id][0][3])
    if not hits:
        return None
    h = np.array(hits)
    by_kind = {k: {"images": int(sum(1 for x in kinds if x == k)),
                   "hit_rate": float(np.mean([hh for hh, kk in zip(hits, kinds, strict=True) if kk == k]))}
               for k in sorted(set(kinds))}
    return {"images": len(h), "hit_rate": float(h.mean()),
            "hit_rate_ci95": bootstrap_ci(h, h, lambda a, b: float(np.mean(b)), patients, n_boot),
            "chance_rate": float(np.mean(chance)), "by_kind": by_kind,
            "rule": "peak cell centre within the lesion radius + half the cell diagonal"}


def _find_lesions(cfg) -> Path | None:
    for base in (cfg.data.labels_csv, cfg.data.manifest):
        if base and (Path(base).parent / "lesions.csv").is_file():
            return Path(base).parent / "lesions.csv"
    if cfg.data.image_dir and (Path(cfg.data.image_dir).parent / "lesions.csv").is_file():
        return Path(cfg.data.image_dir).parent / "lesions.csv"
    if cfg.data.manifest and (Path(cfg.data.manifest).parent / "data" / "lesions.csv").is_file():
        return Path(cfg.data.manifest).parent / "data" / "lesions.csv"
    return None


def evaluate_run(
    run_dir: str | Path, out_dir: str | Path | None = None, subset: str = "test",
    rules: tuple[str, ...] | None = None, subgroups: tuple[str, ...] = DEFAULT_SUBGROUPS,
    n_boot: int = 2000, breast_aggregate: str = "mean", show_progress: bool = True,
    lesions_csv: str | Path | None = None,
) -> dict:
    run = Path(run_dir)
    out = Path(out_dir) if out_dir else run / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    cfg, model, metrics, ckpt = load_run(run)
    if not (run / "split.csv").is_file():
        raise ConfigError(f"{run} has no split.csv: evaluate a run written by 'medvision train'")
    split = read_split(run / "split.csv")
    rows = load_rows(cfg.data.labels_csv, cfg.data.image_dir, cfg.data.manifest)
    rules = rules or (f"sensitivity>={cfg.train.target_sensitivity}",)
    for rule in rules:
        kind, _, value = rule.replace(" ", "").partition(">=")
        try:
            ok = kind in ("sensitivity", "specificity") and 0 < float(value) <= 1
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"operating-point rule {rule!r} must read 'sensitivity>=0.90' or 'specificity>=0.95'")
    pre = Preprocess(cfg.preprocess)
    cache = {"cache_dir": cfg.data.cache_dir, "use_cache": cfg.data.cache, "workers": cfg.data.decode_workers}

    scored, statistics = {}, {}
    for name in ("val", subset):
        part = [r for r in rows if split.get(r.patient_id) == name]
        if len({r.label for r in part}) < 2:
            raise ConfigError(f"the '{name}' split needs both classes to be evaluated; it has {len(part)} image(s)")
        images, kept = decode_all(part, pre, f"decode {name}", show_progress, **cache)
        logits = image_logits(model, images, pre)
        scored[name] = (kept, logits)
        statistics[name] = [image_statistics(images[i]) for i in range(len(kept))]

    # Calibration and operating points: validation only.
    val_rows, val_logits = scored["val"]
    y_val = np.array([r.label for r in val_rows])
    cal, evidence = fit_calibration(y_val, val_logits, [r.patient_id for r in val_rows])
    at_bound = not (TEMPERATURE_RANGE[0] * 1.01 < cal.temperature < TEMPERATURE_RANGE[1] * 0.99)
    if at_bound:
        log.warning("the calibration temperature (%.3g) sits at the edge of %s: the validation logits carry "
                    "almost no information (or are wildly overconfident); do not trust this model's probabilities",
                    cal.temperature, TEMPERATURE_RANGE)
    p_val = cal(val_logits)
    ops = [operating_point(y_val, p_val, rule) for rule in rules]
    calibration = {
        "method": cal.method, "temperature": cal.temperature, "bias": cal.bias, "evidence": evidence,
        "operating_points": [o.as_dict() for o in ops], "fitted_on": "validation",
        "validation_images": len(y_val), "validation_prevalence": float(y_val.mean()), "val_auroc": auroc(y_val, p_val),
        "val_ece_before": reliability(y_val, calibrate(val_logits, 1.0))["ece"],
        "val_ece_after": reliability(y_val, p_val)["ece"], "weights_sha256": sha256_file(ckpt),
        "temperature_at_bound": at_bound,
    }

    test_rows, test_logits = scored[subset]
    y = np.array([r.label for r in test_rows])
    p = cal(test_logits)
    patients = [r.patient_id for r in test_rows]
    primary = ops[0]
    image_level = summarise(y, p, primary.threshold, patients, n_boot=n_boot)
    image_level["operating_points"] = {
        o.name: {"rule": o.rule, "threshold": o.threshold,
                 **dict(zip(("sensitivity", "specificity"), sensitivity_specificity(y, p, o.threshold), strict=True))}
        for o in ops
    }
    headers = scan_files([r.path for r in test_rows], workers=1, show_progress=False)
    reference = _reference(val_rows, cal(val_logits), statistics["val"], test_rows, p, statistics[subset], headers,
                           subset)
    values = _subgroup_values(test_rows, headers)
    by_group = {}
    for g in subgroups:
        if g not in values:
            raise ConfigError(f"unknown subgroup {g!r}; choose from {', '.join(values)}")
        table = {}
        for v in sorted(set(values[g]), key=lambda v: (v == "unknown", v.replace("<", "0"))):
            m = np.array([x == v for x in values[g]])
            yy, pp = y[m], p[m]
            sens, spec = sensitivity_specificity(yy, pp, primary.threshold)
            both = 0 < yy.sum() < len(yy)
            table[v] = {"n": int(m.sum()), "positives": int(yy.sum()),
                        "auroc": auroc(yy, pp) if both else None,
                        "auroc_ci95": bootstrap_ci(yy, pp, auroc, np.array(patients)[m], max(n_boot // 4, 200))
                        if both else None,
                        "sensitivity": sens if yy.sum() else None, "specificity": spec if (yy == 0).any() else None}
        by_group[g] = table

    lat = values["laterality"]
    breast = None
    if all(v in ("L", "R") for v in lat):
        keys = [f"{r.patient_id}|{s}" for r, s in zip(test_rows, lat, strict=True)]
        names, yb, sb = aggregate(keys, y, p, breast_aggregate)
        breast = summarise(yb, sb, primary.threshold, [k.split("|")[0] for k in names], n_boot=n_boot)
        breast["aggregation"] = f"{breast_aggregate} of the breast's images; label = any image labelled cancer"

    lesions = Path(lesions_csv) if lesions_csv else _find_lesions(cfg)
    pointing = pointing_game(model, pre, test_rows, lesions, n_boot) if lesions else None

    report = {
        "model": cfg.model.name, "run": str(run), "medvision_version": __version__, "pointing_game": pointing,
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "subset": subset, "calibration": calibration, "image_level": image_level, "breast_level": breast,
        "subgroups": by_group, "bootstrap": {"resamples": n_boot, "unit": "patient", "interval": "percentile 95 %"},
    }
    (run / CALIBRATION).write_text(json.dumps(calibration, indent=2))
    (run / REFERENCE).write_text(json.dumps({"weights_sha256": calibration["weights_sha256"],
                                             "reference": reference.model_dump()}, indent=2))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plots = _plots(out, y, p, calibrate(test_logits, 1.0), breast)
    (out / "report.md").write_text(_markdown(report, plots))
    return report


def _reference(val_rows, p_val, val_stats, test_rows, p_test, test_stats, test_headers, subset: str) -> Reference:
    """The distributions the model was validated on (validation and held-out images, calibrated probabilities),
    for the service's drift watch."""
    val_headers = scan_files([r.path for r in val_rows], workers=1, show_progress=False)
    profiles, studies = [], []
    for rows, headers, stats, probs in ((val_rows, val_headers, val_stats, p_val),
                                        (test_rows, test_headers, test_stats, p_test)):
        for r, h, st, pr in zip(rows, headers, stats, probs, strict=True):
            profiles.append({**header_of_index(h), **st, "probability": float(pr)})
            studies.append(r.study_id or r.patient_id)
    return build_reference(profiles, studies, source=f"validation and {subset} splits")


def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def _ci(pair) -> str:
    return "n/a" if not pair or pair[0] is None or not np.isfinite(pair[0]) else f"{pair[0]:.3f}–{pair[1]:.3f}"


def _level_md(title: str, m: dict) -> list[str]:
    c = m["confusion"]
    s = [f"## {title}", "", f"{m['n']} cases, {m['positives']} with cancer.", "",
         "| metric | value | 95 % CI |", "|---|---|---|",
         f"| AUROC | {_fmt(m['auroc'])} | {_ci(m['auroc_ci95'])} |",
         f"| PR-AUC | {_fmt(m['pr_auc'])} | {_ci(m['pr_auc_ci95'])} |",
         f"| sensitivity at the operating point | {_fmt(m['sensitivity'])} | {_ci(m['sensitivity_ci95'])} |",
         f"| specificity at the operating point | {_fmt(m['specificity'])} | {_ci(m['specificity_ci95'])} |",
         f"| ECE (10 bins) | {_fmt(m['calibration']['ece'])} | {_ci(m.get('ece_ci95'))} |", "",
         *([f"A perfectly calibrated model would show an ECE of {m['ece_if_calibrated']['mean']:.3f} on these "
            f"{m['n']} cases (95th percentile {m['ece_if_calibrated']['p95']:.3f}; p = "
            f"{m['ece_if_calibrated']['p_value']:.2f} that an ECE this high comes from calibrated probabilities).", ""]
           if m.get("ece_if_calibrated") else []),
         f"Confusion matrix at threshold {m['threshold']:.4f}: TP {c['tp']}, FN {c['fn']}, FP {c['fp']}, TN {c['tn']}.", "",
         "| fixed specificity | sensitivity | | fixed sensitivity | specificity |", "|---|---|---|---|---|"]
    for (a, x), (b, z) in zip(m["sensitivity_at_specificity"].items(), m["specificity_at_sensitivity"].items(),
                              strict=True):
        s.append(f"| {a} | {_fmt(x)} | | {b} | {_fmt(z)} |")
    return s + [""]


def _calibration_md(cal: dict) -> str:
    """The chosen calibration and why (runs evaluated before Platt scaling hold a temperature only)."""
    method = cal.get("method", "temperature")
    text = (f"Platt scaling, sigmoid(logit / {cal['temperature']:.3f} {cal['bias']:+.3f})" if method == "platt"
            else f"Temperature scaling, T = {cal['temperature']:.3f}")
    text += f" (validation ECE {cal['val_ece_before']:.3f} → {cal['val_ece_after']:.3f})."
    if ev := cal.get("evidence"):
        text += (" Chosen on validation by out-of-fold log-loss over patient folds: "
                 + ", ".join(f"{m} {e['cv_log_loss']:.4f} (ECE {e['cv_ece']:.3f})" for m, e in ev.items()) + ".")
    if "validation_prevalence" in cal:
        text += (f" Probabilities are at the validation split's cancer rate ({100 * cal['validation_prevalence']:.1f} %"
                 " of images); a site with another prevalence needs its own calibration.")
    return text


def _markdown(r: dict, plots: list[str]) -> str:
    cal = r["calibration"]
    s = [f"# Evaluation: {r['model']}", "",
         f"`medvision evaluate` (medvision {r['medvision_version']}), {r['created_utc']}, on the held-out "
         f"'{r['subset']}' split. Intervals: patient-clustered percentile bootstrap, {r['bootstrap']['resamples']} "
         "resamples.", "",
         "## Calibration and operating points (fitted on validation)", "",
         _calibration_md(cal) + " Probabilities below are calibrated."
         + (" **The temperature sits at the edge of its range: the model's scores carry almost no information "
            "on validation; do not use its probabilities.**" if cal.get("temperature_at_bound") else ""), "",
         "| operating point | rule | threshold | test sensitivity | test specificity |", "|---|---|---|---|---|"]
    for name, o in r["image_level"]["operating_points"].items():
        s.append(f"| {name} | {o['rule']} | {o['threshold']:.4f} | {_fmt(o['sensitivity'])} | {_fmt(o['specificity'])} |")
    s.append("")
    s += _level_md("Image level", r["image_level"])
    if r["breast_level"]:
        s += _level_md(f"Breast level ({r['breast_level']['aggregation']})", r["breast_level"])
    else:
        s += ["## Breast level", "", "Not computed: laterality is missing for some images.", ""]
    pg = r.get("pointing_game")
    if pg:
        lo, hi = pg["hit_rate_ci95"]
        s += ["## Heatmaps: pointing game", "",
              f"On {pg['images']} cancer images with a known lesion, the heatmap's peak falls on a malignant lesion "
              f"in {100 * pg['hit_rate']:.0f} % (95 % CI {100 * lo:.0f}–{100 * hi:.0f} %); a random point on the breast "
              f"would in {100 * pg['chance_rate']:.0f} %. Rule: {pg['rule']}.", "",
              "| lesion kind | images | hit rate |", "|---|---|---|"]
        s += [f"| {k} | {v['images']} | {100 * v['hit_rate']:.0f} % |" for k, v in pg["by_kind"].items()] + [""]
    s += ["## Subgroups (image level, at the primary operating point)", ""]
    for g, table in r["subgroups"].items():
        s += [f"### {g}", "", "| value | images | cancer | AUROC | 95 % CI | sensitivity | specificity |",
              "|---|---|---|---|---|---|---|"]
        for v, m in table.items():
            s.append(f"| {v} | {m['n']} | {m['positives']} | {_fmt(m['auroc'])} | {_ci(m['auroc_ci95'])} | "
                     f"{_fmt(m['sensitivity'])} | {_fmt(m['specificity'])} |")
        s.append("")
    s += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(s)


def _plots(out: Path, y, p, p_raw, breast) -> list[str]:
    plt = pyplot()
    if plt is None:
        return []
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=110)
    fpr, tpr, _ = roc_curve(y, p)
    ax.plot(fpr, tpr, label=f"image level, AUROC {auroc(y, p):.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC (held-out)")
    ax.legend(frameon=False, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "roc.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=110)
    for probs, label in ((p_raw, "uncalibrated"), (p, "calibrated")):
        bins = reliability(y, probs)["bins"]
        ax.plot([b["mean_probability"] for b in bins], [b["observed_rate"] for b in bins], "o-",
                label=f"{label}, ECE {reliability(y, probs)['ece']:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed cancer rate")
    ax.set_title("Reliability (held-out)")
    ax.legend(frameon=False, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "reliability.png")
    plt.close(fig)
    return ["roc.png", "reliability.png"]


def score_split(run_dir: str | Path, subset: str = "test", show_progress: bool = True) -> tuple[list[ImageRow], np.ndarray]:
    """The run's rows of ``subset`` (by its own split.csv) and its model's logits for them."""
    run = Path(run_dir)
    cfg, model, _, _ = load_run(run)
    rows = split_rows(cfg, run, subset)
    pre = Preprocess(cfg.preprocess)
    images, kept = decode_all(rows, pre, f"decode {subset}", show_progress, cfg.data.cache_dir, cfg.data.cache,
                              cfg.data.decode_workers)
    return kept, image_logits(model, images, pre)


def compare_runs(runs: dict[str, str | Path], subset: str = "test", n_boot: int = 2000,
                 show_progress: bool = True) -> dict:
    """AUROC of several runs on the same images, each with a patient-clustered CI, and the paired
    difference of every run against the first (same resamples for both, so the interval is honest)."""
    scored = {name: score_split(path, subset, show_progress) for name, path in runs.items()}
    names = list(scored)
    ref_rows = scored[names[0]][0]
    key = [r.path for r in ref_rows]
    for name in names[1:]:
        if [r.path for r in scored[name][0]] != key:
            raise ConfigError(f"runs '{names[0]}' and '{name}' were not evaluated on the same images (other split?)")
    y = np.array([r.label for r in ref_rows])
    patients = [r.patient_id for r in ref_rows]
    out: dict = {"subset": subset, "images": len(y), "positives": int(y.sum()), "runs": {}}
    for name in names:
        s = scored[name][1]
        out["runs"][name] = {"auroc": auroc(y, s), "auroc_ci95": bootstrap_ci(y, s, auroc, patients, n_boot)}
    base = scored[names[0]][1]
    for name in names[1:]:
        diff, ci = paired_difference(y, scored[name][1], base, auroc, clusters=patients, n=n_boot)
        out["runs"][name][f"auroc_minus_{names[0]}"] = diff
        out["runs"][name][f"auroc_minus_{names[0]}_ci95"] = ci
    return out
