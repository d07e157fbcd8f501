"""DICOM UIDs checked exactly (PS3.5 9.1), so that one can safely name a row, a key or a URL."""

import pytest
from pydicom.uid import generate_uid

from medvision.errors import InvalidUidError
from medvision.identifiers import check_uid, is_uid


@pytest.mark.parametrize("uid", ["0", "1.2.840.10008.1.2.4.90", "2.25." + "1" * 59, generate_uid(), "1.0.2"])
def test_well_formed_uids_pass(uid):
    assert is_uid(uid) and check_uid(uid) == uid


@pytest.mark.parametrize("value, problem", [
    ("", "is empty"),
    (None, "is empty"),
    (1.2, "is empty"),
    ("1.2." + "3" * 61, "65 characters long"),
    ("../../etc", "other than digits and dots"),
    ("/tmp/x", "other than digits and dots"),
    ("1.2.3\n", "other than digits and dots"),
    ("1.2.3 ", "other than digits and dots"),
    ("１.２", "other than digits and dots"),  # full-width digits are digits to str.isdigit, not to DICOM
    ("..", "empty component"),
    ("1..2", "empty component"),
    (".1.2", "empty component"),
    ("1.2.", "empty component"),
    ("1.02.3", "leading zero"),
    ("00", "leading zero"),
])
def test_malformed_uids_are_refused_by_name_without_quoting_the_value(value, problem):
    assert not is_uid(value)
    with pytest.raises(InvalidUidError, match=problem) as caught:
        check_uid(value, "the Study Instance UID")
    assert caught.value.code == "invalid_uid" and "the Study Instance UID" in caught.value.message
    if isinstance(value, str) and value:
        assert value.strip() not in caught.value.message
