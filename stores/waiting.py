"""The parked queue: chat requests that wait for memory, kept in the `OLLAMA_WAITING` stream.

A request that cannot be placed is *parked*: its original event (binary-mode headers and
body) is stored as a message on `ollama.waiting.p<rank>.<encoded model>.<client>`, its delivery is
acknowledged, and it is *woken by events* — a lease released, a model evicted or loaded, a
node joining, a deferral ending — never by redelivery loops. Waking re-publishes the stored
event on `ollama.chat.requested.<client>` (same CloudEvent id, so the same task), under a message id
made of the task and the event that woke it, so concurrent wakers of one waiter send it once.

Order: the rank sorts higher priority first, and within a subject the stream keeps arrival
order, so waiters are served FIFO per model and client, priority first across models. Every
client's head is woken, so one client's backlog never stands in front of another's request;
what one client has waiting is counted from the subjects (one request). The stream is on
disk: waiters survive restarts of every process. The number of messages in it is the queue
depth (what KEDA scales the runtime pool on: the `waiting` consumer's pending count).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from events.bus import WAITING_STREAM, wait_out
from events.codec import Event, to_binary
from events.keys import decode_name, encode_name
from events.types import CLIENT_EXTENSION, CLIENT_RE, SUBJECT_PREFIX, subject_for

log = logging.getLogger("stores.waiting")
WAITING_PREFIX = f"{SUBJECT_PREFIX}.waiting"
H_TASK, H_SOURCE, H_MODEL, H_SINCE = "Oa-Task", "Oa-Source", "Oa-Model", "Oa-Since"
H_PRIORITY = "Oa-Priority"
_OURS = (H_TASK, H_SOURCE, H_MODEL, H_SINCE, H_PRIORITY)
WAKE_WAIT_S = 15.0  # how long a wake waits out a bus that does not answer


def rank(priority: int) -> str:
    """Priority -100..100 as a 3-digit rank that sorts the highest priority first."""
    return f"p{100 - max(-100, min(100, priority)):03d}"


def subject_of(model: str, priority: int, client: str) -> str:
    return f"{WAITING_PREFIX}.{rank(priority)}.{encode_name(model)}.{client}"


@dataclass(frozen=True)
class Waiter:
    seq: int
    task_id: str
    source: str
    model: str
    priority: int
    since: float
    headers: dict[str, str]
    body: bytes
    head: bool = False  # first of its (priority, model, client): next to be served


class Waiting:
    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self._waker: asyncio.Task[None] | None = None
        self._next_trigger: str | None = None

    async def park(self, event: Event, model: str, priority: int, since: float, client: str) -> int:
        """Store the request; returns its sequence (its handle for `remove`)."""
        headers, body = to_binary(event)
        headers |= {
            H_TASK: event.id,
            H_SOURCE: event.source,
            H_MODEL: model,
            H_SINCE: f"{since:.3f}",
            H_PRIORITY: str(priority),
        }
        ack = await self.js.publish(subject_of(model, priority, client), body, headers=headers)
        return int(ack.seq)

    async def remove(self, seq: int | None) -> None:
        if seq is None:
            return
        try:
            await self.js.delete_msg(WAITING_STREAM, seq)
        except NotFoundError:
            pass  # already removed (by another run, or reconcile)

    async def any(self) -> bool:
        """Is anyone waiting? One small direct-get request (no stream info to parse)."""
        try:
            await self.js.get_msg(
                WAITING_STREAM, seq=1, subject=f"{WAITING_PREFIX}.>", next=True, direct=True
            )
        except NotFoundError:
            return False
        return True

    async def depth(self) -> int:
        info = await self.js.stream_info(WAITING_STREAM)
        return int(info.state.messages)

    async def count_of(self, client: str) -> int:
        """How many requests `client` has waiting (one request to the server)."""
        info = await self.js.stream_info(
            WAITING_STREAM, subjects_filter=f"{WAITING_PREFIX}.*.*.{client}"
        )
        return sum((info.state.subjects or {}).values())

    async def subjects(self) -> dict[str, int]:
        """Waiters per subject (priority rank, model and client), in serving order."""
        info = await self.js.stream_info(WAITING_STREAM, subjects_filter=f"{WAITING_PREFIX}.>")
        return dict(sorted((info.state.subjects or {}).items()))

    async def _read(self, subject: str, after: int = 0) -> Waiter | None:
        try:
            raw = await self.js.get_msg(WAITING_STREAM, seq=after + 1, subject=subject, next=True)
        except NotFoundError:
            return None
        return _waiter(raw.seq or 0, raw.headers or {}, raw.data or b"")

    async def get(self, seq: int) -> Waiter | None:
        try:
            raw = await self.js.get_msg(WAITING_STREAM, seq=seq)
        except NotFoundError:
            return None
        return _waiter(raw.seq or seq, raw.headers or {}, raw.data or b"")

    async def models(self) -> set[str]:
        """The models that parked requests wait for (one request to the server)."""
        return {w for w in (_model_of(s) for s in await self.subjects()) if w}

    async def of_model(self, model: str, limit: int = 64) -> list[Waiter]:
        """The first `limit` waiters for `model`, across priorities."""
        out: list[Waiter] = []
        for subject in await self.subjects():
            if _model_of(subject) != model:
                continue
            after = 0
            while len(out) < limit and (w := await self._read(subject, after)) is not None:
                out.append(w)
                after = w.seq
        return out

    async def heads(self) -> list[Waiter]:
        """The first waiter of every (priority, model, client), highest priority first."""
        out = []
        for subject in await self.subjects():
            head = await self._read(subject)
            if head is not None:
                out.append(dataclasses.replace(head, head=True))
        return out

    async def all(self, limit: int = 10_000) -> list[Waiter]:
        """Every waiter in serving order (status, reconcile); at most `limit`."""
        out: list[Waiter] = []
        for subject in await self.subjects():
            after = 0
            while len(out) < limit and (w := await self._read(subject, after)) is not None:
                out.append(dataclasses.replace(w, head=True) if after == 0 else w)
                after = w.seq
        return out

    async def wake(self, waiter: Waiter, trigger: str) -> None:
        """Re-publish the stored request to the chat function. `trigger` names the event that
        woke it: wakes by one trigger are deduplicated, a later trigger wakes it again."""
        headers = dict(waiter.headers)
        for h in _OURS:
            headers.pop(h, None)
        headers["ce-oawake"] = str(waiter.seq)  # tells the chat function it was parked
        headers["Nats-Msg-Id"] = f"{waiter.task_id}.wake.{waiter.seq}.{trigger}"[:240]
        # Back under its client's name (the parked event kept the one its subject gave it).
        client = headers.get(f"ce-{CLIENT_EXTENSION}", "")
        if not CLIENT_RE.match(client):  # parked before clients were named: it cannot go back
            log.warning(
                "waiter %d (task %s) names no client; not woken", waiter.seq, waiter.task_id
            )
            return
        await self.js.publish(
            subject_for("chat.requested", client=client), waiter.body, headers=headers
        )

    def wake_heads_soon(self, trigger: str) -> None:
        """`wake_heads` in the background. Calls while one runs are coalesced into one more
        run after it (which sees every release before it started), so a burst of releases
        costs a couple of reads, not one each."""
        if self._waker is not None and not self._waker.done():
            self._next_trigger = trigger
            return
        self._waker = asyncio.create_task(self._wake_loop(trigger))

    async def _wake_loop(self, trigger: str | None) -> None:
        while trigger is not None:
            self._next_trigger = None
            try:
                # A bus electing a new leader does not answer for a few seconds: a wake lost
                # there would leave the waiters parked beside free memory. Wait it out.
                await wait_out(functools.partial(self.wake_heads, trigger), WAKE_WAIT_S, "waking")
            except Exception as exc:  # reconcile's sweep wakes them (WAKE_SWEEP_S)
                log.warning("waking the waiters failed: %r", exc)
            trigger = self._next_trigger

    async def wake_heads(self, trigger: str, models: set[str] | None = None) -> int:
        """Wake the head of every (priority, model, client) — or only of `models`. Returns
        how many."""
        woken = 0
        if not await self.any():
            return 0
        for head in await self.heads():
            if models is None or head.model in models:
                await self.wake(head, trigger)
                woken += 1
        if woken:
            log.info("woke %d waiter(s) trigger=%s", woken, trigger)
        return woken


def _waiter(seq: int, headers: dict[str, str], body: bytes) -> Waiter:
    return Waiter(
        seq=seq,
        task_id=headers.get(H_TASK, ""),
        source=headers.get(H_SOURCE, ""),
        model=headers.get(H_MODEL, ""),
        priority=int(headers.get(H_PRIORITY, "0") or 0),
        since=float(headers.get(H_SINCE, "0") or 0),
        headers=headers,
        body=body,
    )


def _model_of(subject: str) -> str | None:
    """The model of `ollama.waiting.p<rank>.<model>[.<client>]` (waiters parked before
    clients were named have no client segment)."""
    parts = subject.split(".")
    try:
        return decode_name(parts[3]) if len(parts) >= 4 else None
    except ValueError:
        return None
