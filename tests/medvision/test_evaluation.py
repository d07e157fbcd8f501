"""Clinical evaluation maths, checked against scikit-learn and against cases worked out by hand."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from medvision.evaluation import (
    aggregate,
    average_precision,
    bootstrap_ci,
    calibrate,
    confusion,
    fit_temperature,
    operating_point,
    reliability,
    sensitivity_at_specificity,
    specificity_at_sensitivity,
    summarise,
    threshold_for_specificity,
)
from medvision.metrics import auroc, sensitivity_specificity


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    s = np.round(rng.normal(y * 1.2, 1.0), 1)  # rounding makes ties, the hard case
    return y, s


def test_average_precision_equals_sklearn(data):
    y, s = data
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert np.isnan(average_precision(np.zeros(5), np.arange(5)))


def test_specificity_threshold_reaches_target_and_is_the_most_sensitive(data):
    y, s = data
    for target in (0.5, 0.8, 0.9, 0.95, 1.0):
        thr = threshold_for_specificity(y, s, target)
        sens, spec = sensitivity_specificity(y, s, thr)
        assert spec >= target
        lower = np.nextafter(np.max(s[(y == 0) & (s < thr)], initial=-np.inf), -np.inf)
        assert sensitivity_specificity(y, s, lower)[1] < target or lower == -np.inf
    assert sensitivity_at_specificity(y, s, 0.9) == sensitivity_specificity(y, s, threshold_for_specificity(y, s, 0.9))[0]
    assert 0 <= specificity_at_sensitivity(y, s, 0.9) <= 1


def test_confusion_and_operating_points():
    y = np.array([0, 0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.8, 0.7, 0.9])
    assert confusion(y, p, 0.5) == {"tp": 2, "fp": 1, "tn": 3, "fn": 0}
    op = operating_point(y, p, "sensitivity>=1.0")
    assert op.threshold == 0.7 and op.sensitivity == 1.0 and op.specificity == 0.75 and op.name == "sens100"
    op = operating_point(y, p, "specificity >= 1.0")
    assert op.specificity == 1.0 and op.sensitivity == 0.5
    with pytest.raises(ValueError, match="must read"):
        operating_point(y, p, "ppv>=0.5")


def test_reliability_and_temperature():
    rng = np.random.default_rng(1)
    true_logit = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-true_logit))).astype(int)
    overconfident = 3.0 * true_logit
    t = fit_temperature(y, overconfident)
    assert t == pytest.approx(3.0, rel=0.05)
    before = reliability(y, calibrate(overconfident, 1.0))["ece"]
    after = reliability(y, calibrate(overconfident, t))["ece"]
    assert after < 0.02 < before
    r = reliability(np.array([0, 1]), np.array([0.05, 0.95]), bins=10)
    assert r["ece"] == pytest.approx(0.05) and [b["count"] for b in r["bins"]] == [1, 1]


def test_platt_scaling_removes_the_shift_class_balanced_training_leaves_and_is_chosen_for_it():
    """A model trained on balanced batches scores as if half the images had cancer; at a 15 % cancer rate its
    probabilities are far too high, and a temperature cannot move them down, only flatten them."""
    from medvision.evaluation import fit_calibration, fit_platt

    rng = np.random.default_rng(5)

    def draw(n):  # a feature ~ N(+-1.2, 1); the logit a balanced-trained model reports: its log-odds at 50 %
        y = (rng.random(n) < 0.15).astype(int)
        return y, 2.4 * rng.normal(np.where(y == 1, 1.2, -1.2), 1.0)

    y_fit, z_fit = draw(400)  # a validation split's size
    y_new, z_new = draw(20000)  # held out
    cal, evidence = fit_calibration(y_fit, z_fit, np.arange(400) // 4)  # 4 images per patient
    assert cal.method == "platt" and cal.bias < -1.0
    assert evidence["platt"]["cv_log_loss"] < evidence["temperature"]["cv_log_loss"]
    temperature_only = reliability(y_new, calibrate(z_new, fit_temperature(y_fit, z_fit)))["ece"]
    assert reliability(y_new, cal(z_new))["ece"] < 0.03 < 0.1 < temperature_only
    # already calibrated logits: Platt changes (almost) nothing
    t, b = fit_platt(y_new, z_new + np.log(0.15 / 0.85))  # the true log-odds at 15 %
    assert t == pytest.approx(1.0, abs=0.1) and b == pytest.approx(0.0, abs=0.1)


def test_patient_clustered_bootstrap_is_wider_than_image_bootstrap():
    rng = np.random.default_rng(2)
    patients = np.repeat(np.arange(60), 4)
    y = np.repeat(rng.integers(0, 2, 60), 4)
    s = np.repeat(rng.normal(y[::4] * 1.0, 1.0), 4) + rng.normal(0, 0.05, 240)  # 4 near-copies per patient
    lo_i, hi_i = bootstrap_ci(y, s, auroc, None, n=500, seed=0)
    lo_p, hi_p = bootstrap_ci(y, s, auroc, patients, n=500, seed=0)
    assert lo_p <= auroc(y, s) <= hi_p
    assert hi_p - lo_p > 1.5 * (hi_i - lo_i)


def test_breast_level_aggregation_and_summary():
    keys = ["p1_L", "p1_L", "p1_R", "p1_R", "p2_L", "p2_L"]
    names, y, s = aggregate(keys, np.array([0, 1, 0, 0, 0, 0]), np.array([0.2, 0.8, 0.1, 0.3, 0.4, 0.4]))
    assert names == ["p1_L", "p1_R", "p2_L"] and list(y) == [1, 0, 0] and list(s) == [0.5, 0.2, 0.4]
    assert list(aggregate(keys, np.zeros(6), np.arange(6.0), "max")[2]) == [1.0, 3.0, 5.0]
    rng = np.random.default_rng(3)
    yy = rng.integers(0, 2, 200)
    pp = 1 / (1 + np.exp(-rng.normal(yy * 2 - 1, 1.0)))
    m = summarise(yy, pp, 0.5, clusters=np.arange(200) // 2, n_boot=200)
    assert m["auroc_ci95"][0] < m["auroc"] < m["auroc_ci95"][1]
    assert m["pr_auc_ci95"][0] < m["pr_auc"] < m["pr_auc_ci95"][1]
    assert sum(m["confusion"].values()) == 200 and set(m["sensitivity_at_specificity"]) == {"0.80", "0.90", "0.95"}
    assert 0 <= m["calibration"]["ece"] <= 1
    assert m["ece_ci95"][0] <= m["calibration"]["ece"] <= m["ece_ci95"][1] + 1e-12
    floor = m["ece_if_calibrated"]
    assert 0 < floor["mean"] < floor["p95"] and 0 <= floor["p_value"] <= 1


def test_the_ece_of_a_perfect_model_on_few_cases_is_not_zero_and_a_biased_one_stands_out():
    from medvision.evaluation import ece_if_calibrated

    rng = np.random.default_rng(6)
    p = rng.beta(1, 5, 320)
    y = (rng.random(320) < p).astype(int)
    floor = ece_if_calibrated(p, reliability(y, p)["ece"], n=500)
    assert 0.02 < floor["mean"] < 0.06 and floor["p_value"] > 0.01  # calibrated: an ordinary draw
    shifted = np.clip(p + 0.1, 0, 1)  # ten points too high
    assert ece_if_calibrated(shifted, reliability(y, shifted)["ece"], n=500)["p_value"] < 0.01


def test_temperature_of_uninformative_logits_sits_at_the_bound():
    from medvision.evaluation import TEMPERATURE_RANGE

    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 500)
    t = fit_temperature(y, rng.normal(0, 3, 500))  # logits unrelated to the labels
    assert t == pytest.approx(TEMPERATURE_RANGE[1], rel=0.01)
