"""The reconcile function, on every `fleet.tick`: keep KV honest.

- leases whose holder stopped renewing them expire;
- idle models past their keep-alive are evicted (never active, loading or pinned ones);
- drift between KV and what the runtime really has loaded is repaired: KV `ready` that the
  runtime lost is dropped, a model the runtime loaded behind our back is adopted as idle;
- `loading` that outlived the load timeout is dropped, a load no load function took in hand
  (its sender died before publishing it) is re-sent, a stuck `evicting` is re-sent;
- parked requests: a ghost (its task ended or is gone) is removed, a deferral that ended and a
  waiter whose run died are woken; anything that freed memory wakes the waiters; a head
  nothing woke for WAKE_SWEEP_S is woken (a wake lost to a bus that did not answer).
"""

from __future__ import annotations

import contextlib
import logging
import time

from domain import planner, state
from domain.state import NodeRecord, Slot, TransitionError
from events import bus
from events.codec import Event
from events.outcome import Done, Outcome
from events.types import ModelLoad
from stores.tasks import TERMINAL

from .evict import request_evict
from .services import Services

log = logging.getLogger("functions.reconcile")
EVICT_RESEND_S = 60.0
LOAD_RESEND_S = 10.0
NODE_FORGET_S = 600.0
WAKE_SWEEP_S = 30.0  # a waiting head nothing has woken for this long is planned again


def _adopt(model: str, nbytes: int, now: float, keep_alive_s: float):  # type: ignore[no-untyped-def]
    def transition(r: NodeRecord) -> NodeRecord:
        new = r.model_copy(deep=True)
        if model not in new.models:
            placed = sum(s.bytes for s in new.models.values() if s.state != "evicting")
            if placed + nbytes > new.capacity_bytes:
                raise TransitionError(f"{model} does not fit beside what is placed on {r.node_id}")
            new.models[model] = Slot(
                state="ready",
                bytes=nbytes,
                since=now,
                last_used=now,
                keep_alive_until=now + keep_alive_s,
                reason="adopted",
            )
        return new

    return transition


async def reconcile_node(svc: Services, record: NodeRecord, now: float) -> list[str]:
    actions: list[str] = []
    node_id = record.node_id
    if any(until < now for s in record.models.values() for until in s.leases.values()):
        record = await svc.fleet.update(node_id, lambda r: state.expire_leases(r, now))
        actions.append("expired stale leases")
    try:
        loaded = await (await svc.runtime_of(record)).loaded()
    except Exception as exc:  # an unreachable runtime is reported, not fatal
        log.warning("reconcile: runtime of %s unreachable: %s", node_id, exc)
        loaded = None
    for model, slot in record.models.items():
        if slot.state == "ready" and loaded is not None and model not in loaded:
            await svc.fleet.update(
                node_id,
                lambda r, m=model: state.remove_if(
                    r, m, "ready", "runtime no longer had it loaded"
                ),
            )
            actions.append(f"dropped {model}: runtime lost it")
        elif (
            slot.state == "ready"
            and not slot.leases
            and not slot.pinned
            and slot.keep_alive_until is not None
            and slot.keep_alive_until < now
        ):
            try:
                await svc.fleet.update(
                    node_id, lambda r, m=model: state.mark_evicting(r, m, now, "keep_alive expired")
                )
            except TransitionError:
                continue
            await request_evict(svc, model, node_id, "keep_alive expired", gen=slot.gen)
            actions.append(f"keep-alive expired: {model}")
        elif slot.state == "loading" and now - slot.since > svc.settings.load_timeout_s + 30:
            await svc.fleet.update(
                node_id, lambda r, m=model: state.remove_if(r, m, "loading", "load timed out")
            )
            actions.append(f"dropped stuck load of {model}")
        elif (
            slot.state == "loading"
            and slot.load_seen_at is None
            and now - slot.since > LOAD_RESEND_S
        ):
            data = ModelLoad(model=model, node=node_id, reason="re-sent by reconcile", gen=slot.gen)
            await bus.publish(
                svc.js,
                Event("model.load", data.model_dump()),
                msg_id=f"load.{node_id}.{slot.gen}.r{int(now // LOAD_RESEND_S)}",
            )
            actions.append(f"re-sent load of {model}: no load function took it")
        elif slot.state == "evicting" and now - slot.since > EVICT_RESEND_S:
            await request_evict(
                svc,
                model,
                node_id,
                "evict re-sent by reconcile",
                gen=slot.gen,
                msg_id=f"reconcile.{node_id}.{slot.gen}.{int(now // EVICT_RESEND_S)}",
            )
            actions.append(f"re-sent evict of {model}")
    if loaded:
        for model, status in loaded.items():
            if model not in record.models and status == "loaded":
                info = await svc.catalog.get(model)
                nbytes = info.bytes if info else 0
                try:
                    await svc.fleet.update(
                        node_id, _adopt(model, nbytes, now, svc.settings.keep_alive_s)
                    )
                    actions.append(f"adopted {model} loaded outside the planner")
                except TransitionError:
                    # Its memory is given to others already: booking it would over-commit
                    # the node, leaving it would hold memory nothing accounts for.
                    runtime = await svc.runtime_of(record)
                    with contextlib.suppress(Exception):
                        await runtime.unload(model, svc.settings.unload_timeout_s)
                    actions.append(f"unloaded {model}: loaded outside the planner, no room")
    return actions


async def reconcile_waiters(svc: Services, now: float) -> list[str]:
    actions: list[str] = []
    for w in await svc.waiting.all():
        got = await svc.tasks.get(w.source, w.task_id)
        rec = got.record if got else None
        if rec is None or rec.state in TERMINAL or rec.waiter_seq not in (None, w.seq):
            await svc.waiting.remove(w.seq)
            actions.append(f"removed ghost waiter {w.task_id} ({rec.state if rec else 'no task'})")
        elif rec.state == "queued" and rec.wake_at is not None and rec.wake_at <= now:
            # Named by the deferral itself: a second deferral ending within the same second
            # as the first is a new wake, not a duplicate of it (JetStream drops those).
            await svc.waiting.wake(w, f"deferral.{rec.wake_at:.3f}")
            actions.append(f"woke {w.task_id}: its deferral ended")
        elif rec.state != "queued" and rec.owner_until < now:
            await svc.waiting.wake(w, f"orphan.{int(now // 30)}")
            actions.append(f"woke {w.task_id}: its run stopped")
        elif (
            w.head
            and rec.state == "queued"
            and rec.wake_at is None
            and now - rec.updated_at > WAKE_SWEEP_S
        ):
            # Nothing has looked at it for a while: a wake may have been lost (a bus that did
            # not answer, a waker that died between a release and its wake). Plan it again.
            await svc.waiting.wake(w, f"sweep.{rec.updated_at:.3f}")
            actions.append(f"woke {w.task_id}: not looked at for {now - rec.updated_at:.0f}s")
    return actions


async def handle(svc: Services, event: Event, attempt: int) -> Outcome:
    now = time.time()
    done: list[str] = []
    freed = False
    for record, rev in await svc.fleet.nodes():
        if now - record.heartbeat_at > NODE_FORGET_S:
            # Gone for good (scaled down, or a previous local run): its residency can never
            # be used again. Deleting at the revision we read keeps a node that came back.
            if await svc.fleet.forget(record.node_id, rev):
                done.append(
                    f"{record.node_id}: forgotten (no heartbeat for "
                    f"{now - record.heartbeat_at:.0f}s)"
                )
                log.info("reconcile node=%s forgotten", record.node_id)
            continue
        if not planner.node_is_live(record, now):
            continue
        for action in await reconcile_node(svc, record, now):
            done.append(f"{record.node_id}: {action}")
            log.info("reconcile node=%s %s", record.node_id, action)
            freed = freed or action.startswith(("expired", "dropped"))
    for action in await reconcile_waiters(svc, now):
        done.append(action)
        log.info("reconcile %s", action)
    # A node agent's tick when it joins or leaves: memory changed, the queue's heads re-plan.
    trigger = event.data.get("trigger") if isinstance(event.data, dict) else None
    if isinstance(trigger, str) and trigger.startswith(("join.", "leave.")):
        await svc.waiting.wake_heads(trigger[:64])
    elif freed:
        await svc.waiting.wake_heads(f"reconcile.{int(now)}")
    return Done("; ".join(done))
