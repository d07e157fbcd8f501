"""The inference engine: an ONNX Runtime session plus the preprocessing its artifact describes."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, Field

from medvision import __version__
from medvision.artifact import ArtifactMetadata, session_metadata, sha256_file
from medvision.cores import physical_cores
from medvision.dicom_io import DicomMeta, ReadLimits, Source, decodes_without_gil
from medvision.drift import header_of, input_statistics, profile
from medvision.errors import ArtifactError
from medvision.preprocess import Preprocess
from medvision.read_ahead import Ahead, decode_ahead
from medvision.serving.settings import Settings
from medvision.site_calibration import SiteCalibration

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    probability: float
    label: str
    above_threshold: bool
    meta: DicomMeta
    inference_ms: float
    profile: dict | None = None  # drift quantities (medvision.drift), when the model input was at hand
    threshold: float = 0.5  # the one the label was decided at: the model's, or the site calibration's
    calibration_id: int | None = None  # the site calibration that made probability and threshold; None: the model's

    @property
    def calibration(self) -> str:
        return "model" if self.calibration_id is None else f"site calibration {self.calibration_id}"


class ModelInfo(BaseModel):
    """Who made a result: the served model's identity, as results, the SR, metrics and /readyz state it."""

    model_config = {"protected_namespaces": (), "frozen": True}

    name: str
    architecture: str
    artifact_sha256: str
    weights_sha256: str
    trained_with: str
    served_by: str
    operating_point: str
    threshold: float
    providers: list[str]
    format: str = Field(description="fp32, fp16 or the INT8 variant chosen by 'medvision quantize'")
    gate: str = Field(description="promoted, refused or not gated ('medvision gate')")
    labels: list[str] = Field(["non-cancer", "cancer"], description="the label below and at or above the threshold")


def choose_providers(requested: list[str] | None = None) -> list[str]:
    """CUDA first when the installed onnxruntime has it, CPU always last."""
    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ArtifactError(f"execution provider(s) {missing} not available; installed: {available}")
        return requested
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class Engine:
    """Load an artifact; ``predict(source)`` reads, preprocesses and scores one DICOM."""

    def __init__(self, artifact: str | Path, threads: int = 0, providers: list[str] | None = None,
                 limits: ReadLimits = ReadLimits(), spinning: bool = True) -> None:
        path = Path(artifact)
        if not path.is_file():
            raise ArtifactError(f"model artifact not found: {path} (set MEDVISION_ARTIFACT or --model)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or physical_cores()  # not ONNX Runtime's default: see physical_cores
        if not spinning:  # idle ONNX Runtime threads sleep instead of spinning: decoding processes need the cores
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=choose_providers(providers))
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
            raise ArtifactError(f"cannot load {path} with ONNX Runtime: {exc}") from None
        self.meta: ArtifactMetadata = session_metadata(self.session)
        if self.meta.gate is not None and not self.meta.gate.passed:
            raise ArtifactError(f"{path.name} was refused by the promotion gate ("
                                + "; ".join(self.meta.gate.reasons) + "): it must not be served")
        self.preprocess = Preprocess(self.meta.preprocess)
        self.artifact_sha256 = sha256_file(path)
        self.limits = limits
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        size = self.meta.preprocess.image_size
        if list(inp.shape[1:]) != [1, size, size]:
            raise ArtifactError(f"graph input {inp.shape} does not match the metadata's {size} x {size}")
        self.run(np.zeros((1, 1, size, size), np.float32))  # warm-up: first-call allocation off the request path

    @classmethod
    def from_settings(cls, settings: Settings) -> Engine:
        # beside decoding processes on every core, a second intra-op thread only costs: 4 % more JPEG 2000 images/s at
        # 8 requests at once with one, and no slower alone
        threads = settings.threads or (1 if settings.decoders else 0)
        engine = cls(settings.artifact, threads=threads, providers=settings.providers,
                     limits=ReadLimits(max_pixels=settings.max_pixels), spinning=not settings.decoders)
        pinned, trained = settings.decode_long_side, engine.meta.preprocess.decode_long_side
        if pinned is not None and pinned != trained:
            raise ArtifactError(
                f"decode contract mismatch: {Path(settings.artifact).name} was trained on images "
                f"{engine.meta.preprocess.decoding} (decode_long_side {trained}), but this deployment is pinned to "
                f"decode_long_side {pinned} (MEDVISION_DECODE_LONG_SIDE): serving it would feed the model other pixels "
                "than it learned from")
        return engine

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for a preprocessed batch of shape (N, 1, H, W)."""
        return self.session.run(["probability"], {self.input_name: batch})[0][:, 0]

    @property
    def has_heatmap(self) -> bool:
        return any(o.name == "heatmap" for o in self.session.get_outputs())

    def run_with_heatmap(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and the per-location logits (N, 1, rows, cols) from the same forward pass."""
        prob, heat = self.session.run(["probability", "heatmap"], {self.input_name: batch})
        return prob[:, 0], heat

    def prepare(self, source: Source, identifiers: dict[str, str] | None = None,
                gil_free_only: bool = False, ahead=None) -> tuple[np.ndarray, DicomMeta]:
        """Read and preprocess one DICOM: the model input (1, H, W) and its metadata (``identifiers``,
        ``gil_free_only``, ``ahead``: see ``read_dicom``)."""
        stored, meta = self.preprocess.read(source, self.limits, identifiers, gil_free_only, ahead)
        return self.preprocess(stored, meta), meta

    @property
    def reads_reduced(self) -> bool:
        """Whether this engine's contract reads images at a reduced size (``decode_long_side``)."""
        return self.preprocess.cfg.decode_long_side > 0

    def decode_ahead(self, arrived, size: int) -> Ahead | None:
        """A JPEG 2000 or uncompressed file's pixels under this engine's contract, read while the file arrives
        (``medvision.read_ahead``; ``arrived``: its ``Arriving``): handed to ``prepare(..., ahead=)`` once it is in."""
        return decode_ahead(arrived, size, self.preprocess.cfg.decode_long_side, self.limits)

    def decodes_without_gil(self, data) -> bool:
        """Whether a DICOM's bytes look like a decode, under this engine's contract, that lets the process's other
        threads run (``dicom_io.decodes_without_gil``: a hint; ``prepare(..., gil_free_only=True)`` holds to it)."""
        return decodes_without_gil(data, self.preprocess.cfg.decode_long_side)

    def prediction(self, probability: float, meta: DicomMeta, inference_ms: float,
                   x: np.ndarray | dict | None = None, overlay: tuple[int, SiteCalibration] | None = None) -> Prediction:
        """The result for one scored image; ``x`` (its model input, or that input's ``statistics``, computed where
        it was prepared) adds its drift quantities (with the model's own probability), ``overlay`` (the site's
        calibration id and overlay) replaces probability and threshold."""
        profile = None if x is None else self.drift_profile(x, meta, probability)
        threshold, calibration_id = self.meta.threshold, None
        if overlay is not None:
            calibration_id, site = overlay
            probability, threshold = float(site.probability(probability)), site.threshold
        above = probability >= threshold
        return Prediction(probability, self.meta.labels[int(above)], above, meta, inference_ms, profile, threshold,
                          calibration_id)

    def drift_profile(self, x: np.ndarray | dict, meta: DicomMeta, probability: float) -> dict:
        """What the drift watch compares with the artifact's reference (greys recovered from the normalised input
        ``x``, or its ``statistics``)."""
        return profile(header_of(meta), x if isinstance(x, dict) else self.statistics(x), probability)

    def statistics(self, x: np.ndarray) -> dict[str, float]:
        """The drift watch's statistics of one model input (as a decoding worker computes them)."""
        return input_statistics(x, self.meta.preprocess)

    def score(self, x: np.ndarray, meta: DicomMeta, overlay: tuple[int, SiteCalibration] | None = None) -> Prediction:
        """The prediction for one prepared image (``prepare``, or a ``DecodePool``'s)."""
        start = time.perf_counter()
        prob = float(self.run(x[None])[0])
        return self.prediction(prob, meta, (time.perf_counter() - start) * 1000, x, overlay)

    def predict(self, source: Source, identifiers: dict[str, str] | None = None) -> Prediction:
        return self.score(*self.prepare(source, identifiers))

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            name=self.meta.model_name, architecture=self.meta.architecture, artifact_sha256=self.artifact_sha256,
            weights_sha256=self.meta.weights_sha256, trained_with=self.meta.medvision_version, served_by=__version__,
            operating_point=self.meta.operating_point, threshold=self.meta.threshold, providers=self.providers,
            format=self.meta.format, gate=self.meta.gate_status, labels=list(self.meta.labels))
