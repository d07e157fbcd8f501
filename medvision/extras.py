"""Check an optional dependency group before a command needs it (MONAI's ``optional_import`` idea)."""

from __future__ import annotations

from importlib.util import find_spec

from medvision.errors import MissingExtraError

DISTRIBUTION = "medvision-radiology"  # the name on the package index ("medvision" there is another project)


def require_extra(extra: str, *modules: str) -> None:
    """Raise ``MissingExtraError`` naming the first of ``modules`` that is not installed (ONNX Runtime comes in two
    flavours, each its own extra: ``cpu`` or ``gpu``)."""
    for module in modules:
        if find_spec(module) is None:
            raise MissingExtraError(module, "cpu" if module == "onnxruntime" else extra)
