"""Domain exceptions. Each carries a stable ``code`` that the service maps to a 4xx response."""

from __future__ import annotations


class MedvisionError(Exception):
    """Base class for every error medvision raises on purpose."""

    code = "medvision_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(MedvisionError):
    """A configuration file or override is invalid."""

    code = "invalid_config"


class DicomError(MedvisionError):
    """The input could not be used as a DICOM image."""

    code = "invalid_dicom"


class InvalidUidError(DicomError):
    """A value that stands where a DICOM UID belongs is not one (PS3.5 9.1: digits and dots, <= 64 characters)."""

    code = "invalid_uid"


class EmptyInputError(DicomError):
    """Zero bytes were given where a DICOM file was expected."""

    code = "empty_body"


class NotDicomError(DicomError):
    """The bytes are not a DICOM Part 10 file (nor a bare dataset pydicom can parse)."""

    code = "not_dicom"


class NotAnImageError(DicomError):
    """A valid DICOM object without pixel data (SR, RT structure set, presentation state...)."""

    code = "not_an_image"


class CorruptDicomError(DicomError):
    """The file is DICOM but truncated or malformed so its pixels cannot be decoded."""

    code = "corrupt_dicom"


class UnsupportedImageError(DicomError):
    """A decodable image that medvision's stated policy refuses (colour, multi-frame, too large)."""

    code = "unsupported_image"


class MissingCodecError(DicomError):
    """No installed pixel-data plugin can decode this transfer syntax."""

    code = "missing_codec"


class PreprocessError(MedvisionError):
    """A preprocessing step failed; the message names the step and the input's shape and range."""

    code = "preprocess_failed"


class ArtifactError(MedvisionError):
    """A model artifact is missing, unreadable, or has an unknown schema."""

    code = "invalid_artifact"


class MissingExtraError(MedvisionError):
    """An optional dependency group is not installed."""

    code = "missing_extra"

    def __init__(self, package: str, extra: str) -> None:
        from medvision.extras import DISTRIBUTION

        hint = f"pip install '{DISTRIBUTION}[{extra}]'"
        if extra == "cpu":
            hint += f" (or '{DISTRIBUTION}[gpu]' on a machine with CUDA: one ONNX Runtime per environment)"
        super().__init__(f"'{package}' is not installed; install it with: {hint}")
        self.package = package
        self.extra = extra
