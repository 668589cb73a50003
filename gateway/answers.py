"""One chat answered over HTTP, in the shape of the API that asked: streamed (NDJSON for
Ollama, server-sent events for OpenAI) or whole, with the error's status when the chat ends
in error before its first token, and a `chat.cancel` when the client goes away."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from events.types import ChatRequested

from .core import Chat, Gateway, Restarted
from .http import Streamed, error_response, retry_after, status_of, unless_gone

log = logging.getLogger("gateway")


class Shape(Protocol):
    """How one API writes an answer."""

    api: str
    media_type: str

    def piece(self, chat: Chat, text: str, first: bool) -> bytes: ...

    def final(self, chat: Chat) -> bytes: ...  # after the last piece of a completed chat

    def failure(self, message: str, code: str) -> bytes: ...  # an error inside the stream

    def whole(self, chat: Chat, text: str) -> dict[str, Any]: ...  # "stream": false


def ended_in_error(chat: Chat) -> tuple[str, str] | None:
    """(code, message) if the chat ended with chat.failed."""
    end = chat.end
    if end is None or end.type != "chat.failed":
        return None
    err = end.data.get("error") or {}
    return str(err.get("code") or "failed"), str(err.get("message") or "the chat failed")


def failure_response(api: str, code: str, message: str) -> JSONResponse:
    return error_response(api, status_of(code), message, code, retry_after(code, message))


async def answer(
    request: Request, gw: Gateway, req: ChatRequested, stream: bool, shape: Shape
) -> Response:
    try:
        chat = await gw.start_chat(req)
    except Exception as exc:  # the bus did not take it (NATS down, the stream full)
        log.warning("chat.requested not published: %r", exc)
        return error_response(
            shape.api,
            503,
            f"the fleet's bus did not take the request: {exc!r}",
            "unavailable",
            {"Retry-After": "1"},
        )
    headers = {"X-OA-Task-Id": chat.task_id}
    pieces = chat.pieces().__aiter__()
    gw_metrics = gw.metrics
    if gw_metrics is not None:
        gw_metrics.in_flight.inc()
    done = False

    async def gone() -> None:
        log.info("client went away: cancelling task_id=%s", chat.task_id)
        if await chat.cancel() and gw_metrics is not None:
            gw_metrics.cancels.inc()

    def finish() -> None:
        nonlocal done
        if not done:
            done = True
            chat.close()
            if gw_metrics is not None:
                gw_metrics.in_flight.dec()

    streaming = False  # once the body is handed to the server, it finishes the chat
    try:
        if not stream:
            # Whole: only the end matters (its text is the answer), so a worker's restart
            # mid-answer costs nothing here.
            ok, _ = await unless_gone(request, chat.until_end())
            if not ok:
                await gone()
                return Response(status_code=499)
            failed = ended_in_error(chat)
            if failed is not None:
                return failure_response(shape.api, *failed)
            text = str((chat.end.data if chat.end else {}).get("text", ""))
            return JSONResponse(shape.whole(chat, text), headers=headers)
        # Streamed: the status is only sent with the first piece (or the end), so a chat that
        # fails before it starts gets its error's status, not 200.
        ok, first = await unless_gone(request, _first(pieces))
        if not ok:
            await gone()
            return Response(status_code=499)
        failed = ended_in_error(chat)
        if first is None and failed is not None:
            return failure_response(shape.api, *failed)
        streaming = True
    except Restarted as exc:
        await chat.cancel()
        return error_response(shape.api, 500, f"the answer was cut: {exc}; send it again")
    finally:
        if not streaming:
            finish()

    async def body() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield shape.piece(chat, first, True)
                async for text in pieces:
                    yield shape.piece(chat, text, False)
            failed = ended_in_error(chat)
            if failed is not None:
                yield shape.failure(failed[1], failed[0])
            else:
                yield shape.final(chat)
        except Restarted as exc:
            await chat.cancel()
            yield shape.failure(f"the answer was cut: {exc}; send it again", "interrupted")
        finally:
            finish()

    async def on_gone() -> None:
        await gone()
        finish()

    return Streamed(body(), shape.media_type, on_gone, headers)


async def _first(pieces: AsyncIterator[str]) -> str | None:
    try:
        return await pieces.__anext__()
    except StopAsyncIteration:
        return None


def stats_of(chat: Chat) -> dict[str, Any]:
    end = chat.end
    return dict(end.data.get("stats") or {}) if end is not None else {}


def created_s(chat: Chat) -> int:
    """The request's time, in whole seconds (OpenAI's `created`)."""
    if chat.event.time:
        return int(dt.datetime.fromisoformat(chat.event.time).timestamp())
    return int(time.time())
