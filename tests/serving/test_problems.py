"""Errors as RFC 9457 problem details: every code the service or its core library can answer is catalogued, served
at its type URL, listed in the docs, and every error response in the OpenAPI document carries the Problem schema."""

import re
from pathlib import Path

import medvision.errors
import medvision.serving.batcher
import medvision.serving.decode_pool
import medvision.serving.errors
import medvision.serving.storage
from medvision.deid import DeidError
from medvision.errors import MedvisionError
from medvision.serving.problems import CATALOGUE, MEDIA_TYPE

DOCS = Path(__file__).resolve().parents[2] / "docs" / "errors.md"
# codes answered without an exception class: by the HTTP layer, validation, the body-limit middleware, a fault
HANDLER_CODES = {"invalid_request", "not_found", "method_not_allowed", "http_error", "internal_error",
                 "invalid_parameter", "invalid_uid", "invalid_site"}


def _error_classes(cls=MedvisionError):
    for sub in cls.__subclasses__():
        yield sub
        yield from _error_classes(sub)


def test_every_error_code_is_catalogued_and_documented():
    assert DeidError and medvision.serving.storage and medvision.serving.decode_pool  # their classes are loaded
    # the errors the service can raise: its own and the core library's (training's never reach it: no torch there)
    served = [c for c in _error_classes() if not c.__module__.startswith("medvision.training")]
    codes = {MedvisionError.code} | {c.code for c in served if isinstance(c.__dict__.get("code"), str)}
    codes |= HANDLER_CODES
    assert not codes - set(CATALOGUE), f"codes without a catalogue entry: {sorted(codes - set(CATALOGUE))}"
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", DOCS.read_text(), re.M))
    assert documented == set(CATALOGUE), (sorted(set(CATALOGUE) - documented), sorted(documented - set(CATALOGUE)))


def test_a_refusal_is_a_problem_whose_type_the_service_answers(client):
    r = client.post("/v1/predict", content=b"PNG not DICOM" * 20, headers={"Content-Type": "application/dicom"})
    assert r.status_code == 422 and r.headers["content-type"] == MEDIA_TYPE
    problem = r.json()
    assert problem["code"] == "not_dicom" and problem["status"] == 422 and problem["type"] == "/problems/not_dicom"
    assert problem["title"] == CATALOGUE["not_dicom"][0] and problem["detail"]
    assert problem["request_id"] == r.headers["x-request-id"]
    assert problem["instance"] == f"urn:medvision:request:{r.headers['x-request-id']}"
    described = client.get(problem["type"])
    assert described.status_code == 200 and described.json()["title"] == problem["title"]
    assert {p["code"] for p in client.get("/problems").json()} == set(CATALOGUE)
    missing = client.get("/problems/no_such_code")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    assert client.get("/problems/..%2Fetc").status_code in (404, 422)


def test_validation_errors_name_the_fields(client):
    r = client.get("/v1/admin/audit", params={"limit": "many"})
    assert r.status_code in (403, 422)  # the test key has no admin scope: refused before validation or after
    r = client.get("/problems/" + "x" * 100)
    assert r.status_code == 422 and r.headers["content-type"] == MEDIA_TYPE
    problem = r.json()
    assert problem["code"] == "invalid_request" and problem["errors"] and problem["errors"][0]["loc"][-1] == "code"
    assert "code" in problem["detail"]


def test_every_error_response_in_openapi_is_a_problem(client):
    spec = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert set(spec["components"]["schemas"]["Problem"]["required"]) >= {"type", "title", "status", "detail", "code"}
    checked = 0
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            responses = op["responses"]
            assert "500" in responses, f"{method} {path}"
            if op.get("security"):
                assert {"401", "403"} <= set(responses), f"{method} {path}"
            for status, response in responses.items():
                if int(status) >= 400 and path != "/readyz":
                    assert response["description"], f"{method} {path} {status}"
                    schema = response["content"][MEDIA_TYPE]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Problem"}, f"{method} {path} {status}"
                    checked += 1
    assert checked > 100
    predict = spec["paths"]["/v1/predict"]["post"]["responses"]
    assert {"413", "415", "422", "429", "503"} <= set(predict)
