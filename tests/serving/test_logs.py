"""JSON log lines carry the request id and the request's fields; nothing identifying goes in."""

import json
import logging

from medvision.serving.logs import JsonFormatter


def test_json_formatter_keeps_request_fields():
    record = logging.LogRecord("medvision.serving", logging.INFO, __file__, 1, "POST %s %d", ("/v1/predict", 200), None)
    record.request_id, record.route, record.status, record.duration_ms = "abc123", "/v1/predict", 200, 3.2
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "POST /v1/predict 200" and entry["request_id"] == "abc123"
    assert entry["level"] == "info" and entry["status"] == 200 and entry["ts"].endswith("+00:00")


def test_request_log_records_carry_the_request_id(client, dicom_files, caplog):
    caplog.set_level(logging.INFO, logger="medvision.serving")
    r = client.post("/v1/predict", content=dicom_files[0].read_bytes(), headers={"Content-Type": "application/dicom",
                                                                                  "X-Request-ID": "req-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
    mine = [rec for rec in caplog.records if getattr(rec, "request_id", None) == "req-42"]
    assert mine and mine[-1].route == "/v1/predict" and mine[-1].status == 200
    line = JsonFormatter().format(mine[-1])
    assert "SYNTHETIC" not in line and json.loads(line)["request_id"] == "req-42"
