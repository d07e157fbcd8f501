"""The HTTP floor: an ASGI app that reads a request's body and answers a few bytes, under the same server
(uvicorn) as `medvision serve`. Its latency for a body is what receiving that body costs any Python service on
the machine, before any work on it (benchmarks/fullfield.py subtracts it from the served latency). On medvision's
HTTP protocol it takes the body the way the service does (written into a buffer as it arrives:
``serving.http_server.BODY_INTO``); elsewhere through ``receive()``, dropping each chunk."""

_free: dict[int, list[bytearray]] = {}  # reused, one per body in flight: as the service reuses its shared segments
MOST = 64 << 20


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    fill = scope.get("extensions", {}).get("medvision.body_into")
    declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
    if fill is not None and declared.isdigit() and int(declared) <= MOST:
        size = int(declared)
        spare = _free.setdefault(size, [])
        buffer = spare.pop() if spare else bytearray(size)
        try:
            await fill(buffer)
        finally:
            spare.append(buffer)
        await receive()
    else:
        while (await receive()).get("more_body"):
            pass
    body = b'{"probability":0.5}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
