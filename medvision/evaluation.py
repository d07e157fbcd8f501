"""Clinical evaluation (numpy only): intervals, operating points, calibration, subgroups, breast level.

Everything here takes labels and scores, so the same code judges a torch checkpoint, an ONNX artifact
and an INT8 candidate. Confidence intervals come from a *patient-clustered* bootstrap: the images of
one patient are correlated, so resampling images would make the intervals too narrow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from medvision.metrics import auroc, sensitivity_specificity, threshold_for_sensitivity


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as the step sum of precision over recall increments
    (equal to ``sklearn.metrics.average_precision_score``). NaN without positives."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.sum() == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def threshold_for_specificity(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The lowest threshold whose specificity (score < threshold counts as negative) reaches ``target``."""
    y = np.asarray(labels).astype(bool).ravel()
    neg = np.sort(np.asarray(scores, dtype=np.float64).ravel()[~y])
    if neg.size == 0:
        return 0.5
    k = min(int(math.ceil(target * neg.size)), neg.size)  # at least k negatives must fall below it
    if k == 0:
        return float(neg[0])
    return float(np.nextafter(neg[k - 1], np.inf))  # just above the k-th lowest negative: most sensitive


def sensitivity_at_specificity(labels, scores, target: float) -> float:
    return sensitivity_specificity(labels, scores, threshold_for_specificity(labels, scores, target))[0]


def specificity_at_sensitivity(labels, scores, target: float) -> float:
    return sensitivity_specificity(labels, scores, threshold_for_sensitivity(labels, scores, target))[1]


def confusion(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, int]:
    y = np.asarray(labels).astype(bool).ravel()
    pred = np.asarray(scores, dtype=np.float64).ravel() >= threshold
    return {"tp": int((pred & y).sum()), "fp": int((pred & ~y).sum()), "tn": int((~pred & ~y).sum()),
            "fn": int((~pred & y).sum())}


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict:
    """Equal-width reliability bins and the expected calibration error (ECE, weighted by bin size)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), 0.0, 1.0)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        m = idx == b
        if not m.any():
            continue
        conf, acc = float(p[m].mean()), float(y[m].mean())
        ece += m.sum() / len(p) * abs(conf - acc)
        rows.append({"bin": b, "count": int(m.sum()), "mean_probability": conf, "observed_rate": acc})
    return {"ece": float(ece), "bins": rows}


TEMPERATURE_RANGE = (0.05, 20.0)


def _nll(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary log-loss of ``sigmoid(logits)`` (``labels`` may be soft targets)."""
    return float(np.mean(np.logaddexp(0.0, logits) - labels * logits))


def ece_if_calibrated(probs: np.ndarray, observed: float, n: int = 1000, seed: int = 0) -> dict:
    """What the ECE would be if ``probs`` were perfectly calibrated: labels drawn as Bernoulli(p), ``n`` times. On a
    few hundred images the ECE of a perfect model is far from 0 (sparse bins), so an observed ECE means little
    without it. Returns its mean and 95th percentile, and the share of draws at or above ``observed`` (a p-value
    for "these probabilities are calibrated")."""
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), 0.0, 1.0)
    rng = np.random.default_rng(seed)
    draws = np.array([reliability((rng.random(p.size) < p).astype(int), p)["ece"] for _ in range(n)])
    return {"mean": float(draws.mean()), "p95": float(np.quantile(draws, 0.95)),
            "p_value": float(np.mean(draws >= observed - 1e-12))}


def fit_temperature(labels: np.ndarray, logits: np.ndarray) -> float:
    """The temperature T minimising the binary log-loss of ``sigmoid(logit / T)`` (golden-section on log T,
    within ``TEMPERATURE_RANGE``; a fit at the upper end means the logits carry almost no information)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    z = np.asarray(logits, dtype=np.float64).ravel()

    def nll(log_t: float) -> float:
        return _nll(y, z / math.exp(log_t))

    lo, hi = (math.log(v) for v in TEMPERATURE_RANGE)
    g = (math.sqrt(5) - 1) / 2
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    for _ in range(80):
        if nll(c) < nll(d):
            hi = d
        else:
            lo = c
        c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    return float(math.exp((lo + hi) / 2))


def fit_platt(labels: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """Platt scaling: the temperature T and bias b of ``sigmoid(logit / T + b)`` minimising the log-loss against
    Platt's smoothed targets ((N+ + 1) / (N+ + 2) and 1 / (N- + 2), so a separable set does not run off to
    infinity); Newton's method with step halving, T kept within ``TEMPERATURE_RANGE``. The bias is what a
    temperature cannot do: remove the shift that class-balanced sampling or another prevalence puts into the
    logits."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    z = np.asarray(logits, dtype=np.float64).ravel()
    pos, neg = y.sum(), len(y) - y.sum()
    t = np.where(y > 0.5, (pos + 1) / (pos + 2), 1 / (neg + 2))
    x = np.stack([z, np.ones_like(z)], axis=1)
    lo, hi = 1 / TEMPERATURE_RANGE[1], 1 / TEMPERATURE_RANGE[0]
    theta = np.array([1.0 / fit_temperature(t, z), math.log((pos + 1) / (neg + 1))])
    loss = _nll(t, x @ theta)
    for _ in range(100):
        p = 1 / (1 + np.exp(-(x @ theta)))
        grad = x.T @ (p - t) / len(z)
        hess = (x.T * (p * (1 - p))) @ x / len(z) + 1e-10 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        for _ in range(30):
            cand = theta - step
            cand[0] = min(max(cand[0], lo), hi)
            cand_loss = _nll(t, x @ cand)
            if cand_loss <= loss:
                break
            step = step / 2
        else:
            break
        done = loss - cand_loss < 1e-12
        theta, loss = cand, cand_loss
        if done:
            break
    return float(1 / theta[0]), float(theta[1])


@dataclass(frozen=True)
class Calibration:
    """How a logit becomes the probability shown to readers: ``sigmoid(logit / temperature + bias)``."""

    method: str = "none"  # "temperature", "platt" or "none"
    temperature: float = 1.0
    bias: float = 0.0

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        return calibrate(logits, self.temperature, self.bias)

    @classmethod
    def of(cls, record: dict | None) -> Calibration:
        """From a run's ``calibration.json`` (runs written before Platt scaling hold a temperature only)."""
        if not record:
            return cls()
        return cls(record.get("method", "temperature"), float(record["temperature"]), float(record.get("bias", 0.0)))


def _folds(groups: np.ndarray, k: int, seed: int = 0) -> list[np.ndarray]:
    """``k`` folds of whole groups (patients), each index in one fold."""
    uniq = np.unique(groups)
    order = np.random.default_rng(seed).permutation(len(uniq))
    fold_of = dict(zip(uniq[order], np.arange(len(uniq)) % k, strict=True))
    per = np.array([fold_of[g] for g in groups])
    return [np.flatnonzero(per == f) for f in range(k)]


def fit_calibration(labels: np.ndarray, logits: np.ndarray, groups: Sequence | None = None,
                    folds: int = 5) -> tuple[Calibration, dict]:
    """Temperature scaling or Platt scaling, whichever predicts held-out labels better: each is fitted on all but
    one fold of patients and scored (log-loss) on that fold, in turn. Returns the chosen calibration fitted on every
    image, and the evidence (out-of-fold log-loss and ECE of each method)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    z = np.asarray(logits, dtype=np.float64).ravel()
    g = np.asarray(groups) if groups is not None else np.arange(len(y))
    fitters = {"temperature": lambda yy, zz: (fit_temperature(yy, zz), 0.0), "platt": fit_platt}
    out_of_fold = {m: np.full_like(z, np.nan) for m in fitters}
    for held in _folds(g, min(folds, len(np.unique(g)))):
        fit = np.setdiff1d(np.arange(len(y)), held)
        if len(np.unique(y[fit])) < 2:
            continue  # a fold without both classes cannot be fitted; leave it to the others
        for m, fitter in fitters.items():
            out_of_fold[m][held] = calibrate(z[held], *fitter(y[fit], z[fit]))
    evidence = {}
    for m in fitters:
        scored = np.isfinite(out_of_fold[m])
        p, yy = np.clip(out_of_fold[m][scored], 1e-12, 1 - 1e-12), y[scored]
        evidence[m] = {"cv_log_loss": float(-np.mean(yy * np.log(p) + (1 - yy) * np.log(1 - p))),
                       "cv_ece": reliability(yy, p)["ece"]}
    method = min(fitters, key=lambda m: evidence[m]["cv_log_loss"])
    temperature, bias = fitters[method](y, z)
    return Calibration(method, temperature, bias), evidence


def calibrate(logits: np.ndarray, temperature: float, bias: float = 0.0) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(np.asarray(logits, dtype=np.float64) / temperature + bias)))


def bootstrap_ci(
    labels: np.ndarray, scores: np.ndarray, metric: Callable[[np.ndarray, np.ndarray], float],
    clusters: Sequence | None = None, n: int = 2000, seed: int = 0, alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric``, resampling whole clusters (patients) with replacement."""
    y = np.asarray(labels)
    s = np.asarray(scores)
    ids = np.asarray(clusters) if clusters is not None else np.arange(len(y))
    uniq, inverse = np.unique(ids, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(len(uniq))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        pick = rng.integers(0, len(uniq), len(uniq))
        idx = np.concatenate([members[k] for k in pick])
        v = metric(y[idx], s[idx])
        if np.isfinite(v):
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    return float(np.quantile(values, alpha / 2)), float(np.quantile(values, 1 - alpha / 2))


def paired_difference(
    labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
    metric_a: Callable[[np.ndarray, np.ndarray], float], metric_b: Callable[[np.ndarray, np.ndarray], float] | None = None,
    clusters: Sequence | None = None, n: int = 2000, seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """``metric_a(a) - metric_b(b)`` on the same images and its clustered bootstrap 95 % interval.

    Both models are scored on the *same* resamples (a paired bootstrap), so the interval reflects the
    difference between them, not the sampling noise of each one separately.
    """
    metric_b = metric_b or metric_a
    both = np.stack([np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)], axis=1)

    def diff(y: np.ndarray, s: np.ndarray) -> float:
        return metric_a(y, s[:, 0]) - metric_b(y, s[:, 1])

    return diff(np.asarray(labels), both), bootstrap_ci(labels, both, diff, clusters, n, seed)


@dataclass(frozen=True)
class OperatingPoint:
    name: str
    rule: str
    threshold: float
    sensitivity: float
    specificity: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def operating_point(labels, probs, rule: str) -> OperatingPoint:
    """Choose a threshold by rule, ``"sensitivity>=0.90"`` or ``"specificity>=0.95"``, on these scores."""
    kind, _, value = rule.replace(" ", "").partition(">=")
    target = float(value)
    if kind == "sensitivity":
        thr = threshold_for_sensitivity(labels, probs, target)
    elif kind == "specificity":
        thr = threshold_for_specificity(labels, probs, target)
    else:
        raise ValueError(f"operating-point rule {rule!r} must read 'sensitivity>=x' or 'specificity>=x'")
    sens, spec = sensitivity_specificity(labels, probs, thr)
    return OperatingPoint(name=f"{kind[:4]}{round(target * 100)}", rule=f"{kind} >= {target:.2f} on validation",
                          threshold=thr, sensitivity=sens, specificity=spec)


def aggregate(keys: Sequence[str], labels: np.ndarray, scores: np.ndarray, how: str = "mean"):
    """Combine images sharing a key (e.g. patient + laterality = one breast): label = any, score = mean/max."""
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    f = np.mean if how == "mean" else np.max
    names = list(groups)
    y = np.array([int(np.max(np.asarray(labels)[groups[k]])) for k in names])
    s = np.array([float(f(np.asarray(scores)[groups[k]])) for k in names])
    return names, y, s


def summarise(labels, probs, threshold: float, clusters=None, specificities=(0.8, 0.9, 0.95),
              sensitivities=(0.8, 0.9, 0.95), n_boot: int = 2000, seed: int = 0) -> dict:
    """Every headline metric with patient-clustered 95 % intervals."""
    y = np.asarray(labels).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    sens, spec = sensitivity_specificity(y, p, threshold)
    out = {
        "n": int(len(y)), "positives": int(y.sum()),
        "auroc": auroc(y, p), "auroc_ci95": bootstrap_ci(y, p, auroc, clusters, n_boot, seed),
        "pr_auc": average_precision(y, p), "pr_auc_ci95": bootstrap_ci(y, p, average_precision, clusters, n_boot, seed),
        "threshold": threshold, "sensitivity": sens, "specificity": spec,
        "sensitivity_ci95": bootstrap_ci(y, p, lambda a, b: sensitivity_specificity(a, b, threshold)[0],
                                         clusters, n_boot, seed),
        "specificity_ci95": bootstrap_ci(y, p, lambda a, b: sensitivity_specificity(a, b, threshold)[1],
                                         clusters, n_boot, seed),
        "confusion": confusion(y, p, threshold),
        "sensitivity_at_specificity": {f"{t:.2f}": sensitivity_at_specificity(y, p, t) for t in specificities},
        "specificity_at_sensitivity": {f"{t:.2f}": specificity_at_sensitivity(y, p, t) for t in sensitivities},
        "calibration": reliability(y, p),
        "ece_ci95": bootstrap_ci(y, p, lambda a, b: reliability(a, b)["ece"], clusters, n_boot, seed),
    }
    out["ece_if_calibrated"] = ece_if_calibrated(p, out["calibration"]["ece"], max(n_boot // 2, 200), seed)
    return out


def age_band(age: float | None) -> str:
    if age is None or not np.isfinite(age):
        return "unknown"
    if age < 50:
        return "<50"
    if age < 60:
        return "50-59"
    if age < 70:
        return "60-69"
    return "70+"
