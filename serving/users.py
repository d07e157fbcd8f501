"""Review-UI accounts and browser sessions.

Passwords are stored as salted scrypt hashes (``hashlib.scrypt``, n=2**17, r=8, p=1 as OWASP recommends:
memory-hard, in the standard library; older hashes are upgraded at the next sign-in). Every sign-in attempt
costs exactly one scrypt, whether the user exists, is disabled or not, so timing does not tell known from
unknown names. Failed attempts are throttled per client address (5 per user name, 50 in all, per 15 minutes),
never per account: an account lock would let anyone lock a named reader out. A session is a random 256-bit
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
import threading
from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from medvision.errors import ConfigError
from medvision.serving.tables import AuditEvent, LoginFailure, UiSession, User, utcnow

ROLES = ("reader", "admin")
MIN_PASSWORD = 10
THROTTLE_MINUTES = 15
MAX_FAILURES_PER_NAME = 5  # from one address, for one user name
MAX_FAILURES_PER_ADDRESS = 50  # from one address, all names (readers behind one NAT share it)
_SCRYPT = {"n": 2**17, "r": 8, "p": 1}
_MAXMEM = 256 * 1024 * 1024  # n=2**17, r=8 needs 128 MiB
_SLOTS = threading.BoundedSemaphore(2)  # at most two hashes at once: 256 MiB, however many sign in together
_USERNAME = re.compile(r"[A-Za-z0-9_.@-]{2,64}")
# A hash nobody's password matches, with today's parameters: checking it costs what a real check costs.
_NOBODY = "scrypt${n}${r}${p}$".format(**_SCRYPT) + base64.b64encode(b"medvision-nobody").decode() + "$" + \
    base64.b64encode(bytes(32)).decode()


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


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    with _SLOTS:
        return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=_MAXMEM)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, **_SCRYPT)
    return "scrypt${n}${r}${p}$".format(**_SCRYPT) + base64.b64encode(salt).decode() + "$" + base64.b64encode(digest).decode()


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def _outdated(stored: str) -> bool:
    return not stored.startswith("scrypt${n}${r}${p}$".format(**_SCRYPT))


def _aware(t: _dt.datetime | None) -> _dt.datetime | None:
    return t.replace(tzinfo=_dt.UTC) if t is not None and t.tzinfo is None else t  # SQLite hands back naive UTC


def _audit(db: Session, action: str, username: str, actor: str) -> None:
    db.add(AuditEvent(action=action, resource=username, status=200, detail={"by": actor}))


def create_user(db: Session, username: str, password: str, role: str, actor: str = "") -> User:
    if not _USERNAME.fullmatch(username or ""):
        raise ConfigError("a username is 2-64 letters, digits or . _ @ - (not a patient name: it appears in the audit log)")
    if role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    _check_rules(password)
    if db.scalar(select(User).where(User.username == username)) is not None:
        raise ConfigError(f"a user named {username!r} exists already")
    user = User(username=username, password_hash=hash_password(password), role=role)
    db.add(user)
    _audit(db, "user_create", username, actor)
    db.commit()
    return user


def set_password(db: Session, username: str, password: str, actor: str = "") -> User:
    user = _get(db, username)
    _check_rules(password)
    user.password_hash = hash_password(password)
    db.execute(delete(UiSession).where(UiSession.user_id == user.id))  # a new password signs everyone out
    _audit(db, "user_passwd", username, actor)
    db.commit()
    return user


def disable_user(db: Session, username: str, actor: str = "") -> User:
    user = _get(db, username)
    if user.disabled_at is None:
        user.disabled_at = utcnow()
        _audit(db, "user_disable", username, actor)
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


def _name_digest(username: str) -> str:
    """16 bits of the typed name: enough to throttle per name, too few to test a password typed into it against."""
    return hashlib.sha256(username.encode("utf-8", "replace")).hexdigest()[:4]


def throttled(db: Session, address: str) -> tuple[int, dict[str, int]]:
    """Failures from ``address`` in the throttle window: in all, and by name digest."""
    since = utcnow() - _dt.timedelta(minutes=THROTTLE_MINUTES)
    rows = db.execute(select(LoginFailure.username_digest, func.count()).where(
        LoginFailure.address == address, LoginFailure.at > since).group_by(LoginFailure.username_digest)).all()
    by_name = dict(rows)
    return sum(by_name.values()), by_name


def authenticate(db: Session, username: str, password: str, address: str) -> tuple[User | None, str]:
    """``(user, "")`` when the password is right, else ``(None, reason)`` with reason for the audit log (the page
    says the same for every reason but ``throttled``, so it cannot be used to find user names).

    One scrypt per attempt, whoever the name belongs to (a hash nobody matches for unknown names; the real check
    for disabled users too). ``address`` is the client's: past the throttle limits an attempt is refused without a
    check, and that depends only on the address and the typed name, never on whether the user exists.
    """
    address, digest = address[:64], _name_digest(username)
    total, by_name = throttled(db, address)
    if total >= MAX_FAILURES_PER_ADDRESS or by_name.get(digest, 0) >= MAX_FAILURES_PER_NAME:
        return None, "throttled"
    now = utcnow()
    # counted as a failure from the start, so attempts racing each other cannot pass the limit together
    db.add(LoginFailure(at=now, address=address, username_digest=digest))
    db.commit()
    # a typed name that cannot be a user name (control characters, a sentence) is nobody's: never queried
    user = db.scalar(select(User).where(User.username == username)) if _USERNAME.fullmatch(username) else None
    right = check_password(password, user.password_hash if user is not None else _NOBODY)
    if user is not None and _outdated(user.password_hash):
        check_password(password, _NOBODY)  # an older, cheaper hash must not answer sooner than an unknown name
    reason = ("unknown_user" if user is None else "disabled" if user.disabled_at is not None
              else "" if right else "wrong_password")
    if reason:
        db.execute(delete(LoginFailure).where(LoginFailure.at < now - _dt.timedelta(minutes=THROTTLE_MINUTES)))
        db.commit()
        return None, reason
    db.execute(delete(LoginFailure).where(LoginFailure.address == address, LoginFailure.username_digest == digest))
    if _outdated(user.password_hash):
        user.password_hash = hash_password(password)
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
