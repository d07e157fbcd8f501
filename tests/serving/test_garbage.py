"""Every route of the live service, fed garbage: odd path and query values, wrong and broken bodies and content
types, mangled credentials, broken HTTP framing. Each answer is a refusal that says what is wrong (never a 500,
never a hang), and the service still scores afterwards."""

import itertools
import re
import socket

import httpx
import pytest
from helpers import ADMIN

from medvision.serving.routes import admin, dicomweb, dicomweb_query, health, predict, problems, results, ui

WEIRD_SEGMENTS = ["", "..", "%2e%2e%2f%2e%2e", "1.2.3", "a" * 5000, "1.2'; DROP TABLE studies;--", "%00", "%F0%9F%98%80",
                  "-1", "1.2.840.10008.1.2.1.99", "%ff%fe", "%25", "x.png"]
WEIRD_QUERY = ["", "-1", "0", "99999999999999999999", "abc", "2026-13-45", "1e308", "%00", "[]", "{}", "a" * 3000,
               "../../etc/passwd", "suspicion'--", "%F0%9F%98%80"]
WEIRD_BODIES = [
    ("application/json", b"{"), ("application/json", b"[]"), ("application/json", b'{"study_uid": 5}'),
    ("application/json", b'{"study_uid": "' + b"9" * 20000 + b'"}'), ("application/json", b"[" * 5000 + b"]" * 5000),
    ("application/json", b'{"agree": "maybe", "sop_uid": null}'), ("application/json", b"\xff\xfe\x00"),
    ("application/dicom", b""), ("application/dicom", b"DICM" * 64), ("application/dicom", b"\x00" * 200),
    ("multipart/related", b"--x\r\n\r\n--x--"), ('multipart/related; type="application/dicom"', b"--x\r\n--x--"),
    ('multipart/related; type="application/dicom"; boundary=', b"----\r\n"),
    ('multipart/related; type="application/dicom"; boundary=b', b"--b\r\nContent-Type: application/dicom\r\n\r\n"),
    ('multipart/related; type="application/json"; boundary=b', b"--b\r\n\r\n{}\r\n--b--\r\n"),
    ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data; name=file\r\n\r\nabc\r\n--b--\r\n"),
    ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data\r\n\r\n" + b"z" * 50 + b"--b--"),
    ("multipart/form-data", b"garbage"), ("application/x-www-form-urlencoded", b"username=%ff&password=&&&=&csrf=%"),
    ("application/x-www-form-urlencoded", b"a" * 100000), ("text/plain", b"hello"), ("", b"\x00\x01\x02"),
    ("application/dicom; charset=utf-8; boundary=x", b"\x00" * 132 + b"DICM"),
]
AUTHS = [None, "Bearer", "Bearer  mv_x", "Bearer " + "x" * 10000, "Basic YWRtaW46YWRtaW4=", "bearer mv_short",
         "Bearer mv_" + "0" * 40, "Token abc"]


def _routes() -> list[tuple[str, str]]:
    out = set()
    for module in (health, predict, results, dicomweb, dicomweb_query, admin, ui, problems):
        for route in module.router.routes:
            for method in route.methods - {"HEAD"}:
                out.add((method, route.path))
    return sorted(out)


def _fill(path: str, value: str) -> str:
    return re.sub(r"\{[^}]+\}", value, path)


@pytest.fixture(scope="module")
def keys(ui_server):
    from medvision.serving.auth import create_key
    from medvision.serving.db import open_database

    with open_database(ui_server.server.config.app.state.settings.database_url)() as db:
        return {"admin": create_key(db, "garbage-admin", "score,review,admin")[0],
                "score": ui_server.key, "review": ui_server.reader}


DOCUMENTED: dict[tuple[str, str], set[int]] = {}  # (method, route) -> the statuses its OpenAPI entry describes


def _assert_refusal(r: httpx.Response, what: str, route: tuple[str, str] | None = None) -> None:
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:300]}"
    if r.status_code >= 400 and not r.headers.get("content-type", "").startswith("text/html"):
        # an RFC 9457 problem naming what is wrong, with its stable code, not a bare stack trace
        assert r.headers["content-type"] == "application/problem+json", f"{what}: {r.headers['content-type']}"
        body = r.json()
        assert body["status"] == r.status_code and body["type"] == f"/problems/{body['code']}", f"{what}: {r.text[:300]}"
        assert body["title"] and body["detail"], f"{what}: {r.text[:300]}"
        if route in DOCUMENTED and body["code"] not in ("not_found", "method_not_allowed"):  # not this route's answer
            assert r.status_code in DOCUMENTED[route], f"{what}: {r.status_code} is not in the route's OpenAPI entry"


def test_every_route_refuses_garbage_clearly_and_the_service_stays_up(ui_server, keys, dicom_files):
    routes = _routes()
    for path, operations in ui_server.client.get("/openapi.json").json()["paths"].items():
        for method, op in operations.items():
            DOCUMENTED[(method.upper(), path)] = {int(s) for s in op["responses"]}
    assert len(routes) >= 20 and ("POST", "/dicomweb/studies") in routes and ("POST", "/ui/login") in routes
    sent = 0
    with httpx.Client(base_url=ui_server.url, timeout=30) as c, httpx.Client(base_url=ui_server.url,
                                                                            timeout=30) as ui_client:
        assert ui_client.post("/ui/login", data={"username": ADMIN[0], "password": ADMIN[1]}).status_code == 303
        for (method, path), seg in itertools.product(routes, WEIRD_SEGMENTS):
            for who in ("admin", "review"):
                r = c.request(method, _fill(path, seg), headers={"Authorization": f"Bearer {keys[who]}"})
                _assert_refusal(r, f"{method} {path} with {seg[:40]!r} as {who}", (method, path))
                sent += 1
            if path.startswith("/ui"):
                r = ui_client.request(method, _fill(path, seg))
                _assert_refusal(r, f"{method} {path} with {seg[:40]!r} signed in")
                sent += 1
        for (method, path), value in itertools.product(routes, WEIRD_QUERY):
            params = {name: value for name in ("since", "until", "limit", "action", "status", "model", "site", "from",
                                               "to", "q", "sort", "next", "offset", "format")}
            real = _fill(path, ui_server.studies[0])
            for client, headers in ((c, {"Authorization": f"Bearer {keys['admin']}"}), (ui_client, {})):
                r = client.request(method, real, params=params, headers=headers)
                _assert_refusal(r, f"{method} {path}?…={value[:40]!r}", (method, path))
                sent += 1
        for (method, path), (ctype, body) in itertools.product(routes, WEIRD_BODIES):
            if method != "POST":
                continue
            real = _fill(path, ui_server.studies[0])
            for client, headers in ((c, {"Authorization": f"Bearer {keys['admin']}"}), (ui_client, {})):
                r = client.post(real, content=body, headers={**headers, "Content-Type": ctype,
                                                             "X-CSRF-Token": "nonsense"})
                _assert_refusal(r, f"POST {path} with {ctype!r} {body[:40]!r}", (method, path))
                sent += 1
        for (method, path), auth in itertools.product(routes, AUTHS):
            headers = {"Authorization": auth} if auth is not None else {}
            r = c.request(method, _fill(path, ui_server.studies[0]), headers=headers)
            _assert_refusal(r, f"{method} {path} with Authorization {str(auth)[:30]!r}", (method, path))
            if not path.startswith(("/healthz", "/readyz", "/ui", "/problems")):
                assert r.status_code == 401, f"{method} {path} answered {r.status_code} to {str(auth)[:30]!r}"
            sent += 1
    assert sent > 1500
    still = ui_server.client.post("/v1/predict", content=dicom_files[0].read_bytes(),
                                  headers={"Content-Type": "application/dicom"})
    assert still.status_code == 200 and 0 <= still.json()["probability"] <= 1


def _raw(url: str, request: bytes, read_timeout: float = 20) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


@pytest.mark.parametrize("name,framing", [
    ("short body", b"Content-Type: application/dicom\r\nContent-Length: 5000\r\n\r\nDICM"),
    ("bad chunk size", b"Content-Type: application/dicom\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
    ("unterminated chunks", b"Content-Type: application/dicom\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n"),
    ("both lengths", b"Content-Type: application/dicom\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("negative length", b"Content-Type: application/dicom\r\nContent-Length: -1\r\n\r\n"),
    ("header without colon", b"Content-Type application/dicom\r\n\r\n"),
])
def test_broken_http_framing_gets_a_4xx_or_a_closed_connection(ui_server, dicom_files, name, framing):
    for path in (b"/v1/predict", b"/dicomweb/studies"):
        reply = _raw(ui_server.url, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + ui_server.key.encode() + b"\r\n" + framing)
        if reply:  # uvicorn may answer 400 or just close: either way no 5xx
            status = int(reply.split(b" ", 2)[1])
            assert 400 <= status < 500, f"{name} on {path!r}: {reply[:300]!r}"
    assert ui_server.client.get("/healthz").status_code == 200
    assert ui_server.client.post("/v1/predict", content=dicom_files[1].read_bytes(),
                                 headers={"Content-Type": "application/dicom"}).status_code == 200

