"""Packaging contracts that a fresh install depends on (the wheel and serve-only venv are tested in serving/)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(reqs):
    return {re.split(r"[<>=!\[ ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_extras_hold_what_each_install_needs_and_install_together():
    assert PYPROJECT["project"]["name"] == "medvision-radiology"  # "medvision" on the index is another project
    extras = {k: _names(v) for k, v in PYPROJECT["project"]["optional-dependencies"].items()}
    assert {"torch", "timm", "monai", "albumentations"} <= extras["train"] and "torchvision" not in extras["train"]
    assert {"fastapi", "uvicorn"} <= extras["serve"]
    assert extras["cpu"] == {"onnxruntime"} and extras["gpu"] == {"onnxruntime-gpu"}
    assert not {"torch", "timm", "monai", "torchvision"} & (extras["serve"] | extras["gpu"])
    # one ONNX Runtime per environment: only the flavour extras name one, so [train,serve,gpu] gets exactly one
    runtimes = {"onnxruntime", "onnxruntime-gpu"}
    assert all(not runtimes & names for extra, names in extras.items() if extra not in ("cpu", "gpu"))
    core = _names(PYPROJECT["project"]["dependencies"])
    assert "pydicom" in core and not {"torch", "onnxruntime"} & core
    assert "pylibjpeg-libjpeg" not in core  # GPL-3.0: deliberately not a dependency


def test_dockerfile_is_serve_only_and_non_root():
    text = (ROOT / "Dockerfile").read_text()
    assert "[serve,cpu]" in text and "[train" not in text and "medvision_radiology-" in text
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
