"""Entry points: the functions-framework targets (what Knative runs) and the handler table.

    functions-framework --source functions/entry.py --target chat --asgi --port 8090

Each target takes a binary- or structured-mode CloudEvent over HTTP and answers with the
outcome's status: 200 done, 503 + Retry-After retry, 422 reject (dead-letter).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable

import functions_framework.aio as ffa
from cloudevents.http import from_http
from starlette.requests import Request
from starlette.responses import Response

from events.codec import CORE_ATTRS, Event
from events.outcome import Outcome, Reject, to_http

from . import chat, evict, load, reconcile
from .context import Services, shared_services

Handler = Callable[[Services, Event, int], Awaitable[Outcome]]
HANDLERS: dict[str, Handler] = {
    "chat": chat.handle,
    "load": load.handle,
    "evict": evict.handle,
    "reconcile": reconcile.handle,
}


def _to_event(headers: dict[str, str], body: bytes) -> Event:
    ce = from_http(headers, body)
    attrs = dict(ce.get_attributes())
    core = {k: attrs.pop(k, None) for k in CORE_ATTRS}
    data = ce.get_data()
    if isinstance(data, (bytes, bytearray)) and data:
        data = json.loads(data)
    return Event(
        type=str(core["type"]),
        data=data,
        id=str(core["id"]),
        source=str(core["source"]),
        specversion=str(core["specversion"]),
        time=core["time"],
        subject=core["subject"],
        datacontenttype=core["datacontenttype"],
        extensions={k: str(v) for k, v in attrs.items()},
    )


_logging_ready = False


def _configure_logging() -> None:
    """In a function server: one structured line per event, on stderr. Done on the first
    request, not at import, so importing HANDLERS in-process changes no one's logging."""
    global _logging_ready
    if not _logging_ready:
        logging.basicConfig(
            level=os.environ.get("OA_LOG_LEVEL", "INFO"),
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
        )
        logging.getLogger("httpx").setLevel(logging.WARNING)
        _logging_ready = True


async def _serve(name: str, request: Request) -> Response:
    _configure_logging()
    body = await request.body()
    headers = dict(request.headers)
    try:
        event = _to_event(headers, body)
    except Exception as exc:  # the SDK raises several types for malformed input
        outcome: Outcome = Reject(f"malformed CloudEvent: {exc}")
    else:
        attempt = int(headers.get("x-oa-delivery-attempt", "1") or 1)
        outcome = await HANDLERS[name](await shared_services(), event, attempt)
    status, extra, text = to_http(outcome)
    return Response(text, status_code=status, headers=extra, media_type="text/plain")


@ffa.http
async def chat_fn(request: Request) -> Response:
    return await _serve("chat", request)


@ffa.http
async def load_fn(request: Request) -> Response:
    return await _serve("load", request)


@ffa.http
async def evict_fn(request: Request) -> Response:
    return await _serve("evict", request)


@ffa.http
async def reconcile_fn(request: Request) -> Response:
    return await _serve("reconcile", request)
