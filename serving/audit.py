"""The audit trail: who (key or reader) did what to which resource, when, how it ended, and the request id.

Every access a route grants is written by the route (``audit``); every refusal of a known caller that the route
did not write itself is written by the error handlers (``errors``); failed authentication is written within a
per-address budget (``audit_failure``), since anyone can send requests without a key.
"""

from __future__ import annotations

import time

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from medvision.serving.tables import AuditEvent


def audit(sessions: sessionmaker[Session], request: Request, action: str, status: int, resource: str = "",
          key_id: int | None = None, user_id: int | None = None, **detail) -> None:
    """One audit row (by an API key or a review-UI reader). ``resource`` holds checked UIDs or route templates,
    never names, other identifiers or anything else a caller typed. The request is marked audited, so a refusal
    it ends in is not written twice (``errors``)."""
    with sessions() as db:
        db.add(AuditEvent(key_id=key_id, user_id=user_id, action=action, resource=resource[:256], status=status,
                          request_id=getattr(request.state, "request_id", ""), detail=detail))
        db.commit()
    request.state.audited = True


def write_audit(sessions: sessionmaker[Session], action: str, status: int, resource: str = "",
                key_id: int | None = None, user_id: int | None = None, **detail) -> None:
    """An audit row for something no HTTP request carries (a DICOM association, a CLI change), or a change made
    from the review UI whose own transaction writes it (``user_id``: the signed-in reader)."""
    with sessions() as db:
        db.add(AuditEvent(key_id=key_id, user_id=user_id, action=action, resource=resource[:256], status=status,
                          detail=detail))
        db.commit()


def route_of(request: Request) -> str:
    """The route template (``/v1/studies/{study_uid}``), never the path: a path is whatever the caller typed."""
    return getattr(request.scope.get("route"), "path", "unmatched")


class FailureBudget:
    """Audit rows for failed authentication, at most ``per_minute`` per client address (per process): anyone can
    send requests without a key, and must not be able to grow the database at will. What is left out is counted
    in the next row written for that address (``suppressed``)."""

    def __init__(self, per_minute: int = 30, max_addresses: int = 10_000) -> None:
        self.per_minute = per_minute
        self.max_addresses = max_addresses
        self._seen: dict[str, list] = {}  # address -> [minute, rows this minute, suppressed]

    def take(self, address: str) -> int | None:
        """``None`` if this failure goes unwritten, else how many were left out before it."""
        minute = int(time.monotonic() // 60)
        if len(self._seen) >= self.max_addresses:
            self._seen = {a: v for a, v in self._seen.items() if v[0] == minute}
        entry = self._seen.setdefault(address, [minute, 0, 0])
        if entry[0] != minute:
            entry[0], entry[1] = minute, 0
        if entry[1] >= self.per_minute:
            entry[2] += 1
            return None
        entry[1] += 1
        suppressed, entry[2] = entry[2], 0
        return suppressed


async def audit_failure(request: Request, action: str, status: int, user_id: int | None = None,
                        key_id: int | None = None, **detail) -> None:
    """Audit an authentication failure or refusal on ``request``'s route, within the address's budget."""
    suppressed = request.app.state.failures.take(request.client.host if request.client else "")
    if suppressed is None:
        return
    if suppressed:
        detail["suppressed"] = suppressed
    await run_in_threadpool(audit, request.app.state.db, request, action, status, route_of(request),
                            key_id=key_id, user_id=user_id, **detail)
