import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medvision.metrics import auroc, sensitivity_specificity, threshold_for_sensitivity


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.3 * y, 1)  # rounding creates many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auroc_one_class_is_nan():
    assert np.isnan(auroc(np.ones(5), np.arange(5)))


def test_threshold_reaches_the_target_sensitivity():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = rng.random(500) + 0.5 * y
    for target in (0.5, 0.8, 0.9, 1.0):
        t = threshold_for_sensitivity(y, s, target)
        sens, _ = sensitivity_specificity(y, s, t)
        assert sens >= target
        # the highest such threshold: any higher one misses the target
        higher = np.min(s[s > t]) if np.any(s > t) else None
        if higher is not None:
            assert sensitivity_specificity(y, s, higher)[0] < target
