"""The model card: markdown generated from an artifact's embedded metadata alone.

Everything a reader needs to judge a model (what it is for, how it was validated, how it was
compressed, whether the promotion gate passed it) already travels inside the ONNX file, so the card
is a rendering of that metadata and can be regenerated from any copy of the model.
"""

from __future__ import annotations

from pathlib import Path

from medvision.artifact import ArtifactMetadata, GateReport


def _num(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (int, float)):
        return f"{v:.{digits}f}"
    return str(v)


def _ci(pair) -> str:
    if not pair or any(p is None for p in pair):
        return ""
    return f" (95 % CI {_num(pair[0])} to {_num(pair[1])})"


def _calibration(meta: ArtifactMetadata) -> str:
    if meta.calibration_method == "none":
        return "none (the probability is the model's raw sigmoid)"
    if meta.calibration_method == "temperature":
        return f"temperature scaling on validation, T = {meta.temperature:.3f}"
    return (f"Platt scaling on validation, sigmoid(logit / {meta.temperature:.3f} {meta.calibration_bias:+.3f}): "
            "probabilities are at the validation set's cancer rate")


def gate_lines(gate: GateReport | None) -> list[str]:
    """The gate's verdict and its table (also printed by ``medvision gate``)."""
    if gate is None:
        return ["Not gated: run `medvision gate` (or `medvision quantize --teacher`) before clinical evaluation."]
    verdict = "**PROMOTED**" if gate.passed else "**REFUSED**"
    lines = [f"{verdict} on {gate.test_images} held-out test images of {gate.test_patients} patients "
             f"({gate.test_positives} cancer), against teacher `{gate.teacher_model}` (weights "
             f"{gate.teacher_weights_sha256[:12]}), paired patient-clustered bootstrap with {gate.bootstrap} resamples, "
             f"{gate.decided_on}.", "",
             "| criterion | measured | 95 % interval | limit | result |", "|---|---|---|---|---|"]
    for c in gate.criteria:
        interval = f"{_num(c.ci95[0], 4)} to {_num(c.ci95[1], 4)}" if c.ci95 else "—"
        lines.append(f"| {c.name} | {_num(c.measured, 4)} | {interval} | {c.limit} | {'pass' if c.passed else 'FAIL'} |")
    check = gate.contract_check
    if check is not None:
        lines += ["", f"Decode contract ({check.contract}) against a full decode, same model and threshold: AUROC "
                  f"{check.auroc_contract:.4f} vs {check.auroc_full:.4f}, {check.flipped} of {gate.test_images} "
                  f"decisions differ, probabilities change by {check.mean_probability_change:.4f} on average (at most "
                  f"{check.max_probability_change:.4f})."]
    if gate.reasons:
        lines += ["", "Refused because: " + "; ".join(gate.reasons) + "."]
    for note in gate.notes:
        lines += ["", f"Note: {note}"]
    return lines


def render(meta: ArtifactMetadata, artifact: str | Path | None = None, size_bytes: int | None = None,
           sha256: str | None = None) -> str:
    name = Path(artifact).name if artifact else meta.model_name
    size = meta.input.shape
    lines = [f"# Model card: {name}", "",
             f"`{meta.model_name}` ({meta.architecture}), exported by medvision {meta.medvision_version} on "
             f"{meta.created_utc}.", "",
             "**Status: " + {"promoted": "promoted by the gate", "refused": "REFUSED by the gate — do not deploy",
                             "not gated": "not gated"}[meta.gate_status] + ".**", ""]
    if sha256 or size_bytes:
        lines += [f"File: {f'{size_bytes / 1e6:.1f} MB' if size_bytes else ''}"
                  f"{f', sha256 `{sha256}`' if sha256 else ''}; weights sha256 `{meta.weights_sha256[:16]}`.", ""]
    lines += ["## Intended use", "", meta.intended_use, ""]
    if meta.training_data:
        lines += [f"Training data: {meta.training_data}.", ""]
    lines += ["## Input and output", "",
              f"- Input `{meta.input.name}`: {meta.input.dtype} {size}, {meta.input.modality}; "
              f"{meta.input.value_range}.",
              f"- Preprocessing (inside the service, from this metadata): {meta.preprocess.image_size} px, "
              f"mean {meta.preprocess.mean}, std {meta.preprocess.std}; images {meta.preprocess.decoding}.",
              *[f"- Output `{k}`: {v}." for k, v in meta.outputs.items()],
              f"- Labels: {', '.join(meta.labels)}; calibration: {_calibration(meta)}.", "",
              "## Operating point", "",
              f"Probability ≥ **{meta.threshold:.4f}** reads as '{meta.labels[-1]}': {meta.operating_point}."]
    for op in meta.operating_points[1:]:
        lines.append(f"Alternative: {op.label} → threshold {op.threshold:.4f}.")
    lines.append("")
    if meta.validation:
        lines += ["## Validation (model selection split)", "",
                  ", ".join(f"{k.replace('val_', '')} {_num(v)}" for k, v in meta.validation.items()) + ".", ""]
    e = meta.evaluation
    if e is not None:
        lines += [f"## Held-out evaluation ({e.subset}, {e.images} images, {e.positives} cancer; fp32 model before "
                  "compression)", "",
                  f"- AUROC {_num(e.auroc)}{_ci(e.auroc_ci95)}",
                  f"- Sensitivity {_num(e.sensitivity)}{_ci(e.sensitivity_ci95)}, specificity "
                  f"{_num(e.specificity)}{_ci(e.specificity_ci95)} at the operating point"]
        if e.breast_auroc is not None:
            lines.append(f"- Breast-level AUROC {_num(e.breast_auroc)}{_ci(e.breast_auroc_ci95)}")
        if e.ece is not None:
            lines.append(f"- Expected calibration error {_num(e.ece)}{_ci(e.ece_ci95) if e.ece_ci95 else ''}")
        lines.append("")
    q = meta.quantization
    lines += ["## Compression", ""]
    if q.format != "fp32" or q.reason:
        text = f"Format `{q.format}`" + (f": {q.reason}" if q.reason else "") + "."
        if q.speedup_vs_fp32 is not None:
            text += f" Speed-up over fp32 on the quantizing machine {_num(q.speedup_vs_fp32, 2)}×."
        if q.agreement_with_fp32 is not None:
            text += f" Decisions agreeing with fp32 on the held-out split: {_num(100 * q.agreement_with_fp32, 1)} %."
        if any(q.kept_in_float.values()):
            text += " Kept in float: " + ", ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in q.kept_in_float.items()
                                                   if v) + "."
        lines += [text, ""]
    else:
        lines += ["fp32 (not quantized).", ""]
    lines += ["## Promotion gate", "", *gate_lines(meta.gate), "",
              "## Limitations", "",
              "- Scores one 2-D image (or averages a breast's images); it does not compare with prior exams.",
              "- Intervals are patient-clustered bootstrap intervals on the data named above; performance on "
              "another site, vendor or population must be measured there before use.", ""]
    return "\n".join(lines)
