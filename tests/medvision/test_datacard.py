"""medvision data card: every number counted from the data, plots drawn, gaps and PHI named."""

from pathlib import Path

import pytest

from medvision.cli import main
from medvision.datacard import parse_age, write_data_card
from medvision.errors import ConfigError
from medvision.manifest import read_manifest
from medvision.scan import scan_files


@pytest.fixture(scope="module")
def card(synth_dir, tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("card")
    m, s = work / "m.csv", work / "split.csv"
    assert main(["data", "manifest", "--rsna", str(synth_dir / "labels.csv"), "--images", str(synth_dir / "images"),
                 "--out", str(m)]) == 0
    assert main(["data", "split", str(m), "--out", str(s)]) == 0
    assert main(["data", "card", str(m), "--name", "unit", "--out-dir", str(work / "cards"), "--split", str(s),
                 "--no-progress", "--intended-use", "Unit tests only."]) == 0
    return work / "cards" / "unit.md", m


def test_card_counts_match_the_data(card, synth_dir):
    path, manifest = card
    text = path.read_text()
    rows = read_manifest(manifest)
    assert f"| images | {len(rows)} |" in text
    assert f"| patients | {len({r.patient_id for r in rows})} |" in text
    assert f"| cancer images | {sum(r.label for r in rows)} |" in text
    assert "Unit tests only." in text
    for heading in ("Per split", "Manufacturer", "View", "Transfer syntax", "Photometric interpretation",
                    "Pixel spacing", "Sex", "PHI status", "Known gaps"):
        assert heading in text
    assert "MONOCHROME1" in text and "JPEG 2000" in text and "Age recorded for 64 of 64 images" in text
    assert "PatientName (64)" in text and "run `medvision deid`" in text
    for png in ("unit_labels.png", "unit_age.png"):
        assert f"]({png})" in text and (path.parent / png).stat().st_size > 1000


def test_card_after_deid_reports_identity_removed(card, tmp_path):
    _, manifest = card
    assert main(["deid", str(Path(read_manifest(manifest)[0].path).parents[1]), str(tmp_path / "d"), "--manifest",
                 str(manifest), "--keep-patient-characteristics", "--no-progress"]) == 0
    rows = read_manifest(tmp_path / "d" / "manifest.csv")
    headers = scan_files([r.path for r in rows], workers=1, show_progress=False)
    text = write_data_card("after", rows, headers, tmp_path / "cards").read_text()
    assert f"Patient Identity Removed = YES in {len(rows)} of {len(rows)}" in text
    assert "still carry identifying attributes" not in text and "None of the checked identifying attributes" in text


def test_ages_and_names():
    assert parse_age("062Y") == 62 and parse_age("006M") == 0.5 and parse_age("45") == 45 and parse_age("x") is None
    with pytest.raises(ConfigError, match="may hold only"):
        write_data_card("../escape", [], [], Path("/tmp"))


def test_a_second_site_is_compared_attribute_by_attribute(card, tmp_path):
    _, manifest = card
    site = tmp_path / "site_b"
    assert main(["synth", str(site), "--patients", "8", "--rows", "128", "--columns", "104", "--site", "shifted",
                 "--seed", "2", "--no-progress"]) == 0
    m = tmp_path / "site_b.csv"
    assert main(["data", "manifest", "--rsna", str(site / "labels.csv"), "--images", str(site / "images"),
                 "--out", str(m)]) == 0
    assert main(["data", "card", str(m), "--name", "site_b", "--out-dir", str(tmp_path / "cards"), "--compare",
                 str(manifest), "--compare-name", "training", "--no-progress"]) == 0
    text = (tmp_path / "cards" / "site_b.md").read_text()
    assert "## Compared with training" in text and "| images | 32 | 64 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| manufacturer |"))
    assert "Draco Diagnostics 100 %" in row and row.endswith("| **yes** |")
    assert "Different: manufacturer" in text
    # the same data against itself differs in nothing
    assert main(["data", "card", str(manifest), "--name", "same", "--out-dir", str(tmp_path / "cards"),
                 "--compare", str(manifest), "--no-progress"]) == 0
    assert "No attribute differs by these tests." in (tmp_path / "cards" / "same.md").read_text()
