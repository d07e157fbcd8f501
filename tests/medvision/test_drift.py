"""Drift tests: the quantities of a scored image, the reference a model carries, and when a site's window alarms.
The statistics are checked against scipy; the policy against repeated draws of an unchanged and a shifted site."""

import numpy as np
import pytest

from medvision.drift import (
    DriftPolicy,
    _chi2_sf,
    _ks_p,
    age_band,
    build_reference,
    compare,
    image_statistics,
)


def test_age_bands_keep_no_age():
    assert [age_band(a) for a in ("045Y", "055Y", "069Y", "081Y", "600M", "", None, "abc")] == \
        ["<50", "50-59", "60-69", "70+", "50-59", "(not recorded)", "(not recorded)", "(not recorded)"]


def test_chi_square_and_ks_tails_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for x, dof in ((3.841, 1), (11.07, 5), (0.5, 3), (40.0, 6), (200.0, 10)):
        assert _chi2_sf(x, dof) == pytest.approx(stats.chi2.sf(x, dof), rel=1e-6, abs=1e-12)
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 300), rng.normal(0.3, 1, 500)
    ks = stats.ks_2samp(a, b, method="asymp")
    assert _ks_p(ks.statistic, 300, 500) == pytest.approx(ks.pvalue, rel=0.05)


def test_image_statistics_of_a_model_input():
    grey = np.zeros((100, 100), np.float32)
    grey[:, :40] = np.linspace(0.2, 0.8, 40)  # 40 % breast
    s = image_statistics(grey)
    assert s["breast_fraction"] == pytest.approx(0.4)
    assert 0.2 < s["grey_p10"] < s["grey_p50"] < s["grey_p90"] < 0.8
    assert image_statistics(np.zeros((8, 8)))["breast_fraction"] == 0.0


def _site(rng, studies: int, maker_p=(0.5, 0.3, 0.2), shift: float = 0.0, new_vendor: bool = False):
    """``studies`` four-view studies; what one study shares (vendor, age band) is drawn once per study."""
    profiles, uids = [], []
    for s in range(studies):
        maker = "Draco" if new_vendor else str(rng.choice(["Aurora", "Borealis", "Cygnus"], p=maker_p))
        band = str(rng.choice(["<50", "50-59", "60-69", "70+"]))
        level = rng.normal(0.5, 0.08)  # a patient's breast density moves all four views
        for view in ("CC", "MLO", "CC", "MLO"):
            profiles.append({"manufacturer": maker, "view": view, "age_band": band,
                             "probability": float(np.clip(rng.beta(2, 8) + shift, 0, 1)),
                             "grey_p50": float(level + rng.normal(0, 0.02))})
            uids.append(f"study-{s}")
    return profiles, uids


def test_an_unchanged_site_does_not_alarm_and_a_shifted_one_does():
    rng = np.random.default_rng(1)
    reference = build_reference(*_site(rng, 160), source="validation")  # the demo's validation + test size
    assert reference.studies == 160 and reference.images == 640 and len(reference.continuous["probability"]) == 101
    false_alarms = sum(any(d.alarm for d in compare(reference, *_site(rng, 150))) for _ in range(200))
    assert false_alarms <= 4  # Bonferroni at 0.001 over 5 quantities: about 0.2 expected in 200 windows
    shifted = compare(reference, *_site(rng, 150, shift=0.12))
    assert {d.quantity for d in shifted if d.alarm} == {"probability"}
    vendor = {d.quantity: d for d in compare(reference, *_site(rng, 150, new_vendor=True))}
    assert vendor["manufacturer"].alarm and "(other)" in vendor["manufacturer"].site
    few = compare(reference, *_site(rng, 30, new_vendor=True))  # a handful of studies: never an alarm
    assert not any(d.alarm for d in few) and all("needs 100" in d.reason for d in few)


def test_a_tiny_but_significant_difference_on_a_big_site_is_not_an_alarm():
    rng = np.random.default_rng(2)
    reference = build_reference(*_site(rng, 5000))
    drift = {d.quantity: d for d in compare(reference, *_site(rng, 5000, maker_p=(0.42, 0.35, 0.23)),
                                            DriftPolicy())}
    m = drift["manufacturer"]
    assert m.p_value < 0.001 / 5 and m.effect < 0.1 and not m.alarm and "small" in m.reason


def test_the_percentiles_of_every_scored_image_are_numpys():
    from medvision.drift import percentiles

    rng = np.random.default_rng(3)
    for n in [*range(1, 40), 1000, 16384]:
        for dtype in (np.float32, np.float64):
            values = rng.random(n).astype(dtype)
            if n % 5 == 0:
                values[: n // 2] = values[0]  # ties
            assert percentiles(values, (10, 50, 90)) == pytest.approx(np.percentile(values, [10, 50, 90]),
                                                                      abs=1e-7, rel=1e-7)
