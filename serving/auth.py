"""API keys with scopes, and the audit trail of who accessed what.

A key reads ``mv_<prefix>_<secret>``: the prefix is public and finds the row, the secret proves it; only
the secret's SHA-256 is stored (keys are 256-bit random, so a fast hash is the right one — there is no
password to brute-force), compared in constant time. Each key belongs to a **site**, which owns what the key
sends (several keys may share a site, so a key can be rotated without losing the site's results).

Scopes: ``score`` (send images; read the results, reports and images of its own site), ``pull`` (make the
service fetch a study from the configured PACS: that reads any study the PACS holds, so give it only to
trusted integrations), ``review`` (read every site's results: the reading side), ``admin`` (keys, usage,
audit, metrics; implies the others). Every key and user change is written to the audit log.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from medvision.errors import ConfigError
from medvision.serving.audit import audit_failure
from medvision.serving.errors import Forbidden, Unauthenticated
from medvision.serving.identifiers import Owner, is_site
from medvision.serving.tables import ApiKey, AuditEvent, utcnow

SCOPES = ("score", "pull", "review", "admin")


@dataclass(frozen=True)
class Caller:
    """The authenticated key, as routes see it (no secret, no ORM session attached)."""

    key_id: int
    name: str
    site: str
    scopes: frozenset[str]

    @property
    def reads_all(self) -> bool:
        """``review`` and ``admin`` keys read every site's results; ``score`` keys only their own site's."""
        return bool(self.scopes & {"review", "admin"})

    @property
    def owner(self) -> Owner:
        """What this key sends belongs to its site."""
        return Owner(self.site, self.key_id)

    def sees(self, site: str) -> bool:
        return self.reads_all or site == self.site


class KeyCache:
    """Keys verified in the last ``seconds``, so a busy site's requests skip the database lookup and its thread
    hop (~2 ms of a request here). Held under the SHA-256 of the whole token — the token itself is never kept
    — with the key's id, name and scopes; only successes are held, so every bad key still reaches the
    database and the audit. The price: a key revoked with 'medvision keys revoke' (in any process) keeps
    working for up to ``seconds`` in a process that has just seen it. ``seconds`` = 0 turns it off."""

    def __init__(self, seconds: float, max_entries: int = 4096) -> None:
        self.seconds = seconds
        self.max_entries = max_entries
        self._held: dict[str, tuple[Caller, float]] = {}

    def get(self, token: str) -> Caller | None:
        if self.seconds <= 0:
            return None
        hit = self._held.get(_digest(token))
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def put(self, token: str, caller: Caller) -> None:
        if self.seconds <= 0:
            return
        now = time.monotonic()
        if len(self._held) >= self.max_entries:
            self._held = {k: v for k, v in self._held.items() if v[1] >= now}
            if len(self._held) >= self.max_entries:
                self._held.clear()
        self._held[_digest(token)] = (caller, now + self.seconds)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_scopes(text: str) -> list[str]:
    scopes = sorted({s.strip() for s in text.split(",") if s.strip()})
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise ConfigError(f"scopes must be a comma-separated subset of {', '.join(SCOPES)}; got {text!r}")
    return scopes


def create_key(db: Session, name: str, scopes: str, site: str | None = None, actor: str = "") -> tuple[str, ApiKey]:
    """A new key of ``site`` (default: a site named like the key); the returned token is shown once and cannot be
    recovered from the database. ``actor`` (who made it, e.g. the operating-system user of the CLI) is audited."""
    if not name or len(name) > 128:
        raise ConfigError("a key needs a name (the site or client it is for), at most 128 characters")
    site = name if site is None else site
    if not is_site(site):
        raise ConfigError("a site name is 1-64 letters, digits or . _ @ - , starting with a letter or digit (give "
                          "--site when the key's name is not one)")
    if db.scalar(select(ApiKey).where(ApiKey.name == name)) is not None:
        raise ConfigError(f"a key named {name!r} exists already (revoke it or choose another name)")
    prefix, secret = secrets.token_hex(4), secrets.token_urlsafe(32)
    row = ApiKey(name=name, site=site, prefix=prefix, secret_sha256=_digest(secret),
                 scopes=",".join(parse_scopes(scopes)))
    db.add(row)
    db.flush()
    db.add(AuditEvent(key_id=row.id, action="key_create", resource=name[:256], status=200,
                      detail={"by": actor, "site": site, "scopes": row.scopes}))
    db.commit()
    return f"mv_{prefix}_{secret}", row


def revoke_key(db: Session, name: str, actor: str = "") -> ApiKey:
    row = db.scalar(select(ApiKey).where(ApiKey.name == name))
    if row is None:
        raise ConfigError(f"no key named {name!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        db.add(AuditEvent(key_id=row.id, action="key_revoke", resource=name[:256], status=200, detail={"by": actor}))
        db.commit()
    return row


def verify(db: Session, token: str) -> ApiKey | None:
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != "mv":
        return None
    row = db.scalar(select(ApiKey).where(ApiKey.prefix == parts[1]))
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.secret_sha256, _digest(parts[2])):
        return None
    now = utcnow()
    last = row.last_used_at
    if last is not None and last.tzinfo is None:  # SQLite hands back naive UTC
        last = last.replace(tzinfo=_dt.UTC)
    if last is None or now - last > _dt.timedelta(minutes=5):  # not a write on every request
        row.last_used_at = now
        db.commit()
    return row


def _token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.headers.get("x-api-key") or None


# How a key may be sent, declared for the OpenAPI document (generated clients, the docs' Authorize button); the keys
# are read and checked by ``require`` itself.
BEARER = HTTPBearer(auto_error=False, scheme_name="bearer", description="an API key: 'Authorization: Bearer mv_…'")
API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKey", description="the same key in "
                       "an X-API-Key header")


def require(*scopes: str):
    """Route dependency: a valid, unrevoked key holding one of ``scopes`` (or ``admin``); 401 / 403
    otherwise, every refusal audited."""
    if not scopes or any(s not in SCOPES for s in scopes):
        raise ValueError(scopes)

    async def dependency(request: Request, _bearer=Security(BEARER), _header=Security(API_KEY)) -> Caller:
        sessions = request.app.state.db
        cache: KeyCache | None = getattr(request.app.state, "key_cache", None)
        token = _token(request)
        caller = cache.get(token) if cache is not None and token else None
        if caller is None:
            row = await run_in_threadpool(_lookup, sessions, token) if token else None
            if row is None:
                await audit_failure(request, "auth_failed", 401, reason="missing" if not token else "invalid")
                raise Unauthenticated("a valid API key is required: send 'Authorization: Bearer <key>' (create one "
                                      "with 'medvision keys create')" if not token else
                                      "the API key is not valid or has been revoked")
            caller = Caller(row.id, row.name, row.site, frozenset(row.scopes.split(",")))
            if cache is not None:
                cache.put(token, caller)
        if not caller.scopes & {*scopes, "admin"}:
            await audit_failure(request, "forbidden", 403, key_id=caller.key_id)
            raise Forbidden(f"this key lacks the {' or '.join(repr(s) for s in scopes)} scope")
        request.state.caller = caller
        return caller

    return Depends(dependency)


def _lookup(sessions: sessionmaker[Session], token: str) -> ApiKey | None:
    with sessions() as db:
        return verify(db, token)
