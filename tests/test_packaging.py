"""Packaging contracts that a fresh install depends on (the wheel and serve-only venv are tested in serving/)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(reqs):
    return {re.split(r"[<>=!\[ ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_extras_hold_what_each_install_needs():
    extras = {k: _names(v) for k, v in PYPROJECT["project"]["optional-dependencies"].items()}
    assert {"torch", "torchvision", "timm", "monai", "albumentations"} <= extras["train"]
    assert {"onnxruntime", "fastapi", "uvicorn"} <= extras["serve"]
    assert "onnxruntime-gpu" in extras["gpu"] and "onnxruntime" not in extras["gpu"]
    assert not {"torch", "timm", "monai", "torchvision"} & (extras["serve"] | extras["gpu"])
    core = _names(PYPROJECT["project"]["dependencies"])
    assert "pydicom" in core and not {"torch", "onnxruntime"} & core
    assert "pylibjpeg-libjpeg" not in core  # GPL-3.0: deliberately not a dependency


def test_dockerfile_is_serve_only_and_non_root():
    text = (ROOT / "Dockerfile").read_text()
    assert "[serve]" in text and "[train]" not in text
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci
    assert "make demo" in readme


def test_make_test_names_the_missing_system_tools_up_front():
    import subprocess

    done = subprocess.run(["/bin/bash", str(ROOT / "scripts" / "system_tools.sh"), "check"], capture_output=True,
                          text=True, env={"PATH": "/nonexistent"}, timeout=30)
    assert done.returncode == 0  # a warning, not a failure: the tests that need them say so when skipped
    for tool in ("dicom3tools", "dcmtk", "chromium", "orthanc", "openssl"):
        assert tool in done.stderr
    assert "will be SKIPPED" in done.stderr and "apt-get install" in done.stderr
    makefile = (ROOT / "Makefile").read_text()
    assert "scripts/system_tools.sh" in makefile and "scripts/system_tools.sh install" in (ROOT / ".ci" / "run").read_text()
