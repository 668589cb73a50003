"""The chat function: `chat.requested` -> lease or place the model -> stream `chat.token`s ->
one `chat.completed` or `chat.failed`.

Idempotent under redelivery: the task id is the event id, leases are keyed by task id, and
the terminal event is published with a fixed Nats-Msg-Id, so a re-run after a worker died
re-takes the same lease and the client still sees exactly one end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime

from pydantic import ValidationError

from events import bus
from events.codec import Event
from events.dispatcher import backoff
from events.outcome import Done, Outcome, Reject, Retry
from events.types import (
    CHAT_ID_RE,
    ChatCompleted,
    ChatFailed,
    ChatRequested,
    ChatStats,
    ChatToken,
    ErrorInfo,
    ModelLoad,
)

from . import planner, state
from .context import Services
from .evict import request_evict
from .runtimes.base import RuntimeFailure
from .state import NodeRecord, TransitionError
from .tasks import TERMINAL, QueueEntry, TaskRecord

log = logging.getLogger("functions.chat")
LEASE_RENEW_S = 20.0


def _event_time(event: Event, now: float) -> float:
    if event.time:
        try:
            t = datetime.fromisoformat(event.time).timestamp()
            if now - 86400 < t <= now + 1:
                return t
        except ValueError:
            pass
    return now


async def _fail(svc: Services, task: TaskRecord, code: str, message: str) -> None:
    was_queued = task.state == "queued"
    task.state, task.error, task.updated_at = (
        "failed",
        {"code": code, "message": message},
        time.time(),
    )
    await svc.tasks.put(task)
    if was_queued:
        await svc.tasks.dequeue(task.task_id)
    data = ChatFailed(
        chat_id=task.chat_id, task_id=task.task_id, error=ErrorInfo(code=code, message=message)
    )
    await bus.publish(svc.js, Event("chat.failed", data.model_dump()), msg_id=f"{task.task_id}.end")
    log.info(
        "chat.failed task_id=%s chat_id=%s model=%s code=%s",
        task.task_id,
        task.chat_id,
        task.model,
        code,
    )


async def _lease_ready(svc: Services, req: ChatRequested, task_id: str) -> NodeRecord | None:
    """Take a lease on a node where the model is ready (least active first)."""
    now = time.time()
    nodes = [rv for rv in await svc.fleet.nodes() if planner.node_is_live(rv[0], now)]
    ready = sorted(
        (rv for rv in nodes if (s := rv[0].models.get(req.model)) and s.state == "ready"),
        key=lambda rv: (rv[0].models[req.model].active, rv[0].node_id),
    )
    loading = [rv for rv in nodes if (s := rv[0].models.get(req.model)) and s.state == "loading"]
    # Ready copies first; else reserve our place on a copy that is already loading.
    for record, rev in ready + loading:
        try:
            return await svc.fleet.update(
                record.node_id,
                lambda r: state.take_lease(r, req.model, task_id, time.time()),
                known=(record, rev),
            )
        except TransitionError:
            continue
    return None


async def _wait_ready(svc: Services, node_id: str, model: str) -> NodeRecord:
    def settled(r: NodeRecord) -> bool:
        slot = r.models.get(model)
        return slot is None or slot.state != "loading"

    return await svc.fleet.wait_for(node_id, settled, svc.settings.load_timeout_s)


async def _renew(svc: Services, node_id: str, model: str, task_id: str) -> None:
    while True:
        await asyncio.sleep(LEASE_RENEW_S)
        with contextlib.suppress(TransitionError, TimeoutError):
            await svc.fleet.update(
                node_id, lambda r: state.take_lease(r, model, task_id, time.time())
            )


async def handle(svc: Services, event: Event, attempt: int) -> Outcome:
    try:
        req = ChatRequested.model_validate(event.data)
    except ValidationError as exc:
        reason = f"invalid chat.requested data: {exc.errors(include_url=False)}"
        chat_id = event.data.get("chat_id") if isinstance(event.data, dict) else None
        if isinstance(chat_id, str) and CHAT_ID_RE.match(chat_id):
            task = TaskRecord(
                task_id=event.id,
                chat_id=chat_id,
                model="?",
                state="failed",
                created_at=time.time(),
                updated_at=time.time(),
            )
            await _fail(svc, task, "invalid_request", reason)
        return Reject(reason)

    task_id, now = event.id, time.time()
    # Independent reads go out together: each is a round trip to NATS on the TTFT path.
    task, info = await asyncio.gather(svc.tasks.get(task_id), svc.catalog.get(req.model))
    if task and task.state in TERMINAL:
        return Done("duplicate delivery of a finished task")
    if task is None:
        task = TaskRecord(
            task_id=task_id,
            chat_id=req.chat_id,
            model=req.model,
            state="placing",
            created_at=_event_time(event, now),
            updated_at=now,
        )
    task.attempt = attempt

    if info is None:
        known = ", ".join(m.name for m in await svc.catalog.all()) or "none"
        msg = f"unknown model {req.model!r}; the catalog has: {known}"
        await _fail(svc, task, "unknown_model", msg)
        return Reject(msg)
    context = req.options.num_ctx or info.context or 2048
    est_tokens = req.prompt_chars() / svc.settings.chars_per_token
    if est_tokens > context:
        msg = (
            f"prompt of ~{est_tokens:.0f} tokens exceeds the {context}-token context of "
            f"{req.model}; shorten it or raise options.num_ctx"
        )
        await _fail(svc, task, "prompt_too_long", msg)
        return Reject(msg)

    # 1. A lease on a ready (or already loading) copy, else a placement.
    record = await _lease_ready(svc, req, task_id)
    placed_at = time.time()
    if record is None:
        queue = [e for e in await svc.tasks.queue() if e.task_id != task_id]
        peers = [e for e in queue if e.model == req.model]
        now = time.time()
        result = await svc.fleet.place(
            planner.PlanRequest(
                req.model,
                info.bytes,
                frozenset(e.model for e in queue if e.model != req.model),
                waited_s=now - task.created_at + sum(now - e.since for e in peers),
                waiting=1 + len(peers),
            ),
            time.time(),
            svc.settings.policy,
            task_id,
            reason=f"chat {task_id}",
        )
        if isinstance(result, planner.Reject):
            await _fail(svc, task, "model_too_large", result.reason)
            return Reject(result.reason)
        if isinstance(result, planner.Queue):
            if task.state != "queued":
                task.state, task.reason, task.updated_at = "queued", result.reason, time.time()
                await svc.tasks.put(task)
                await svc.tasks.enqueue(
                    QueueEntry(
                        task_id=task_id, model=req.model, since=time.time(), reason=result.reason
                    )
                )
                log.info("queued task_id=%s model=%s reason=%s", task_id, req.model, result.reason)
            delay = min(2.0, svc.settings.queue_retry_s * (1 + attempt / 10))
            return Retry(
                min(delay, result.retry_s) if result.retry_s is not None else delay,
                result.reason,
                failure=False,
            )
        placed_at = time.time()
        for victim in result.evict:
            await request_evict(svc, victim, result.node_id, f"make room for {req.model}")
        await bus.publish(
            svc.js,
            Event(
                "model.load",
                ModelLoad(
                    model=req.model, node=result.node_id, reason="chat", task_id=task_id
                ).model_dump(),
            ),
            msg_id=f"{task_id}.load.{attempt}",
        )
        log.info(
            "placed task_id=%s model=%s node=%s evict=%s policy=%s",
            task_id,
            req.model,
            result.node_id,
            list(result.evict),
            svc.settings.policy,
        )
        record, _ = await svc.fleet.get(result.node_id)
    if task.state == "queued":
        await svc.tasks.dequeue(task_id)
    queue_ms = (placed_at - task.created_at) * 1000

    node_id = record.node_id
    slot = record.models.get(req.model)
    load_ms = 0.0
    if slot is not None and slot.state == "loading":
        task.state, task.node, task.updated_at = "loading", node_id, time.time()
        await svc.tasks.put(task)
        try:
            record = await _wait_ready(svc, node_id, req.model)
        except TimeoutError as exc:
            await svc.fleet.update(
                node_id, lambda r: state.release_lease(r, req.model, task_id, time.time(), 0)
            )
            return Retry(backoff(attempt), str(exc))
        slot = record.models.get(req.model)
        if slot is None:
            err = record.errors.get(req.model, "the load was abandoned")
            await _fail(svc, task, "load_failed", f"{req.model} on {node_id}: {err}")
            return Done("load failed")
        load_ms = (time.time() - placed_at) * 1000

    # 2. Stream.
    task.state, task.node, task.updated_at = "running", node_id, time.time()
    # Recorded while the runtime starts on the prompt, not before it (it is only a status).
    running_saved = asyncio.create_task(svc.tasks.put(task.model_copy()))
    runtime = svc.runtime(record.runtime, record.url)
    renew = asyncio.create_task(_renew(svc, node_id, req.model, task_id))
    messages = [m.model_dump() for m in req.messages]
    pieces: list[str] = []
    t_stream = time.time()
    first_at: float | None = None
    try:
        async for text in runtime.chat(req.model, messages, req.options.model_dump()):
            if first_at is None:
                first_at = time.time()
            token = ChatToken(
                chat_id=req.chat_id, task_id=task_id, seq=len(pieces), text=text, attempt=attempt
            )
            await bus.publish_fast(
                svc.nc, Event("chat.token", token.model_dump()), chat_id=req.chat_id
            )
            pieces.append(text)
    except RuntimeFailure as exc:
        renew.cancel()
        await running_saved  # so the failed state is written after it, never before
        await svc.fleet.update(
            node_id,
            lambda r: state.release_lease(
                r, req.model, task_id, time.time(), svc.settings.keep_alive_s
            ),
        )
        if exc.code == "model_not_loaded" and attempt < 5:
            return Retry(backoff(attempt), f"runtime lost {req.model}: {exc}")
        await _fail(svc, task, exc.code, str(exc))
        return Done("runtime failure reported")
    except Exception:
        renew.cancel()
        await asyncio.gather(running_saved, return_exceptions=True)
        raise
    renew.cancel()
    await running_saved
    end = time.time()
    keep_alive = req.options.keep_alive_s
    first_at = first_at or end
    gen_s = max(1e-6, end - first_at)
    stats = ChatStats(
        queue_ms=round(queue_ms, 1),
        load_ms=round(load_ms, 1),
        ttft_ms=round((first_at - task.created_at) * 1000, 1),
        total_ms=round((end - task.created_at) * 1000, 1),
        tokens=len(pieces),
        tokens_per_s=round((len(pieces) - 1) / gen_s, 1) if len(pieces) > 1 else 0.0,
        node=node_id,
        model=req.model,
        attempt=attempt,
    )
    task.state, task.updated_at = "done", end
    task.timings = {
        "queue_ms": stats.queue_ms,
        "load_ms": stats.load_ms,
        "ttft_ms": stats.ttft_ms,
        "total_ms": stats.total_ms,
        "stream_ms": round((end - t_stream) * 1000, 1),
    }
    done = ChatCompleted(chat_id=req.chat_id, task_id=task_id, text="".join(pieces), stats=stats)
    # Three independent writes, together. If this worker dies between them, the message is
    # not acked: the redelivery finds no `done` task, re-runs, and its chat.completed carries
    # the same Nats-Msg-Id, so the client still sees one end; a lease left behind expires.
    await asyncio.gather(
        svc.fleet.update(
            node_id,
            lambda r: state.release_lease(
                r,
                req.model,
                task_id,
                end,
                svc.settings.keep_alive_s if keep_alive is None else keep_alive,
            ),
        ),
        svc.tasks.put(task),
        bus.publish(svc.js, Event("chat.completed", done.model_dump()), msg_id=f"{task_id}.end"),
    )
    log.info(
        "chat.completed task_id=%s chat_id=%s model=%s node=%s tokens=%d ttft_ms=%.0f",
        task_id,
        req.chat_id,
        req.model,
        node_id,
        len(pieces),
        stats.ttft_ms,
    )
    return Done()
