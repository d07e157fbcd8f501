"""The self-describing model artifact: JSON metadata embedded in the ONNX file.

Written by ``medvision.training.export`` (with the ``onnx`` package), read by the service through
onnxruntime's ``custom_metadata_map`` alone, so serving rebuilds its preprocessing from the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medvision.errors import ArtifactError
from medvision.preprocess import PreprocessConfig

SCHEMA_VERSION = 1
METADATA_KEY = "medvision"


class InputContract(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "image"
    shape: list[int | str] = Field(description="['batch', 1, H, W]")
    dtype: Literal["float32"] = "float32"
    modality: str = "MG"
    sop_classes: list[str] = ["Digital Mammography X-Ray Image Storage - For Presentation"]
    value_range: str = "preprocessed: (grey[0..1] - mean) / std"


class ArtifactMetadata(BaseModel):
    """Schema of the ``medvision`` metadata entry. Bump ``schema_version`` on incompatible change."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    schema_version: int = SCHEMA_VERSION
    model_name: str
    architecture: str
    medvision_version: str
    created_utc: str
    preprocess: PreprocessConfig
    input: InputContract
    outputs: dict[str, str] = {"logit": "cancer logit, shape [batch, 1]",
                               "probability": "sigmoid(logit / temperature), calibrated on validation"}
    labels: list[str] = ["non-cancer", "cancer"]
    threshold: float = Field(ge=0.0, le=1.0, description="probability at or above which the label is 'cancer'")
    operating_point: str = ""
    weights_sha256: str
    validation: dict[str, float] = {}
    temperature: float = Field(1.0, gt=0, description="calibration temperature, applied inside the graph")
    operating_points: list[dict] = Field([], description="thresholds chosen by rule on validation; the first is used")
    evaluation: dict = Field({}, description="held-out results from 'medvision evaluate' (with 95 % intervals)")
    quantization: dict = Field({}, description="what 'medvision quantize' chose and measured; empty for fp32 exports")
    split_sha256: str = Field("", description="sha256 of the training run's split.csv: the gate refuses to judge a "
                              "model on test patients of another split")
    gate: dict = Field({}, description="the promotion gate's result ('medvision gate'); empty if never gated")
    runtime_ops: list[str] = Field([], description="non-standard operators the graph needs (ONNX Runtime contrib "
                                   "operators such as com.microsoft.Attention); empty: standard ONNX only")
    intended_use: str = (
        "Research use only. Not a medical device; not for clinical decisions. Trained on synthetic data unless "
        "stated otherwise in 'training_data'."
    )
    training_data: str = ""


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
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"artifact schema version {version!r} is not supported (this medvision reads {SCHEMA_VERSION})"
        )
    try:
        return ArtifactMetadata.model_validate(data)
    except ValidationError as exc:
        raise ArtifactError(f"artifact metadata is invalid: {exc}") from None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
