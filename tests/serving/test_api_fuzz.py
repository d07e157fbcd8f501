"""Every route of the live service, fuzzed from its own OpenAPI document (schemathesis, a short run: a few examples
per operation, valid and invalid): no 5xx, and every status and content type is one the document lists for that
route. The long run is ``benchmarks/fuzz.py --model ...``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from helpers import LiveServer, stow_body

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_generated_requests_to_every_route_get_documented_answers_and_no_5xx(artifact, dicom_files, tmp_path):
    from medvision.serving.auth import create_key
    from medvision.serving.settings import Settings

    server = LiveServer(Settings(artifact=str(artifact), database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                                 data_dir=str(tmp_path / "data"), job_workers=1, study_stable_seconds=0.1))
    try:
        with server.sessions() as db:
            key = create_key(db, "fuzzer", "score,pull,review,admin")[0]
        body, ctype = stow_body([dicom_files[0].read_bytes()])
        assert server.client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
        ds = pydicom.dcmread(dicom_files[0], stop_before_pixels=True)
        code = ("import json, sys; from pathlib import Path; from fuzz import api\n"
                "r = api.run(sys.argv[1], sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4]), max_examples=8,"
                " seed=1)\n"
                "print(json.dumps({k: v for k, v in r.items() if k != 'output'}))")
        uids = {"study_uid": str(ds.StudyInstanceUID), "series_uid": str(ds.SeriesInstanceUID),
                "sop_uid": str(ds.SOPInstanceUID)}
        import json

        done = subprocess.run([sys.executable, "-c", code, server.url, key, str(tmp_path / "st"), json.dumps(uids)],
                              cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        log = (tmp_path / "st" / "schemathesis.log").read_text()
        assert result["operations"] >= 20 and result["generated"] >= 100, log[-3000:]
        assert result["failures"] == {}, log[-6000:]
    finally:
        server.stop()
