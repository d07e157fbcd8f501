"""``medvision gate``: promote a compressed student only if it keeps the teacher's clinical accuracy.

On the teacher's held-out test split (the patients neither model was trained or selected on), the
student *artifact* (the ONNX file that would be served, quantized or not) is compared with its
teacher by a paired, patient-clustered bootstrap:

- AUROC drop (teacher − student) ≤ ``max_auroc_drop`` (0.01);
- sensitivity drop at the stored operating points (the teacher's threshold for the teacher, the
  artifact's threshold for the artifact) ≤ ``max_sensitivity_drop`` (2 points);
- for a quantized artifact, decisions agreeing with its fp32 source on ≥ ``min_agreement`` (99 %) of
  the test images;
- for an artifact that decodes fewer pixels than the file holds (``preprocess.decode_long_side``: JPEG 2000
  wavelet levels left undecoded, other syntaxes the same low-pass band computed), the same artifact scored on the
  same images decoding every pixel: AUROC lost to the contract (full − contract) ≤ ``max_contract_auroc_drop``
  (0.005) and decisions agreeing between the two ways on ≥ ``min_contract_agreement`` (99 %) of the test images.

By default each criterion is decided on its point estimate and the upper 95 % bound is stated next
to it; ``non_inferiority=True`` decides on the upper bound instead (a non-inferiority test, which
needs a test set large enough for the interval to be narrower than the margin).

A model that passes is written to ``out`` with the result in its metadata; one that fails is not
written (a stale file at ``out`` is removed). Either way ``out.gate.json`` and the model card
``out.card.md`` record the measurements and the reasons.
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx

from medvision.artifact import (
    ContractCheck,
    GateCriterion,
    GateReport,
    GateScores,
    read_artifact,
    sha256_file,
    write_artifact,
)
from medvision.errors import ArtifactError, ConfigError
from medvision.evaluation import Calibration, calibrate, paired_difference
from medvision.metrics import auroc, sensitivity_specificity
from medvision.model_card import gate_lines, render
from medvision.preprocess import Preprocess
from medvision.training.criteria import GateCriteria
from medvision.training.evaluate import score_split
from medvision.training.export import load_calibration, read_run
from medvision.training.onnx_scoring import model_inputs, probabilities, session

log = logging.getLogger(__name__)
GATE_FAILED_EXIT = 3


def _teacher_scores(teacher: Path, show_progress: bool):
    """Teacher rows, calibrated probabilities on its test split, its operating threshold and rule."""
    cfg, metrics, ckpt = read_run(teacher)
    rows, logits = score_split(teacher, "test", show_progress)
    calibration, _ = load_calibration(teacher, ckpt)
    if calibration and calibration.get("operating_points"):
        op = calibration["operating_points"][0]
        return cfg, ckpt, rows, Calibration.of(calibration)(logits), float(op["threshold"]), op["rule"]
    threshold = float(metrics.get("threshold", 0.5))
    return cfg, ckpt, rows, calibrate(logits, 1.0), threshold, metrics.get("operating_point", "threshold 0.5")


def _fp32_source(artifact_meta, fp32: str | Path | None) -> Path | None:
    q = artifact_meta.quantization
    if q.format == "fp32":
        return None
    path = Path(fp32) if fp32 else Path(q.source) if q.source else None
    if path is None or not path.is_file():
        raise ConfigError("the artifact is quantized: give its fp32 source with --fp32 (the export it was "
                          "quantized from) so INT8 and fp32 decisions can be compared")
    if q.source_sha256 and sha256_file(path) != q.source_sha256:
        raise ConfigError(f"{path} is not the fp32 model this artifact was quantized from (sha256 differs)")
    return path


def _criterion(name: str, measured: float, ci, limit: float, lower_is_better: bool,
               decide_on_bound: bool) -> GateCriterion:
    if lower_is_better:
        value = ci[1] if decide_on_bound and ci else measured
        passed = bool(np.isfinite(value) and value <= limit + 1e-12)
        limit_text = f"≤ {limit:g}"
    else:
        value = ci[0] if decide_on_bound and ci else measured
        passed = bool(np.isfinite(value) and value >= limit - 1e-12)
        limit_text = f"≥ {limit:g}"
    return GateCriterion(name=name, measured=float(measured), ci95=[float(c) for c in ci] if ci else None,
                         limit=limit_text, passed=passed)


def _contract_check(sess, meta, rows, tcfg, y, patients, p_contract, criteria: GateCriteria, n_boot: int,
                    show_progress: bool) -> tuple[list[GateCriterion], ContractCheck, list[str]]:
    """The artifact scored on the test images decoding every pixel, against its scores under its own contract: the
    criteria, the check and notes. An image that decodes under the contract but not in full (a codestream damaged in
    levels the contract never decodes) cannot be compared: the others are, and a criterion counting them fails."""
    full = Preprocess(meta.preprocess.model_copy(update={"decode_long_side": 0}))
    x, kept = model_inputs(rows, full, tcfg, "decode test (full resolution)", show_progress)
    p_full = probabilities(sess, x)
    del x
    index = {r.path: i for i, r in enumerate(rows)}
    both = np.array([index[r.path] for r in kept], dtype=int)
    y, p_contract = y[both], p_contract[both]
    patients = [patients[i] for i in both]
    threshold = meta.threshold
    checks, notes = [], []
    if len(both) < len(rows):
        checks.append(_criterion("test images that decode in full too (the rest cannot be compared)",
                                 len(both) / len(rows), None, 1.0, False, False))
        notes.append(f"{len(rows) - len(both)} test image(s) decode under the contract but not at full resolution "
                     "(the log names their rows): the contract is compared on the others")
    if len(set(y.tolist())) < 2:
        raise ArtifactError("too few test images decode at full resolution to compare the contract with a full decode")
    drop, ci = paired_difference(y, p_full, p_contract, auroc, clusters=patients, n=n_boot)
    same = (p_contract >= threshold) == (p_full >= threshold)
    change = np.abs(p_contract - p_full)
    check = ContractCheck(contract=meta.preprocess.decoding, auroc_contract=auroc(y, p_contract),
                          auroc_full=auroc(y, p_full), agreement=float(np.mean(same)), flipped=int((~same).sum()),
                          max_probability_change=float(change.max()), mean_probability_change=float(change.mean()))
    checks += [
        _criterion("AUROC drop under the decode contract (full decode − contract)", drop, ci,
                   criteria.max_contract_auroc_drop, True, criteria.non_inferiority),
        _criterion("decisions agreeing between the decode contract and a full decode", check.agreement, None,
                   criteria.min_contract_agreement, False, False),
    ]
    return checks, check, notes


def gate_artifact(artifact: str | Path, teacher_run: str | Path, out: str | Path, fp32: str | Path | None = None,
                  criteria: GateCriteria = GateCriteria(), n_boot: int = 2000, threads: int = 0,
                  show_progress: bool = True) -> GateReport:
    artifact, teacher, out = Path(artifact), Path(teacher_run), Path(out)
    meta = read_artifact(artifact)
    if not (teacher / "split.csv").is_file():
        raise ConfigError(f"{teacher} has no split.csv: give the teacher's run folder from 'medvision train'")
    split_sha = sha256_file(teacher / "split.csv")
    if meta.split_sha256 and meta.split_sha256 != split_sha:
        raise ConfigError("the student was trained on another patient split than the teacher: its test patients "
                          "may be in the student's training data, so the gate cannot judge it (distill with "
                          "'medvision distill --teacher' to share the split)")
    if out.resolve() in (artifact.resolve(), Path(fp32).resolve() if fp32 else None):
        raise ConfigError("--out must be a new file, not the artifact being judged")
    fp32_path = _fp32_source(meta, fp32)

    tcfg, tckpt, rows, p_teacher, thr_teacher, teacher_rule = _teacher_scores(teacher, show_progress)
    x, kept = model_inputs(rows, Preprocess(meta.preprocess), tcfg, "decode test (student)", show_progress)
    if [r.path for r in kept] != [r.path for r in rows]:
        raise ArtifactError("the student's preprocessing could not read every test image the teacher read")
    y = np.array([r.label for r in rows])
    if len(set(y.tolist())) < 2:
        raise ConfigError("the teacher's test split needs both classes to compare AUROC and sensitivity")
    patients = [r.patient_id for r in rows]
    student_session = session(artifact, threads)
    p_student = probabilities(student_session, x)
    thr_student = meta.threshold

    def sens_teacher(a, b):
        return sensitivity_specificity(a, b, thr_teacher)[0]

    def sens_student(a, b):
        return sensitivity_specificity(a, b, thr_student)[0]

    bound = criteria.non_inferiority
    auc_drop, auc_ci = paired_difference(y, p_teacher, p_student, auroc, clusters=patients, n=n_boot)
    sens_drop, sens_ci = paired_difference(y, p_teacher, p_student, sens_teacher, sens_student, patients, n_boot)
    checks = [
        _criterion("AUROC drop (teacher − student)", auc_drop, auc_ci, criteria.max_auroc_drop, True, bound),
        _criterion("sensitivity drop at the operating point", sens_drop, sens_ci, criteria.max_sensitivity_drop,
                   True, bound),
    ]
    notes = []
    agreement = None
    if fp32_path is not None:
        p32 = probabilities(session(fp32_path, threads), x)
        agreement = float(np.mean((p_student >= thr_student) == (p32 >= thr_student)))
        checks.append(_criterion("decisions agreeing with the fp32 student", agreement, None, criteria.min_agreement,
                                 False, False))
    else:
        notes.append("the artifact is fp32 (not quantized): the INT8 vs fp32 agreement criterion does not apply")
    del x  # the full decode's inputs take its place
    contract = None
    if meta.preprocess.decode_long_side:
        contract_checks, contract, contract_notes = _contract_check(student_session, meta, rows, tcfg, y, patients,
                                                                    p_student, criteria, n_boot, show_progress)
        checks += contract_checks
        notes += contract_notes
    else:
        notes.append("the artifact decodes every pixel (no decode contract): the contract criteria do not apply")
    margin = criteria.max_auroc_drop
    if np.isfinite(auc_ci[1]) and auc_ci[1] - auc_drop > margin:
        notes.append(f"the AUROC-drop interval ({auc_ci[0]:+.3f} to {auc_ci[1]:+.3f}) is wider than the {margin:g} "
                     "margin: this test set is too small to show non-inferiority; more test patients narrow it")
    if meta.operating.rule != teacher_rule:
        notes.append(f"the teacher's operating point ({teacher_rule}) and the student's ({meta.operating.rule}) were "
                     "chosen by different rules")
    reasons = [f"{c.name} {c.measured:.4f}"
               + (f" (upper 95 % bound {c.ci95[1]:.4f})" if bound and c.ci95 else "") + f" is not {c.limit}"
               for c in checks if not c.passed]
    passed = not reasons
    t_sens, t_spec = sensitivity_specificity(y, p_teacher, thr_teacher)
    s_sens, s_spec = sensitivity_specificity(y, p_student, thr_student)
    report = GateReport(
        passed=passed, reasons=reasons, criteria=checks, notes=notes,
        decided_on="upper 95 % bounds (non-inferiority)" if bound else "point estimates (upper 95 % bounds stated)",
        limits=asdict(criteria), bootstrap=n_boot,
        test_images=len(y), test_patients=len(set(patients)), test_positives=int(y.sum()),
        split_sha256=split_sha, teacher_run=str(teacher.resolve()), teacher_model=tcfg.model.name,
        teacher_weights_sha256=sha256_file(tckpt),
        teacher=GateScores(auroc=auroc(y, p_teacher), threshold=thr_teacher, operating_point=teacher_rule,
                           sensitivity=t_sens, specificity=t_spec, model=tcfg.model.name),
        student=GateScores(auroc=auroc(y, p_student), threshold=thr_student, operating_point=meta.operating_point,
                           sensitivity=s_sens, specificity=s_spec, model=meta.model_name, artifact=artifact.name,
                           artifact_sha256=sha256_file(artifact), format=meta.format),
        agreement_with_fp32=agreement, fp32_source_sha256=sha256_file(fp32_path) if fp32_path else None,
        contract_check=contract,
        gated_utc=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )
    gated = meta.model_copy(update={"gate": report})
    if passed:
        write_artifact(onnx.load(str(artifact)), gated, out)
        log.info("gate: promoted %s -> %s", artifact.name, out)
    else:
        if out.exists():
            log.warning("gate: removing %s, left by an earlier run: this model is not promoted", out)
            out.unlink()
        log.warning("gate: refused %s: %s", artifact.name, "; ".join(reasons))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".gate.json").write_text(report.model_dump_json(indent=2))
    card_of = out if passed else artifact
    out.with_suffix(".card.md").write_text(render(gated, card_of, card_of.stat().st_size, sha256_file(card_of)))
    return report


def gate_summary(report: GateReport) -> str:
    return "\n".join(gate_lines(report))
