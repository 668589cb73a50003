"""Task records (bucket `tasks`, key `task.<task_id>`) and the queue (key `queue`).

A task is one chat request: its state, where it ran, its timings and its error. The queue
holds the requests waiting for memory; its length is the queue depth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from events.keys import task_key

TaskState = Literal["queued", "placing", "loading", "running", "done", "failed"]
TERMINAL: frozenset[str] = frozenset({"done", "failed"})


class TaskRecord(BaseModel):
    task_id: str
    chat_id: str
    model: str
    state: TaskState
    node: str | None = None
    created_at: float
    updated_at: float
    attempt: int = 1
    timings: dict[str, float] = Field(default_factory=dict)
    error: dict[str, str] | None = None
    reason: str = ""


class QueueEntry(BaseModel):
    task_id: str
    model: str
    since: float
    reason: str


class QueueTable(BaseModel):
    entries: dict[str, QueueEntry] = Field(default_factory=dict)


QUEUE_KEY = "queue"


class Tasks:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, task_id: str) -> TaskRecord | None:
        try:
            entry = await self.kv.get(task_key(task_id))
        except (KeyNotFoundError, KeyDeletedError):
            return None
        return TaskRecord.model_validate_json(entry.value) if entry.value else None

    async def put(self, record: TaskRecord) -> None:
        await self.kv.put(task_key(record.task_id), record.model_dump_json().encode())

    async def _change_queue(self, change: Callable[[dict[str, QueueEntry]], None]) -> None:
        """Compare-and-set on the one `queue` key; enqueue/dequeue happen only when memory
        is short, so this key is not on the hot path of a chat that fits."""
        for _ in range(200):
            try:
                entry = await self.kv.get(QUEUE_KEY)
                rev: int | None = entry.revision
                table = QueueTable.model_validate_json(entry.value or b"{}")
            except (KeyNotFoundError, KeyDeletedError):
                rev, table = None, QueueTable()
            change(table.entries)
            data = table.model_dump_json().encode()
            try:
                if rev is None:
                    await self.kv.create(QUEUE_KEY, data)
                else:
                    await self.kv.update(QUEUE_KEY, data, last=rev)
                return
            except KeyWrongLastSequenceError:
                continue
        raise TimeoutError("the queue key lost 200 compare-and-set races in a row")

    async def enqueue(self, entry: QueueEntry) -> None:
        await self._change_queue(lambda q: q.__setitem__(entry.task_id, entry))

    async def dequeue(self, task_id: str) -> None:
        await self._change_queue(lambda q: q.pop(task_id, None) and None)

    async def queue(self) -> list[QueueEntry]:
        """Waiting requests, oldest first (one read)."""
        try:
            entry = await self.kv.get(QUEUE_KEY)
        except (KeyNotFoundError, KeyDeletedError):
            return []
        table = QueueTable.model_validate_json(entry.value or b"{}")
        return sorted(table.entries.values(), key=lambda e: e.since)
