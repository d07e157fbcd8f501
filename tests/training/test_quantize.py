"""medvision quantize: every candidate measured against fp32 here; the written model says what it is."""

import json

import numpy as np
import onnx

from medvision.artifact import decode
from medvision.cli import main


def test_quantize_measures_candidates_and_ships_one(artifact, tiny_run, tmp_path, capsys):
    out = tmp_path / "model_int8.onnx"
    assert main(["quantize", str(artifact), "--run", str(tiny_run), "--out", str(out), "--runs", "5",
                 "--calibration-images", "8", "--entropy-bins", "256", "--no-progress"]) == 0
    report = json.loads(out.with_suffix(".quantize.json").read_text())
    assert set(report["candidates"]) == {"dynamic_s8", "dynamic_u8_reduce_range", "static_qdq_minmax",
                                         "static_qdq_entropy", "static_qdq_percentile",
                                         "static_qdq_percentile_all_matmuls", "static_qdq_minmax_all_nodes"}
    # the default export fuses attention (one com.microsoft.Attention node per block): no activation products left
    assert report["sensitive_nodes"]["first_conv"] and report["sensitive_nodes"]["activation_matmuls"] == []
    measured = [c for c in report["candidates"].values() if "error" not in c]
    assert measured, report["candidates"]
    for c in measured:
        assert c["latency_ms"] > 0 and 0 <= c["agreement"] <= 1 and c["passes"] == (
            c["agreement"] >= 0.99 and c["auroc_drop"] <= 0.01)
    chosen = report["chosen"]
    if chosen != "fp32":
        assert report["candidates"][chosen]["passes"] and report["candidates"][chosen]["speedup"] > 1
    meta = decode({p.key: p.value for p in onnx.load(str(out)).metadata_props})
    assert meta.quantization.format == chosen and meta.quantization.reason == report["reason"]
    assert meta.quantization.source == str(artifact.resolve()) and meta.gate is None  # not gated without --teacher
    # the written model serves: same preprocessing, outputs and threshold as the fp32 artifact
    from medvision.serving.engine import Engine

    engine = Engine(str(out))
    x = np.zeros((2, 1, meta.preprocess.image_size, meta.preprocess.image_size), np.float32)
    assert engine.run(x).shape == (2,)
    assert json.loads(capsys.readouterr().out)["chosen"] == chosen


def test_portable_export_keeps_attention_products_in_float(tiny_run, tmp_path):
    """--portable: standard ONNX only, so attention's activation x activation MatMuls exist; the static
    candidates find them and keep them in float (the all-MatMul variant quantizes them)."""
    portable, out = tmp_path / "portable.onnx", tmp_path / "portable_int8.onnx"
    assert main(["export", str(tiny_run), "--out", str(portable), "--portable"]) == 0
    proto = onnx.load(str(portable))
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    assert decode({p.key: p.value for p in proto.metadata_props}).runtime_ops == []
    assert main(["quantize", str(portable), "--run", str(tiny_run), "--out", str(out), "--runs", "3",
                 "--calibration-images", "8", "--entropy-bins", "256", "--no-progress"]) == 0
    report = json.loads(out.with_suffix(".quantize.json").read_text())
    assert len(report["sensitive_nodes"]["activation_matmuls"]) >= 4
