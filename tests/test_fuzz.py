"""The fuzz targets under atheris for a few hundred inputs each (the long run is ``benchmarks/fuzz.py``), and every
finding ever kept replayed: bytes from outside get a documented refusal or a result, never anything else."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz-seeds")
    code = ("import sys; from pathlib import Path; from fuzz import seeds\n"
            "for t in ('read', 'stow', 'dimse'): print(t, seeds.write(Path(sys.argv[1]) / t, t))")
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = dict(line.split() for line in done.stdout.split("\n") if line)
    assert all(int(n) >= 20 for n in counts.values()), counts  # synthetic images and real corpus files alike
    return out


@pytest.mark.parametrize("target", ["read", "stow", "dimse"])
def test_a_short_fuzz_run_finds_nothing(seeds, tmp_path, target):
    corpus, findings = tmp_path / "corpus", tmp_path / "findings"
    corpus.mkdir()
    findings.mkdir()
    runs = 300
    done = subprocess.run([sys.executable, "-m", "fuzz.run", target, f"-runs={runs}", "-timeout=10", "-seed=1",
                           "-max_len=262144", "-rss_limit_mb=4096", f"-artifact_prefix={findings}/", str(corpus),
                           str(seeds / target)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MEDVISION_FUZZ_TMP": str(tmp_path)})
    assert done.returncode == 0 and not list(findings.iterdir()), done.stderr[-3000:]
    assert f"Done {runs} runs" in done.stderr
    cov = re.findall(r"DONE\s+cov: (\d+)", done.stderr)
    assert cov and int(cov[-1]) > 300, done.stderr[-1000:]  # instrumentation reaches the code under test


def test_every_kept_finding_is_refused_cleanly_now(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fuzz.targets"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MEDVISION_FUZZ_TMP": str(tmp_path)})
    assert done.returncode == 0 and "none raised" in done.stdout, done.stderr[-3000:]


def test_a_target_reports_what_is_not_a_documented_refusal(tmp_path):
    """The targets are not vacuous: an input that breaks the reader's contract is reported."""
    code = ("import numpy as np\n"
            "import medvision.preprocess as p\n"
            "from fuzz import targets, seeds\n"
            "data = seeds._synthetic()[0]\n"
            "targets.run('read', data)\n"  # a valid image passes
            "p.normalize = lambda x, m, s: np.full_like(x, np.nan)\n"  # a preprocessing bug: non-finite input
            "try:\n"
            "    targets.run('read', data)\n"
            "except targets.Finding as exc:\n"
            "    print('reported:', exc)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MEDVISION_FUZZ_TMP": str(tmp_path)})
    assert "reported: model input" in done.stdout, done.stderr[-2000:]
