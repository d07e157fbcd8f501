"""The model card is rendered from artifact metadata alone."""

from medvision.artifact import (
    ArtifactMetadata,
    EvaluationSummary,
    GateCriterion,
    GateReport,
    InputContract,
    OperatingPoint,
    QuantizationReport,
)
from medvision.model_card import render
from medvision.preprocess import PreprocessConfig


def _meta(**update) -> ArtifactMetadata:
    base = ArtifactMetadata(model_name="m", architecture="vit", medvision_version="0", created_utc="2026-01-01",
                            preprocess=PreprocessConfig(image_size=64), input=InputContract(shape=["batch", 1, 64, 64]),
                            operating_points=[OperatingPoint(rule="sensitivity >= 0.90 on validation", threshold=0.3,
                                                             calibrated=True),
                                              OperatingPoint(rule="specificity >= 0.80 on validation", threshold=0.6)],
                            weights_sha256="ab" * 32)
    return base.model_copy(update=update)


def test_card_states_status_operating_point_and_compression():
    text = render(_meta())
    assert "**Status: not gated.**" in text and "Probability ≥ **0.3000**" in text and "fp32 (not quantized)" in text
    assert "sensitivity >= 0.90 on validation (calibrated)" in text
    assert "Alternative: specificity >= 0.80 on validation → threshold 0.6000." in text
    q = QuantizationReport(format="static_qdq_entropy", reason="fastest", speedup_vs_fp32=1.4, agreement_with_fp32=0.995,
                           kept_in_float={"first_conv": ["c"], "activation_matmuls": ["a", "b"]})
    e = EvaluationSummary(images=10, positives=3, auroc=0.8, auroc_ci95=[0.7, 0.9], sensitivity=0.9,
                          sensitivity_ci95=[None, None], specificity=0.5, specificity_ci95=[0.4, 0.6])
    text = render(_meta(quantization=q, evaluation=e))
    assert "1.40×" in text and "99.5 %" in text and "2 activation matmuls" in text
    assert "AUROC 0.800 (95 % CI 0.700 to 0.900)" in text


def test_card_of_a_refused_model_says_so_with_reasons():
    gate = GateReport(passed=False, reasons=["AUROC drop 0.0300 is not ≤ 0.01"], test_images=40, test_patients=10,
                      test_positives=8, criteria=[GateCriterion(name="AUROC drop (teacher − student)", measured=0.03,
                                                                ci95=[0.0, 0.06], limit="≤ 0.01", passed=False)])
    text = render(_meta(gate=gate))
    assert "REFUSED by the gate — do not deploy" in text and "**REFUSED**" in text
    assert "| AUROC drop (teacher − student) | 0.0300 | 0.0000 to 0.0600 | ≤ 0.01 | FAIL |" in text
    assert "Refused because: AUROC drop 0.0300 is not ≤ 0.01." in text
