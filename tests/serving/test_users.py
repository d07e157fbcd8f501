"""Sign-in costs the same whoever the name belongs to; passwords hashed with OWASP's scrypt parameters."""

import pytest

from medvision.serving.db import open_database
from medvision.serving.tables import LoginFailure
from medvision.serving.users import (
    MAX_FAILURES_PER_NAME,
    authenticate,
    check_password,
    create_user,
    disable_user,
    hash_password,
)


@pytest.fixture
def sessions(tmp_path):
    s = open_database(f"sqlite:///{tmp_path / 'users.db'}")
    with s() as db:
        create_user(db, "reader1", "right-password-1", "reader")
        create_user(db, "gone1", "right-password-2", "reader")
        disable_user(db, "gone1")
    return s


@pytest.fixture
def scrypt_calls(monkeypatch):
    """Count the scrypt runs (the whole cost of a sign-in; everything else is a few queries)."""
    import medvision.serving.users as users

    calls = []
    real = users._scrypt

    def counted(*args, **kwargs):
        calls.append(args[2:])
        return real(*args, **kwargs)

    monkeypatch.setattr(users, "_scrypt", counted)
    return calls


@pytest.mark.parametrize("username, password, reason", [
    ("reader1", "right-password-1", ""),
    ("reader1", "wrong-password", "wrong_password"),
    ("nobody", "whatever-password", "unknown_user"),
    ("gone1", "right-password-2", "disabled"),
])
def test_every_sign_in_costs_exactly_one_scrypt_with_todays_parameters(sessions, scrypt_calls, username, password,
                                                                       reason):
    with sessions() as db:
        user, why = authenticate(db, username, password, "10.0.0.1")
    assert why == reason and (user is not None) == (reason == "")
    assert scrypt_calls == [(2**17, 8, 1)]


def test_a_user_with_an_older_cheaper_hash_costs_at_least_what_an_unknown_name_costs(sessions, scrypt_calls,
                                                                                      monkeypatch):
    import medvision.serving.users as users
    from medvision.serving.tables import User

    with monkeypatch.context() as m:
        m.setattr(users, "_SCRYPT", {"n": 2**14, "r": 8, "p": 1})
        old = hash_password("an-older-password")
    with sessions() as db:
        db.query(User).filter(User.username == "reader1").update({"password_hash": old})
        db.commit()
        scrypt_calls.clear()
        assert authenticate(db, "reader1", "a-wrong-password", "10.0.0.9") == (None, "wrong_password")
    assert (2**17, 8, 1) in scrypt_calls  # the check at today's cost runs too


def test_a_throttled_address_is_refused_before_any_check_whoever_it_names(sessions, scrypt_calls):
    with sessions() as db:
        for _ in range(MAX_FAILURES_PER_NAME):
            assert authenticate(db, "nobody", "x", "10.0.0.2")[1] == "unknown_user"
        for _ in range(MAX_FAILURES_PER_NAME):
            assert authenticate(db, "reader1", "x", "10.0.0.3")[1] == "wrong_password"
        scrypt_calls.clear()
        assert authenticate(db, "nobody", "x", "10.0.0.2") == (None, "throttled")
        assert authenticate(db, "reader1", "right-password-1", "10.0.0.3") == (None, "throttled")
        assert scrypt_calls == []
        assert authenticate(db, "reader1", "right-password-1", "10.0.0.4")[0] is not None  # elsewhere: fine
        # what is kept of a typed name is 16 bits of its hash: nothing a password could be recovered from
        assert {len(f.username_digest) for f in db.query(LoginFailure)} == {4}


def test_older_hashes_still_verify_and_are_upgraded_at_sign_in(sessions, monkeypatch):
    import medvision.serving.users as users

    monkeypatch.setattr(users, "_SCRYPT", {"n": 2**14, "r": 8, "p": 1})
    old = hash_password("an-older-password")
    monkeypatch.undo()
    assert old.startswith("scrypt$16384$") and check_password("an-older-password", old)
    from medvision.serving.tables import User

    with sessions() as db:
        db.query(User).filter(User.username == "reader1").update({"password_hash": old})
        db.commit()
        assert authenticate(db, "reader1", "an-older-password", "10.0.0.5")[0] is not None
        assert db.query(User).filter(User.username == "reader1").one().password_hash.startswith("scrypt$131072$8$1$")
