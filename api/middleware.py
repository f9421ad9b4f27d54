"""ASGI middleware: the request body size limit (413 in the problem shape)."""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import problem_response


class BodySizeLimit:
    """Refuses bodies larger than ``max_bytes``: at once when Content-Length says so,
    else while reading (chunked uploads). The body is buffered up to the limit, so
    the application never sees a partial body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is None:
            await self._reply(400, "Content-Length is not a number", scope, receive, send)
            return
        if declared > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"the request body is larger than {self.max_bytes} bytes"
        await self._reply(413, detail, scope, receive, send)

    @staticmethod
    async def _reply(status: int, detail: str, scope: Scope, receive: Receive, send: Send) -> None:
        await problem_response(status, detail)(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    """The declared length (0 when none is declared), None when it is not a number."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            text: Any = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return 0
