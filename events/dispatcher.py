"""Pull events from a durable JetStream consumer and deliver each one to a function.

Delivery is either in-process (call the handler) or a binary-mode CloudEvent HTTP POST to the
function's functions-framework server, exactly as Knative Eventing would deliver it. The
function's outcome becomes ack / nak(delay) / term + dead-letter record. While a handler runs,
the dispatcher keeps the message alive with in-progress acks, so a long chat is not
redelivered; if the worker dies, the acks stop and JetStream redelivers after ack_wait.
"""

from __future__ import annotations

import asyncio
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
from .types import DEAD_LETTER_PREFIX, DeadLetter

log = logging.getLogger("events.dispatcher")

MAX_FAILED_DELIVERIES = 10
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


@dataclass
class Stats:
    done: int = 0
    retried: int = 0
    rejected: int = 0


class Dispatcher:
    def __init__(
        self, js: JetStreamContext, spec: ConsumerSpec, deliver: Deliver, concurrency: int = 64
    ) -> None:
        self.js, self.spec, self.deliver = js, spec, deliver
        self.concurrency = concurrency
        self.stats = Stats()
        self._tasks: set[asyncio.Task[None]] = set()

    async def dead_letter(self, msg: Msg, reason: str, event: Event | None) -> None:
        record = DeadLetter(
            reason=reason,
            consumer=self.spec.name,
            subject=msg.subject,
            event_type=event.type if event else None,
            event_id=event.id if event else None,
            headers=dict(msg.headers or {}),
            body=msg.data.decode("utf-8", errors="replace"),
            num_delivered=msg.metadata.num_delivered if msg.reply else 1,
        )
        subject = f"{DEAD_LETTER_PREFIX}.{self.spec.name}"
        await self.js.publish(subject, record.model_dump_json().encode())
        log.warning(
            "dead-letter consumer=%s subject=%s reason=%s", self.spec.name, msg.subject, reason
        )

    async def _keep_alive(self, msg: Msg) -> None:
        interval = max(0.5, self.spec.ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await msg.in_progress()
            except Exception:  # connection blips: the next tick tries again
                log.debug("in_progress failed", exc_info=True)

    async def handle(self, msg: Msg) -> None:
        attempt = msg.metadata.num_delivered
        event: Event | None = None
        try:
            event = decode(dict(msg.headers or {}), msg.data)
            if event.type != self.spec.event_type:
                raise CodecError(
                    f"consumer {self.spec.name} takes {self.spec.event_type!r}, got {event.type!r}"
                )
        except CodecError as exc:
            await self.dead_letter(msg, f"malformed event: {exc}", event)
            await msg.term()
            self.stats.rejected += 1
            return
        keeper = asyncio.create_task(self._keep_alive(msg))
        t0 = time.perf_counter()
        try:
            outcome = await self.deliver(event, attempt)
        finally:
            keeper.cancel()
        if isinstance(outcome, Retry) and outcome.failure and attempt >= MAX_FAILED_DELIVERIES:
            outcome = Reject(f"gave up after {attempt} deliveries; last error: {outcome.reason}")
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
            event.id,
            outcome,
            (time.perf_counter() - t0) * 1000,
        )

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self.js.pull_subscribe_bind(durable=self.spec.name, stream=EVENTS_STREAM)
        try:
            while not stop.is_set():
                free = self.concurrency - len(self._tasks)
                if free <= 0:
                    await asyncio.sleep(0.01)
                    continue
                try:
                    msgs = await sub.fetch(batch=min(free, 32), timeout=0.5)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except nats.errors.ConnectionClosedError:
                    return
                for msg in msgs:
                    task = asyncio.create_task(self._guarded(msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            await sub.unsubscribe()

    async def _guarded(self, msg: Msg) -> None:
        # Concurrency is bounded by fetching only as many messages as there are free slots.
        try:
            await self.handle(msg)
        except Exception:
            log.exception("dispatcher failed on %s; leaving it for redelivery", msg.subject)

    async def drain(self, timeout: float = 10.0) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
