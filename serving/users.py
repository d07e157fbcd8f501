"""Review-UI accounts and browser sessions.

Passwords are stored as salted scrypt hashes (``hashlib.scrypt``, n=2**14, r=8, p=1: memory-hard, in the
standard library); five wrong passwords lock an account for 15 minutes. A session is a random 256-bit
token in an ``HttpOnly``, ``SameSite=Strict`` cookie; the database keeps its SHA-256 and a CSRF token that
every state-changing request must echo. Sessions expire after ``ui_session_minutes`` without activity.
Single sign-on (OIDC / SAML) is a documented extension point: it would replace ``authenticate`` and
create the same session rows.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from medvision.errors import ConfigError
from medvision.serving.tables import UiSession, User, utcnow

ROLES = ("reader", "admin")
MIN_PASSWORD = 10
MAX_FAILURES = 5
LOCK_MINUTES = 15
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
_USERNAME = re.compile(r"[A-Za-z0-9_.@-]{2,64}")


@dataclass(frozen=True)
class Reader:
    """The signed-in user as pages see it (no hash, no ORM session attached)."""

    user_id: int
    username: str
    role: str
    csrf_token: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return "scrypt${n}${r}${p}$".format(**_SCRYPT) + base64.b64encode(salt).decode() + "$" + base64.b64encode(digest).decode()


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=32)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def _aware(t: _dt.datetime | None) -> _dt.datetime | None:
    return t.replace(tzinfo=_dt.UTC) if t is not None and t.tzinfo is None else t  # SQLite hands back naive UTC


def create_user(db: Session, username: str, password: str, role: str) -> User:
    if not _USERNAME.fullmatch(username or ""):
        raise ConfigError("a username is 2-64 letters, digits or . _ @ - (not a patient name: it appears in the audit log)")
    if role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    _check_rules(password)
    if db.scalar(select(User).where(User.username == username)) is not None:
        raise ConfigError(f"a user named {username!r} exists already")
    user = User(username=username, password_hash=hash_password(password), role=role, failed_logins=0)
    db.add(user)
    db.commit()
    return user


def set_password(db: Session, username: str, password: str) -> User:
    user = _get(db, username)
    _check_rules(password)
    user.password_hash, user.failed_logins, user.locked_until = hash_password(password), 0, None
    db.execute(delete(UiSession).where(UiSession.user_id == user.id))  # a new password signs everyone out
    db.commit()
    return user


def disable_user(db: Session, username: str) -> User:
    user = _get(db, username)
    if user.disabled_at is None:
        user.disabled_at = utcnow()
    db.execute(delete(UiSession).where(UiSession.user_id == user.id))
    db.commit()
    return user


def _check_rules(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise ConfigError(f"a password needs at least {MIN_PASSWORD} characters")


def _get(db: Session, username: str) -> User:
    user = db.scalar(select(User).where(User.username == username))
    if user is None:
        raise ConfigError(f"no user named {username!r}")
    return user


def authenticate(db: Session, username: str, password: str) -> tuple[User | None, str]:
    """``(user, "")`` when the password is right, else ``(None, reason)`` with reason for the audit log
    (the page itself always says the same thing, so it cannot be used to find user names)."""
    user = db.scalar(select(User).where(User.username == username))
    if user is None:
        check_password(password, hash_password("timing equaliser"))  # same cost as a real check
        return None, "unknown_user"
    if user.disabled_at is not None:
        return None, "disabled"
    now = utcnow()
    if user.locked_until is not None and _aware(user.locked_until) > now:
        return None, "locked"
    if not check_password(password, user.password_hash):
        user.failed_logins += 1
        if user.failed_logins >= MAX_FAILURES:
            user.locked_until, user.failed_logins = now + _dt.timedelta(minutes=LOCK_MINUTES), 0
        db.commit()
        return None, "wrong_password"
    user.failed_logins, user.locked_until = 0, None
    db.commit()
    return user, ""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def start_session(db: Session, user: User, minutes: float) -> str:
    """A new session for ``user``; returns the cookie value (shown to the browser only)."""
    token = secrets.token_urlsafe(32)
    db.execute(delete(UiSession).where(UiSession.expires_at < utcnow()))  # expired sessions of anyone
    db.add(UiSession(token_sha256=_digest(token), user_id=user.id, csrf_token=secrets.token_urlsafe(24),
                     expires_at=utcnow() + _dt.timedelta(minutes=minutes)))
    db.commit()
    return token


def resume_session(db: Session, token: str, minutes: float) -> Reader | None:
    """The reader behind a cookie, sliding its expiry forward; ``None`` if unknown, expired or disabled."""
    row = db.scalar(select(UiSession).where(UiSession.token_sha256 == _digest(token)))
    if row is None:
        return None
    now = utcnow()
    if _aware(row.expires_at) <= now:
        db.delete(row)
        db.commit()
        return None
    user = db.get(User, row.user_id)
    if user is None or user.disabled_at is not None:
        return None
    renewed = now + _dt.timedelta(minutes=minutes)
    if renewed - _aware(row.expires_at) > _dt.timedelta(minutes=minutes / 10):  # not a write on every request
        row.expires_at = renewed
        db.commit()
    return Reader(user.id, user.username, user.role, row.csrf_token)


def end_session(db: Session, token: str) -> None:
    db.execute(delete(UiSession).where(UiSession.token_sha256 == _digest(token)))
    db.commit()
