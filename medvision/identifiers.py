"""DICOM UIDs as data from outside: checked before they name a file, a folder, a database row or a URL.

PS3.5 section 9.1: a UID is components of digits separated by dots, no component empty or with a leading zero
(except the component "0"), at most 64 characters. That rule also makes a UID safe as a path segment (no
``/``, no ``..``) and in a URL; the check is exact (``re.fullmatch``, ASCII digits only), where pydicom's
``UID.is_valid`` lets a trailing newline through.
"""

from __future__ import annotations

import re

from medvision.errors import InvalidUidError

MAX_UID_LENGTH = 64
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*", re.ASCII)


def is_uid(value: object) -> bool:
    """True for a well-formed DICOM UID."""
    return isinstance(value, str) and len(value) <= MAX_UID_LENGTH and _UID.fullmatch(value) is not None


def check_uid(value: object, what: str = "UID") -> str:
    """``value`` if it is a well-formed DICOM UID, else ``InvalidUidError`` naming ``what`` (the value itself is
    not quoted: it is data from outside and may be anything)."""
    if is_uid(value):
        return value  # type: ignore[return-value]
    if not isinstance(value, str) or not value:
        problem = "is empty"
    elif len(value) > MAX_UID_LENGTH:
        problem = f"is {len(value)} characters long (at most {MAX_UID_LENGTH})"
    elif not set(value) <= set("0123456789."):
        problem = "holds characters other than digits and dots"
    else:
        problem = "has an empty component or one with a leading zero"
    raise InvalidUidError(f"{what} is not a valid DICOM UID: it {problem} (PS3.5 9.1: digits and dots, "
                          f"no empty or leading-zero components, at most {MAX_UID_LENGTH} characters)")
