import pytest

from medvision.data import ImageRow, patient_split, read_labels, read_split, write_split
from medvision.errors import ConfigError


def _rows(n_patients=50, positive_every=4):
    rows = []
    for p in range(n_patients):
        for v in range(4):
            rows.append(ImageRow(str(p), f"{p}_{v}", "x", int(p % positive_every == 0 and v < 2)))
    return rows


def test_split_is_patient_level_stratified_and_reproducible(tmp_path):
    rows = _rows()
    a = patient_split(rows, 0.2, 0.2, seed=3)
    assert a == patient_split(rows, 0.2, 0.2, seed=3)
    assert a != patient_split(rows, 0.2, 0.2, seed=4)
    assert set(a) == {r.patient_id for r in rows}
    pos = {r.patient_id for r in rows if r.label}
    for split in ("train", "val", "test"):
        members = {p for p, s in a.items() if s == split}
        assert members & pos and members - pos, f"{split} lacks a class"
    write_split(tmp_path / "split.csv", rows, a)
    assert read_split(tmp_path / "split.csv") == a


def test_a_split_file_that_leaks_a_patient_is_refused(tmp_path):
    p = tmp_path / "split.csv"
    p.write_text("patient_id,image_id,split,cancer\n1,a,train,0\n1,b,test,0\n")
    with pytest.raises(ConfigError, match="two splits"):
        read_split(p)


def test_labels_csv_errors_are_clear(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("patient_id,image_id\n1,2\n")
    with pytest.raises(ConfigError, match="cancer"):
        read_labels(p, tmp_path)
    p.write_text("patient_id,image_id,cancer\n1,2,maybe\n")
    with pytest.raises(ConfigError, match="0 or 1"):
        read_labels(p, tmp_path)
