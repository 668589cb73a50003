"""The evict function: `model.evict` -> the runtime unloads -> slot removed, `model.evicted`.

A placement or the keep-alive expiry has already marked the slot `evicting` by CAS; a manual
evict marks it here, and is refused while the model is in use.
"""

from __future__ import annotations

import logging
import time

from pydantic import ValidationError

from domain import planner, state
from domain.state import NodeRecord, TransitionError
from events import bus
from events.codec import Event
from events.outcome import Done, Outcome, Reject, Retry, invalid
from events.types import ModelEvict, ModelEvicted
from runtimes.base import RuntimeFailure

from .services import Services

log = logging.getLogger("functions.evict")


async def request_evict(
    svc: Services,
    model: str,
    node: str,
    reason: str,
    gen: int | None = None,
    msg_id: str | None = None,
) -> None:
    """Publish `model.evict` for a slot that a CAS has already marked `evicting`; with `gen`,
    only that copy is unloaded (a late re-send never unloads a newer one)."""
    data = ModelEvict(model=model, node=node, reason=reason, gen=gen).model_dump()
    await bus.publish(svc.js, Event("model.evict", data), msg_id=msg_id)


async def evict_for(svc: Services, placement: planner.Placement) -> NodeRecord:
    """Send `model.evict` for each victim of a committed placement (each its own copy);
    returns the node record the placement wrote."""
    record, _ = await svc.fleet.get(placement.node_id)
    for victim in placement.evict:
        await request_evict(
            svc,
            victim,
            placement.node_id,
            f"make room for {placement.model}",
            gen=record.models[victim].gen,
        )
    return record


async def handle(svc: Services, event: Event, attempt: int) -> Outcome:
    try:
        req = ModelEvict.model_validate(event.data)
    except ValidationError as exc:
        return Reject(invalid("model.evict", exc))
    records = [
        r
        for r, _ in await svc.fleet.nodes()
        if (req.node is None or r.node_id == req.node) and req.model in r.models
    ]
    if not records:
        return Done(f"{req.model} is not resident" + (f" on {req.node}" if req.node else ""))
    if req.gen is not None:
        records = [r for r in records if r.models[req.model].gen == req.gen]
        if not records:
            return Done(f"stale evict: copy {req.gen} of {req.model} is gone")
    for record in records:
        slot = record.models[req.model]
        if slot.state == "loading":
            return Reject(f"{req.model} is loading on {record.node_id}; evict it once ready")
        if slot.state == "ready":
            try:
                record = await svc.fleet.update(
                    record.node_id,
                    lambda r: state.mark_evicting(r, req.model, time.time(), req.reason),
                )
            except TransitionError as exc:
                return Reject(f"cannot evict: {exc}")
        runtime = await svc.runtime_of(record)
        t0 = time.perf_counter()
        try:
            await runtime.unload(req.model, svc.settings.unload_timeout_s)
        except (RuntimeFailure, TimeoutError) as exc:
            return Retry(2.0, f"unload of {req.model} on {record.node_id} failed: {exc}")
        evict_ms = (time.perf_counter() - t0) * 1000
        freed = record.models[req.model].bytes
        gen = record.models[req.model].gen
        await svc.fleet.update(record.node_id, lambda r, g=gen: state.remove_gen(r, req.model, g))
        await bus.publish(
            svc.js,
            Event(
                "model.evicted",
                ModelEvicted(
                    model=req.model,
                    node=record.node_id,
                    bytes_freed=freed,
                    reason=req.reason,
                    evict_ms=round(evict_ms, 1),
                ).model_dump(),
            ),
        )
        log.info(
            "model.evicted model=%s node=%s bytes=%d evict_ms=%.0f reason=%s",
            req.model,
            record.node_id,
            freed,
            evict_ms,
            req.reason,
        )
        await svc.waiting.wake_heads(f"evicted.{record.node_id}.{gen}")
    return Done()
