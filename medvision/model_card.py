"""The model card: markdown generated from an artifact's embedded metadata alone.

Everything a reader needs to judge a model (what it is for, how it was validated, how it was
compressed, whether the promotion gate passed it) already travels inside the ONNX file, so the card
is a rendering of that metadata and can be regenerated from any copy of the model.
"""

from __future__ import annotations

from pathlib import Path

from medvision.artifact import ArtifactMetadata


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


def gate_lines(gate: dict) -> list[str]:
    """The gate's verdict and its table (also printed by ``medvision gate``)."""
    if not gate:
        return ["Not gated: run `medvision gate` (or `medvision quantize --teacher`) before clinical evaluation."]
    verdict = "**PROMOTED**" if gate.get("passed") else "**REFUSED**"
    lines = [f"{verdict} on {gate.get('test_images', '?')} held-out test images of {gate.get('test_patients', '?')} "
             f"patients ({gate.get('test_positives', '?')} cancer), against teacher `{gate.get('teacher_model', '?')}` "
             f"(weights {str(gate.get('teacher_weights_sha256', ''))[:12]}), paired patient-clustered bootstrap with "
             f"{gate.get('bootstrap', '?')} resamples, {gate.get('decided_on', 'point estimates')}.", "",
             "| criterion | measured | 95 % interval | limit | result |", "|---|---|---|---|---|"]
    for c in gate.get("criteria", []):
        ci = c.get("ci95")
        lines.append(f"| {c['name']} | {_num(c.get('measured'), 4)} | "
                     f"{f'{_num(ci[0], 4)} to {_num(ci[1], 4)}' if ci else '—'} | {c['limit']} | "
                     f"{'pass' if c['passed'] else 'FAIL'} |")
    if gate.get("reasons"):
        lines += ["", "Refused because: " + "; ".join(gate["reasons"]) + "."]
    for note in gate.get("notes", []):
        lines += ["", f"Note: {note}"]
    return lines


def render(meta: ArtifactMetadata, artifact: str | Path | None = None, size_bytes: int | None = None,
           sha256: str | None = None) -> str:
    name = Path(artifact).name if artifact else meta.model_name
    size = meta.input.shape
    lines = [f"# Model card: {name}", "",
             f"`{meta.model_name}` ({meta.architecture}), exported by medvision {meta.medvision_version} on "
             f"{meta.created_utc}.", "",
             "**Status: " + ("promoted by the gate" if meta.gate.get("passed") else "REFUSED by the gate — do not deploy"
                             if meta.gate else "not gated") + ".**", ""]
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
              f"mean {meta.preprocess.mean}, std {meta.preprocess.std}.",
              *[f"- Output `{k}`: {v}." for k, v in meta.outputs.items()],
              f"- Labels: {', '.join(meta.labels)}; calibration temperature {meta.temperature:.3f}.", "",
              "## Operating point", "",
              f"Probability ≥ **{meta.threshold:.4f}** reads as '{meta.labels[-1]}': {meta.operating_point}."]
    for op in meta.operating_points[1:]:
        lines.append(f"Alternative: {op.get('rule')} → threshold {op.get('threshold', float('nan')):.4f}.")
    lines.append("")
    if meta.validation:
        lines += ["## Validation (model selection split)", "",
                  ", ".join(f"{k.replace('val_', '')} {_num(v)}" for k, v in meta.validation.items()) + ".", ""]
    e = meta.evaluation
    if e:
        lines += [f"## Held-out evaluation ({e.get('subset', 'test')}, {e.get('images', '?')} images, "
                  f"{e.get('positives', '?')} cancer; fp32 model before compression)", "",
                  f"- AUROC {_num(e.get('auroc'))}{_ci(e.get('auroc_ci95'))}",
                  f"- Sensitivity {_num(e.get('sensitivity'))}{_ci(e.get('sensitivity_ci95'))}, specificity "
                  f"{_num(e.get('specificity'))}{_ci(e.get('specificity_ci95'))} at the operating point"]
        if "breast_auroc" in e:
            lines.append(f"- Breast-level AUROC {_num(e['breast_auroc'])}{_ci(e.get('breast_auroc_ci95'))}")
        if "ece" in e:
            lines.append(f"- Expected calibration error {_num(e['ece'])}")
        lines.append("")
    q = meta.quantization
    lines += ["## Compression", ""]
    if q:
        text = f"Format `{q.get('format')}`" + (f": {q['reason']}" if q.get("reason") else "") + "."
        if "speedup_vs_fp32" in q:
            text += f" Speed-up over fp32 on the quantizing machine {_num(q['speedup_vs_fp32'], 2)}×."
        if "agreement_with_fp32" in q:
            text += f" Decisions agreeing with fp32 on the held-out split: {_num(100 * q['agreement_with_fp32'], 1)} %."
        floats = q.get("kept_in_float") or {}
        if any(floats.values()):
            text += " Kept in float: " + ", ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in floats.items() if v) + "."
        lines += [text, ""]
    else:
        lines += ["fp32 (not quantized).", ""]
    lines += ["## Promotion gate", "", *gate_lines(meta.gate), "",
              "## Limitations", "",
              "- Scores one 2-D image (or averages a breast's images); it does not compare with prior exams.",
              "- Intervals are patient-clustered bootstrap intervals on the data named above; performance on "
              "another site, vendor or population must be measured there before use.", ""]
    return "\n".join(lines)
