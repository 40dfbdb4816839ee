"""ASGI middleware of the OpenAI server: the ``x-request-id`` header, paths with a trailing
slash answered as without (no redirect, which clients would follow with a GET), and CORS
for the origins given to ``qvl launch --allowed-origins`` (none by default)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from typing import Any

_GOOD_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|\*")


def parse_origins(values: Sequence[str]) -> tuple[str, ...]:
    """``--allowed-origins`` values (repeated or comma-separated) -> origins, or a UsageError."""
    from qwenvl_cli.errors import UsageError

    origins = tuple(o.strip().rstrip("/") for v in values for o in v.split(",") if o.strip())
    for origin in origins:
        if not _ORIGIN.fullmatch(origin):
            raise UsageError(f"--allowed-origins {origin!r} is not an origin",
                             "give scheme://host[:port], e.g. http://localhost:3000, or '*'")
    return origins


def request_id(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """The client's x-request-id when it is a sane token, else a new one."""
    for name, value in headers:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _GOOD_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex


class RequestIdAndSlash:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "/")
        if len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/") or "/", "raw_path": None}
        rid = request_id(scope.get("headers") or ())
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def wrap(app: Any, allowed_origins: Sequence[str]) -> Any:
    """The app with the request-id / slash middleware, and CORS when origins are allowed."""
    if allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        app = CORSMiddleware(app, allow_origins=list(allowed_origins), allow_methods=["GET", "POST", "OPTIONS"],
                             allow_headers=["*"], expose_headers=["x-request-id"], max_age=600,
                             allow_credentials="*" not in allowed_origins)
    return RequestIdAndSlash(app)
