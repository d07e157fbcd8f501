"""medvision evaluate on a run trained here: every metric of the report, calibration carried into the artifact."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from medvision.artifact import read_artifact
from medvision.cli import main


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(tiny_run, run)
    assert main(["evaluate", str(run), "--bootstrap", "200", "--rule", "sensitivity>=0.9",
                 "--rule", "specificity>=0.8", "--no-progress"]) == 0
    return run


def test_report_holds_every_metric(evaluated):
    r = json.loads((evaluated / "evaluation" / "report.json").read_text())
    m = r["image_level"]
    for key in ("auroc", "auroc_ci95", "pr_auc", "pr_auc_ci95", "sensitivity", "sensitivity_ci95", "specificity",
                "specificity_ci95", "confusion", "sensitivity_at_specificity", "specificity_at_sensitivity",
                "calibration", "ece_ci95", "operating_points"):
        assert key in m, key
    lo, hi = m["auroc_ci95"]
    assert lo <= m["auroc"] <= hi
    assert sum(m["confusion"].values()) == m["n"] and m["positives"] > 0
    assert set(m["operating_points"]) == {"sens90", "spec80"}
    assert r["breast_level"]["n"] * 2 == m["n"]  # two views per breast
    assert {"manufacturer", "view", "laterality", "density", "age_band"} == set(r["subgroups"])
    assert sum(v["n"] for v in r["subgroups"]["manufacturer"].values()) == m["n"]
    assert r["bootstrap"]["unit"] == "patient"
    pg = r["pointing_game"]  # lesions.csv sits next to the synthetic labels
    assert pg["images"] > 0 and 0 <= pg["hit_rate"] <= 1 and 0 < pg["chance_rate"] < 1
    assert pg["hit_rate_ci95"][0] <= pg["hit_rate"] <= pg["hit_rate_ci95"][1]
    md = (evaluated / "evaluation" / "report.md").read_text()
    for text in ("AUROC", "PR-AUC", "95 % CI", "Breast level", "Confusion matrix", "scaling", "out-of-fold", "age_band",
                 "pointing game"):
        assert text in md
    for png in ("roc.png", "reliability.png"):
        assert (evaluated / "evaluation" / png).stat().st_size > 1000


def test_calibration_is_fitted_on_validation_and_exported_into_the_graph(evaluated, tmp_path):
    cal = json.loads((evaluated / "calibration.json").read_text())
    assert cal["fitted_on"] == "validation" and cal["temperature"] > 0 and cal["method"] in ("temperature", "platt")
    assert set(cal["evidence"]) == {"temperature", "platt"}
    chosen = min(cal["evidence"], key=lambda m: cal["evidence"][m]["cv_log_loss"])
    assert cal["method"] == chosen and (cal["bias"] == 0.0) == (chosen == "temperature")
    assert [o["name"] for o in cal["operating_points"]] == ["sens90", "spec80"]
    out = tmp_path / "model.onnx"
    assert main(["export", str(evaluated), "--out", str(out)]) == 0
    meta = read_artifact(out)
    assert meta.temperature == pytest.approx(cal["temperature"]) and meta.calibration_method == cal["method"]
    assert meta.calibration_bias == pytest.approx(cal["bias"])
    assert meta.calibration_prevalence == pytest.approx(cal["validation_prevalence"])
    assert meta.threshold == pytest.approx(cal["operating_points"][0]["threshold"])
    assert [o.name for o in meta.operating_points] == ["sens90", "spec80"] and meta.operating.calibrated
    assert meta.operating_point == cal["operating_points"][0]["rule"] + " (calibrated)"
    assert meta.evaluation.auroc == json.loads((evaluated / "evaluation" / "report.json").read_text())["image_level"]["auroc"]
    # the distributions it was validated on travel with it, for the service's drift watch
    report = json.loads((evaluated / "evaluation" / "report.json").read_text())
    ref = meta.reference
    assert ref is not None and ref.images == cal["validation_images"] + report["image_level"]["n"]
    assert sum(ref.categorical["manufacturer"].values()) == ref.images and "(not recorded)" not in ref.categorical["view"]
    assert ref.continuous["probability"] == sorted(ref.continuous["probability"]) and len(ref.continuous["grey_p50"]) == 101
    assert 0 < ref.continuous["breast_fraction"][50] < 1
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    size = meta.input.shape[-1]
    x = np.random.default_rng(0).standard_normal((3, 1, size, size)).astype(np.float32)
    logit, prob = sess.run(["logit", "probability"], {"image": x})
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-(logit / meta.temperature + meta.calibration_bias))),
                               rtol=1e-5, atol=1e-6)


def test_calibration_for_other_weights_is_not_exported(evaluated, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(evaluated, run)
    cal = json.loads((run / "calibration.json").read_text())
    cal["weights_sha256"] = "0" * 64
    (run / "calibration.json").write_text(json.dumps(cal))
    assert main(["export", str(run), "--out", str(tmp_path / "m.onnx")]) == 0
    meta = read_artifact(tmp_path / "m.onnx")
    assert meta.temperature == 1.0 and meta.calibration_bias == 0.0 and meta.calibration_method == "none"
    assert meta.evaluation is None
    assert len(meta.operating_points) == 1 and not meta.operating.calibrated  # the training run's own threshold


def test_bad_rules_and_runs_are_clear_errors(evaluated, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--no-progress"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["evaluate", str(evaluated), "--subgroups", "shoe_size", "--bootstrap", "50", "--no-progress"]) == 2
    assert "unknown subgroup" in capsys.readouterr().err
    assert main(["evaluate", str(evaluated), "--rule", "ppv>=0.5", "--no-progress"]) == 2
    assert "must read 'sensitivity>=0.90'" in capsys.readouterr().err
