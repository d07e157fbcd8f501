"""A site's overlay: fitted on one part of its studies, judged on the other, accepted only when it brings the
rule's metric back to the target and does better than the model's own threshold there."""

import numpy as np
import pytest

from medvision.evaluation import calibrate
from medvision.site_calibration import consistent, held_out, recalibrate


def _site(rng, studies: int, shift: float, prevalence: float = 0.15, informative: bool = True):
    """Four images per study; the model's logit for a cancer image sits ``shift`` lower than where it was
    validated (another vendor's processing makes findings fainter)."""
    y = np.repeat((rng.random(studies) < prevalence).astype(int), 4)
    signal = np.where(y == 1, 1.5 - shift, -1.5) if informative else np.zeros(y.size)
    z = signal + rng.normal(0, 1.0, y.size) - 1.7
    uids = np.repeat([f"1.2.826.0.1.{i}" for i in range(studies)], 4)
    return calibrate(z, 1.0), y, uids


def test_the_split_keeps_studies_whole_and_is_fixed_for_a_site():
    uids = [f"1.2.3.{i}" for i in range(2000)]
    part = [held_out(u, 0.5, "site-b") for u in uids]
    assert 0.45 < np.mean(part) < 0.55 and part == [held_out(u, 0.5, "site-b") for u in uids]
    assert part != [held_out(u, 0.5, "site-c") for u in uids]


def test_a_site_whose_sensitivity_fell_gets_it_back_on_held_out_studies():
    rng = np.random.default_rng(0)
    p, y, uids = _site(rng, 1200, shift=1.0)
    validated_threshold = float(calibrate(-0.2 - 1.2816, 1.0))  # sensitivity 0.90 where it was validated (shift 0)
    overlay = recalibrate("site-b", "ab" * 32, validated_threshold, p, y, uids, n_boot=300)
    ev = overlay.evidence
    assert ev.model_threshold.sensitivity < 0.80  # the drop the site suffered at the model's threshold
    assert ev.site_threshold.sensitivity == pytest.approx(0.90, abs=0.04)
    assert ev.site_threshold.sensitivity_ci95[0] <= ev.site_threshold.sensitivity <= ev.site_threshold.sensitivity_ci95[1]
    assert overlay.accepted and overlay.threshold < validated_threshold and len(overlay.reasons) == 3
    assert ev.fit_studies + ev.held_out_studies == 1200 and ev.ece_after < ev.ece_before + 0.02
    assert np.all(np.diff(overlay.probability(np.linspace(0.01, 0.99, 50))) > 0)  # monotone: ranking unchanged


def test_labels_the_model_cannot_separate_are_refused_and_too_few_outcomes_are_an_error():
    rng = np.random.default_rng(1)
    p, y, uids = _site(rng, 600, shift=0.0, informative=False)
    overlay = recalibrate("site-c", "cd" * 32, 0.09, p, y, uids, n_boot=300)
    assert not overlay.accepted and "does not show that it separates" in " ".join(overlay.reasons)
    with pytest.raises(ValueError, match="both kinds"):
        recalibrate("site-d", "ef" * 32, 0.09, p[:8], np.zeros(8, int), uids[:8])


def test_an_overlay_whose_verdict_or_threshold_its_evidence_does_not_support_is_found_out():
    rng = np.random.default_rng(0)
    p, y, uids = _site(rng, 600, shift=1.0)
    good = recalibrate("site-b", "ab" * 32, float(calibrate(-1.4816, 1.0)), p, y, uids, n_boot=200)
    refused = recalibrate("site-c", "ab" * 32, 0.01, p, y, uids, n_boot=200)  # the model's own threshold is fine
    assert good.accepted and not refused.accepted
    assert consistent(good) and consistent(refused)
    assert consistent(type(good).model_validate_json(good.model_dump_json()))  # survives its JSON file
    assert not consistent(refused.model_copy(update={"accepted": True}))
    assert not consistent(good.model_copy(update={"threshold": good.threshold * 0.5}))
    better = good.evidence.model_copy(update={"auroc_ci95": [0.4, 0.6]})  # no proof the model separates the site
    assert not consistent(good.model_copy(update={"evidence": better}))
