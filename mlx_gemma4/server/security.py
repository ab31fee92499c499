"""What every request passes before a route sees it: the API key (compared in constant time) and the body size
(refused from Content-Length at once, or as soon as a streamed body grows past the limit, never read whole)."""

import hmac
import json
from typing import Optional

from fastapi import HTTPException

from .schema import error_body

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
OPEN_PATHS = ("/health",)


async def send_error(send, status: int, message: str, code: str):
    body = json.dumps(error_body(message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Gatekeeper:
    """ASGI middleware: 401 without the key, 413 past the body limit."""

    def __init__(self, app, api_key: Optional[str], max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.app = app
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes

    def authorized(self, headers: dict) -> bool:
        if not self.api_key:
            return True
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if scope["method"] != "OPTIONS" and scope["path"] not in OPEN_PATHS and not self.authorized(headers):
            return await send_error(send, 401, "missing or wrong API key (Authorization: Bearer KEY)",
                                    "invalid_api_key")
        declared = headers.get(b"content-length")
        too_large = f"the request body is larger than the server's limit of {self.max_request_bytes} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.max_request_bytes:
            return await send_error(send, 413, too_large, "request_too_large")
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_request_bytes:
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited_receive, send)
