"""A client of the running system, through NATS only: send a chat, receive its stream."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS

from events import bus
from events.auth import DEFAULT_CLIENT
from events.codec import Event, decode
from events.types import ChatCancel, ChatRequested, ChatToken, subject_for


@dataclass
class ChatResult:
    task_id: str
    chat_id: str
    end: Event | None = None  # chat.completed or chat.failed
    tokens: list[ChatToken] = field(default_factory=list)
    published_at: float = 0.0

    def text(self, attempt: int | None = None) -> str:
        attempt = attempt or max((t.attempt for t in self.tokens), default=1)
        return "".join(t.text for t in self.tokens if t.attempt == attempt)


def client_name(nc: NATS) -> str:
    """The client segment a connection's chats go under: its user ("client" with no auth)."""
    return bus.user_of(nc) or DEFAULT_CLIENT


class ChatSession:
    """Subscribe first, then publish, so no token can be missed. The request goes out as
    `client` (by default the connection's user), and only that client's tokens and ends
    are read."""

    def __init__(
        self,
        nc: NATS,
        request: ChatRequested,
        on_token: Callable[[ChatToken], None] | None = None,
        client: str | None = None,
    ) -> None:
        self.nc, self.request, self.on_token = nc, request, on_token
        self.client = client or client_name(nc)
        self.event = Event("chat.requested", request.model_dump(exclude_none=True))
        self.result = ChatResult(task_id=self.event.id, chat_id=request.chat_id)
        self._end: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._subs: list[Any] = []

    async def start(self) -> ChatSession:
        seen: set[tuple[int, int]] = set()

        async def on_token(msg: Any) -> None:
            tok = ChatToken.model_validate(decode(msg.headers, msg.data).data)
            # A token JetStream did not acknowledge is sent again: the second copy is dropped.
            if tok.task_id == self.result.task_id and (tok.attempt, tok.seq) not in seen:
                seen.add((tok.attempt, tok.seq))
                self.result.tokens.append(tok)
                if self.on_token:
                    self.on_token(tok)

        async def on_end(msg: Any) -> None:
            ev = decode(msg.headers, msg.data)
            if (
                isinstance(ev.data, dict)
                and ev.data.get("task_id") == self.result.task_id
                and not self._end.done()
            ):
                self._end.set_result(ev)

        c, chat_id = self.client, self.request.chat_id
        self._subs = [
            await self.nc.subscribe(subject_for("chat.token", chat_id, c), cb=on_token),
            await self.nc.subscribe(subject_for("chat.completed", client=c), cb=on_end),
            await self.nc.subscribe(subject_for("chat.failed", client=c), cb=on_end),
        ]
        await self.nc.flush()
        self.result.published_at = time.time()
        await bus.publish(self.nc.jetstream(), self.event, client=c)
        return self

    async def cancel(self) -> None:
        """Publish `chat.cancel` for this request: it ends with `chat.failed` `cancelled`."""
        data = ChatCancel(chat_id=self.request.chat_id, task_id=self.result.task_id)
        await bus.publish(
            self.nc.jetstream(), Event("chat.cancel", data.model_dump()), client=self.client
        )

    @property
    def done(self) -> bool:
        return self._end.done()

    async def ended_within(self, timeout: float) -> bool:
        """Wait up to `timeout` for the end event without consuming it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._end), timeout)
        return self._end.done()

    async def wait(self, timeout: float) -> ChatResult:
        """Wait for the end event (TimeoutError after `timeout`) and the last tokens."""
        self.result.end = await asyncio.wait_for(asyncio.shield(self._end), timeout)
        if self.result.end.type == "chat.completed":
            stats = self.result.end.data["stats"]
            # Tokens and the end travel on different subjects: let the last tokens land.
            deadline = time.monotonic() + 2.0
            while (
                sum(t.attempt == stats["attempt"] for t in self.result.tokens) < stats["tokens"]
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.01)
        for sub in self._subs:
            await sub.unsubscribe()
        return self.result


async def chat(
    nc: NATS,
    model: str,
    prompt: str,
    timeout: float = 120.0,
    chat_id: str | None = None,
    **options: Any,
) -> ChatResult:
    import uuid

    req = ChatRequested(
        chat_id=chat_id or uuid.uuid4().hex[:16],
        model=model,
        messages=[{"role": "user", "content": prompt}],
        options=options,
    )
    session = await ChatSession(nc, req).start()
    return await session.wait(timeout)
