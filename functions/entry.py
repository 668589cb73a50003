"""Entry points: the functions-framework targets (what Knative runs) and the handler table.

    functions-framework --source functions/entry.py --target chat --asgi --port 8090

Each target takes a binary- or structured-mode CloudEvent over HTTP and answers with the
outcome's status: 200 done, 503 + Retry-After retry, 422 reject (dead-letter).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable

import functions_framework.aio as ffa
from starlette.requests import Request
from starlette.responses import Response

from events.bus import CONSUMERS
from events.codec import CodecError, Event, decode
from events.dispatcher import Dispatcher, in_process, over_http
from events.outcome import Outcome, Reject, to_http

from . import cancel, chat, evict, load, pull, reconcile
from .services import Services, shared_services

Handler = Callable[[Services, Event, int], Awaitable[Outcome]]
GiveUpHook = Callable[[Services, Event, str], Awaitable[None]]
# What a function does when the dispatcher dead-letters its event after repeated failures.
GIVE_UP: dict[str, GiveUpHook] = {"chat": chat.give_up}
HANDLERS: dict[str, Handler] = {
    "chat": chat.handle,
    "cancel": cancel.handle,
    "load": load.handle,
    "evict": evict.handle,
    "pull": pull.handle,
    "reconcile": reconcile.handle,
}


def dispatcher(svc: Services, name: str, url: str | None = None) -> Dispatcher:
    """The dispatcher of function `name`: in-process, or over HTTP to its server at `url`
    (as Knative delivers); a dead-lettered event goes to the function's give-up hook."""
    if url is not None:
        deliver = over_http(url)
    else:
        handler = HANDLERS[name]
        deliver = in_process(lambda e, a: handler(svc, e, a))
    hook = GIVE_UP.get(name)

    async def give_up(event: Event, reason: str) -> None:
        if hook is not None:
            await hook(svc, event, reason)

    return Dispatcher(svc.js, CONSUMERS[name], deliver, give_up=give_up if hook else None)


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


def _attempt(headers: dict[str, str]) -> int:
    try:
        return max(1, int(headers.get("x-oa-delivery-attempt", "1")))
    except ValueError:
        return 1


async def _serve(name: str, request: Request) -> Response:
    _configure_logging()
    body = await request.body()
    headers = dict(request.headers)
    try:
        event = decode(headers, body)  # the same decoder as the NATS path
    except CodecError as exc:
        outcome: Outcome = Reject(f"malformed event: {exc}")
    else:
        expected = CONSUMERS[name].event_type
        if event.type != expected:
            outcome = Reject(f"the {name} function takes {expected!r} events, got {event.type!r}")
        else:
            svc = await shared_services()
            deliver = in_process(lambda e, a: HANDLERS[name](svc, e, a))
            outcome = await deliver(event, _attempt(headers))
    status, extra, text = to_http(outcome)
    return Response(text, status_code=status, headers=extra, media_type="text/plain")


@ffa.http
async def chat_fn(request: Request) -> Response:
    return await _serve("chat", request)


@ffa.http
async def cancel_fn(request: Request) -> Response:
    return await _serve("cancel", request)


@ffa.http
async def load_fn(request: Request) -> Response:
    return await _serve("load", request)


@ffa.http
async def evict_fn(request: Request) -> Response:
    return await _serve("evict", request)


@ffa.http
async def pull_fn(request: Request) -> Response:
    return await _serve("pull", request)


@ffa.http
async def reconcile_fn(request: Request) -> Response:
    return await _serve("reconcile", request)
