"""The chat function: `chat.requested` -> admit -> acquire -> stream -> finish.

  admit    validate; claim the task (its record, by compare-and-set, so two deliveries of one
           request never run at once); a request seen again after its end gets that end again
  acquire  a lease on a ready (or loading) copy, or a placement (evictions + `model.load`);
           when nothing fits, or admission defers the load, the request is *parked* in the
           waiting stream and its delivery acknowledged: it is woken by events, not retried
  stream   `chat.token` events; a stream the runtime cuts short is a failure
  finish   the end (`chat.completed` / `chat.failed`) is stored in the task, then published
           under the task's message id, then the lease is released and waiters are woken

Every path ends a request with exactly one end event; a redelivery re-sends the stored one
under the same `Nats-Msg-Id`, so JetStream's deduplication keeps it one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from domain import planner, state
from domain.state import NodeRecord, TransitionError
from events import bus
from events.codec import Event, to_binary
from events.outcome import Done, Outcome, Reject, Retry, invalid
from events.types import (
    CHAT_ID_RE,
    CLIENT_EXTENSION,
    ChatCompleted,
    ChatFailed,
    ChatRequested,
    ChatStats,
    ChatToken,
    ErrorInfo,
    ModelLoad,
    PlannerDecided,
    subject_for,
)
from runtimes import RuntimeFailure
from stores.tasks import TERMINAL, Conflict, TaskRecord, Versioned

from .evict import evict_for
from .services import Services

log = logging.getLogger("functions.chat")
LEASE_RENEW_S = 20.0
OWNER_TTL_S = 15.0  # a run's claim on its task; renewed every OWNER_RENEW_S while it runs
OWNER_RENEW_S = 5.0
WAKE_EXTENSION = "oawake"  # set on a re-published parked request


SAVE_WAIT_S = 10.0  # how long a task write waits out a bus that does not answer (< OWNER_TTL_S)


class Lost(RuntimeError):
    """Another run took this task over (our claim expired): stop, publish nothing."""


@dataclass
class Run:
    """One handling of one task: its record and revision, kept in step by `save`."""

    svc: Services
    rec: TaskRecord
    rev: int
    run_id: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    new: bool = False  # this run created the task: its request is new (counted for the rate)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    pieces: list[str] = field(default_factory=list)  # the answer so far
    # A lease taken on arrival beside the claim (a new request for a resident model needs
    # no other step before the runtime); `_acquire` takes it over, else it is given back.
    early: asyncio.Task[Lease | None] | None = None

    async def save(self, **changes: Any) -> None:
        """Apply `changes` to the task by compare-and-set; re-read on conflict. Lost if
        another run now owns the task. A bus that does not answer for a moment (a cluster
        electing a new leader, a restarting server) is waited out for up to SAVE_WAIT_S: a
        write that landed without its answer comes back as a conflict, re-read as ours."""
        async with self.lock:
            for _ in range(40):
                new = self.rec.model_copy(update={**changes, "updated_at": time.time()})
                try:
                    self.rev = await bus.wait_out(
                        lambda: self.svc.tasks.update(new, self.rev),  # noqa: B023
                        SAVE_WAIT_S,
                        f"task_id={self.rec.task_id} save",
                    )
                    self.rec = new
                    return
                except Conflict:
                    got = await self.svc.tasks.get(self.rec.source, self.rec.task_id)
                    if got is None or got.record.owner != self.run_id:
                        raise Lost(f"task {self.rec.task_id} was taken over") from None
                    self.rec, self.rev = got.record, got.revision
                    if self.rec.cancel_requested:  # written by the cancel function
                        self.cancelled.set()
            raise Lost(f"task {self.rec.task_id}: too many conflicting writes")


# -- ends -----------------------------------------------------------------------------------------
def _end_msg_id(task_id: str) -> str:
    return f"{task_id}.end"


async def _end(run: Run, event_type: str, data: dict[str, Any], **changes: Any) -> None:
    """Store the end in the task, then publish it. If the publish fails the handler raises,
    the delivery is retried, and the retry re-sends the stored end (same message id)."""
    await run.save(end={"type": event_type, "data": data}, owner=None, **changes)
    if run.rec.waiter_seq is not None:
        await run.svc.waiting.remove(run.rec.waiter_seq)
    await bus.publish(
        run.svc.js,
        Event(event_type, data),
        msg_id=_end_msg_id(run.rec.task_id),
        client=run.rec.client,
    )


async def _fail(run: Run, code: str, message: str, text: str = "") -> None:
    rec = run.rec
    data = ChatFailed(
        chat_id=rec.chat_id,
        task_id=rec.task_id,
        error=ErrorInfo(code=code, message=message),
        text=text,
        model=rec.model,
    ).model_dump()
    await _end(run, "chat.failed", data, state="failed", error={"code": code, "message": message})
    log.info(
        "chat.failed task_id=%s chat_id=%s model=%s code=%s",
        rec.task_id,
        rec.chat_id,
        rec.model,
        code,
    )


async def _fail_taking_back(run: Run, code: str, message: str, text: str = "") -> None:
    """`_fail` after the run's work was cancelled mid-write: a write of its own may have
    landed without its answer (a park's `owner=None`), which the run would then read as
    taken over, and the end would never be sent. A task nobody owns and not ended is taken
    back; one another run holds raises Lost (that run sees the flag and ends it)."""
    for _ in range(3):
        try:
            await _fail(run, code, message, text=text)
            return
        except Lost:
            got = await run.svc.tasks.get(run.rec.source, run.rec.task_id)
            if (
                got is None
                or got.record.state in TERMINAL
                or got.record.owned_by_other(run.run_id, time.time())
            ):
                raise
            run.rec, run.rev = got.record, got.revision  # unowned and not ended: ours again
    raise Lost(f"task {run.rec.task_id}: could not be taken back to end it")


async def resend_end(svc: Services, rec: TaskRecord, same_message: bool) -> None:
    """A request seen again after its end: send the stored end again. A redelivery of the
    same message uses the end's message id (JetStream keeps one); a new message that reuses
    the id gets a fresh one, so its sender hears the answer."""
    assert rec.end is not None
    msg_id = _end_msg_id(rec.task_id) if same_message else f"{rec.task_id}.end.{uuid.uuid4().hex}"
    await bus.publish(
        svc.js, Event(rec.end["type"], rec.end["data"]), msg_id=msg_id, client=rec.client
    )


async def give_up(svc: Services, event: Event, reason: str) -> None:
    """The dispatcher dead-lettered this request (it kept failing): end it for its client."""
    got = await svc.tasks.get(event.source, event.id)
    if got is None or got.record.state in TERMINAL:
        return
    if got.record.client != event.extensions.get(CLIENT_EXTENSION):
        return  # another client's task (a reused id): not this request's to end
    run = Run(svc, got.record, got.revision, got.record.owner or "dispatcher")
    with contextlib.suppress(Lost):
        await _fail(run, "gave_up", reason)


# -- admit ----------------------------------------------------------------------------------------
async def _reject_invalid(
    svc: Services, event: Event, client: str, exc: ValidationError
) -> Outcome:
    reason = invalid("chat.requested", exc)
    chat_id = event.data.get("chat_id") if isinstance(event.data, dict) else None
    if isinstance(chat_id, str) and CHAT_ID_RE.match(chat_id):
        now = time.time()
        rec = TaskRecord(
            task_id=event.id,
            source=event.source,
            client=client,
            chat_id=chat_id,
            model="?",
            state="placing",
            created_at=now,
            updated_at=now,
        )
        with contextlib.suppress(Conflict):
            await _fail(Run(svc, rec, await svc.tasks.create(rec), ""), "invalid_request", reason)
    return Reject(reason)


async def _refuse_reused_id(
    svc: Services, event: Event, client: str, req: ChatRequested
) -> Outcome:
    """Another client's request has this identity (source + id): tell this client, leave
    that task alone (its answer is never sent to anyone else)."""
    reason = f"request id {event.id!r} from source {event.source!r} is taken; use a fresh id"
    data = ChatFailed(
        chat_id=req.chat_id,
        task_id=event.id,
        error=ErrorInfo(code="duplicate_id", message=reason),
        model=req.model,
    ).model_dump()
    await bus.publish(
        svc.js, Event("chat.failed", data), msg_id=f"{event.id}.dup.{client}", client=client
    )
    return Reject(reason)


async def _claim(
    svc: Services, event: Event, client: str, req: ChatRequested, attempt: int
) -> Run | Outcome:
    """Own the task for this run, or say what to do instead."""
    run_id = uuid.uuid4().hex[:12]
    woken = WAKE_EXTENSION in event.extensions
    got: Versioned | None = None
    for i in range(10):
        now = time.time()
        # A new request is the common case: try to create its record first (one round trip).
        if i > 0 or woken:
            got = await svc.tasks.get(event.source, event.id)
        if got is None:
            if woken:
                return Done("woken, but the task is gone")
            rec = TaskRecord(
                task_id=event.id,
                source=event.source,
                client=client,
                chat_id=req.chat_id,
                model=req.model,
                state="placing",
                priority=req.priority,
                created_at=now,  # arrival here: a client's `time` is never trusted
                updated_at=now,
                owner=run_id,
                owner_until=now + OWNER_TTL_S,
            )
            try:
                return Run(svc, rec, await svc.tasks.create(rec), run_id, new=True)
            except Conflict:
                continue
        rec = got.record
        if rec.client != client:
            return await _refuse_reused_id(svc, event, client, req)
        if rec.state in TERMINAL:
            # A first wake of an ended task is stale; a wake seen again (attempt > 1) may be
            # the one whose run stored the end but failed to publish it: re-send it.
            if rec.end is None or (woken and attempt == 1):
                return Done(f"already {rec.state}")
            await resend_end(svc, rec, same_message=attempt > 1)
            return Done(f"seen again after its end: {rec.end['type']} re-sent")
        if rec.owned_by_other(run_id, now):
            # A first wake of a task another run holds is a duplicate wake: that run's own
            # message is redelivered if it fails. A wake seen again (attempt > 1) is the one
            # that run came from, so it must not be dropped.
            if (woken and attempt == 1) or rec.state == "queued":
                return Done("another run has it")
            # A second delivery while the first still runs (or its claim has not expired
            # yet after a crash): come back when the claim would have expired.
            return Retry(rec.owner_until - now + 0.5, "another run holds the task", failure=False)
        claimed = rec.model_copy(
            update={"owner": run_id, "owner_until": now + OWNER_TTL_S, "updated_at": now}
        )
        if rec.state == "queued":
            claimed.state = "placing"
            claimed.waited_s = rec.waited_s + max(0.0, now - rec.updated_at)
        try:
            return Run(svc, claimed, await svc.tasks.update(claimed, got.revision), run_id)
        except Conflict:
            continue
    return Retry(0.5, "the task record kept changing")


# -- acquire --------------------------------------------------------------------------------------
@dataclass
class Held:
    record: NodeRecord
    placed_at: float


@dataclass
class Lease:
    """A lease this run took: where, and whether it made it (a lease under the task's id
    may already be there, another run's of the same task)."""

    record: NodeRecord
    until: float | None  # the expiry this run wrote, if it made the lease


async def _lease_ready(
    svc: Services, model: str, task_id: str, fresh: bool = False
) -> Lease | None:
    """Take a lease on a node where the model is ready (least active first), else reserve
    a place on a copy that is already loading. The node records come from the fleet's
    watch (no round trip) unless `fresh`: the lease itself is a compare-and-set, so a
    record a moment old costs a failed CAS and a read, never a wrong lease."""
    now = time.time()
    listed = await (svc.fleet.nodes() if fresh else svc.fleet.hot_nodes())
    nodes = [rv for rv in listed if planner.node_takes_work(rv[0], now)]
    ready = sorted(
        (rv for rv in nodes if (s := rv[0].models.get(model)) and s.state == "ready"),
        key=lambda rv: (rv[0].models[model].active, rv[0].node_id),
    )
    loading = [rv for rv in nodes if (s := rv[0].models.get(model)) and s.state == "loading"]
    for record, rev in ready + loading:
        made: list[float | None] = [None]

        def lease(r: NodeRecord, made: list[float | None] = made) -> NodeRecord:
            slot = r.models.get(model)
            new = state.take_lease(r, model, task_id, time.time())
            made[0] = (
                None
                if slot is None or task_id in slot.leases
                else new.models[model].leases[task_id]
            )
            return new

        try:
            got = await svc.fleet.update(record.node_id, lease, known=(record, rev))
            return Lease(got, made[0])
        except TransitionError:
            continue
    return None


async def _undo_early(
    svc: Services, early: asyncio.Task[Lease | None] | None, model: str, task_id: str
) -> None:
    """A lease taken on arrival, beside the claim, that the request did not use: give it
    back if this run made it (one that was there already is another run's)."""
    if early is None:
        return
    try:
        lease = await early
    except Exception:
        return
    if lease is not None and lease.until is not None:
        until = lease.until
        with contextlib.suppress(Exception):
            await svc.fleet.update(
                lease.record.node_id, lambda r: state.drop_lease(r, model, task_id, until)
            )


async def warm_for_parked(svc: Services, model: str) -> int:
    """A request for `model` waits: start reading its file into the page cache on each node
    that could load it and does not hold it, so its load, when it comes, is a warm one.
    Only where the file is visible from here (the local stack); elsewhere nothing happens.
    Returns how many reads were started."""
    if not svc.settings.prefetch:
        return 0
    started = 0
    for record, _ in await svc.fleet.nodes():
        if model in record.models or (record.available and model not in record.available):
            continue
        try:
            warm = getattr(await svc.runtime_of(record), "prefetch", None)
            if warm is None:
                continue
            started += bool(await warm(model))
        except Exception as exc:  # a hint, never a reason to fail the request
            log.warning("prefetch of %s on %s failed: %s", model, record.node_id, exc)
    return started


async def _park(run: Run, event: Event, req: ChatRequested, result: planner.Queue) -> Outcome:
    """Record the request as waiting and acknowledge it; events wake it."""
    svc, now = run.svc, time.time()
    wake_at = now + result.retry_s if result.retry_s is not None else None
    first = run.rec.waiter_seq is None
    seq = run.rec.waiter_seq
    if first:
        plain = Event(
            event.type,
            event.data,
            id=event.id,
            source=event.source,
            time=event.time,
            subject=event.subject,
            datacontenttype=event.datacontenttype,
            extensions={k: v for k, v in event.extensions.items() if k != WAKE_EXTENSION},
        )
        waiting = await svc.waiting.count_of(run.rec.client)
        if waiting >= svc.settings.client_max_waiting:
            reason = (
                f"client {run.rec.client!r} already has {waiting} requests waiting (at most "
                f"{svc.settings.client_max_waiting}); retry once some are served"
            )
            await _fail(run, "queue_full", reason)
            return Reject(reason)
        seq = await svc.waiting.park(
            plain, req.model, req.priority, run.rec.created_at, run.rec.client
        )
    await run.save(
        state="queued", reason=result.reason, owner=None, waiter_seq=seq, wake_at=wake_at
    )
    if run.rec.cancel_requested:
        # Cancelled while this run held the task (the cancel function only flagged it): a
        # parked request that nothing wakes would keep that flag unanswered. End it here.
        await _fail(run, "cancelled", "cancelled while queued")
        return Done("cancelled")
    log.info("parked task_id=%s model=%s reason=%s", run.rec.task_id, req.model, result.reason)
    if first:
        await warm_for_parked(svc, req.model)
    if first and seq is not None and (waiter := await svc.waiting.get(seq)) is not None:
        # Memory may have been freed between our plan and the park: one look again.
        await svc.waiting.wake(waiter, "parked")
    return Done("parked: " + result.reason)


async def _decided(
    svc: Services, task_id: str, model: str, decision: str, t0: float, **more: Any
) -> None:
    """Tell whoever listens (the gateway's metrics) what the placement decided: core NATS,
    no acknowledgement, nothing waits on it."""
    data = PlannerDecided(
        task_id=task_id,
        model=model,
        decision=decision,  # type: ignore[arg-type]
        decision_ms=round((time.perf_counter() - t0) * 1000, 3),
        **more,
    )
    headers, body = to_binary(Event("planner.decided", data.model_dump()))
    with contextlib.suppress(Exception):  # a metric, never a reason to fail the request
        await svc.nc.publish(subject_for("planner.decided"), body, headers=headers)


def _decided_soon(
    svc: Services, task_id: str, model: str, decision: str, t0: float, **more: Any
) -> None:
    """`_decided` off the request's path: it runs while the runtime starts on the prompt."""
    task = asyncio.create_task(_decided(svc, task_id, model, decision, t0, **more))
    svc.background.add(task)
    task.add_done_callback(svc.background.discard)


async def _acquire(run: Run, event: Event, req: ChatRequested, info: Any) -> Held | Outcome:
    svc, task_id = run.svc, run.rec.task_id
    t0 = time.perf_counter()
    # The hot path: a copy is ready (watched records, then one CAS). Only when none is
    # seen are the records read afresh, so that a copy the watch has not shown yet is not
    # loaded a second time.
    early, run.early = run.early, None
    lease = await (early if early is not None else _lease_ready(svc, req.model, task_id))
    if lease is None:
        lease = await _lease_ready(svc, req.model, task_id, fresh=True)
    if lease is not None:
        _decided_soon(svc, task_id, req.model, "resident", t0, node=lease.record.node_id)
        return Held(lease.record, time.time())
    reserved, peers = await asyncio.gather(svc.waiting.models(), svc.waiting.of_model(req.model))
    peers = [w for w in peers if w.task_id != task_id]
    now = time.time()
    # This request's wait so far (a parked one's is in waited_s; one never parked has waited
    # since it came), and its parked peers': their sum, their number and the longest one
    # feed the admission rule.
    own_wait = run.rec.waited_s + (now - run.rec.created_at if run.rec.waiter_seq is None else 0.0)
    peer_waits = [now - w.since for w in peers]
    result = await svc.fleet.place(
        planner.PlanRequest(
            req.model,
            info.bytes,
            frozenset(reserved - {req.model}),
            waited_s=own_wait + sum(peer_waits),
            waiting=1 + len(peers),
            oldest_s=max([own_wait, *peer_waits]),
        ),
        now,
        svc.settings.policy,
        task_id,
        reason=f"chat {task_id}",
    )
    if isinstance(result, planner.Reject):
        await _decided(svc, task_id, req.model, "reject", t0)
        await _fail(run, result.code, result.reason)
        return Reject(result.reason)
    if isinstance(result, planner.Queue):
        await _decided(svc, task_id, req.model, "queue", t0)
        return await _park(run, event, req, result)
    decision = "evict_and_load" if result.evict else "load"
    await _decided(
        svc, task_id, req.model, decision, t0, node=result.node_id, evicted=list(result.evict)
    )
    placed_at = time.time()
    record = await evict_for(svc, result)
    gen = record.models[req.model].gen
    await bus.publish(
        svc.js,
        Event(
            "model.load",
            ModelLoad(
                model=req.model, node=result.node_id, reason="chat", task_id=task_id, gen=gen
            ).model_dump(),
        ),
        msg_id=f"load.{result.node_id}.{gen}",
    )
    log.info(
        "placed task_id=%s model=%s node=%s evict=%s policy=%s",
        task_id,
        req.model,
        result.node_id,
        list(result.evict),
        svc.settings.policy,
    )
    return Held(record, placed_at)


async def _keep(run: Run, node_id: str, model: str) -> None:
    """While the run lasts: renew its claim on the task and its lease on the model. Errors
    are logged and retried at the next beat; a lost claim stops the renewals."""
    last_lease = time.monotonic()
    while True:
        await asyncio.sleep(OWNER_RENEW_S)
        try:
            await run.save(owner_until=time.time() + OWNER_TTL_S)
        except Lost:
            log.warning("task_id=%s claim lost; renewals stop", run.rec.task_id)
            return
        except Exception as exc:
            log.warning("task_id=%s claim renewal failed: %r", run.rec.task_id, exc)
        if time.monotonic() - last_lease >= LEASE_RENEW_S:
            try:
                await run.svc.fleet.update(
                    node_id, lambda r: state.take_lease(r, model, run.rec.task_id, time.time())
                )
                last_lease = time.monotonic()
            except Exception as exc:  # TransitionError: the slot is gone; else NATS trouble
                log.warning(
                    "task_id=%s lease renewal on %s failed: %r", run.rec.task_id, node_id, exc
                )


async def _release(
    svc: Services, node_id: str, model: str, task_id: str, keep_alive: float
) -> None:
    # A bus that does not answer for a moment (a cluster electing a leader) is waited out:
    # a release given up would hold the model's memory until the lease expired (60 s).
    record = await bus.wait_out(
        lambda: svc.fleet.update(
            node_id, lambda r: state.release_lease(r, model, task_id, time.time(), keep_alive)
        ),
        SAVE_WAIT_S,
        f"task_id={task_id} release",
    )
    slot = record.models.get(model)
    if slot is None or not slot.leases:
        # The model became evictable (or is gone): a waiter may fit now. In the background,
        # coalesced with other releases in this process (not on the chat's path).
        svc.waiting.wake_heads_soon(f"release.{task_id}")


# -- the handler ----------------------------------------------------------------------------------
async def handle(svc: Services, event: Event, attempt: int) -> Outcome:
    client = event.extensions.get(CLIENT_EXTENSION)
    if not client:
        return Reject(
            "chat.requested without its client: it must come on ollama.chat.requested.<client> "
            "(the dispatcher names the client from the subject)"
        )
    try:
        req = ChatRequested.model_validate(event.data)
    except ValidationError as exc:
        return await _reject_invalid(svc, event, client, exc)
    # A first delivery of a new request: its lease on a ready copy is taken at once, beside
    # the claim (the lease names the task, so a duplicate's lease is the same one; one this
    # run made and did not use is given back).
    early = None
    if attempt == 1 and WAKE_EXTENSION not in event.extensions:
        early = asyncio.create_task(_lease_ready(svc, req.model, event.id))
    try:
        claimed, info = await asyncio.gather(
            _claim(svc, event, client, req, attempt), svc.catalog.get(req.model)
        )
    except BaseException:
        await asyncio.shield(_undo_early(svc, early, req.model, event.id))
        raise
    if not isinstance(claimed, Run):
        await _undo_early(svc, early, req.model, event.id)
        return claimed
    run = claimed
    run.early = early
    try:
        return await _handle(svc, event, req, run, client, info)
    finally:
        if run.early is not None:  # not taken over by `_acquire`: the request ended before
            await asyncio.shield(_undo_early(svc, run.early, req.model, event.id))


async def _handle(
    svc: Services, event: Event, req: ChatRequested, run: Run, client: str, info: Any
) -> Outcome:
    if run.new:  # a new request (not a redelivery, a wake or a re-sent id)
        wait_s = svc.over_rate(client, time.time())
        if wait_s:
            reason = (
                f"client {client!r} sends more than {svc.settings.client_rate:g} chats a "
                f"second (burst {svc.settings.client_burst:g}); retry in {wait_s:.1f} s"
            )
            await _fail(run, "rate_limited", reason)
            return Reject(reason)
    if run.rec.cancel_requested:
        await _fail(run, "cancelled", "cancelled before it started")
        return Done("cancelled")
    await svc.listen_for_cancels()
    svc.cancels[(client, run.rec.task_id)] = run.cancelled
    serving = asyncio.create_task(_serve(run, event, req, info))
    stopping = asyncio.create_task(run.cancelled.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not serving.done():  # a chat.cancel: stop generating, release, end it once
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError, Lost):
                await serving
            text = "".join(run.pieces)
            msg = f"cancelled after {len(run.pieces)} tokens"
            await _fail_taking_back(run, "cancelled", msg, text=text)
            return Done("cancelled")
        outcome = serving.result()
        if isinstance(outcome, Retry):  # let the redelivery claim it at once
            with contextlib.suppress(Lost):
                await run.save(owner=None, owner_until=0.0)
        return outcome
    except Lost as exc:
        return Done(str(exc))
    except Exception:
        # The run failed (a bus or store error mid-stream): give up the claim if the store
        # answers, so the redelivery claims it at once rather than when the claim expires.
        with contextlib.suppress(Exception):
            await asyncio.shield(run.save(owner=None, owner_until=0.0))
        raise
    except asyncio.CancelledError:
        # Handed back (a draining worker): stop generating, give the lease back, and give up
        # the claim so the redelivery — on another worker — starts at once.
        serving.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.shield(serving)
        with contextlib.suppress(Exception):
            await asyncio.shield(run.save(owner=None, owner_until=0.0))
        raise
    finally:
        stopping.cancel()
        svc.cancels.pop((client, run.rec.task_id), None)


def _out_of_bounds(svc: Services, req: ChatRequested, info: Any) -> str | None:
    """What in the request's options exceeds the model or the deployment's limits, if any."""
    opts, settings = req.options, svc.settings
    if opts.num_ctx is not None and info.context and opts.num_ctx > info.context:
        return (
            f"options.num_ctx {opts.num_ctx} exceeds the {info.context}-token context "
            f"of {req.model}"
        )
    if opts.max_tokens is not None and opts.max_tokens > settings.max_tokens:
        return f"options.max_tokens {opts.max_tokens} exceeds the limit of {settings.max_tokens}"
    if opts.keep_alive_s is not None and opts.keep_alive_s > settings.max_keep_alive_s:
        return (
            f"options.keep_alive_s {opts.keep_alive_s:g} exceeds the limit of "
            f"{settings.max_keep_alive_s:g} s"
        )
    return None


async def _serve(run: Run, event: Event, req: ChatRequested, info: Any) -> Outcome:
    svc, task_id = run.svc, run.rec.task_id
    if info is None:
        known = ", ".join(m.name for m in await svc.catalog.all()) or "none"
        msg = f"unknown model {req.model!r}; the catalog has: {known}"
        await _fail(run, "unknown_model", msg)
        return Reject(msg)
    problem = _out_of_bounds(svc, req, info)
    if problem:
        await _fail(run, "invalid_request", problem)
        return Reject(problem)
    req.options.max_tokens = req.options.max_tokens or svc.settings.default_max_tokens
    context = req.options.num_ctx or info.context or 2048
    est_tokens = req.prompt_chars() / svc.settings.chars_per_token
    if est_tokens > context:
        msg = (
            f"prompt of ~{est_tokens:.0f} tokens exceeds the {context}-token context of "
            f"{req.model}; shorten it or raise options.num_ctx"
        )
        await _fail(run, "prompt_too_long", msg)
        return Reject(msg)

    # 1. Acquire: a lease on a ready or loading copy, a placement, or a parked wait.
    held = await _acquire(run, event, req, info)
    if not isinstance(held, Held):
        return held
    if run.rec.waiter_seq is not None:
        await svc.waiting.remove(run.rec.waiter_seq)
        run.rec.waiter_seq = None
    queue_ms = (held.placed_at - run.rec.created_at) * 1000
    record, node_id = held.record, held.record.node_id
    keeper = asyncio.create_task(_keep(run, node_id, req.model))
    keep_alive = (
        svc.settings.keep_alive_s if req.options.keep_alive_s is None else req.options.keep_alive_s
    )
    try:
        load_ms = 0.0
        slot = record.models.get(req.model)
        if slot is not None and slot.state == "loading":
            await run.save(state="loading", node=node_id, waiter_seq=None)
            try:
                record = await svc.fleet.wait_for(
                    node_id,
                    lambda r: (s := r.models.get(req.model)) is None or s.state != "loading",
                    svc.settings.load_timeout_s,
                )
            except TimeoutError as exc:
                await _release(svc, node_id, req.model, task_id, keep_alive)
                return Retry(5.0, str(exc))
            if req.model not in record.models:
                err = record.errors.get(req.model)
                if err is None:  # dropped, not failed (its node restarted): place it again
                    return Retry(0.5, f"the load of {req.model} on {node_id} was abandoned")
                await _fail(run, "load_failed", f"{req.model} on {node_id}: {err}")
                return Done("load failed")
            load_ms = (time.time() - held.placed_at) * 1000

        # 2. Stream.
        return await _stream(run, req, record, queue_ms, load_ms, keep_alive)
    except asyncio.CancelledError:  # cancelled while waiting for the load: give the lease back
        with contextlib.suppress(Exception):
            await _release(svc, node_id, req.model, task_id, keep_alive)
        raise
    finally:
        keeper.cancel()


async def _settle(svc: Services, task_id: str, sent: list[bus.Sent]) -> None:
    """Wait (up to SAVE_WAIT_S) until JetStream stored every token; never raises: the end
    and the lease's release come after it whatever happens."""
    try:
        missing = await svc.tokens_out.settle(sent, SAVE_WAIT_S)
    except Exception as exc:
        svc.tokens_out.forget(sent)
        log.warning("task_id=%s tokens not confirmed stored: %r", task_id, exc)
        return
    if missing:
        log.warning("task_id=%s %d of %d tokens never stored", task_id, missing, len(sent))


async def _stream(
    run: Run,
    req: ChatRequested,
    record: NodeRecord,
    queue_ms: float,
    load_ms: float,
    keep_alive: float,
) -> Outcome:
    svc, task_id, node_id = run.svc, run.rec.task_id, record.node_id
    runs = run.rec.runs + 1
    # Recorded while the runtime starts on the prompt (it is only a status).
    running_saved = asyncio.create_task(
        run.save(state="running", node=node_id, runs=runs, waiter_seq=None)
    )
    runtime = await svc.runtime_of(record)
    messages = [m.model_dump() for m in req.messages]
    pieces = run.pieces
    pieces.clear()
    usage: dict[str, Any] = {}  # what the runtime says of the answer, at its end
    t_stream = time.time()
    first_at: float | None = None
    sent: list[bus.Sent] = []  # every token, until JetStream has stored it
    # Token message ids name the task by source and id: another source's task of the same
    # id never has its tokens dropped as duplicates.
    token_ids = f"{task_id}.{hashlib.sha256(run.rec.source.encode()).hexdigest()[:12]}"
    try:
        async for text in runtime.chat(req.model, messages, req.options.model_dump(), usage):
            if first_at is None:
                first_at = time.time()
                # This run's attempt number is stored before its first token goes out: a run
                # whose save failed streams nothing, so two runs never share an attempt.
                await running_saved
            token = ChatToken(
                chat_id=req.chat_id, task_id=task_id, seq=len(pieces), text=text, attempt=runs
            )
            sent.append(
                await svc.tokens_out.send(
                    Event("chat.token", token.model_dump()),
                    msg_id=f"{token_ids}.{runs}.{token.seq}",
                    chat_id=req.chat_id,
                    client=run.rec.client,
                )
            )
            pieces.append(text)
    except RuntimeFailure as exc:
        await running_saved  # so the failed state is written after it, never before
        await _settle(svc, task_id, sent)
        await _release(svc, node_id, req.model, task_id, keep_alive)
        # Once for a cut stream (a prompt that kills its process must not do so again and
        # again), up to twice for a model the runtime says it does not have.
        retries = 3 if exc.code == "model_not_loaded" else 2 if exc.code == "interrupted" else 0
        if not pieces and runs < retries:
            # The model's process went before the first token (nothing reached the client):
            # reconcile (or the node's rejoin) drops the slot; the redelivery places it again.
            return Retry(2.0 * runs, f"runtime lost {req.model}: {exc}")
        await _fail(run, exc.code, str(exc), text="".join(pieces))
        return Done("runtime failure reported")
    except BaseException:
        svc.tokens_out.forget(sent)
        await asyncio.gather(running_saved, return_exceptions=True)
        with contextlib.suppress(Exception):
            await _release(svc, node_id, req.model, task_id, keep_alive)
        raise
    await running_saved
    end = time.time()
    # The end goes out only once every token before it is stored (a late reader of the
    # token stream sees the whole answer).
    await _settle(svc, task_id, sent)
    first_at = first_at or end
    gen_s = max(1e-6, end - first_at)
    stats = ChatStats(
        queue_ms=round(queue_ms, 1),
        load_ms=round(load_ms, 1),
        ttft_ms=round((first_at - run.rec.created_at) * 1000, 1),
        total_ms=round((end - run.rec.created_at) * 1000, 1),
        tokens=len(pieces),
        tokens_per_s=round((len(pieces) - 1) / gen_s, 1) if len(pieces) > 1 else 0.0,
        node=node_id,
        model=req.model,
        attempt=runs,
        prompt_tokens=usage.get("prompt_tokens"),
        done_reason=usage.get("done_reason"),
    )
    timings = {
        "queue_ms": stats.queue_ms,
        "load_ms": stats.load_ms,
        "ttft_ms": stats.ttft_ms,
        "total_ms": stats.total_ms,
        "stream_ms": round((end - t_stream) * 1000, 1),
    }
    done = ChatCompleted(chat_id=req.chat_id, task_id=task_id, text="".join(pieces), stats=stats)
    # 3. Finish: the end stored, then published; the lease released beside it (it need not
    # wait: a worker that dies before the end is out is redelivered, stored end or not).
    await asyncio.gather(
        _end(run, "chat.completed", done.model_dump(), state="done", timings=timings),
        _release(svc, node_id, req.model, task_id, keep_alive),
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
