"""Shared fixtures: one small synthetic dataset and one tiny trained + exported model per test session.

They are built through the real CLI (``medvision.cli.main``), so the fixtures double as the
end-to-end path: synth -> train -> export.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medvision.cli import main

SYNTH_ARGS = ["--patients", "16", "--rows", "256", "--columns", "208", "--prevalence", "0.5",
              "--compressed-fraction", "0.5", "--seed", "7", "--no-progress"]


@pytest.fixture(scope="session", autouse=True)
def _private_image_cache(tmp_path_factory):
    """Keep the decode-once cache and the service database of this test session out of the user's folders
    (subprocesses inherit both)."""
    os.environ["MEDVISION_CACHE"] = str(tmp_path_factory.mktemp("image-cache"))
    os.environ["MEDVISION_DATABASE_URL"] = f"sqlite:///{tmp_path_factory.mktemp('service-db') / 'medvision.db'}"
    # services started by the tests decode in threads (spawning worker processes for each of dozens of short-lived
    # apps would dominate the suite); tests/serving/test_decode_pool.py runs the worker processes, the default
    os.environ["MEDVISION_DECODE_PROCESSES"] = "0"
    yield


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    assert main(["synth", str(out), *SYNTH_ARGS]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_run(synth_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    code = main(["train", "--config", "tiny", "--labels", str(synth_dir / "labels.csv"),
                 "--images", str(synth_dir / "images"), "--out", str(run), "--no-progress",
                 "train.epochs=2", "data.val_fraction=0.25", "data.test_fraction=0.25"])
    assert code == 0
    return run


@pytest.fixture(scope="session")
def artifact(tiny_run) -> Path:
    path = tiny_run / "model.onnx"
    assert main(["export", str(tiny_run), "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="session")
def dicom_files(synth_dir) -> list[Path]:
    return sorted((synth_dir / "images").rglob("*.dcm"))
