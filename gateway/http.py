"""What both APIs share: errors in each API's shape, the status of each error code, bodies
that stop when their client goes away, and the API-key guard."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import ipaddress
import json
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The status of each error code a chat can end with (chat.failed), in both APIs.
STATUS_OF_CODE = {
    "unknown_model": 404,
    "model_unavailable": 404,
    "invalid_request": 400,
    "prompt_too_long": 400,
    "too_big": 400,
    "duplicate_id": 409,
    "rate_limited": 429,
    "queue_full": 503,
    "cancelled": 499,  # the client went away (Ollama's own status for it)
}
RETRY_AFTER_S = {"queue_full": 5.0, "rate_limited": 1.0}
_RETRY_IN = re.compile(r"retry in ([0-9.]+) s")


def status_of(code: str) -> int:
    return STATUS_OF_CODE.get(code, 500)


def retry_after(code: str, message: str) -> dict[str, str]:
    """A Retry-After header for the codes that mean "later" (seconds, rounded up)."""
    if code not in RETRY_AFTER_S:
        return {}
    m = _RETRY_IN.search(message)
    seconds = float(m.group(1)) if m else RETRY_AFTER_S[code]
    return {"Retry-After": str(max(1, int(-(-seconds // 1))))}


class BadRequest(ValueError):
    """A request the gateway refuses before anything is sent on the bus (400)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


MAX_BODY_BYTES = 8 << 20  # a prompt is at most 200,000 characters a message


async def json_body(request: Request, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The request's JSON object, read no further than `limit` bytes (413 beyond)."""
    too_big = BadRequest(f"the request body exceeds {limit} bytes", 413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise BadRequest("empty request body: send a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested beyond reason
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def iso_time(t: float | None = None) -> str:
    """RFC 3339 in UTC, as Ollama writes `created_at`."""
    when = dt.datetime.fromtimestamp(t, dt.UTC) if t is not None else dt.datetime.now(dt.UTC)
    return when.isoformat().replace("+00:00", "Z")


def ndjson(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def until_disconnect(receive: Receive) -> None:
    """Return once the client has gone (the request body was read before)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_gone[T](request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Await `work` unless the client goes first: (True, result), or (False, None) with the
    work cancelled."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(until_disconnect(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the handler itself is cancelled (shutdown)
        task.cancel()
        raise
    finally:
        gone.cancel()
    if task.done():
        return True, task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    return False, None


class Streamed(Response):
    """A body from an async iterator that stops as soon as its client goes away (whether or
    not anything is being written then), and then calls `on_gone`."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        media_type: str,
        on_gone: Callable[[], Awaitable[None]],
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(None, 200, headers, media_type)
        # No Content-Length: the body's length is not known (the server sends it chunked).
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.chunks, self.on_gone = chunks, on_gone

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def write() -> None:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        writer = asyncio.ensure_future(write())
        gone = asyncio.ensure_future(until_disconnect(receive))
        try:
            await asyncio.wait({writer, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # shutdown: the body stops with the handler
            writer.cancel()
            raise
        finally:
            gone.cancel()
        if writer.done():
            if writer.exception() is not None and not isinstance(writer.exception(), OSError):
                raise writer.exception()  # type: ignore[misc]
            if writer.exception() is None:
                return
        else:
            writer.cancel()
            with contextlib.suppress(BaseException):
                await writer
        await self.on_gone()


# -- API keys ---------------------------------------------------------------------------------
class RefusedToServe(RuntimeError):
    pass


def load_keys(env: dict[str, str] | None = None) -> frozenset[str]:
    """The API keys: `OA_GATEWAY_API_KEYS` (comma-separated) and the lines of the file named
    by `OA_GATEWAY_API_KEYS_FILE` (blank lines and `#` comments skipped)."""
    env = os.environ if env is None else env
    keys = {k.strip() for k in env.get("OA_GATEWAY_API_KEYS", "").split(",") if k.strip()}
    path = env.get("OA_GATEWAY_API_KEYS_FILE")
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise RefusedToServe(f"cannot read OA_GATEWAY_API_KEYS_FILE {path}: {exc}") from exc
        keys |= {ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")}
    short = [k for k in keys if len(k) < 16]
    if short:
        raise RefusedToServe(f"{len(short)} API key(s) shorter than 16 characters: use longer")
    return frozenset(keys)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(host: str, keys: frozenset[str]) -> None:
    if not keys and not is_loopback(host):
        raise RefusedToServe(
            f"the gateway will not listen on {host} without API keys: set "
            "OA_GATEWAY_API_KEYS or OA_GATEWAY_API_KEYS_FILE (or listen on 127.0.0.1)"
        )


OPEN_PATHS = frozenset({"/"})  # Ollama's "is it running?" probe


def api_of(path: str) -> str:
    if path.startswith("/v1/"):
        return "openai"
    if path == "/metrics":
        return "metrics"
    if path.startswith("/api/v1/"):
        return "task"
    return "ollama"


def error_body(api: str, status: int, message: str, code: str | None = None) -> dict[str, Any]:
    if api == "openai":
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return {"error": message}


def error_response(
    api: str,
    status: int,
    message: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(api, status, message, code), status, headers=headers)


class Guard:
    """ASGI middleware: the API keys (when any are set) and the request counter."""

    def __init__(
        self, app: ASGIApp, keys: frozenset[str], count: Callable[[str, str, int], None]
    ) -> None:
        self.app, self.keys, self.count = app, [k.encode() for k in keys], count

    def _allowed(self, scope: Scope) -> bool:
        if not self.keys or scope["path"] in OPEN_PATHS:
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        return any(hmac.compare_digest(token, k) for k in self.keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        api, route = api_of(path), route_of(path)
        status = [500]

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if not self._allowed(scope):
                resp = error_response(
                    api,
                    401,
                    "missing or wrong API key: send Authorization: Bearer <key>",
                    "invalid_api_key",
                    {"WWW-Authenticate": "Bearer"},
                )
                await resp(scope, receive, counted)
                return
            await self.app(scope, receive, counted)
        finally:
            self.count(api, route, status[0])


ROUTES = (
    "/",
    "/api/version",
    "/api/tags",
    "/api/ps",
    "/api/show",
    "/api/pull",
    "/api/chat",
    "/api/generate",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/metrics",
)


def route_of(path: str) -> str:
    """A bounded label for a path (task ids are not labels)."""
    if path in ROUTES:
        return path
    if path.startswith("/api/v1/task/"):
        return "/api/v1/task/{task_id}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"
