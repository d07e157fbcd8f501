"""A site's own calibration and operating point, fitted on its outcomes, proven on its held-out studies.

The model's probability was calibrated, and its threshold chosen, on the validation split: another site (another
vendor, another population, another cancer rate) gets other probabilities and another sensitivity at that
threshold. ``recalibrate`` takes what the site already has (the model's stored probability of each image and the
outcome of each study) and, on one part of the site's studies, refits a Platt scaling on top of the model's
probability and chooses the site's threshold by the same rule as ``medvision evaluate``; the other part is held out
to prove it. The result is an *overlay*: it changes this site's probabilities and threshold only, for this artifact
only, and is applied by an administrator, never by itself.

The overlay's gate, on the held-out studies: the rule's metric (e.g. sensitivity, for ``sensitivity>=0.90``) at the
new threshold is within ``tolerance`` (2 points) of the target, and it is better than the model's own threshold
there: a higher value of the rule's metric where the model's threshold missed the target, or, where the model's
threshold met it already, a better other metric (specificity) at no loss of the rule's; and the model must separate
the site's cases at all (held-out AUROC interval above 0.5), since a threshold cannot repair a model that does not.
"""

from __future__ import annotations

import datetime as _dt
import hashlib

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from medvision.evaluation import bootstrap_ci, calibrate, fit_platt, operating_point, reliability
from medvision.metrics import auroc, sensitivity_specificity


class Measured(BaseModel):
    """Held-out sensitivity and specificity at one threshold, with study-clustered 95 % intervals."""

    model_config = ConfigDict(extra="forbid")

    threshold: float
    sensitivity: float
    sensitivity_ci95: list[float]
    specificity: float
    specificity_ci95: list[float]


class Evidence(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fit_studies: int
    fit_images: int
    held_out_studies: int
    held_out_images: int
    held_out_cancer_images: int
    prevalence: float = Field(description="cancer share of the site's images (fit and held-out)")
    model_threshold: Measured = Field(description="the artifact's own threshold, on the held-out studies")
    site_threshold: Measured = Field(description="the site's new threshold, on the held-out studies")
    ece_before: float = Field(description="held-out ECE of the model's probability")
    ece_after: float = Field(description="held-out ECE of the site's probability")
    auroc: float = Field(description="held-out AUROC of the model at this site (calibration does not change it)")
    auroc_ci95: list[float]


class SiteCalibration(BaseModel):
    """The overlay: ``p_site = sigmoid(logit(p_model) / temperature + bias)``, ``label = p_site >= threshold``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    site: str
    artifact_sha256: str
    model_name: str = ""
    rule: str
    target: float
    temperature: float = Field(gt=0)
    bias: float
    threshold: float = Field(ge=0, le=1)
    evidence: Evidence
    accepted: bool
    reasons: list[str] = Field(description="why the gate accepted or refused it")
    tolerance: float = 0.02
    created_utc: str = ""

    def probability(self, p_model: float | np.ndarray) -> np.ndarray:
        p = np.clip(np.asarray(p_model, dtype=np.float64), 1e-7, 1 - 1e-7)
        return calibrate(np.log(p / (1 - p)), self.temperature, self.bias)


def held_out(study: str, fraction: float, salt: str = "") -> bool:
    """Whether a study is in the held-out part: by a hash of its UID, so the split is fixed for a site and keeps
    every image of a study (and so of a patient's exam) on one side."""
    digest = hashlib.sha256(f"{salt}|{study}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _measured(y, p, threshold: float, clusters, n_boot: int, seed: int) -> Measured:
    sens, spec = sensitivity_specificity(y, p, threshold)
    return Measured(
        threshold=threshold, sensitivity=sens, specificity=spec,
        sensitivity_ci95=list(bootstrap_ci(y, p, lambda a, b: sensitivity_specificity(a, b, threshold)[0],
                                           clusters, n_boot, seed)),
        specificity_ci95=list(bootstrap_ci(y, p, lambda a, b: sensitivity_specificity(a, b, threshold)[1],
                                           clusters, n_boot, seed)))


def judge(evidence: Evidence, kind: str, target: float, tolerance: float) -> tuple[bool, list[str]]:
    """The gate, from the held-out evidence alone: the site's threshold reaches the target within ``tolerance``, does
    better than the model's own threshold, and the model separates the site's cases at all. (accepted, reasons)."""
    old, new = evidence.model_threshold, evidence.site_threshold
    metric = "sensitivity" if kind == "sensitivity" else "specificity"
    other = "specificity" if metric == "sensitivity" else "sensitivity"
    m_old, m_new = getattr(old, metric), getattr(new, metric)
    reasons = []
    near = m_new >= target - tolerance
    reasons.append(f"held-out {metric} at the site's threshold {m_new:.3f} is "
                   + ("within" if near else "not within") + f" {100 * tolerance:.0f} points of the target {target:.2f}")
    if m_old < target - tolerance:
        better = m_new > m_old
        reasons.append(f"the model's own threshold gives {m_old:.3f} here: the site's is "
                       + ("better" if better else "not better"))
    else:
        better = getattr(new, other) > getattr(old, other) and m_new >= m_old - 1e-12
        reasons.append(f"the model's own threshold meets the target here ({metric} {m_old:.3f}); the site's "
                       + (f"improves {other}" if better else f"does not improve {other} at no loss of {metric}"))
    auc, auc_ci = evidence.auroc, evidence.auroc_ci95
    separates = auc_ci[0] > 0.5
    reasons.append(f"held-out AUROC {auc:.3f} (95 % CI {auc_ci[0]:.3f} to {auc_ci[1]:.3f}): the model "
                   + ("separates" if separates else "does not show that it separates")
                   + " this site's cases" + ("" if separates else ", and no threshold can fix that"))
    return near and better and separates, reasons


def consistent(overlay: SiteCalibration) -> bool:
    """Whether an overlay's verdict and threshold are what its own evidence says (a file edited by hand is not)."""
    kind = overlay.rule.replace(" ", "").partition(">=")[0]
    accepted, _ = judge(overlay.evidence, kind, overlay.target, overlay.tolerance)
    return accepted == overlay.accepted and overlay.evidence.site_threshold.threshold == overlay.threshold


def recalibrate(site: str, artifact_sha256: str, model_threshold: float, probabilities, labels, studies,
                rule: str = "sensitivity>=0.90", held_out_fraction: float = 0.5, tolerance: float = 0.02,
                n_boot: int = 2000, seed: int = 0, model_name: str = "",
                held_out_mask=None) -> SiteCalibration:
    """Fit the site's overlay on one part of its studies and judge it on the other (see the module's text).

    ``probabilities``: the model's (calibrated) probability of each image as served; ``labels``: each image's
    outcome (1 = cancer); ``studies``: each image's study UID (the unit of the split and of the intervals);
    ``held_out_mask``: which images to hold out, instead of the split by study hash (e.g. a site's first studies to
    fit, the later ones to prove)."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    s = np.asarray(studies)
    kind, _, value = rule.replace(" ", "").partition(">=")
    if kind not in ("sensitivity", "specificity"):
        raise ValueError(f"rule {rule!r} must read 'sensitivity>=x' or 'specificity>=x'")
    target = float(value)
    test = (np.asarray(held_out_mask, dtype=bool) if held_out_mask is not None
            else np.array([held_out(x, held_out_fraction, site) for x in s]))
    fit = ~test
    for part, name in ((fit, "fit"), (test, "held-out")):
        if len(set(y[part])) < 2:
            raise ValueError(f"the {name} part of the site's studies needs outcomes of both kinds "
                             f"({int(part.sum())} images, {int(y[part].sum())} cancer): more labelled studies")
    z = np.log(np.clip(p, 1e-7, 1 - 1e-7) / np.clip(1 - p, 1e-7, 1))
    temperature, bias = fit_platt(y[fit], z[fit])
    p_site = calibrate(z, temperature, bias)
    threshold = operating_point(y[fit], p_site[fit], rule).threshold
    clusters = s[test]
    old = _measured(y[test], p[test], model_threshold, clusters, n_boot, seed)
    new = _measured(y[test], p_site[test], threshold, clusters, n_boot, seed)
    auc = auroc(y[test], p[test])
    auc_ci = bootstrap_ci(y[test], p[test], auroc, clusters, n_boot, seed)
    evidence = Evidence(
        fit_studies=len(set(s[fit])), fit_images=int(fit.sum()), held_out_studies=len(set(s[test])),
        held_out_images=int(test.sum()), held_out_cancer_images=int(y[test].sum()), prevalence=float(y.mean()),
        model_threshold=old, site_threshold=new, ece_before=reliability(y[test], p[test])["ece"],
        ece_after=reliability(y[test], p_site[test])["ece"], auroc=auc, auroc_ci95=list(auc_ci))
    accepted, reasons = judge(evidence, kind, target, tolerance)
    return SiteCalibration(
        site=site, artifact_sha256=artifact_sha256, model_name=model_name, rule=f"{kind} >= {target:.2f}",
        target=target, temperature=temperature, bias=bias, threshold=threshold, evidence=evidence,
        accepted=accepted, reasons=reasons, tolerance=tolerance,
        created_utc=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
