"""medvision score: every file gets one row (scored or refused with its reason), an interrupted run resumes
without scoring anything twice or losing anything, a crashing decoder refuses only its own file, and the Ray
engine (a local Ray instance started by the test) writes the same rows as the local engine."""

import json
import os
import shutil

import numpy as np
import pytest

from medvision.cli import main
from medvision.serving.archive import Options, ResultStore, list_inputs, score_archive


@pytest.fixture(scope="module")
def mixed_folder(dicom_files, tmp_path_factory):
    """The synthetic exams (uncompressed, JPEG 2000, JPEG-LS, RLE; MONOCHROME1 and 2) with a truncated DICOM,
    a text file, a PNG and an empty file mixed in."""
    root = tmp_path_factory.mktemp("archive")
    for f in dicom_files:
        target = root / f.parent.name / f.name
        target.parent.mkdir(exist_ok=True)
        shutil.copy(f, target)
    (root / "10000" / "truncated.dcm").write_bytes(dicom_files[0].read_bytes()[:3000])
    (root / "notes.txt").write_text("not an image")
    (root / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    (root / "empty.dcm").write_bytes(b"")
    return root


def _by_path(out) -> dict:
    return {r["path"]: r for r in ResultStore(out, "csv" if (out / "images.csv").exists() else "parquet").read()}


def test_every_file_gets_one_row_with_identifiers_and_reasons(mixed_folder, artifact, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["score", str(mixed_folder), "--model", str(artifact), "--out", str(out), "--no-progress",
                 "--batch-size", "8", "--workers", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = _by_path(out)
    files = list_inputs([str(mixed_folder)])
    assert len(files) == 68 and set(rows) == set(files)
    assert summary["scored_now"] == 64 and summary["total"]["exams"] == 16
    assert sum(summary["refused_now"].values()) == 4 and "corrupt_dicom" in summary["refused_now"], summary
    refused = {os.path.basename(p): r for p, r in rows.items() if r["status"] == "refused"}
    assert set(refused) == {"truncated.dcm", "notes.txt", "scan.png", "empty.dcm"}
    assert all(r["error_code"] and r["error"] and r["probability"] is None for r in refused.values())
    from medvision.serving.engine import Engine

    engine = Engine(str(artifact))
    some = [p for p in files if p.endswith(".dcm") and rows[p]["status"] == "scored"][:6]
    for p in some:  # the batched, pooled pipeline gives what scoring the file alone gives
        r = rows[p]
        assert r["probability"] == pytest.approx(engine.predict(p).probability, abs=1e-6)
        assert r["sop_instance_uid"] and r["study_instance_uid"] and r["laterality"] in ("L", "R")
        assert r["label"] == engine.meta.labels[int(r["probability"] >= engine.meta.threshold)]
        assert r["model_name"] == engine.meta.model_name and r["artifact_sha256"] == engine.artifact_sha256
        # the model's contract asks for 96 px: these 256-row images are decoded at half size, and the row says how
        assert r["decode"] in ("1/2 lowpass", "1/2 wavelet"), r["decode"]
    assert not any("PatientName" in k or "patient" in k.lower() for k in next(iter(rows.values())))
    import pyarrow.parquet as pq

    exams = pq.read_table(out / "exams.parquet").to_pylist()
    assert len(exams) == 16 and all(e["images"] == 4 for e in exams)
    best = {}
    for r in rows.values():
        if r["status"] == "scored":
            best[r["study_instance_uid"]] = max(best.get(r["study_instance_uid"], 0), r["probability"])
    assert all(e["probability"] == pytest.approx(best[e["study_instance_uid"]]) for e in exams)
    assert len(pq.read_table(out / "breasts.parquet")) == 32


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_an_interrupted_run_resumes_without_duplicates_or_losses(mixed_folder, artifact, tmp_path, monkeypatch, fmt):
    files = list_inputs([str(mixed_folder)])
    reference = tmp_path / "reference"
    score_archive(files, str(artifact), reference, fmt, Options(batch_size=8, show_progress=False))
    out = tmp_path / "interrupted"
    real_append = ResultStore.append
    written = []

    def append_then_interrupt(self, rows):
        real_append(self, rows)
        written.append(len(rows))
        if len(written) == 3:
            raise KeyboardInterrupt  # Ctrl-C after the third batch was written

    monkeypatch.setattr(ResultStore, "append", append_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        score_archive(files, str(artifact), out, fmt, Options(batch_size=8, show_progress=False))
    monkeypatch.setattr(ResultStore, "append", real_append)
    assert len(_by_path(out)) == 24  # the three batches written are kept
    if fmt == "csv":  # and a kill -9 in the middle of writing a row: the torn row is dropped and scored again
        with (out / "images.csv").open("a") as fh:
            fh.write(f"{files[-1]},scored,1.2.3")
    summary = score_archive(files, str(artifact), out, fmt, Options(batch_size=8, show_progress=False))
    assert summary["already_done"] == 24 and summary["processed_now"] == len(files) - 24
    if fmt == "csv":
        lines = (out / "images.csv").read_text().splitlines()
        assert len(lines) == len(files) + 1  # header + one row per file: nothing twice, nothing lost
    got, want = _by_path(out), _by_path(reference)
    assert set(got) == set(want) == set(files)
    for p in files:
        assert got[p]["status"] == want[p]["status"] and got[p]["error_code"] == want[p]["error_code"]
        if want[p]["probability"] is not None:
            assert got[p]["probability"] == pytest.approx(want[p]["probability"], abs=1e-6)
    again = score_archive(files, str(artifact), out, fmt, Options(batch_size=8, show_progress=False))
    assert again["processed_now"] == 0 and again["total"]["rows"] == len(files)


def test_a_crashing_decoder_refuses_only_its_file(mixed_folder, artifact, tmp_path, monkeypatch):
    crash = str(mixed_folder / "10001" / sorted(os.listdir(mixed_folder / "10001"))[0])
    from medvision.preprocess import Preprocess

    real_read = Preprocess.read

    def read(self, path, limits=None, identifiers=None):
        if str(path) == crash:
            os._exit(11)  # what a segfaulting codec does to its worker process
        return real_read(self, path, limits)

    monkeypatch.setattr(Preprocess, "read", read)  # the forked workers inherit it
    files = list_inputs([str(mixed_folder)])
    summary = score_archive(files, str(artifact), tmp_path / "out", "parquet",
                            Options(batch_size=8, workers=2, show_progress=False))
    rows = _by_path(tmp_path / "out")
    assert set(rows) == set(files)
    assert rows[crash]["error_code"] == "decoder_crashed"
    assert summary["scored_now"] == 63 and summary["refused_now"]["decoder_crashed"] == 1


def test_bad_arguments_are_refused_clearly(artifact, tmp_path, capsys):
    assert main(["score", str(tmp_path / "missing"), "--model", str(artifact), "--out", str(tmp_path / "o")]) != 0
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["score", "--model", str(artifact), "--out", str(tmp_path / "o")]) != 0
    assert "nothing to score" in capsys.readouterr().err
    assert main(["score", str(tmp_path), "--model", str(artifact), "--out", str(tmp_path / "o"), "--engine", "ray",
                 "--format", "csv"]) != 0
    assert "writes Parquet" in capsys.readouterr().err
    assert main(["score", "--studies", "1.2.3", "--model", str(artifact), "--out", str(tmp_path / "o")]) != 0
    assert "--studies needs --pacs" in capsys.readouterr().err


def test_ray_engine_writes_the_rows_the_local_engine_writes(mixed_folder, artifact, tmp_path, capsys):
    """A local Ray instance (started here, two CPUs): decode tasks, an ONNX Runtime actor, Parquet parts. It also
    resumes a run the local engine left unfinished (same output folder format)."""
    files = list_inputs([str(mixed_folder)])
    local = tmp_path / "local"
    score_archive(files, str(artifact), local, "parquet", Options(batch_size=8, show_progress=False))
    out = tmp_path / "ray"
    score_archive(files[:20], str(artifact), out, "parquet", Options(batch_size=8, show_progress=False))
    try:
        assert main(["score", str(mixed_folder), "--model", str(artifact), "--out", str(out), "--engine", "ray",
                     "--batch-size", "8", "--workers", "2", "--no-progress"]) == 0
    finally:
        import ray

        ray.shutdown()
    summary = json.loads(capsys.readouterr().out)
    assert summary["engine"] == "ray" and summary["already_done"] == 20 and summary["processed_now"] == len(files) - 20
    assert any(not p.name.startswith("part-") for p in (out / "images").iterdir())  # Ray's own parts, beside the local run's
    got, want = _by_path(out), _by_path(local)
    assert set(got) == set(want) == set(files)
    for p in files:
        for field in ("status", "error_code", "sop_instance_uid", "study_instance_uid", "laterality", "view", "label"):
            assert got[p][field] == want[p][field], (p, field)
        if want[p]["probability"] is not None:
            assert abs(got[p]["probability"] - want[p]["probability"]) <= 1e-6
    assert np.isclose(sum(r["probability"] or 0 for r in got.values()), sum(r["probability"] or 0 for r in want.values()))


def test_study_uids_for_a_pacs_fetch_are_checked_before_they_name_a_folder():
    from medvision.errors import ConfigError
    from medvision.serving.archive_pacs import parse_studies

    assert parse_studies("1.2.3, 1.2.4,1.2.3") == ["1.2.3", "1.2.4"]
    for bad in ("..", "...", "1.2/../..", "1.02.3", "1.2." + "3" * 70):
        with pytest.raises(ConfigError, match="not a Study Instance UID"):
            parse_studies(f"1.2.3,{bad}")
