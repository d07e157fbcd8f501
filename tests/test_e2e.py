"""The spine end to end: synthetic DICOM -> tiny ViT -> ONNX -> service -> prediction for every held-out image."""

import csv
import json

import numpy as np
from fastapi.testclient import TestClient

from medvision.metrics import auroc
from medvision.serving.app import create_app
from medvision.serving.settings import Settings


def test_synth_train_export_serve_predict(synth_dir, tiny_run, artifact):
    with open(tiny_run / "split.csv", newline="") as fh:
        held_out = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    assert held_out
    labels, scores = [], []
    with TestClient(create_app(Settings(artifact=str(artifact)))) as client:
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
