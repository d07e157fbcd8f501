"""Request limits: body sizes counted while the body streams in, on every route and for every framing, and URLs
without control characters (a NUL reaches no query, path or log).

A declared ``Content-Length`` over the limit is answered 413 before anything is read. A chunked body (or one
that lies about its length) is counted as it arrives: the first chunk past the limit raises a 413 inside
whatever is reading it (a multipart parser, the JSON body of a form, a STOW-RS collector), so no route ever
holds more than its limit. Routes that receive DICOM get ``max_upload_bytes``; every other route, whose body is
a small form or JSON document, gets ``max_form_bytes``. An answer given before the body was read to its end (a
refusal: too large, wrong type, no key) closes the connection, so the client stops sending instead of the service
reading and discarding the rest.

Scoring requests are admitted at the door (``Admission``): at most ``queue_max`` of them are in the service at once,
from their first byte to their answer; the next is refused at once with 429 and Retry-After, before its key is
looked up or its body read. Without it, requests past the batcher's own bound wait unseen in the HTTP server and the
worker threads, and an accepted request's wait grows without bound under overload.
"""

from __future__ import annotations

import math
import re
from urllib.parse import unquote_to_bytes

from starlette.exceptions import HTTPException

from medvision.serving.problems import MEDIA_TYPE, problem_bytes

DICOM_ROUTES = ("/v1/predict", "/dicomweb/studies")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


class BodyLimit:
    """A plain ASGI middleware (no extra task per request, unlike ``BaseHTTPMiddleware``)."""

    def __init__(self, app, dicom_bytes: int, other_bytes: int) -> None:
        self.app = app
        self.dicom_bytes = dicom_bytes
        self.other_bytes = other_bytes

    def limit_for(self, path: str) -> int:
        return self.dicom_bytes if path.startswith(DICOM_ROUTES) else self.other_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if _CONTROL.search(path.encode("utf-8", "surrogateescape")) or _CONTROL.search(
                unquote_to_bytes(scope.get("query_string", b""))):
            await _refuse(scope, send, "the URL holds control characters", 400, "invalid_request")
            return
        limit = self.limit_for(path)
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(scope, send, f"request body of {int(declared):,} bytes exceeds the limit of {limit:,}")
            return
        received = 0
        chunked = any(k == b"transfer-encoding" for k, _ in scope["headers"])
        unread = chunked or (declared.isdigit() and int(declared) > 0)

        async def counted() -> dict:
            nonlocal received, unread
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, f"request body exceeds the limit of {limit:,} bytes")
                unread = unread and message.get("more_body", False)
            return message

        async def closing(message) -> None:
            if message["type"] == "http.response.start" and unread:
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
                message["headers"] = [*headers, (b"connection", b"close")]
            await send(message)

        await self.app(scope, counted, closing)


class Admission:
    """At most ``limit`` scoring requests (``POST /v1/predict``) in the service at once; the next one is answered
    ``429 overloaded`` with a Retry-After estimate straight away. Its body is left unread: the HTTP server discards
    what still arrives and keeps the connection. ``seconds_per_request`` gives the service's current cost of one
    request (the batcher's running estimate), for Retry-After. A refusal here is not audited: the caller is not yet
    known, and an overloaded service writes nothing it need not (the request log and metrics count it)."""

    ROUTES = ("/v1/predict",)

    def __init__(self, app, limit: int, seconds_per_request=lambda: 0.01) -> None:
        self.app = app
        self.limit = limit
        self.seconds_per_request = seconds_per_request
        self.inside = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("path") not in self.ROUTES:
            await self.app(scope, receive, send)
            return
        if self.inside >= self.limit:
            retry = max(1, math.ceil(self.inside * self.seconds_per_request()))
            await _refuse(scope, send, f"the service is at capacity ({self.inside} scoring requests in progress): "
                          f"retry after {retry} s", 429, "overloaded", keep_alive=True,
                          headers=[(b"retry-after", str(retry).encode())])
            return
        self.inside += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inside -= 1


async def _refuse(scope, send, message: str, status: int = 413, code: str = "payload_too_large",
                  keep_alive: bool = False, headers: list[tuple[bytes, bytes]] = ()) -> None:
    request_id = scope.get("state", {}).get("request_id")
    body = problem_bytes(code, message, status, request_id)
    framing = [] if keep_alive else [(b"connection", b"close")]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode()),
                            *framing, *headers]})
    await send({"type": "http.response.body", "body": body})
