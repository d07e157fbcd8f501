"""What a site's images and scores look like, against what the model was validated on.

A threshold set on one population moves when the population moves: another vendor's processing, another age mix,
another prevalence. ``profile`` describes one scored image by the quantities that shift between sites (header
attributes, simple statistics of the model's input, the probability); ``Reference`` summarises them over the
images the model was validated on (it travels in the artifact); ``compare`` tests a site's recent images against it,
one quantity at a time:

- categorical quantities (manufacturer, model, transfer syntax, view, laterality, age band, image size):
  Pearson's chi-square test of homogeneity of the site's and the reference's counts (categories never seen in
  validation pooled into one), with the Jensen-Shannon distance as the effect size;
- continuous quantities (probability, breast area fraction, grey-level percentiles): the Kolmogorov-Smirnov
  distance between the site's values and the reference's distribution, with the two-sample critical value
  ``c(alpha) * sqrt(1/n + 1/m)``, and the Wasserstein-1 distance as the effect size.

Images of one study are not independent (four views share the patient, the vendor, the age), so every test counts
**studies**, not images, as its sample size. An alarm needs a window of at least ``min_studies`` studies, a
p-value below ``alpha`` divided by the number of quantities (Bonferroni: one false alarm in about 1 / alpha
windows of an unchanged site), and an effect above a floor, so a large site does not alarm on differences
nobody would act on.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

CATEGORICAL = ("manufacturer", "model", "transfer_syntax", "view", "laterality", "age_band", "size")
CONTINUOUS = ("probability", "breast_fraction", "grey_p10", "grey_p50", "grey_p90")
QUANTILES = 101  # the reference keeps each continuous quantity as its 0..100th percentiles
OTHER = "(other)"
MISSING = "(not recorded)"

# the age bands of the evaluation report's subgroups
_BANDS = ((50, "<50"), (60, "50-59"), (70, "60-69"), (200, "70+"))


def age_band(age_string: str | None) -> str:
    """DICOM Age String (``055Y``) -> an age band; only the band is ever kept."""
    m = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY]?)\s*", age_string or "")
    if not m:
        return MISSING
    years = int(m.group(1)) / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[m.group(2) or "Y"]
    return next(label for limit, label in _BANDS if years < limit)


def percentiles(values: np.ndarray, qs) -> list[float]:
    """``np.percentile(values, qs)`` (its default linear interpolation, as numpy computes it) of a flat array, from
    one sort: numpy's vectorised sort beats the partial sort ``np.percentile`` runs (a quarter of the time on a model
    input, computed for every scored image)."""
    n = values.size
    positions = [q / 100 * (n - 1) for q in qs]
    lows = [math.floor(p) for p in positions]
    part = np.sort(values)
    out = []
    for p, lo in zip(positions, lows, strict=True):
        a, b, t = float(part[lo]), float(part[min(lo + 1, n - 1)]), p - lo
        out.append(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)
    return out


def image_statistics(grey: np.ndarray) -> dict[str, float]:
    """Statistics of the model's input before normalisation (display greys in [0, 1]): the share of the image that
    is breast (grey above 0.05) and the breast's 10th, 50th and 90th grey percentiles."""
    g = np.asarray(grey, dtype=np.float32).reshape(-1)
    breast = g[g > 0.05]
    if breast.size == 0:
        return {"breast_fraction": 0.0, "grey_p10": 0.0, "grey_p50": 0.0, "grey_p90": 0.0}
    p10, p50, p90 = percentiles(breast, (10, 50, 90))
    return {"breast_fraction": float(breast.size / g.size), "grey_p10": float(p10), "grey_p50": float(p50),
            "grey_p90": float(p90)}


def input_statistics(x: np.ndarray, config) -> dict[str, float]:
    """``image_statistics`` of a model input ``x`` normalised by ``config`` (a ``PreprocessConfig``): its greys
    recovered first. Computed where the image was prepared (a decoding worker), not where it is scored."""
    return image_statistics(np.asarray(x, dtype=np.float32) * config.std + config.mean)


def profile(header: dict, grey: np.ndarray | dict, probability: float | None = None) -> dict:
    """One scored image's drift quantities: ``header`` from ``header_of`` (a decoded image's ``DicomMeta``) or
    ``header_of_index`` (a scanned file), ``grey`` the model input before normalisation (or its
    ``image_statistics``, computed already). No identifier is kept (an age band, not an age)."""
    out = {**header, **(grey if isinstance(grey, dict) else image_statistics(grey))}
    if probability is not None:
        out["probability"] = float(probability)
    return out


def _header(manufacturer, model, transfer_syntax, view, laterality, band, rows, columns) -> dict:
    return {"manufacturer": str(manufacturer or MISSING)[:64], "model": str(model or MISSING)[:64],
            "transfer_syntax": str(transfer_syntax or MISSING)[:64], "view": str(view or MISSING)[:16],
            "laterality": str(laterality or MISSING)[:16], "age_band": band or MISSING, "size": f"{rows}x{columns}"}


def header_of(meta) -> dict:
    """The categorical quantities of a decoded image (``dicom_io.DicomMeta``)."""
    return _header(meta.manufacturer, meta.model_name, meta.transfer_syntax, meta.view, meta.laterality,
                   meta.age_band, meta.rows, meta.columns)


def header_of_index(row) -> dict:
    """The categorical quantities of a scanned file (``scan.IndexRow``)."""
    return _header(row.manufacturer, row.model, row.transfer_syntax, row.view, row.laterality,
                   age_band(row.patient_age), row.rows, row.columns)


class Reference(BaseModel):
    """The distributions a model was validated on (stored in its artifact)."""

    model_config = ConfigDict(extra="forbid")

    images: int
    studies: int
    source: str = Field("", description="which images, e.g. 'validation + test splits'")
    categorical: dict[str, dict[str, int]] = Field(description="quantity -> category -> images")
    continuous: dict[str, list[float]] = Field(description=f"quantity -> its {QUANTILES} percentiles (0..100)")


def build_reference(profiles: Sequence[dict], studies: Sequence[str], source: str = "") -> Reference:
    categorical = {q: dict(Counter(p[q] for p in profiles if q in p).most_common()) for q in CATEGORICAL}
    continuous = {}
    for q in CONTINUOUS:
        values = np.array([p[q] for p in profiles if q in p], dtype=np.float64)
        if values.size:
            continuous[q] = [round(float(v), 6) for v in np.percentile(values, np.linspace(0, 100, QUANTILES))]
    return Reference(images=len(profiles), studies=len(set(studies)), source=source, categorical=categorical,
                     continuous=continuous)


@dataclass(frozen=True)
class Drift:
    """The test of one quantity over one window."""

    quantity: str
    kind: str  # categorical / continuous
    test: str
    studies: int
    statistic: float
    p_value: float | None
    effect: float  # Jensen-Shannon distance (categorical) or Wasserstein-1 (continuous)
    effect_name: str
    alarm: bool
    reason: str
    site: dict  # category -> share (categories the reference never saw pooled), or percentiles 10/50/90
    reference: dict
    site_categories: dict | None = None  # the site's own categories and shares, unseen ones by name

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _chi2_sf(x: float, dof: int) -> float:
    """Survival function of the chi-square distribution (regularised upper incomplete gamma, by series / continued
    fraction as in Numerical Recipes), so the service needs no scipy."""
    if x <= 0 or dof <= 0:
        return 1.0
    a, z = dof / 2.0, x / 2.0
    if z < a + 1:  # series for the lower gamma
        term = total = 1.0 / a
        n = a
        for _ in range(500):
            n += 1
            term *= z / n
            total += term
            if abs(term) < abs(total) * 1e-12:
                break
        return max(0.0, 1.0 - total * math.exp(-z + a * math.log(z) - math.lgamma(a)))
    b, c, d = z + 1 - a, 1e300, 1 / (z + 1 - a)
    h = d
    for i in range(1, 500):  # Lentz's continued fraction for the upper gamma
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1 / d
        step = d * c
        h *= step
        if abs(step - 1) < 1e-12:
            break
    return min(1.0, math.exp(-z + a * math.log(z) - math.lgamma(a)) * h)


def _ks_p(distance: float, n: int, m: int) -> float:
    """Asymptotic two-sample Kolmogorov-Smirnov p-value."""
    en = math.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * distance
    if lam < 1e-3:
        return 1.0
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return float(min(max(p, 0.0), 1.0))


def _categorical(quantity: str, ref_counts: dict[str, int], values: list[str], studies: int,
                 reference_studies: int) -> Drift:
    seen = set(ref_counts)
    site = Counter(v if v in seen else OTHER for v in values)
    cats = sorted(seen | set(site))
    ref = np.array([ref_counts.get(c, 0) for c in cats], dtype=np.float64)
    obs = np.array([site.get(c, 0) for c in cats], dtype=np.float64)
    ref_p, obs_p = ref / max(ref.sum(), 1), obs / max(obs.sum(), 1)
    # homogeneity of the two samples, each counted in studies (image counts scaled: a design effect)
    table = np.stack([ref_p * reference_studies, obs_p * studies])
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / max(table.sum(), 1e-12)
    chi2 = float(np.sum((table - expected) ** 2 / np.where(expected > 0, expected, 1.0)))
    p = _chi2_sf(chi2, len(cats) - 1) if len(cats) > 1 and studies else 1.0
    mix = (ref_p + obs_p) / 2

    def kl(a, b):
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / b[nz])))

    js = math.sqrt(max(0.0, (kl(ref_p, mix) + kl(obs_p, mix)) / 2))
    named = Counter(values)
    return Drift(quantity, "categorical", "chi-square test of homogeneity (studies)", studies, chi2, p, js,
                 "Jensen-Shannon distance", False, "",
                 {c: float(s) for c, s in zip(cats, obs_p, strict=True)},
                 {c: float(r) for c, r in zip(cats, ref_p, strict=True)},
                 {c: n / len(values) for c, n in named.most_common(12)})


def _continuous(quantity: str, ref_quantiles: list[float], values: list[float], studies: int,
                reference_studies: int) -> Drift:
    x = np.sort(np.asarray(values, dtype=np.float64))
    q = np.asarray(ref_quantiles, dtype=np.float64)
    levels = np.linspace(0, 1, len(q))
    grid = np.unique(np.concatenate([x, q]))
    site_cdf = np.searchsorted(x, grid, side="right") / len(x)
    ref_cdf = np.interp(grid, q, levels, left=0.0, right=1.0)
    distance = float(np.max(np.abs(site_cdf - ref_cdf)))
    # Wasserstein-1 between the two quantile functions
    site_q = np.percentile(x, levels * 100)
    wasserstein = float(np.mean(np.abs(site_q - q)))
    p = _ks_p(distance, studies, reference_studies)
    return Drift(quantity, "continuous", "Kolmogorov-Smirnov, two-sample (studies)", studies, distance, p,
                 wasserstein, "Wasserstein-1", False, "",
                 {"p10": float(np.percentile(x, 10)), "p50": float(np.percentile(x, 50)),
                  "p90": float(np.percentile(x, 90))},
                 {"p10": float(q[10 * (len(q) - 1) // 100]), "p50": float(q[(len(q) - 1) // 2]),
                  "p90": float(q[90 * (len(q) - 1) // 100])})


@dataclass(frozen=True)
class DriftPolicy:
    """When a difference is an alarm. The defaults: no alarm before 100 studies; one false alarm in about 1,000
    windows of an unchanged site; effects below a Jensen-Shannon distance of 0.1, or a Wasserstein distance of
    0.03 (probability and greys are in [0, 1]; 0.03 is three points of probability), are not worth an alarm."""

    min_studies: int = 100
    alpha: float = 0.001
    min_js: float = 0.1
    min_wasserstein: float = 0.03


def compare(reference: Reference, profiles: Sequence[dict], studies: Sequence[str],
            policy: DriftPolicy = DriftPolicy()) -> list[Drift]:
    """Each quantity of ``profiles`` (a site's recent images; ``studies`` their study UIDs) tested against the
    reference; ``alarm`` set where the policy says so."""
    n = len(set(studies))
    quantities = [q for q in CATEGORICAL if q in reference.categorical] + \
        [q for q in CONTINUOUS if q in reference.continuous]
    level = policy.alpha / max(len(quantities), 1)
    out = []
    for q in quantities:
        values = [p[q] for p in profiles if q in p]
        if not values:
            continue
        if q in reference.categorical:
            d = _categorical(q, reference.categorical[q], values, n, reference.studies)
            big = d.effect >= policy.min_js
        else:
            d = _continuous(q, reference.continuous[q], values, n, reference.studies)
            big = d.effect >= policy.min_wasserstein
        significant = d.p_value is not None and d.p_value < level
        if n < policy.min_studies:
            reason = f"{n} studies: an alarm needs {policy.min_studies}"
        elif not significant:
            reason = f"p = {d.p_value:.2g}: within what chance gives (alarm below {level:.1g})"
        elif not big:
            reason = f"significant but small ({d.effect_name} {d.effect:.3f})"
        else:
            reason = f"p = {d.p_value:.2g} < {level:.1g} and {d.effect_name} {d.effect:.3f}"
        alarm = n >= policy.min_studies and significant and big
        out.append(Drift(**{**d.__dict__, "alarm": alarm, "reason": reason}))
    return out
