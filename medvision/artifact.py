"""The self-describing model artifact: JSON metadata embedded in the ONNX file. The only code that reads or
writes it.

Written by ``export``, ``quantize``, ``gate`` and ``bench`` (``write_artifact``: atomically); read by everything
else (``read_artifact`` from a file, ``session_metadata`` from an ONNX Runtime
session the service has loaded anyway), so serving rebuilds its preprocessing, threshold and operating point from the file alone. Every
part is typed; nothing is read back with ``.get()`` chains. Artifacts of the previous schema version still load
(``_upgrade_v1``; version 2 lacked the decode contract, ``PreprocessConfig.decode_long_side``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medvision.drift import Reference
from medvision.errors import ArtifactError
from medvision.preprocess import PreprocessConfig

SCHEMA_VERSION = 3
METADATA_KEY = "medvision"
_METADATA_PROPS = 14  # ModelProto.metadata_props (onnx.proto)


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class InputContract(_Part):
    name: str = "image"
    shape: list[int | str] = Field(description="['batch', 1, H, W]")
    dtype: Literal["float32"] = "float32"
    modality: str = "MG"
    sop_classes: list[str] = ["Digital Mammography X-Ray Image Storage - For Presentation"]
    value_range: str = "preprocessed: (grey[0..1] - mean) / std"


class OperatingPoint(_Part):
    """A threshold chosen by a rule (on validation), with what it achieved there."""

    name: str = ""
    rule: str
    threshold: float = Field(ge=0.0, le=1.0, description="probability at or above which the label is 'cancer'")
    sensitivity: float | None = None
    specificity: float | None = None
    calibrated: bool = Field(False, description="chosen on calibrated probabilities")

    @property
    def label(self) -> str:
        """How the operating point is shown to users (the service, the model card, the SR)."""
        return self.rule + (" (calibrated)" if self.calibrated else "")


class EvaluationSummary(_Part):
    """Held-out results of 'medvision evaluate' for these weights (fp32, before compression), 95 % intervals."""

    subset: str = "test"
    images: int
    positives: int
    auroc: float
    auroc_ci95: list[float | None]
    sensitivity: float
    sensitivity_ci95: list[float | None]
    specificity: float
    specificity_ci95: list[float | None]
    ece: float | None = None
    ece_ci95: list[float | None] | None = None
    breast_auroc: float | None = None
    breast_auroc_ci95: list[float | None] | None = None


class QuantizationReport(_Part):
    """What 'medvision quantize' (or an fp16 export) chose and measured."""

    format: str = "fp32"
    reason: str = ""
    speedup_vs_fp32: float | None = None
    agreement_with_fp32: float | None = None
    source: str = Field("", description="the fp32 artifact it was made from")
    source_sha256: str = ""
    kept_in_float: dict[str, list[str]] = {}


class GateCriterion(_Part):
    name: str
    measured: float
    ci95: list[float] | None = None
    limit: str
    passed: bool


class GateScores(_Part):
    """One side of the gate's comparison on the held-out test split."""

    auroc: float
    threshold: float
    operating_point: str
    sensitivity: float
    specificity: float
    model: str = ""
    artifact: str = ""
    artifact_sha256: str = ""
    format: str = ""


class ContractCheck(_Part):
    """The gate's decode-contract check: the artifact on the test split decoded under its own contract and decoding
    every pixel, the same model, the same threshold."""

    contract: str = Field(description="the artifact's decode contract, in words")
    auroc_contract: float
    auroc_full: float
    agreement: float = Field(description="share of test images whose decision at the threshold is the same both ways")
    flipped: int = Field(description="test images whose decision differs")
    max_probability_change: float
    mean_probability_change: float


class GateReport(_Part):
    """The promotion gate's result ('medvision gate'): the student artifact against its teacher."""

    passed: bool
    reasons: list[str] = []
    criteria: list[GateCriterion] = []
    notes: list[str] = []
    decided_on: str = "point estimates"
    limits: dict[str, float | bool] = {}
    bootstrap: int = 0
    test_images: int = 0
    test_patients: int = 0
    test_positives: int = 0
    split_sha256: str = ""
    teacher_run: str = ""
    teacher_model: str = ""
    teacher_weights_sha256: str = ""
    teacher: GateScores | None = None
    student: GateScores | None = None
    agreement_with_fp32: float | None = None
    fp32_source_sha256: str | None = None
    contract_check: ContractCheck | None = None
    gated_utc: str = ""


class ArtifactMetadata(_Part):
    """Schema of the ``medvision`` metadata entry. Bump ``SCHEMA_VERSION`` on incompatible change, and read the
    previous version."""

    schema_version: int = SCHEMA_VERSION
    model_name: str
    architecture: str
    medvision_version: str
    created_utc: str
    preprocess: PreprocessConfig
    input: InputContract
    outputs: dict[str, str] = {"logit": "cancer logit, shape [batch, 1]",
                               "probability": "sigmoid(logit / temperature + calibration_bias), calibrated on "
                                              "validation"}
    labels: list[str] = ["non-cancer", "cancer"]
    operating_points: list[OperatingPoint] = Field(min_length=1, description="thresholds chosen by rule; the first "
                                                   "is the one the service applies")
    weights_sha256: str
    validation: dict[str, float] = {}
    temperature: float = Field(1.0, gt=0, description="calibration temperature, applied inside the graph")
    calibration_bias: float = Field(0.0, description="calibration bias (Platt scaling), applied inside the graph "
                                    "after the temperature: probability = sigmoid(logit / temperature + bias)")
    calibration_method: Literal["none", "temperature", "platt"] = Field(
        "none", description="how the probability was calibrated on validation ('none': it was not)")
    calibration_prevalence: float | None = Field(None, ge=0, le=1, description="the cancer share of the validation "
                                                 "images the probability was calibrated on: what it is relative to")
    evaluation: EvaluationSummary | None = None
    quantization: QuantizationReport = QuantizationReport()
    split_sha256: str = Field("", description="sha256 of the training run's split.csv: the gate refuses to judge a "
                              "model on test patients of another split")
    gate: GateReport | None = Field(None, description="the promotion gate's result; None if never gated")
    runtime_ops: list[str] = Field([], description="non-standard operators the graph needs (ONNX Runtime contrib "
                                   "operators such as com.microsoft.Attention); empty: standard ONNX only")
    intended_use: str = (
        "Research use only. Not a medical device; not for clinical decisions. Trained on synthetic data unless "
        "stated otherwise in 'training_data'."
    )
    training_data: str = ""
    reference: Reference | None = Field(None, description="the distributions the model was validated on (header "
                                        "attributes, input statistics, calibrated probability): the service's drift "
                                        "watch compares each site with them")

    @property
    def operating(self) -> OperatingPoint:
        """The operating point the service applies."""
        return self.operating_points[0]

    @property
    def threshold(self) -> float:
        return self.operating.threshold

    @property
    def operating_point(self) -> str:
        return self.operating.label

    @property
    def format(self) -> str:
        """fp32, fp16 or the INT8 variant chosen by 'medvision quantize'."""
        return self.quantization.format

    @property
    def gate_status(self) -> str:
        return "not gated" if self.gate is None else "promoted" if self.gate.passed else "refused"


def encode(meta: ArtifactMetadata) -> str:
    return meta.model_dump_json()


def decode(custom_metadata: dict[str, str]) -> ArtifactMetadata:
    """Parse and validate the metadata map of an ONNX model; refuse unknown schemas."""
    raw = custom_metadata.get(METADATA_KEY)
    if raw is None:
        raise ArtifactError(
            f"the ONNX file carries no '{METADATA_KEY}' metadata: export it with 'medvision export'"
        )
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"artifact metadata is not valid JSON: {exc}") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version == 1:
        data = _upgrade_v1(data)
    elif version == 2:  # version 3 added the decode contract; a version-2 model decodes every pixel (the default)
        data = dict(data, schema_version=SCHEMA_VERSION)
    elif version != SCHEMA_VERSION:
        raise ArtifactError(
            f"artifact schema version {version!r} is not supported (this medvision reads 1 to {SCHEMA_VERSION})"
        )
    pre = data.get("preprocess") if isinstance(data, dict) else None
    if isinstance(pre, dict) and "crop_long_side" not in pre:  # written before the box had its own resolution
        data = dict(data, preprocess=dict(pre, crop_long_side=0))
    if isinstance(data, dict) and "calibration_method" not in data and data.get("temperature", 1.0) != 1.0:
        data = dict(data, calibration_method="temperature")  # written before Platt scaling: a temperature only
    try:
        return ArtifactMetadata.model_validate(data)
    except ValidationError as exc:
        raise ArtifactError(f"artifact metadata is invalid: {exc}") from None


def _upgrade_v1(data: dict) -> dict:
    """Version 1 kept the applied threshold and its rule beside an untyped list of operating points (the rule with
    " (calibrated)" appended), and empty dicts for no evaluation, quantization or gate."""
    data = dict(data, schema_version=SCHEMA_VERSION)
    threshold, rule = data.pop("threshold", 0.5), data.pop("operating_point", "")
    calibrated = rule.endswith(" (calibrated)")
    points = [dict(p, calibrated=calibrated) for p in data.get("operating_points") or []]
    if not points:
        points = [{"rule": rule or "threshold 0.5", "threshold": threshold}]
    data["operating_points"] = points
    for part in ("evaluation", "gate"):
        data[part] = data.get(part) or None
    data["quantization"] = data.get("quantization") or {}
    return data


def session_metadata(session) -> ArtifactMetadata:
    """The metadata of an artifact loaded in an ONNX Runtime ``InferenceSession``."""
    return decode(session.get_modelmeta().custom_metadata_map)


def read_artifact(path: str | os.PathLike) -> ArtifactMetadata:
    """The metadata of the ONNX artifact at ``path``.

    Read with protobuf alone (the ONNX file is a protobuf ``ModelProto``; its ``metadata_props`` are field 14, each
    a key / value pair), so neither ``onnx`` nor ONNX Runtime is needed and no graph is built.
    """
    from google.protobuf import empty_pb2
    from google.protobuf.message import DecodeError
    from google.protobuf.unknown_fields import UnknownFieldSet

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no ONNX artifact at {path}: run 'medvision export' first")
    props: dict[str, str] = {}
    try:
        model = empty_pb2.Empty()
        model.ParseFromString(path.read_bytes())
        for field in UnknownFieldSet(model):
            if field.field_number == _METADATA_PROPS and field.wire_type == 2:
                entry = empty_pb2.Empty()
                entry.ParseFromString(field.data)
                kv = {f.field_number: f.data for f in UnknownFieldSet(entry) if f.wire_type == 2}
                props[kv.get(1, b"").decode()] = kv.get(2, b"").decode()
    except (DecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not a readable ONNX model: {type(exc).__name__}") from None
    return decode(props)


def write_artifact(model, meta: ArtifactMetadata, out: str | os.PathLike) -> Path:
    """Save the ONNX ``model`` (an ``onnx.ModelProto``) to ``out`` with ``meta`` as its only medvision metadata,
    atomically: a reader sees the old file or the new one, never half of one. (Models here are far below
    protobuf's 2 GB limit, so the graph is stored in one file.)"""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    for key, value in [*kept, (METADATA_KEY, encode(meta))]:
        model.metadata_props.add(key=key, value=value)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(model.SerializeToString())
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # a model is no secret: readable by the service's user wherever it is mounted
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
