"""Who owns what, and the identifiers requests carry: sites, and UIDs in paths, query strings and bodies.

Everything the service receives belongs to the site of the key that sent it (``Owner``). A UID or site name
taken from a request is checked here before it reaches a query, a cache key or a path; a malformed one is a
400 that names the parameter, never quoting the value (it is data from outside and may be anything).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from medvision.errors import InvalidUidError
from medvision.identifiers import check_uid
from medvision.serving.errors import InvalidParameter

SITE_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}"
_SITE = re.compile(SITE_PATTERN, re.ASCII)


@dataclass(frozen=True)
class Owner:
    """The site that owns a stored instance, study or result, and the key that sent it (for audit and usage)."""

    site: str
    key_id: int | None = None

    @property
    def meter(self) -> str:
        """Whose usage this is: the key, or (no key: images that came by C-STORE) the site's DICOM callers."""
        return f"key:{self.key_id}" if self.key_id is not None else f"dimse:{self.site}"


def is_site(value: object) -> bool:
    return isinstance(value, str) and _SITE.fullmatch(value) is not None


def request_uid(value: str, what: str) -> str:
    """A UID from a request's path, query or body; ``InvalidParameter`` (400, ``invalid_uid``) if malformed."""
    try:
        return check_uid(value, what)
    except InvalidUidError as exc:
        raise InvalidParameter(exc.message, code="invalid_uid") from None


def request_site(value: str | None) -> str | None:
    """An optional site name from a request (``?site=``); ``InvalidParameter`` if it cannot be a site."""
    if value is None or value == "":
        return None
    if not is_site(value):
        raise InvalidParameter("site is not a site name: 1-64 letters, digits or . _ @ - , starting with a letter "
                               "or digit", code="invalid_site")
    return value
