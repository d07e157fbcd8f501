"""The spine end to end: synthetic DICOM -> tiny ViT -> ONNX -> service -> prediction for every held-out image."""

import csv
import json

import numpy as np
from fastapi.testclient import TestClient

from medvision.metrics import auroc
from medvision.serving.app import create_app
from medvision.serving.auth import create_key
from medvision.serving.db import open_database
from medvision.serving.settings import Settings


def test_synth_train_export_serve_predict(synth_dir, tiny_run, artifact):
    with open(tiny_run / "split.csv", newline="") as fh:
        held_out = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    assert held_out
    labels, scores = [], []
    with open_database(Settings().database_url)() as db:
        token, _ = create_key(db, "e2e", "score")
    with TestClient(create_app(Settings(artifact=str(artifact))), headers={"Authorization": f"Bearer {token}"}) as client:
        for r in held_out:
            data = (synth_dir / "images" / r["patient_id"] / f"{r['image_id']}.dcm").read_bytes()
            resp = client.post("/v1/predict", content=data, headers={"Content-Type": "application/dicom"})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert 0.0 <= body["probability"] <= 1.0
            labels.append(int(r["cancer"]))
            scores.append(body["probability"])
    assert len(set(np.round(scores, 6))) > 1, "the model gives every image the same score"
    value = auroc(np.array(labels), np.array(scores))
    assert 0.0 <= value <= 1.0
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["model"] == "mv_vit_test"


def test_teacher_to_gated_student(tiny_run, tmp_path, capsys):
    """M4 end to end: distill -> evaluate -> export -> quantize with the gate -> the service loads what was promoted."""
    from medvision.artifact import decode
    from medvision.cli import main

    student = tmp_path / "student"
    assert main(["distill", "--teacher", str(tiny_run), "--config", "tiny", "--out", str(student), "--no-progress",
                 "train.epochs=1"]) == 0
    assert main(["evaluate", str(student), "--bootstrap", "100", "--no-progress"]) == 0
    fp32 = tmp_path / "student.onnx"
    assert main(["export", str(student), "--out", str(fp32)]) == 0
    out = tmp_path / "promoted.onnx"
    code = main(["quantize", str(fp32), "--run", str(student), "--teacher", str(tiny_run), "--out", str(out),
                 "--runs", "3", "--calibration-images", "8", "--entropy-bins", "256", "--bootstrap", "200",
                 "--min-contract-agreement", "0", "--no-progress"])  # the tiny models' contract: tests/training/test_gate.py
    report = json.loads(out.with_suffix(".gate.json").read_text())
    assert code == (0 if report["passed"] else 3) and out.exists() == report["passed"]
    assert report["test_images"] > 0 and report["teacher_model"] == "mv_vit_test"
    # whatever the verdict, each criterion's decision follows from its measurement and limit
    for c in report["criteria"]:
        limit = float(c["limit"].split()[-1])
        assert c["passed"] == (c["measured"] <= limit if c["limit"].startswith("≤") else c["measured"] >= limit)
    if report["passed"]:
        import onnx

        meta = decode({p.key: p.value for p in onnx.load(str(out)).metadata_props})
        assert meta.gate.passed and meta.gate.student.artifact_sha256
        with TestClient(create_app(Settings(artifact=str(out)))) as client:
            assert client.get("/readyz").status_code == 200
