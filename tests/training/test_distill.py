"""medvision distill: the KD objective, the cached teacher logits, and the comparison with a no-teacher student."""

import json

import numpy as np
import pytest
import torch

from medvision.cli import main
from medvision.config import DistillConfig
from medvision.training.distill import distill_loss


def test_distillation_objective():
    s = torch.tensor([[0.3], [-1.2], [2.0]], requires_grad=True)
    y = torch.tensor([[1.0], [0.0], [1.0]])
    t = torch.tensor([[0.3], [-1.2], [2.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(s, y)
    assert distill_loss(s, y, t, DistillConfig(alpha=0.0)).item() == pytest.approx(bce.item())
    # soft: a student equal to its teacher gets no gradient from the teacher term
    distill_loss(s, y, t, DistillConfig(alpha=1.0, temperature=3.0)).backward()
    assert torch.allclose(s.grad, torch.zeros_like(s), atol=1e-7)
    # hard: the teacher's decisions replace the labels
    hard = distill_loss(s, 1 - y, t, DistillConfig(alpha=1.0, mode="hard"))
    assert hard.item() == pytest.approx(torch.nn.functional.binary_cross_entropy_with_logits(s, (t > 0).float()).item())


def test_distill_with_baseline_report(tiny_run, tmp_path, capsys):
    out = tmp_path / "student"
    code = main(["distill", "--teacher", str(tiny_run), "--config", "tiny", "--out", str(out), "--baseline", "--bootstrap", "100",
                 "--no-progress", "train.epochs=2"])
    assert code == 0
    report = json.loads((out / "distill_report.json").read_text())
    assert list(report["runs"]) == ["student without teacher", "distilled student", "teacher"]
    d = report["runs"]["distilled student"]
    lo, hi = d["auroc_minus_student without teacher_ci95"]
    assert lo <= d["auroc_minus_student without teacher"] <= hi
    assert "paired" in (out / "distill_report.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distillation"]["teacher"] == str(tiny_run) and metrics["distillation"]["mode"] == "soft"
    assert (out / "split.csv").read_text() == (tiny_run / "split.csv").read_text()  # the teacher's split
    z = np.load(out / "teacher_logits.npz")
    assert len(z["logits"]) == metrics["images"]["train"] and np.isfinite(z["logits"]).all()


def test_teacher_logits_are_computed_once(tiny_run, tmp_path, monkeypatch):
    import medvision.training.distill as distill
    from medvision.data import read_split
    from medvision.manifest import load_rows
    from medvision.training.dataset import decode_all
    from medvision.training.distill import teacher_logits
    from medvision.training.export import load_run

    cfg, _, _, _ = load_run(tiny_run)
    split = read_split(tiny_run / "split.csv")
    rows = [r for r in load_rows(cfg.data.labels_csv, cfg.data.image_dir) if split[r.patient_id] == "train"]
    first = teacher_logits(tiny_run, rows, tmp_path, decode_all, show_progress=False)

    def boom(*a, **k):
        raise AssertionError("the teacher ran again")

    monkeypatch.setattr(distill, "image_logits", boom)
    again = teacher_logits(tiny_run, rows, tmp_path, decode_all, show_progress=False)
    np.testing.assert_array_equal(first, again)


def test_deit_distillation_token(tiny_run, tmp_path):
    """The distillation token's head learns from the teacher; export serves the average of both heads."""
    import onnxruntime as ort

    from medvision.training.export import load_run

    out = tmp_path / "deit"
    assert main(["distill", "--teacher", str(tiny_run), "--config", "tiny", "--out", str(out), "--no-progress",
                 "--mode", "hard", "model.name=mv_deit_distilled_test", "train.epochs=2"]) == 0
    _, model, _, _ = load_run(out)
    assert model.dist_head is not None and not model.return_dist
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        model.train()
        model.return_dist = True
        pooled, dist = model(x)
        model.eval()
        served = model(x)
    assert not torch.allclose(pooled, dist)  # the two heads learnt different things
    assert main(["export", str(out), "--out", str(tmp_path / "m.onnx")]) == 0
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    logit, heat = sess.run(["logit", "heatmap"], {"image": x.numpy()})
    np.testing.assert_allclose(logit, served.numpy(), atol=1e-5)
    assert heat.shape == (3, 1, 8, 8)


def test_distillation_token_loss_routes_the_teacher_to_the_token():
    s = torch.zeros(2, 1, requires_grad=True)
    d = torch.zeros(2, 1, requires_grad=True)
    y = torch.ones(2, 1)
    t = -5 * torch.ones(2, 1)
    distill_loss(s, y, t, DistillConfig(alpha=0.5), dist_token=d).backward()
    assert (s.grad < 0).all() and (d.grad > 0).all()  # labels pull s up, the teacher pulls d down
