"""The gateway's side of the bus: one NATS connection (identity `gateway`), one subscription
per kind of event, and the chats and pulls in flight, each fed by its task id.

A chat's tokens come in order of `seq` within an attempt; a copy JetStream did not acknowledge
may come twice and is dropped. Its end (`chat.completed`) carries the whole text, which is the
truth: what the tokens did not bring is taken from it. A worker that died mid-answer restarts
it with a higher attempt; what an HTTP client already received cannot be taken back, so such an
answer ends with an error (`Restarted`) and the new generation is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from events import bus
from events.codec import CodecError, Event, decode
from events.types import (
    ChatCancel,
    ChatRequested,
    ChatToken,
    ModelEvict,
    ModelLoad,
    ModelPull,
    client_of,
    subject_filter,
    subject_for,
)
from functions.services import Services, Settings, open_services

log = logging.getLogger("gateway")


QUIET_S = 10.0  # no token nor end for this long: look for the end in the task record


class Restarted(RuntimeError):
    """The answer was being regenerated after part of it had been sent."""


@dataclass
class Chat:
    """One request through the bus: its text pieces in order, then its end."""

    gateway: Gateway
    request: ChatRequested
    event: Event = field(init=False)
    end: Event | None = None
    sent: str = ""  # the text handed out so far
    attempt: int | None = None
    _queue: asyncio.Queue[ChatToken | Event] = field(default_factory=asyncio.Queue)
    _held: dict[int, str] = field(default_factory=dict)  # tokens that came early, by seq
    _next: int = 0

    def __post_init__(self) -> None:
        self.event = Event("chat.requested", self.request.model_dump(exclude_none=True))

    @property
    def task_id(self) -> str:
        return self.event.id

    def heard(self, item: ChatToken | Event) -> None:
        self._queue.put_nowait(item)

    async def _receive(self) -> ChatToken | Event:
        """The next token or end. Tokens and ends come over core NATS, so one published
        while this connection was reconnecting is never heard: after a quiet spell the task
        record is read, and an end stored there is taken from it."""
        while True:
            try:
                return await asyncio.wait_for(self._queue.get(), QUIET_S)
            except TimeoutError:
                end = await self.gateway.stored_end(self)
                if end is not None:
                    return end

    async def until_end(self) -> Event:
        """Wait for the end only (a whole answer: its text is in the end)."""
        while True:
            item = await self._receive()
            if isinstance(item, Event):
                self.end = item
                return item

    async def pieces(self) -> AsyncIterator[str]:
        """The answer's text pieces as they come; returns once the end has come (`end`)."""
        while True:
            item = await self._receive()
            if isinstance(item, Event):
                self.end = item
                if item.type == "chat.completed":
                    text, final = item.data.get("text", ""), item.data["stats"].get("attempt", 1)
                    if self.sent and (final != self.attempt or not text.startswith(self.sent)):
                        raise Restarted("the answer was regenerated after part of it was sent")
                    if len(text) > len(self.sent):
                        rest, self.sent = text[len(self.sent) :], text
                        yield rest
                return
            tok = item
            if self.attempt is None or tok.attempt > self.attempt:
                if self.sent:
                    raise Restarted(
                        f"its worker restarted and began the answer again (attempt {tok.attempt})"
                    )
                self.attempt, self._held, self._next = tok.attempt, {}, 0
            if tok.attempt < self.attempt or tok.seq < self._next:
                continue  # an older attempt's, or a copy of one already handed out
            self._held[tok.seq] = tok.text
            while self._next in self._held:
                text = self._held.pop(self._next)
                self._next += 1
                self.sent += text
                yield text

    async def cancel(self) -> bool:
        """Publish `chat.cancel` (the client went away): generation stops, the lease goes.
        False if the chat had ended already (nothing to cancel) or the bus refused."""
        if self.end is not None:
            return False
        data = ChatCancel(chat_id=self.request.chat_id, task_id=self.task_id)
        try:
            await bus.publish(
                self.gateway.svc.js,
                Event("chat.cancel", data.model_dump()),
                client=self.gateway.client,
            )
        except Exception as exc:  # the run goes on; its lease is released when it ends
            log.warning("chat.cancel of task_id=%s not published: %r", self.task_id, exc)
            return False
        return True

    def close(self) -> None:
        self.gateway.chats.pop(self.task_id, None)


@dataclass
class Pull:
    """One `model.pull` through the bus: its progress events, then its end."""

    event: Event
    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)


Listener = Callable[[str, Event | dict[str, Any], str | None], None]


class Gateway:
    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.client = bus.user_of(svc.nc) or "client"  # the subject segment of its chats
        self.chats: dict[str, Chat] = {}
        self.pulls: dict[str, Pull] = {}
        self.listeners: list[Listener] = []  # the metrics: every event the gateway hears
        self.metrics: Any = None  # the app's FleetMetrics (its gateway's own series)
        self._subs: list[Any] = []

    @classmethod
    async def open(cls, nats_url: str, ca: str | None = None) -> Gateway:
        nc = await bus.connect(nats_url, name="ollama-autoscaler-gateway", ca=ca)
        svc = await open_services(Settings(nats_url=nats_url), nc=nc)
        gw = cls(svc)
        await gw.subscribe()
        return gw

    async def subscribe(self) -> None:
        nc = self.svc.nc
        token_subject = subject_for("chat.token", "*", self.client)
        self._subs = [
            await nc.subscribe(token_subject, cb=self._token),
            await nc.subscribe(subject_filter("chat.completed"), cb=self._end),
            await nc.subscribe(subject_filter("chat.failed"), cb=self._end),
            await nc.subscribe("ollama.model.>", cb=self._model),
            await nc.subscribe(subject_for("planner.decided"), cb=self._heard),
            await nc.subscribe("ollama.deadletter.>", cb=self._dead),
        ]
        await nc.flush()

    async def close(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await self.svc.close()

    # -- what the bus says ---------------------------------------------------------------------
    def _tell(self, subject: str, what: Event | dict[str, Any], msg: Any = None) -> None:
        # The ends' message ids (JetStream's dedup key): a re-sent end is told once.
        headers = getattr(msg, "headers", None) or {}
        msg_id = headers.get("Nats-Msg-Id") if subject.startswith("ollama.chat.") else None
        for listener in self.listeners:
            try:
                listener(subject, what, msg_id)
            except Exception:  # a metric that fails must not stop the answers
                log.exception("metrics listener failed on %s", subject)

    async def _token(self, msg: Any) -> None:
        try:
            tok = ChatToken.model_validate(decode(msg.headers, msg.data).data)
        except (CodecError, ValueError):
            return
        chat = self.chats.get(tok.task_id)
        if chat is not None:
            chat.heard(tok)

    def _decoded(self, msg: Any) -> tuple[Event, str | None] | None:
        """The event of a message (told to the listeners), and its task id if it has one."""
        try:
            ev = decode(msg.headers, msg.data)
        except CodecError:
            return None
        self._tell(msg.subject, ev, msg)
        task_id = ev.data.get("task_id") if isinstance(ev.data, dict) else None
        return ev, task_id if isinstance(task_id, str) else None

    async def _end(self, msg: Any) -> None:
        got = self._decoded(msg)
        if got is not None and got[1] is not None and client_of(msg.subject) == self.client:
            chat = self.chats.get(got[1])
            if chat is not None:
                chat.heard(got[0])

    async def _model(self, msg: Any) -> None:
        got = self._decoded(msg)
        if got is not None and got[0].type.startswith("model.pull") and got[1] in self.pulls:
            self.pulls[got[1]].queue.put_nowait(got[0])  # type: ignore[index]

    async def _heard(self, msg: Any) -> None:
        with contextlib.suppress(CodecError):
            self._tell(msg.subject, decode(msg.headers, msg.data))

    async def _dead(self, msg: Any) -> None:
        import json

        try:
            record = json.loads(msg.data)
        except ValueError:
            return
        if isinstance(record, dict):
            self._tell(msg.subject, record)
            for pull in self.pulls.values():  # a refused pull never gets an end of its own
                if record.get("event_id") == pull.event.id:
                    pull.queue.put_nowait(Event("deadletter", record))

    async def stored_end(self, chat: Chat) -> Event | None:
        """The end the chat's task record holds, if it ended (None otherwise, or if the
        record cannot be read now)."""
        try:
            got = await self.svc.tasks.get(chat.event.source, chat.task_id)
        except Exception:
            return None
        end = got.record.end if got is not None else None
        return Event(end["type"], end["data"]) if end else None

    # -- what the gateway asks -----------------------------------------------------------------
    async def start_chat(self, request: ChatRequested) -> Chat:
        chat = Chat(self, request)
        self.chats[chat.task_id] = chat
        try:
            await bus.publish(self.svc.js, chat.event, client=self.client)
        except BaseException:
            chat.close()
            raise
        return chat

    async def start_pull(self, request: ModelPull) -> Pull:
        pull = Pull(Event("model.pull", request.model_dump(exclude_none=True)))
        self.pulls[pull.event.id] = pull
        try:
            await bus.publish(self.svc.js, pull.event)
        except BaseException:
            self.pulls.pop(pull.event.id, None)
            raise
        return pull

    async def load(self, model: str, timeout: float) -> tuple[str, float]:
        """Load `model` somewhere unless it is ready already: (node, seconds it took)."""
        t0 = time.monotonic()
        ready = await self._ready(model)
        if ready:
            return ready, 0.0
        event = Event("model.load", ModelLoad(model=model, reason="api").model_dump())
        await bus.publish(self.svc.js, event)
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            node = await self._ready(model)
            if node:
                return node, time.monotonic() - t0
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{model} was not ready within {timeout:.0f} s")

    async def _ready(self, model: str) -> str | None:
        for rec, _ in await self.svc.fleet.nodes():
            slot = rec.models.get(model)
            if slot is not None and slot.state == "ready":
                return rec.node_id
        return None

    async def unload(self, model: str) -> list[str]:
        """Ask every node holding `model` to evict it (after its requests finish, as Ollama
        does): the nodes asked."""
        nodes = [r.node_id for r, _ in await self.svc.fleet.nodes() if model in r.models]
        for node in nodes:
            data = ModelEvict(model=model, node=node, reason="api").model_dump()
            await bus.publish(self.svc.js, Event("model.evict", data))
        return nodes


def new_chat_id() -> str:
    return uuid.uuid4().hex[:16]
