import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from medvision import __version__
from medvision.artifact import METADATA_KEY, decode, sha256_file
from medvision.cli import main
from medvision.preprocess import Preprocess
from medvision.training.export import ExportParityError, _WithProbability, check_parity, load_run


def test_artifact_carries_its_metadata(artifact, tiny_run):
    proto = onnx.load(str(artifact))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props[METADATA_KEY])
    assert meta["schema_version"] == 3
    assert meta["model_name"] == "mv_vit_test"
    assert meta["medvision_version"] == __version__
    assert meta["preprocess"]["image_size"] == 64
    assert meta["labels"] == ["non-cancer", "cancer"]
    assert meta["weights_sha256"] == sha256_file(tiny_run / "best.safetensors")
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert meta["operating_points"][0]["threshold"] == pytest.approx(metrics["threshold"])
    assert proto.opset_import[0].version >= 17
    decode(props)  # validates against the schema


def test_dynamic_batch_and_probability_output(artifact, dicom_files):
    sess = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
    meta = decode(sess.get_modelmeta().custom_metadata_map)
    pre = Preprocess(meta.preprocess)
    x = np.stack([pre.from_dicom(f)[0] for f in dicom_files[:5]])
    logit, prob = sess.run(["logit", "probability"], {"image": x})
    assert logit.shape == prob.shape == (5, 1)
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-logit)), rtol=1e-5)


def test_parity_check_fails_loudly_when_the_graph_differs(artifact, tiny_run):
    _, model, _, _ = load_run(tiny_run)
    with torch.no_grad():
        model.head.bias += 0.5  # torch now computes something else than the exported graph
    x = np.random.default_rng(0).standard_normal((2, 1, 64, 64)).astype(np.float32)
    with pytest.raises(ExportParityError, match="disagrees"):
        check_parity(_WithProbability(model).eval(), artifact, x, atol=1e-4)


def test_an_artifact_of_the_previous_schema_still_loads(artifact, tmp_path):
    """Version 1 stored the applied threshold and rule beside untyped operating points and empty dicts."""
    import onnx

    from medvision.artifact import read_artifact

    current = read_artifact(artifact)
    v1 = json.loads(current.model_dump_json())
    v1.update(schema_version=1, threshold=0.42, operating_point="sensitivity >= 0.90 on validation (calibrated)",
              operating_points=[{"name": "sens90", "rule": "sensitivity >= 0.90 on validation", "threshold": 0.42,
                                 "sensitivity": 0.9, "specificity": 0.5}],
              evaluation={}, quantization={}, gate={}, temperature=1.7)
    for new in ("calibration_bias", "calibration_method"):  # Platt scaling came with version 3
        v1.pop(new)
    v1["preprocess"].pop("decode_long_side")  # version 1 and 2 had no decode contract
    v1["preprocess"].pop("crop_long_side")  # nor a resolution of their own for the breast's box
    model = onnx.load(str(artifact))
    del model.metadata_props[:]
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(v1))
    old = tmp_path / "v1.onnx"
    onnx.save(model, str(old))
    meta = read_artifact(old)
    assert meta.schema_version == 3 and meta.threshold == 0.42 and meta.operating.calibrated
    assert meta.preprocess.decode_long_side == 0  # before the decode contract, every pixel was decoded
    assert meta.preprocess.crop_long_side == 0  # and the box was measured on the decoded pixels, as it still is
    assert current.preprocess.crop_long_side is None  # a new artifact measures it at its input size
    assert (meta.calibration_method, meta.temperature, meta.calibration_bias) == ("temperature", 1.7, 0.0)
    assert meta.operating_point == "sensitivity >= 0.90 on validation (calibrated)"
    assert meta.evaluation is None and meta.gate is None and meta.format == "fp32"
    v1.update(operating_points=[], operating_point="default 0.5 (no validation metrics found)", threshold=0.5)
    assert decode({METADATA_KEY: json.dumps(v1)}).operating_point == "default 0.5 (no validation metrics found)"


def test_unknown_schema_is_refused():
    from medvision.errors import ArtifactError

    with pytest.raises(ArtifactError, match="schema version"):
        decode({METADATA_KEY: json.dumps({"schema_version": 99})})
    with pytest.raises(ArtifactError, match="no 'medvision' metadata"):
        decode({})


def test_heatmap_output_is_exact_and_comes_with_the_score(artifact, dicom_files):
    """One forward pass returns score and map; the logit is the LSE-mean of the map's token logits."""
    sess = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
    meta = decode(sess.get_modelmeta().custom_metadata_map)
    assert "heatmap" in meta.outputs and [o.name for o in sess.get_outputs()] == ["logit", "probability", "heatmap"]
    pre = Preprocess(meta.preprocess)
    x = np.stack([pre.from_dicom(f)[0] for f in dicom_files[:3]])
    logit, heat = sess.run(["logit", "heatmap"], {"image": x})
    assert heat.shape == (3, 1, 8, 8)  # 64 px, patch 8
    r = 5.0
    z = r * heat.reshape(3, -1).astype(np.float64)
    pooled = (np.log(np.exp(z - z.max(1, keepdims=True)).mean(1)) + z.max(1)) / r
    np.testing.assert_allclose(pooled, logit[:, 0], atol=1e-5)


def test_cnn_class_activation_map_mean_is_the_logit():
    from medvision.config import ModelConfig
    from medvision.training.models import class_activation_map, create_model, has_exact_heatmap

    model = create_model(ModelConfig(name="resnet18"), 96).eval()
    x = torch.randn(2, 1, 96, 96)
    with torch.no_grad():
        cam = class_activation_map(model, x)
        assert cam.shape == (2, 1, 3, 3)
        assert torch.allclose(cam.mean(dim=(2, 3)), model(x), atol=1e-5)
    wrapper = _WithProbability(model)
    assert wrapper.has_heatmap and len(wrapper(x)) == 3
    monai = create_model(ModelConfig(name="monai_densenet121"), 64)
    assert not has_exact_heatmap(monai) and len(_WithProbability(monai).eval()(torch.zeros(1, 1, 64, 64))) == 2


def test_exported_graph_is_simplified(artifact):
    proto = onnx.load(str(artifact))
    ops = [n.op_type for n in proto.graph.node]
    assert "Identity" not in ops and "Constant" not in ops  # folded into initializers by onnxslim


def test_fp16_copy_for_gpu_providers(tiny_run, tmp_path, capsys):
    fp32, fp16 = tmp_path / "m.onnx", tmp_path / "m_fp16.onnx"
    assert main(["export", str(tiny_run), "--out", str(fp32), "--fp16", str(fp16)]) == 0
    proto = onnx.load(str(fp16))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    meta = decode({p.key: p.value for p in proto.metadata_props})
    assert meta.quantization.format == "fp16" and meta.quantization.source_sha256 == sha256_file(fp32)
    a = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"])
    assert b.get_inputs()[0].type == "tensor(float)"  # callers and the service keep sending float32
    x = np.random.default_rng(0).standard_normal((3, 1, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(b.run(["probability"], {"image": x})[0], a.run(["probability"], {"image": x})[0],
                               atol=5e-3)
    assert json.loads(capsys.readouterr().out)["fp16"] == str(fp16)


def test_attention_is_exported_fused_and_quantizes_as_qattention(artifact, tiny_run, dicom_files, tmp_path):
    """Each ViT block's attention is one com.microsoft.Attention node computing what timm computes; dynamic
    INT8 turns it into QAttention (the qkv product in INT8) and still agrees with fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from medvision.training.quantize import DYNAMIC_OPS

    proto = onnx.load(str(artifact))
    cfg, model, _, _ = load_run(tiny_run)
    blocks = len(model.backbone.blocks)
    assert [n.op_type for n in proto.graph.node if n.domain == "com.microsoft"] == ["Attention"] * blocks
    assert not any(n.op_type == "Softmax" for n in proto.graph.node)  # no unfused attention left behind
    assert decode({p.key: p.value for p in proto.metadata_props}).runtime_ops == ["com.microsoft.Attention"]
    # ORT's fused kernel against the original (unreplaced) torch model, on real images
    x = np.stack([Preprocess(cfg.preprocess).from_dicom(f)[0] for f in dicom_files[:6]])
    assert check_parity(_WithProbability(model).eval(), artifact, x, atol=1e-4) <= 1e-4
    int8 = tmp_path / "int8.onnx"
    quantize_dynamic(str(artifact), str(int8), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=DYNAMIC_OPS)
    assert sum(n.op_type == "QAttention" for n in onnx.load(str(int8)).graph.node) == blocks
    p32 = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"]).run(["probability"], {"image": x})[0]
    p8 = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"]).run(["probability"], {"image": x})[0]
    assert np.abs(p8 - p32).max() < 0.05


def test_attention_with_qk_norm_is_left_unfused():
    """Only blocks that are exactly packed-qkv scaled-dot-product attention are replaced."""
    import timm

    from medvision.training.ort_attention import fusable, with_fused_attention

    plain = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              num_classes=1)
    normed = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                               num_classes=1, qk_norm=True)
    assert fusable(plain.blocks[0].attn) and not fusable(normed.blocks[0].attn)
    fused, count = with_fused_attention(plain)
    assert count == 2 and with_fused_attention(normed)[1] == 0
    assert plain.blocks[0].attn.__class__.__name__ == "Attention"  # the original is not modified
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain.eval()(x), atol=1e-5, rtol=1e-5)


def test_loading_a_trained_run_does_not_warn_about_random_weights(tiny_run, tmp_path, caplog):
    import logging

    from medvision.cli import main

    caplog.set_level(logging.WARNING)
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "m.onnx")]) == 0
    assert "random initialisation" not in caplog.text  # the trained weights are loaded right after
