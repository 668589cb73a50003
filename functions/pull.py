"""The pull function: `model.pull` -> the node's runtime fetches the model ->
`model.pull.progress` (at most a few a second) -> `model.pulled`, or `model.pull.failed`.

Ollama nodes pull from the Ollama library (`/api/pull`); llama.cpp nodes download a GGUF from
the event's `url` into their models directory (checked against `sha256`, read for its
architecture, size and quantization). The model then enters the catalog and the node's list of
models it can load. The task record (`pull.<id>` in the tasks bucket) follows every step.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from nats.js.errors import KeyDeletedError, KeyNotFoundError
from pydantic import BaseModel, ValidationError

from domain import planner
from domain.state import NodeRecord
from events import bus
from events.codec import Event
from events.keys import encode_name
from events.outcome import Done, Outcome, Reject, invalid
from events.types import ErrorInfo, ModelPull, ModelPulled, ModelPullFailed, ModelPullProgress
from runtimes import RuntimeFailure
from stores.catalog import ModelInfo, estimate_loaded_bytes
from stores.tasks import source_hash

from .services import Services

log = logging.getLogger("functions.pull")
PROGRESS_EVERY_S = 0.3  # at most ~3 progress events a second


class PullRecord(BaseModel):
    task_id: str
    model: str
    node: str
    state: str  # running | done | failed
    completed: int = 0
    total: int = 0
    status: str = ""
    error: dict[str, str] | None = None
    created_at: float
    updated_at: float


def pull_key(source: str, task_id: str) -> str:
    return f"pull.{source_hash(source)}.{encode_name(task_id)}"


async def _save(svc: Services, key: str, rec: PullRecord) -> None:
    rec.updated_at = time.time()
    await svc.tasks.kv.put(key, rec.model_dump_json().encode())


async def _node_for(svc: Services, req: ModelPull) -> NodeRecord | str:
    """The node named, else a live node whose runtime pulls this way (url: llama.cpp)."""
    if req.node is not None:
        try:
            record, _ = await svc.fleet.get(req.node)
        except (KeyNotFoundError, KeyDeletedError, ValueError):
            return f"unknown node {req.node!r}"
        return record
    want = "llamacpp" if req.url else "ollama"
    now = time.time()
    for record, _ in await svc.fleet.nodes():
        if record.runtime == want and planner.node_takes_work(record, now):
            return record
    how = "from a url" if req.url else "by name from the Ollama library"
    return f"no live {want} node to pull {req.model} {how}"


async def handle(svc: Services, event: Event, attempt: int) -> Outcome:
    try:
        req = ModelPull.model_validate(event.data)
    except ValidationError as exc:
        return Reject(invalid("model.pull", exc))
    key = pull_key(event.source, event.id)
    try:
        seen = await svc.tasks.kv.get(key)
        if seen.value and PullRecord.model_validate_json(seen.value).state in ("done", "failed"):
            return Done("this pull already ended")
    except (KeyNotFoundError, KeyDeletedError):
        pass
    node = await _node_for(svc, req)
    now = time.time()
    rec = PullRecord(
        task_id=event.id,
        model=req.model,
        node=node.node_id if isinstance(node, NodeRecord) else "",
        state="running",
        created_at=now,
        updated_at=now,
    )
    if not isinstance(node, NodeRecord):
        await _failed(svc, key, rec, "no_node", node)
        return Reject(node)
    await _save(svc, key, rec)
    last = 0.0

    async def progress(completed: int, total: int, status: str) -> None:
        nonlocal last
        if not total:  # a status line ("verifying …") without sizes: keep the last ones
            completed, total = rec.completed, rec.total
        t = time.monotonic()
        if t - last < PROGRESS_EVERY_S and status == rec.status and completed < total:
            return
        last = t
        rec.completed, rec.total, rec.status = completed, total, status
        data = ModelPullProgress(
            model=req.model,
            node=rec.node,
            task_id=event.id,
            status=status,
            completed=completed,
            total=total,
        )
        await bus.publish(svc.js, Event("model.pull.progress", data.model_dump()))
        await _save(svc, key, rec)

    runtime = await svc.runtime_of(node)
    try:
        result = await runtime.pull(req.model, req.url, req.sha256, progress)
    except RuntimeFailure as exc:
        await _failed(svc, key, rec, exc.code, str(exc))
        return Done(f"pull failed: {exc}")
    await svc.catalog.put(
        ModelInfo(
            name=req.model,
            bytes=estimate_loaded_bytes(result.bytes),
            file_bytes=result.bytes,
            digest=result.digest,
            family=result.family,
            params=result.params,
            quant=result.quant,
            context=result.context,
        )
    )
    available = await runtime.available()
    await svc.fleet.update(node.node_id, lambda r: _with_available(r, available))
    rec.state, rec.completed, rec.total = "done", result.bytes, result.bytes
    await _save(svc, key, rec)
    data = ModelPulled(model=req.model, node=node.node_id, task_id=event.id, bytes=result.bytes)
    await bus.publish(svc.js, Event("model.pulled", data.model_dump()))
    log.info("model.pulled model=%s node=%s bytes=%d", req.model, node.node_id, result.bytes)
    return Done()


def _with_available(r: NodeRecord, available: list[str]) -> NodeRecord:
    return r.model_copy(update={"available": available})


async def _failed(svc: Services, key: str, rec: PullRecord, code: str, message: str) -> None:
    rec.state, rec.error = "failed", {"code": code, "message": message}
    await _save(svc, key, rec)
    data: dict[str, Any] = ModelPullFailed(
        model=rec.model,
        node=rec.node or None,
        task_id=rec.task_id,
        error=ErrorInfo(code=code, message=message),
    ).model_dump()
    await bus.publish(svc.js, Event("model.pull.failed", data))
    log.warning("model.pull.failed model=%s node=%s code=%s %s", rec.model, rec.node, code, message)
