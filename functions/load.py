"""The load function: `model.load` -> the runtime loads the model -> slot `ready`, `model.loaded`.

With a node (a placement the chat function committed) it waits for that node's evictions to
finish, then loads. Without a node (a manual `ollama-autoscaler load M`) it plans first.
"""

from __future__ import annotations

import logging
import time

from nats.js.errors import KeyDeletedError, KeyNotFoundError
from pydantic import ValidationError

from events import bus
from events.codec import Event
from events.outcome import Done, Outcome, Reject, Retry
from events.types import ModelLoad, ModelLoaded

from . import planner, state
from .context import Services
from .evict import request_evict
from .runtimes.base import RuntimeFailure
from .state import NodeRecord

log = logging.getLogger("functions.load")


async def _place(svc: Services, req: ModelLoad) -> str | Outcome:
    info = await svc.catalog.get(req.model)
    if info is None:
        return Reject(f"unknown model {req.model!r}: not in the catalog")
    for record, _ in await svc.fleet.nodes():
        if req.model in record.models:
            return Done(f"{req.model} already {record.models[req.model].state} on {record.node_id}")
    result = await svc.fleet.place(
        planner.PlanRequest(req.model, info.bytes),
        time.time(),
        svc.settings.policy,
        None,
        reason=req.reason,
    )
    if isinstance(result, planner.Reject):
        return Reject(result.reason)
    if isinstance(result, planner.Queue):
        return Retry(1.0, result.reason, failure=False)
    for victim in result.evict:
        await request_evict(svc, victim, result.node_id, f"make room for {req.model}")
    return result.node_id


async def handle(svc: Services, event: Event, attempt: int) -> Outcome:
    try:
        req = ModelLoad.model_validate(event.data)
    except ValidationError as exc:
        return Reject(f"invalid model.load data: {exc.errors(include_url=False)}")
    node_id = req.node
    if node_id is None:
        placed = await _place(svc, req)
        if not isinstance(placed, str):
            return placed
        node_id = placed
    try:
        record, _ = await svc.fleet.get(node_id)
    except (KeyNotFoundError, KeyDeletedError, ValueError):
        return Reject(f"unknown node {node_id!r}")
    slot = record.models.get(req.model)
    if slot is None or slot.state != "loading":
        return Done(f"nothing to load: {req.model} is {slot.state if slot else 'absent'}")

    def no_evictions(r: NodeRecord) -> bool:
        return not any(s.state == "evicting" for s in r.models.values())

    try:
        if not no_evictions(record):
            await svc.fleet.wait_for(node_id, no_evictions, svc.settings.unload_timeout_s)
    except TimeoutError:
        log.warning("load of %s on %s proceeds with evictions still pending", req.model, node_id)
    runtime = svc.runtime(record.runtime, record.url)
    t0 = time.perf_counter()
    try:
        await runtime.load(req.model, svc.settings.load_timeout_s)
    except (RuntimeFailure, TimeoutError, OSError) as exc:
        error = f"{exc.__class__.__name__}: {exc}"
        log.error("load failed model=%s node=%s error=%s", req.model, node_id, error)
        await svc.fleet.update(node_id, lambda r: state.remove(r, req.model, error=error))
        return Done(f"load failed: {error}")
    load_ms = (time.perf_counter() - t0) * 1000
    keep_alive = svc.settings.keep_alive_s
    record = await svc.fleet.update(
        node_id, lambda r: state.mark_ready(r, req.model, load_ms, time.time(), keep_alive)
    )
    nbytes = record.models[req.model].bytes
    await bus.publish(
        svc.js,
        Event(
            "model.loaded",
            ModelLoaded(
                model=req.model, node=node_id, bytes=nbytes, load_ms=round(load_ms, 1)
            ).model_dump(),
        ),
    )
    log.info("model.loaded model=%s node=%s load_ms=%.0f", req.model, node_id, load_ms)
    return Done()
