"""Pull events from a durable JetStream consumer and deliver each one to a function.

Delivery is either in-process (call the handler) or a binary-mode CloudEvent HTTP POST to the
function's functions-framework server, exactly as Knative Eventing would deliver it. The
function's outcome becomes ack / nak(delay) / term + dead-letter record. While a handler runs,
the dispatcher keeps the message alive with in-progress acks, so a long chat is not
redelivered; if the worker dies, the acks stop and JetStream redelivers after ack_wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from .bus import EVENTS_STREAM, ConsumerSpec
from .codec import CodecError, Event, decode, to_http_binary
from .outcome import Done, Outcome, Reject, Retry, from_http
from .types import (
    CLIENT_EXTENSION,
    DEAD_LETTER_PREFIX,
    PER_CLIENT,
    DeadLetter,
    client_of,
    subject_fits,
)

log = logging.getLogger("events.dispatcher")

MAX_FAILED_DELIVERIES = 10
PULL_EXPIRES_S = 1.0  # how long an open pull request lingers on the server
PULL_GRACE_S = 1.0  # past that with no answer, the request is taken as lost and sent again
Deliver = Callable[[Event, int], Awaitable[Outcome]]


def backoff(attempt: int, base: float = 0.25, cap: float = 5.0) -> float:
    return min(cap, base * (2 ** max(0, attempt - 1)))


def in_process(
    handler: Callable[[Event, int], Awaitable[Outcome]], retry_base_s: float = 0.25
) -> Deliver:
    """Deliver by calling the handler; an exception becomes a failed Retry with backoff."""

    async def deliver(event: Event, attempt: int) -> Outcome:
        try:
            return await handler(event, attempt)
        except Exception as exc:  # a handler bug must not kill the dispatcher
            log.exception("handler raised on %s %s", event.type, event.id)
            return Retry(backoff(attempt, retry_base_s), f"{exc.__class__.__name__}: {exc}")

    return deliver


def over_http(url: str, timeout_s: float = 900.0) -> Deliver:
    """Deliver as a binary-mode CloudEvent POST, as Knative does."""
    client = httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=timeout_s))

    async def deliver(event: Event, attempt: int) -> Outcome:
        headers, body = to_http_binary(event)
        headers["x-oa-delivery-attempt"] = str(attempt)
        try:
            resp = await client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return Retry(backoff(attempt), f"function at {url} unreachable: {exc!r}")
        return from_http(resp.status_code, dict(resp.headers), resp.text)

    return deliver


def with_client(event: Event, subject: str) -> Event:
    """The event with its `oaclient` taken from the subject it came on (which the server's
    permissions vouch for), whatever the event said of itself. ValueError for a chat event
    on a subject with no valid client segment."""
    if not subject_fits(event.type, subject):
        # The Broker routes by type: a client must not pass a model.pull off as a chat.
        raise ValueError(f"a {event.type} event on {subject!r}: each type has its own subject")
    client = client_of(subject)
    if client is None and event.type in PER_CLIENT:
        raise ValueError(
            f"{event.type} on {subject!r}: a chat event's subject ends with its client's name "
            "(a-z 0-9 _ -)"
        )
    ext = {k: v for k, v in event.extensions.items() if k != CLIENT_EXTENSION}
    if client is not None:
        ext[CLIENT_EXTENSION] = client
    return dataclasses.replace(event, extensions=ext)


MAX_DEAD_BODY_BYTES = 64 * 1024  # a dead-letter record keeps at most this much of the body


def dead_letter_record(
    reason: str,
    consumer: str,
    subject: str,
    headers: dict[str, str],
    body: bytes,
    event: Event | None,
    num_delivered: int = 1,
) -> DeadLetter:
    """The record of a rejected event: the reason and the original, cut to sane sizes."""
    return DeadLetter(
        reason=reason[:4096],
        consumer=consumer,
        subject=subject,
        event_type=event.type if event else None,
        event_id=event.id if event else None,
        headers={k: str(v)[:1024] for k, v in list(headers.items())[:64]},
        body=body[:MAX_DEAD_BODY_BYTES].decode("utf-8", errors="replace"),
        body_bytes=len(body),
        body_sha256=hashlib.sha256(body).hexdigest(),
        body_truncated=len(body) > MAX_DEAD_BODY_BYTES,
        num_delivered=num_delivered,
    )


async def publish_dead_letter(js: JetStreamContext, record: DeadLetter) -> None:
    """Publish on `ollama.deadletter.<consumer>`; a failed publish is logged, never raised."""
    try:
        await js.publish(
            f"{DEAD_LETTER_PREFIX}.{record.consumer}", record.model_dump_json().encode()
        )
    except Exception:
        log.exception("dead-letter record for %s could not be published", record.subject)


@dataclass
class Stats:
    done: int = 0
    retried: int = 0
    rejected: int = 0
    handed_back: int = 0


GiveUp = Callable[[Event, str], Awaitable[None]]


class Dispatcher:
    """Feeds one durable consumer's events to one function. Every delivered message ends in
    an outcome — ack, nak with delay, or term with a dead-letter record — whatever raises."""

    def __init__(
        self,
        js: JetStreamContext,
        spec: ConsumerSpec,
        deliver: Deliver,
        concurrency: int = 64,
        give_up: GiveUp | None = None,
    ) -> None:
        self.js, self.spec, self.deliver = js, spec, deliver
        self.concurrency = concurrency
        self.give_up = give_up  # told when a handler's event is dead-lettered after failures
        self.stats = Stats()
        self.ack_wait_s = spec.ack_wait_s  # the consumer's real one, read when run starts
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake: asyncio.Event | None = None  # the running pull loop's, set by `_consume`

    async def dead_letter(self, msg: Msg, reason: str, event: Event | None) -> None:
        """Record the event with the reason on `ollama.deadletter.<consumer>`. A body too big
        to fit a record is cut (and says so); a failed publish is logged, never raised."""
        record = dead_letter_record(
            reason,
            self.spec.name,
            msg.subject,
            dict(msg.headers or {}),
            msg.data,
            event,
            msg.metadata.num_delivered if msg.reply else 1,
        )
        await publish_dead_letter(self.js, record)
        log.warning(
            "dead-letter consumer=%s subject=%s reason=%s",
            self.spec.name,
            msg.subject[:200],
            reason if len(reason) <= 300 else f"{reason[:300]}... ({len(reason)} chars)",
        )

    async def _keep_alive(self, msg: Msg) -> None:
        interval = max(0.5, self.ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await msg.in_progress()
            except Exception:  # connection blips: the next tick tries again
                log.debug("in_progress failed", exc_info=True)

    async def _outcome(self, msg: Msg, attempt: int) -> tuple[Outcome, Event | None]:
        try:
            event = decode(dict(msg.headers or {}), msg.data)
        except CodecError as exc:
            return Reject(f"malformed event: {exc}"), None
        if not self.spec.takes(event.type):
            return Reject(
                f"consumer {self.spec.name} takes {self.spec.event_type!r}, got {event.type!r}"
            ), event
        try:
            event = with_client(event, msg.subject)
        except ValueError as exc:
            return Reject(str(exc)), event
        keeper = asyncio.create_task(self._keep_alive(msg))
        try:
            return await self.deliver(event, attempt), event
        except Exception as exc:
            log.exception("delivery of %s %s raised", event.type, event.id)
            return Retry(backoff(attempt), f"{exc.__class__.__name__}: {exc}"), event
        finally:
            keeper.cancel()

    async def handle(self, msg: Msg) -> None:
        attempt = msg.metadata.num_delivered if msg.reply else 1
        t0 = time.perf_counter()
        try:
            outcome, event = await self._outcome(msg, attempt)
        except asyncio.CancelledError:  # drained: hand it back for another worker, at once
            with contextlib.suppress(Exception):
                await asyncio.shield(msg.nak())
            self.stats.handed_back += 1
            raise
        if isinstance(outcome, Retry) and outcome.failure and attempt >= MAX_FAILED_DELIVERIES:
            outcome = Reject(f"gave up after {attempt} deliveries; last error: {outcome.reason}")
            if event is not None and self.give_up is not None:
                try:
                    await self.give_up(event, outcome.reason)
                except Exception:
                    log.exception("give-up hook failed on %s", event.id)
        if isinstance(outcome, Done):
            await msg.ack()
            self.stats.done += 1
        elif isinstance(outcome, Retry):
            await msg.nak(delay=outcome.delay_s)
            self.stats.retried += 1
        else:
            await self.dead_letter(msg, outcome.reason, event)
            await msg.term()
            self.stats.rejected += 1
        log.debug(
            "%s %s -> %s in %.1f ms",
            self.spec.name,
            event.id if event else "?",
            outcome,
            (time.perf_counter() - t0) * 1000,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Pull and dispatch until `stop`; survives connection loss and server restarts.

        One pull request is kept open at a time, for as many messages as there are free
        slots, lingering up to PULL_EXPIRES_S; each message is dispatched the moment it
        arrives (a fetch that waits to fill its batch would hold the first one back). When
        the request is filled or expires, the next goes out. A request the server lost (a
        restart) is replaced once it should have expired. After `stop`, what still arrives
        on the open request is held until that request has expired, then handed back."""
        pause = 0.1
        while not stop.is_set():
            began = time.monotonic()
            try:
                await self._consume(stop)
                return
            except nats.errors.ConnectionClosedError:
                return
            except Exception as exc:  # reconnecting, server restarting, consumer missing
                if time.monotonic() - began > 10:
                    pause = 0.1  # it had been working: a new trouble starts the backoff over
                log.warning("dispatcher %s: %r; retrying in %.1fs", self.spec.name, exc, pause)
                await asyncio.sleep(pause)
                pause = min(5.0, pause * 2)

    async def _consume(self, stop: asyncio.Event) -> None:
        nc = self.js._nc  # the JetStream context's own connection
        info = await self.js.consumer_info(EVENTS_STREAM, self.spec.name)
        self.ack_wait_s = float(info.config.ack_wait or self.spec.ack_wait_s)
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{self.spec.name}"
        inbox = nc.new_inbox()
        wanted = 0  # messages the open request may still bring
        expires_at = 0.0  # when the open request lapses (monotonic)
        wake = asyncio.Event()
        held: list[Msg] = []  # what came after `stop`
        trouble = ""  # why the consumer must be looked up again

        async def arrived(msg: Msg) -> None:
            nonlocal wanted
            nonlocal trouble
            status = (msg.headers or {}).get("Status") if not msg.data else None
            if status:
                if status == "100":  # an idle heartbeat: nothing to do
                    return
                # 408: the request expired (the common case, when idle): ask again at once.
                # Else (409: the server ended it, a leadership change or a limit; 503: no
                # one answers for the consumer) start over, after a pause, from its info.
                wanted = 0
                if status != "408":
                    trouble = f"pull request answered {status} {msg.headers.get('Description', '')}"
                wake.set()
                return
            wanted = max(0, wanted - 1)
            if stop.is_set():  # handed back once the open request is over (see below)
                held.append(msg)
                return
            task = asyncio.create_task(self._guarded(msg))
            self._tasks.add(task)
            task.add_done_callback(self._freed)
            if wanted == 0:
                wake.set()

        self._wake = wake
        stopper = asyncio.create_task(stop.wait())
        stopper.add_done_callback(lambda _: wake.set())
        sub = await nc.subscribe(inbox, cb=arrived)
        try:
            while not stop.is_set():
                if trouble:
                    raise RuntimeError(trouble)  # run() pauses, backing off, and starts over
                now = time.monotonic()
                free = self.concurrency - len(self._tasks)
                if (wanted == 0 or now >= expires_at + PULL_GRACE_S) and free > 0:
                    wanted, expires_at = free, now + PULL_EXPIRES_S
                    request = {"batch": free, "expires": int(PULL_EXPIRES_S * 1e9)}
                    await nc.publish(next_subject, json.dumps(request).encode(), reply=inbox)
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(
                        max(0.01, expires_at + PULL_GRACE_S - time.monotonic())
                    ):
                        await wake.wait()
            # Stopped: what the open request still brings is held until it lapses, then
            # handed back (a nak at once would bring it straight back on the same request),
            # so nothing waits out its ack wait on an inbox nobody reads.
            while wanted and time.monotonic() < expires_at:
                await asyncio.sleep(0.02)
            for msg in held:
                with contextlib.suppress(Exception):
                    await msg.nak()
                self.stats.handed_back += 1
        finally:
            stopper.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _freed(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._wake is not None and len(self._tasks) == self.concurrency - 1:
            self._wake.set()  # was full: a slot is free, a request may go out

    async def _guarded(self, msg: Msg) -> None:
        try:
            await self.handle(msg)
        except Exception:  # acking itself failed (connection lost): JetStream redelivers
            log.exception("dispatcher failed on %s; leaving it for redelivery", msg.subject)

    async def drain(self, timeout: float = 10.0) -> int:
        """After `run` stopped fetching: let in-flight events finish for up to `timeout`,
        then hand back what is still running (its handler is cancelled and cleans up, the
        message is nak'ed for immediate redelivery elsewhere). Returns how many were handed
        back."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        left = list(self._tasks)
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=10)
        return len(left)
