"""Task records (bucket `tasks`, key `task.<task_id>`) and the queue (`queue.<task_id>`).

A task is one chat request: its state, where it ran, its timings and its error. The queue
entries exist while a request waits for memory; their count is the queue depth.
"""

from __future__ import annotations

from typing import Literal

from nats.js.errors import KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from events.bus import snapshot
from events.keys import queue_key, task_key

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

    async def enqueue(self, entry: QueueEntry) -> None:
        await self.kv.put(queue_key(entry.task_id), entry.model_dump_json().encode())

    async def dequeue(self, task_id: str) -> None:
        try:
            await self.kv.delete(queue_key(task_id))
        except (KeyNotFoundError, KeyDeletedError):
            pass

    async def queue(self) -> list[QueueEntry]:
        entries = await snapshot(self.kv, "queue.*")
        out = [QueueEntry.model_validate_json(e.value) for e in entries if e.value]
        return sorted(out, key=lambda e: e.since)
