"""Entry points: the functions-framework targets (what Knative runs) and the handler table.

    functions-framework --source functions/entry.py --target chat --asgi --port 8090

Each target takes a binary- or structured-mode CloudEvent over HTTP and answers with the
outcome's status: 200 done, 503 + Retry-After retry, 422 reject (dead-letter). `GET /healthz`
answers 200 once NATS is reachable (what Knative's readiness probe asks).

`deadletter_fn` is the Knative dead-letter sink: it records what the Broker gave up on (with
the `knativeerror*` reason) on `ollama.deadletter.knative`, beside the workers' own records.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable

import functions_framework.aio as ffa
from starlette.requests import Request
from starlette.responses import Response

from events.bus import CONSUMERS
from events.codec import CodecError, Event, decode
from events.dispatcher import (
    Dispatcher,
    dead_letter_record,
    in_process,
    over_http,
    publish_dead_letter,
)
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


log = logging.getLogger("functions.entry")
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


# Event types a target also takes: Knative's PingSource can only send its own type, so the
# reconcile target takes it as a fleet.tick.
PING_TYPE = "dev.knative.sources.ping"
ALSO_TAKES: dict[str, frozenset[str]] = {"reconcile": frozenset({PING_TYPE})}
HEALTH_PATH = "/healthz"


async def _health() -> Response:
    try:
        svc = await asyncio.wait_for(shared_services(), 5)
    except Exception as exc:  # unreachable NATS is the one thing that makes a function useless
        return Response(f"NATS unreachable: {exc}\n", status_code=503, media_type="text/plain")
    if not svc.nc.is_connected:
        return Response("NATS reconnecting\n", status_code=503, media_type="text/plain")
    return Response("ok\n", media_type="text/plain")


def _attempt(headers: dict[str, str]) -> int:
    try:
        return max(1, int(headers.get("x-oa-delivery-attempt", "1")))
    except ValueError:
        return 1


async def _serve(name: str, request: Request) -> Response:
    _configure_logging()
    if request.method in ("GET", "HEAD"):
        if request.url.path == HEALTH_PATH:
            return await _health()
        return Response("POST a CloudEvent\n", status_code=405, media_type="text/plain")
    body = await request.body()
    headers = dict(request.headers)
    try:
        event = decode(headers, body)  # the same decoder as the NATS path
    except CodecError as exc:
        outcome: Outcome = Reject(f"malformed event: {exc}")
    else:
        expected = CONSUMERS[name].event_type
        if event.type in ALSO_TAKES.get(name, ()):
            event = dataclasses.replace(event, type=expected)
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


@ffa.http
async def deadletter_fn(request: Request) -> Response:
    """Knative's dead-letter sink: record the event and the Broker's reason; always 200 (a
    sink that fails would only make the Broker retry a record)."""
    _configure_logging()
    if request.method in ("GET", "HEAD"):
        return await _health() if request.url.path == HEALTH_PATH else Response(status_code=405)
    body = await request.body()
    headers = dict(request.headers)
    try:
        event: Event | None = decode(headers, body)
    except CodecError:
        event = None
    ext = event.extensions if event is not None else {}
    reason = (
        f"knative gave up: destination {ext.get('knativeerrordest', '?')} answered "
        f"{ext.get('knativeerrorcode', '?')}: {str(ext.get('knativeerrordata', ''))[:1000]}"
    )
    svc = await shared_services()
    record = dead_letter_record(reason, "knative", str(request.url.path), headers, body, event)
    await publish_dead_letter(svc.js, record)
    log.warning("dead-letter from knative: %s %s", event.type if event else "?", reason)
    return Response("recorded\n", media_type="text/plain")
