import pytest

from medvision.data import ImageRow, check_split, patient_split, read_labels, read_split, write_split
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


def test_check_split_finds_leaks_patient_ids_cannot_see():
    rows = _rows(20)
    a = patient_split(rows, 0.2, 0.2, seed=0)
    counts = check_split(rows, a)
    assert sum(counts.values()) == len(rows)
    # the same image re-exported under another patient ID, which landed in another split
    other = next(p for p, s in a.items() if s != a[rows[0].patient_id])
    dup = ImageRow(other, rows[0].image_id, "x", rows[0].label)
    with pytest.raises(ConfigError, match="leakage: the same image"):
        check_split([*rows, dup], a)
    same_study = [ImageRow(rows[0].patient_id, "a", "x", 0, study_id="S1"), ImageRow(other, "b", "x", 0, study_id="S1")]
    with pytest.raises(ConfigError, match="leakage: the same study"):
        check_split(same_study, a)
    with pytest.raises(ConfigError, match="lacks 1 patient"):
        check_split([*rows, ImageRow("new", "n", "x", 0)], a)


def test_split_cli_writes_reusable_split_and_checks_it(synth_dir, tmp_path, capsys):
    from medvision.cli import main

    m = tmp_path / "m.csv"
    assert main(["data", "manifest", "--rsna", str(synth_dir / "labels.csv"), "--images", str(synth_dir / "images"),
                 "--out", str(m)]) == 0
    assert main(["data", "split", str(m), "--out", str(tmp_path / "s.csv"), "--seed", "3"]) == 0
    first = (tmp_path / "s.csv").read_text()
    assert main(["data", "split", str(m), "--out", str(tmp_path / "s2.csv"), "--seed", "3"]) == 0
    assert (tmp_path / "s2.csv").read_text() == first
    assert main(["data", "split", str(m), "--check", str(tmp_path / "s.csv")]) == 0
    assert '"ok": true' in capsys.readouterr().out
    # a split with a patient in two splits is refused when read
    pid, image_id, split, label = first.splitlines()[1].split(",")
    other = next(s for s in ("train", "val", "test") if s != split)
    (tmp_path / "bad.csv").write_text(first + f"{pid},{image_id}-copy,{other},{label}\n")
    assert main(["data", "split", str(m), "--check", str(tmp_path / "bad.csv")]) == 2
    assert "a patient appears in two splits (leakage)" in capsys.readouterr().err
    assert main(["data", "split", str(m), "--out", str(tmp_path / "x.csv"), "--val", "0.7", "--test", "0.5"]) == 2
