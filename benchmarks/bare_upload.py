"""The HTTP floor: an ASGI app that reads a request's body and answers a few bytes, under the same server
(uvicorn) as `medvision serve`. Its latency for a body is what receiving that body costs any Python service on
the machine, before any work on it (benchmarks/fullfield.py subtracts it from the served latency)."""


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    body = b'{"probability":0.5}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
