import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from medvision import __version__
from medvision.artifact import METADATA_KEY, decode, sha256_file
from medvision.preprocess import Preprocess
from medvision.training.export import ExportParityError, _WithProbability, check_parity, load_run


def test_artifact_carries_its_metadata(artifact, tiny_run):
    proto = onnx.load(str(artifact))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props[METADATA_KEY])
    assert meta["schema_version"] == 1
    assert meta["model_name"] == "mv_vit_test"
    assert meta["medvision_version"] == __version__
    assert meta["preprocess"]["image_size"] == 64
    assert meta["labels"] == ["non-cancer", "cancer"]
    assert meta["weights_sha256"] == sha256_file(tiny_run / "best.safetensors")
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert meta["threshold"] == pytest.approx(metrics["threshold"])
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


def test_unknown_schema_is_refused():
    from medvision.errors import ArtifactError

    with pytest.raises(ArtifactError, match="schema version"):
        decode({METADATA_KEY: json.dumps({"schema_version": 99})})
    with pytest.raises(ArtifactError, match="no 'medvision' metadata"):
        decode({})
