"""Check an optional dependency group before a command needs it (MONAI's ``optional_import`` idea)."""

from __future__ import annotations

from importlib.util import find_spec

from medvision.errors import MissingExtraError


def require_extra(extra: str, *modules: str) -> None:
    """Raise ``MissingExtraError`` naming the first of ``modules`` that is not installed."""
    for module in modules:
        if find_spec(module) is None:
            raise MissingExtraError(module, extra)
