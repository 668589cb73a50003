"""Task records (bucket `tasks`, key `task.<source hash>.<encoded id>`).

A task is one chat request. Its identity is its CloudEvent source + id (the id alone is the
`task_id` clients see in tokens and ends). The record holds its state, where it ran, its
timings, its error, and two things that make delivery exactly-once in effect:

- an owner: the run handling it now and until when (renewed while it runs), claimed by
  compare-and-set, so two deliveries of one request never run at once, and a run whose
  process died is taken over once its claim expires;
- its end: the terminal event, stored when the task ends, so any later delivery of the same
  request gets that end again instead of silence.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from events.bus import TASKS_BUCKET, values_matching
from events.keys import encode_name

TaskState = Literal["queued", "placing", "loading", "running", "done", "failed"]
TERMINAL: frozenset[str] = frozenset({"done", "failed"})
WAITING_STATES: frozenset[str] = frozenset({"queued"})


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:12]


def task_key(source: str, task_id: str) -> str:
    return f"task.{source_hash(source)}.{encode_name(task_id)}"


class TaskRecord(BaseModel):
    task_id: str
    source: str = ""
    client: str = ""  # the bus identity that asked: its ends go to its subjects only
    chat_id: str
    model: str
    state: TaskState
    priority: int = 0
    node: str | None = None
    created_at: float
    updated_at: float
    runs: int = 0  # generations started; tokens carry it as `attempt`
    timings: dict[str, float] = Field(default_factory=dict)
    error: dict[str, str] | None = None
    reason: str = ""
    owner: str | None = None  # the run handling it now
    owner_until: float = 0.0
    waiter_seq: int | None = None  # its entry in the waiting stream while parked
    wake_at: float | None = None  # admission deferral ends then, if nothing else wakes it
    waited_s: float = 0.0  # time spent parked so far (for admission and queue_ms)
    end: dict[str, Any] | None = None  # {"type": ..., "data": ...} once it ended
    cancel_requested: bool = False  # a chat.cancel came while another run held the task

    @property
    def key(self) -> str:
        return task_key(self.source, self.task_id)

    def owned_by_other(self, run_id: str, now: float) -> bool:
        return self.owner is not None and self.owner != run_id and self.owner_until > now


class Conflict(RuntimeError):
    """Another writer changed the task first."""


@dataclass
class Versioned:
    record: TaskRecord
    revision: int


class Tasks:
    def __init__(self, kv: KeyValue, js: JetStreamContext | None = None) -> None:
        self.kv, self.js = kv, js

    async def get(self, source: str, task_id: str) -> Versioned | None:
        try:
            entry = await self.kv.get(task_key(source, task_id))
        except (KeyNotFoundError, KeyDeletedError):
            return None
        if not entry.value:
            return None
        return Versioned(TaskRecord.model_validate_json(entry.value), entry.revision or 0)

    async def find(self, task_id: str) -> list[TaskRecord]:
        """Every task with this id, whatever its source (the CLI's `task ID`)."""
        assert self.js is not None, "find needs the JetStream context"
        pattern = f"task.*.{encode_name(task_id)}"
        values = await values_matching(self.js, self.kv, TASKS_BUCKET, pattern)
        return [TaskRecord.model_validate_json(v) for v in values]

    async def create(self, record: TaskRecord) -> int:
        """Write a new record; Conflict if the task exists already."""
        try:
            return await self.kv.create(record.key, record.model_dump_json().encode())
        except KeyWrongLastSequenceError:
            raise Conflict(f"task {record.task_id} exists") from None

    async def update(self, record: TaskRecord, revision: int) -> int:
        """Compare-and-set; Conflict if someone else wrote since `revision`."""
        try:
            return await self.kv.update(
                record.key, record.model_dump_json().encode(), last=revision
            )
        except KeyWrongLastSequenceError:
            raise Conflict(f"task {record.task_id} changed under us") from None

    async def put(self, record: TaskRecord) -> int:
        return await self.kv.put(record.key, record.model_dump_json().encode())
