"""medvision gate: a student artifact is promoted only if it keeps its teacher's clinical accuracy."""

import json
import shutil

import numpy as np
import onnx
import pytest

from medvision.artifact import QuantizationReport, read_artifact, sha256_file, write_artifact
from medvision.cli import main
from medvision.training.gate import GATE_FAILED_EXIT, _criterion

_meta = read_artifact


def test_criterion_point_estimate_or_upper_bound():
    assert _criterion("auroc drop", 0.005, (-0.03, 0.04), 0.01, True, False).passed
    assert not _criterion("auroc drop", 0.005, (-0.03, 0.04), 0.01, True, True).passed  # non-inferiority
    assert not _criterion("auroc drop", 0.02, (0.0, 0.04), 0.01, True, False).passed
    assert _criterion("agreement", 0.995, None, 0.99, False, False).passed
    assert not _criterion("agreement", 0.98, None, 0.99, False, False).passed
    assert not _criterion("auroc drop", float("nan"), None, 0.01, True, False).passed


def test_gate_promotes_the_teachers_own_export(artifact, tiny_run, tmp_path, capsys):
    out = tmp_path / "promoted.onnx"
    # the tiny model's probabilities lie within 0.001 of each other around its threshold, where decoding every
    # pixel flips one of its 16 decisions: the contract's agreement is judged in its own tests below
    assert main(["gate", str(artifact), "--teacher", str(tiny_run), "--out", str(out), "--bootstrap", "200",
                 "--min-contract-agreement", "0.9", "--no-progress"]) == 0
    report = json.loads(out.with_suffix(".gate.json").read_text())
    assert report["passed"] and not report["reasons"]
    drop = report["criteria"][0]
    assert abs(drop["measured"]) < 1e-9 and drop["ci95"][0] <= drop["measured"] <= drop["ci95"][1]
    assert report["test_images"] == 16 and report["split_sha256"] == sha256_file(tiny_run / "split.csv")
    gate = _meta(out).gate
    assert gate.passed and gate.teacher_weights_sha256 == report["teacher_weights_sha256"]
    card = out.with_suffix(".card.md").read_text()
    assert "**PROMOTED**" in card and "promoted by the gate" in card and "AUROC drop" in card
    assert "PROMOTED" in capsys.readouterr().out


def _both_decodes(artifact, run):
    """The artifact's probabilities on the run's test images, decoded under its contract and decoding every pixel,
    image by image as the service reads them (not through the gate's batch decoding and cache)."""
    import onnxruntime as ort

    from medvision.preprocess import Preprocess
    from medvision.training.export import read_run
    from medvision.training.onnx_scoring import split_rows

    meta = _meta(artifact)
    rows = split_rows(read_run(run)[0], run, "test")
    sess = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])

    def scores(pre):
        x = np.stack([pre(*pre.read(r.path)) for r in rows]).astype(np.float32)
        return sess.run(["probability"], {sess.get_inputs()[0].name: x})[0][:, 0]

    full = Preprocess(meta.preprocess.model_copy(update={"decode_long_side": 0}))
    return np.array([r.label for r in rows]), scores(Preprocess(meta.preprocess)), scores(full)


def _with_threshold(artifact, threshold, path):
    meta = _meta(artifact)
    ops = [meta.operating_points[0].model_copy(update={"threshold": float(threshold)}), *meta.operating_points[1:]]
    return write_artifact(onnx.load(str(artifact)), meta.model_copy(update={"operating_points": ops}), path)


def test_gate_checks_the_decode_contract_against_a_full_decode(artifact, tiny_run, tmp_path, capsys):
    from medvision.metrics import auroc

    assert _meta(artifact).preprocess.decode_long_side  # the tiny recipe decodes 1/2 of its 256 x 208 images
    y, contract, full = _both_decodes(artifact, tiny_run)
    change = np.abs(contract - full)
    assert change.max() > 0  # the two decodes are not the same pixels
    # a threshold between the two probabilities of the image they differ most on: its decision flips
    i = int(np.argmax(change))
    flips = _with_threshold(artifact, (contract[i] + full[i]) / 2, tmp_path / "flips.onnx")
    threshold = _meta(flips).threshold
    out = tmp_path / "promoted.onnx"
    code = main(["gate", str(flips), "--teacher", str(tiny_run), "--out", str(out), "--bootstrap", "200",
                 "--max-auroc-drop", "1", "--max-sensitivity-drop", "1", "--no-progress"])
    report = json.loads(out.with_suffix(".gate.json").read_text())
    check = report["contract_check"]
    same = (contract >= threshold) == (full >= threshold)
    # the gate's batched session may differ from these in the 7th digit: only images that close can count otherwise
    close = int(np.sum(np.abs(np.r_[contract, full] - threshold) < 1e-5))
    assert check["flipped"] >= 1 and abs(check["flipped"] - int((~same).sum())) <= close
    assert check["agreement"] == 1 - check["flipped"] / len(y)
    assert abs(check["auroc_contract"] - auroc(y, contract)) < 1e-6 and abs(check["auroc_full"] - auroc(y, full)) < 1e-6
    assert abs(check["max_probability_change"] - change.max()) < 1e-5
    drop = next(c for c in report["criteria"] if c["name"].startswith("AUROC drop under the decode contract"))
    assert drop["measured"] == pytest.approx(check["auroc_full"] - check["auroc_contract"], abs=1e-9)  # full − contract
    assert code == GATE_FAILED_EXIT and not out.exists()
    assert report["reasons"] == [f"decisions agreeing between the decode contract and a full decode "
                                 f"{check['agreement']:.4f} is not ≥ 0.99"]
    card = out.with_suffix(".card.md").read_text()
    assert "Decode contract (decoded at the coarsest power-of-two reduction" in card and "REFUSED" in card
    # the same model with its threshold below every probability: no decision can flip, and it is promoted
    never = _with_threshold(artifact, min(contract.min(), full.min()) / 2, tmp_path / "never.onnx")
    assert main(["gate", str(never), "--teacher", str(tiny_run), "--out", str(out), "--bootstrap", "200",
                 "--max-auroc-drop", "1", "--max-sensitivity-drop", "1", "--no-progress"]) == 0
    promoted = _meta(out).gate
    assert promoted.contract_check.agreement == 1.0 and promoted.contract_check.flipped == 0
    names = [c.name for c in promoted.criteria]
    assert "AUROC drop under the decode contract (full decode − contract)" in names
    # no AUROC may be lost to the contract, not even none: refused on that criterion alone
    assert main(["gate", str(never), "--teacher", str(tiny_run), "--out", str(out), "--bootstrap", "200",
                 "--max-auroc-drop", "1", "--max-sensitivity-drop", "1", "--max-contract-auroc-drop", "-1",
                 "--no-progress"]) == GATE_FAILED_EXIT
    report = json.loads(out.with_suffix(".gate.json").read_text())
    assert not out.exists() and len(report["reasons"]) == 1
    assert report["reasons"][0].startswith("AUROC drop under the decode contract")


def test_gate_of_a_model_that_decodes_every_pixel_has_no_contract_to_check(artifact, tiny_run, tmp_path):
    meta = _meta(artifact)
    full = write_artifact(onnx.load(str(artifact)), meta.model_copy(update={"preprocess": meta.preprocess.model_copy(
        update={"decode_long_side": 0})}), tmp_path / "full.onnx")
    out = tmp_path / "promoted.onnx"
    main(["gate", str(full), "--teacher", str(tiny_run), "--out", str(out), "--bootstrap", "100", "--no-progress"])
    report = json.loads(out.with_suffix(".gate.json").read_text())
    assert report["contract_check"] is None and not any("contract" in c["name"] for c in report["criteria"])
    assert any("no decode contract" in n for n in report["notes"])


def _broken_student(artifact, path, tmp_path):
    """Static INT8 calibrated on blank images: the activation ranges are wrong for real mammograms."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    meta = _meta(artifact)
    size = meta.preprocess.image_size
    blank = iter([{"image": np.zeros((1, 1, size, size), np.float32)} for _ in range(4)])

    class Reader:
        def get_next(self):
            return next(blank, None)

    pre = tmp_path / "pre.onnx"
    quant_pre_process(str(artifact), str(pre))
    quantize_static(str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Conv"],
                    calibrate_method=CalibrationMethod.MinMax)
    meta = meta.model_copy(update={"quantization": QuantizationReport(
        format="static_qdq_minmax", source=str(artifact), source_sha256=sha256_file(artifact))})
    write_artifact(onnx.load(str(path)), meta, path)


def test_gate_refuses_a_wrongly_calibrated_int8_student(artifact, tiny_run, tmp_path, capsys):
    broken = tmp_path / "broken_int8.onnx"
    _broken_student(artifact, broken, tmp_path)
    out = tmp_path / "promoted.onnx"
    shutil.copy(artifact, out)  # a stale promoted model from an earlier run must not survive a refusal
    code = main(["gate", str(broken), "--teacher", str(tiny_run), "--out", str(out), "--bootstrap", "200",
                 "--no-progress"])
    assert code == GATE_FAILED_EXIT
    assert not out.exists()
    report = json.loads(out.with_suffix(".gate.json").read_text())
    assert not report["passed"] and report["agreement_with_fp32"] < 0.99
    assert any("agreeing with the fp32" in r for r in report["reasons"])
    assert "REFUSED" in out.with_suffix(".card.md").read_text()
    assert "not promoted" in capsys.readouterr().out


def test_gate_needs_the_fp32_source_of_a_quantized_student(artifact, tiny_run, tmp_path):
    broken = tmp_path / "int8.onnx"
    _broken_student(artifact, broken, tmp_path)
    meta = _meta(broken)
    meta = meta.model_copy(update={"quantization": meta.quantization.model_copy(update={"source": ""})})
    write_artifact(onnx.load(str(broken)), meta, broken)
    assert main(["gate", str(broken), "--teacher", str(tiny_run), "--out", str(tmp_path / "p.onnx")]) == 2
    other = tmp_path / "other.onnx"
    other.write_bytes(artifact.read_bytes() + b"\0")
    assert main(["gate", str(broken), "--teacher", str(tiny_run), "--out", str(tmp_path / "p.onnx"),
                 "--fp32", str(other)]) == 2


def test_gate_refuses_a_student_from_another_split(artifact, tiny_run, tmp_path, capsys):
    meta = _meta(artifact).model_copy(update={"split_sha256": "0" * 64})
    other = write_artifact(onnx.load(str(artifact)), meta, tmp_path / "other_split.onnx")
    assert main(["gate", str(other), "--teacher", str(tiny_run), "--out", str(tmp_path / "p.onnx")]) == 2
    assert "another patient split" in capsys.readouterr().err


def test_gate_never_overwrites_the_judged_artifact(artifact, tiny_run):
    before = sha256_file(artifact)
    assert main(["gate", str(artifact), "--teacher", str(tiny_run), "--out", str(artifact)]) == 2
    assert sha256_file(artifact) == before


def test_quantize_with_teacher_runs_the_gate(artifact, tiny_run, tmp_path, capsys):
    out = tmp_path / "student_int8.onnx"
    code = main(["quantize", str(artifact), "--run", str(tiny_run), "--out", str(out), "--runs", "3",
                 "--calibration-images", "8", "--entropy-bins", "256", "--teacher", str(tiny_run), "--bootstrap", "100",
                 "--min-contract-agreement", "0", "--no-progress"])  # the contract is judged in its own tests above
    report = json.loads(out.with_suffix(".gate.json").read_text())
    assert code == (0 if report["passed"] else GATE_FAILED_EXIT)
    assert out.exists() == report["passed"]
    assert out.with_suffix(".quantize.json").is_file() and out.with_suffix(".card.md").is_file()
    if report["passed"]:
        meta = _meta(out)
        assert meta.gate.passed and meta.quantization.source_sha256 == sha256_file(artifact)
        assert report["agreement_with_fp32"] is None or report["agreement_with_fp32"] >= 0.99


def test_card_renders_any_artifact(artifact, tmp_path, capsys):
    assert main(["card", str(artifact)]) == 0
    text = capsys.readouterr().out
    assert "# Model card: model.onnx" in text and "not gated" in text and "Intended use" in text
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    assert main(["card", str(bad)]) == 2
