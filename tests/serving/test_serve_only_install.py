"""A wheel installed with only the ``serve`` extra (no torch) starts the service and scores a DICOM over HTTP."""

import json
import os
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from helpers import free_port

from medvision.serving.engine import Engine

ROOT = Path(__file__).resolve().parents[2]



@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                   check=True, timeout=600)
    (whl,) = out.glob("medvision_radiology-*.whl")  # the distribution's name; the package is still `medvision`
    return whl


def test_wheel_maps_training_and_serving_into_the_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top <= {"medvision", next(t for t in top if t.endswith(".dist-info"))}
    for needed in ("medvision/training/train.py", "medvision/serving/app.py", "medvision/synth/phantom.py",
                   "medvision/training/configs/demo.yaml", "medvision/serving/routes/predict.py",
                   "medvision/serving/migrations/versions/0004_review_ui.py", "medvision/serving/ui/templates/study.html",
                   "medvision/serving/ui/static/viewer.js", "medvision/serving/ui/static/app.css"):
        assert needed in names, needed
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "medvision = medvision.cli:main" in text and "medvision.serving.command:register" in text


@pytest.mark.integration
@pytest.mark.slow
def test_serve_extra_alone_serves_without_torch(wheel, artifact, dicom_files, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, exe = venv / "bin" / "python", venv / "bin" / "medvision"
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"{wheel}[serve,cpu]"], check=True, timeout=900)
    no_torch = subprocess.run([str(py), "-c", "import torch"], capture_output=True)
    assert no_torch.returncode != 0, "the serve extra must not pull in torch"

    # The training command is listed but explains which extra it needs.
    train = subprocess.run([str(exe), "train", "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert train.returncode == 2 and "medvision-radiology[train]" in train.stderr

    env = {**os.environ, "MEDVISION_DATABASE_URL": f"sqlite:///{tmp_path / 'service.db'}"}
    made = subprocess.run([str(exe), "keys", "create", "pacs", "--scopes", "score"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["key"]
    port = free_port()
    proc = subprocess.Popen([str(exe), "serve", "--model", str(artifact), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("service did not become ready") from None
                time.sleep(0.3)
        f = dicom_files[5]
        anonymous = urllib.request.Request(base + "/v1/predict", data=f.read_bytes(),
                                           headers={"Content-Type": "application/dicom"}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(anonymous, timeout=30)
        assert info.value.code == 401
        auth = {"Authorization": f"Bearer {key}"}
        req = urllib.request.Request(base + "/v1/predict", data=f.read_bytes(),
                                     headers={"Content-Type": "application/dicom", **auth}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            body = json.loads(r.read())
        assert body["probability"] == pytest.approx(Engine(artifact).predict(f).probability, abs=1e-6)
        bad = urllib.request.Request(base + "/v1/predict", data=b"",
                                     headers={"Content-Type": "application/dicom", **auth}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(bad, timeout=30)
        assert info.value.code == 400
        # the review UI's pages and scripts ship in the wheel
        with urllib.request.urlopen(base + "/ui/login", timeout=30) as r:
            assert r.status == 200 and b"Sign in" in r.read()
        with urllib.request.urlopen(base + "/ui/static/viewer.js", timeout=30) as r:
            assert r.status == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "SYNTHETIC^PATIENT" not in out
