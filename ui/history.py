"""Chat history in the JetStream KV bucket `chats`: one key per chat, scoped to its owner.

Key: `chat.<owner>.<chat_id>` (the owner is the signed-in user when auth is on, else a
browser's own id). A record holds the chat's settings, its messages and the request it is
waiting on, so a reloaded page picks the answer up where it is, and a restarted app still
has every chat.
"""

from __future__ import annotations

import time
import uuid

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from events.bus import values_matching
from events.keys import encode_name

CHATS_BUCKET = "chats"


class Turn(BaseModel):
    role: str  # user | assistant | error
    content: str
    task_id: str | None = None
    stats: dict[str, float | int | str] | None = None


class Pending(BaseModel):
    task_id: str
    source: str
    started: float


class ChatRecord(BaseModel):
    chat_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    title: str = "New chat"
    model: str = ""
    system: str = ""
    temperature: float = 0.7
    max_tokens: int = 256
    turns: list[Turn] = Field(default_factory=list)
    pending: Pending | None = None
    updated_at: float = Field(default_factory=time.time)


class History:
    def __init__(self, kv: KeyValue, js: JetStreamContext, owner: str) -> None:
        self.kv, self.js, self.owner = kv, js, encode_name(owner)

    @classmethod
    async def open(cls, js: JetStreamContext, owner: str) -> History:
        try:
            kv = await js.key_value(CHATS_BUCKET)
        except BucketNotFoundError:
            kv = await js.create_key_value(
                KeyValueConfig(bucket=CHATS_BUCKET, history=1, storage=StorageType.FILE)
            )
        return cls(kv, js, owner)

    def _key(self, chat_id: str) -> str:
        return f"chat.{self.owner}.{encode_name(chat_id)}"

    async def list(self) -> list[ChatRecord]:
        values = await values_matching(self.js, self.kv, CHATS_BUCKET, f"chat.{self.owner}.*")
        out = [ChatRecord.model_validate_json(v) for v in values]
        return sorted(out, key=lambda c: -c.updated_at)

    async def get(self, chat_id: str) -> ChatRecord | None:
        try:
            entry = await self.kv.get(self._key(chat_id))
        except (KeyNotFoundError, KeyDeletedError):
            return None
        return ChatRecord.model_validate_json(entry.value) if entry.value else None

    async def finish(self, chat_id: str, pending_task: str, turn: Turn) -> ChatRecord | None:
        """Record an answer once, on the stored chat (two pages of one person may both have
        followed it)."""
        chat = await self.get(chat_id)
        if chat is None:
            return None
        if not any(t.task_id == pending_task and t.role != "user" for t in chat.turns):
            chat.turns.append(turn)
        if chat.pending is not None and chat.pending.task_id == pending_task:
            chat.pending = None
        await self.save(chat)
        return chat

    async def save(self, chat: ChatRecord) -> None:
        chat.updated_at = time.time()
        await self.kv.put(self._key(chat.chat_id), chat.model_dump_json().encode())

    async def delete(self, chat_id: str) -> None:
        await self.kv.purge(self._key(chat_id))
