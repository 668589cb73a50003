"""The load function: `model.load` -> the runtime loads the model -> slot `ready`, `model.loaded`.

With a node and a gen (a placement the chat function committed) it loads that slot once the
node's evictions have finished — never while they are pending. Otherwise (a manual
`ollama-autoscaler load M [--node N]`) it plans first, on that node if one is named.
Afterwards it wakes the parked requests: those for the model when it is ready, every head when
a failed load gave its memory back.
"""

from __future__ import annotations

import contextlib
import logging
import time

from nats.js.errors import KeyDeletedError, KeyNotFoundError
from pydantic import ValidationError

from domain import planner, state
from domain.state import NodeRecord, TransitionError
from events import bus
from events.codec import Event
from events.outcome import Done, Outcome, Reject, Retry, invalid
from events.types import ModelLoad, ModelLoaded, ModelLoadFailed
from runtimes import RuntimeFailure

from .evict import evict_for
from .services import Services

log = logging.getLogger("functions.load")


async def _place(svc: Services, req: ModelLoad) -> tuple[str, int] | Outcome:
    info = await svc.catalog.get(req.model)
    if info is None:
        return Reject(f"unknown model {req.model!r}: not in the catalog")
    for record, _ in await svc.fleet.nodes():
        if req.model in record.models and req.node in (None, record.node_id):
            slot = record.models[req.model]
            return Done(f"{req.model} already {slot.state} on {record.node_id}")
    if req.node is not None:
        try:
            await svc.fleet.get(req.node)
        except (KeyNotFoundError, KeyDeletedError, ValueError):
            return Reject(f"unknown node {req.node!r}")
    result = await svc.fleet.place(
        planner.PlanRequest(req.model, info.bytes),
        time.time(),
        svc.settings.policy,
        None,
        reason=req.reason,
        only_node=req.node,
    )
    if isinstance(result, planner.Reject):
        return Reject(result.reason)
    if isinstance(result, planner.Queue):
        return Reject(f"cannot load {req.model} now: {result.reason}")
    record = await evict_for(svc, result)
    return result.node_id, record.models[req.model].gen


async def handle(svc: Services, event: Event, attempt: int) -> Outcome:
    try:
        req = ModelLoad.model_validate(event.data)
    except ValidationError as exc:
        return Reject(invalid("model.load", exc))
    if req.node is None or req.gen is None:
        placed = await _place(svc, req)
        if not isinstance(placed, tuple):
            return placed
        node_id, gen = placed
    else:
        node_id, gen = req.node, req.gen
    try:
        record = await svc.fleet.update(
            node_id, lambda r: state.mark_load_seen(r, req.model, gen, time.time())
        )
    except (KeyNotFoundError, KeyDeletedError, ValueError):
        return Reject(f"unknown node {node_id!r}")
    except TransitionError as exc:
        return Done(f"nothing to load: {exc}")

    def no_evictions(r: NodeRecord) -> bool:
        return not any(s.state == "evicting" for s in r.models.values())

    runtime = await svc.runtime_of(record)
    if not no_evictions(record):
        # The load waits for its evictions: warm its file meanwhile (llama.cpp nodes).
        warm = getattr(runtime, "prefetch", None)
        if warm is not None and svc.settings.prefetch:
            await warm(req.model)
        try:
            await svc.fleet.wait_for(node_id, no_evictions, svc.settings.unload_timeout_s)
        except TimeoutError:
            # Loading now could over-commit the runtime's memory: try again later (reconcile
            # re-sends the stuck evictions meanwhile).
            return Retry(5.0, f"evictions on {node_id} still pending; {req.model} waits")
    t0 = time.perf_counter()
    try:
        await runtime.load(req.model, svc.settings.load_timeout_s)
    except (RuntimeFailure, TimeoutError) as exc:
        error = str(exc)
        log.error("load failed model=%s node=%s error=%s", req.model, node_id, error)
        await svc.fleet.update(node_id, lambda r: state.remove_gen(r, req.model, gen, error))
        failed = ModelLoadFailed(model=req.model, node=node_id, error=error, reason=req.reason)
        await bus.publish(
            svc.js,
            Event("model.load.failed", failed.model_dump()),
            msg_id=f"load-failed.{node_id}.{gen}",
        )
        await svc.waiting.wake_heads(f"load-failed.{node_id}.{gen}")
        return Done(f"load failed: {error}")
    load_ms = (time.perf_counter() - t0) * 1000
    keep_alive = svc.settings.keep_alive_s
    try:
        record = await svc.fleet.update(
            node_id,
            lambda r: state.mark_ready(r, req.model, load_ms, time.time(), keep_alive, gen=gen),
        )
    except TransitionError as exc:
        # Nothing books its memory now (its runtime restarted, or it was cancelled): unless
        # another copy of the model is placed there, unload it rather than leave it unbooked.
        current, _ = await svc.fleet.get(node_id)
        if req.model not in current.models:
            with contextlib.suppress(RuntimeFailure, TimeoutError):
                await runtime.unload(req.model, svc.settings.unload_timeout_s)
            return Done(f"loaded, but the slot is gone ({exc}): unloaded again")
        return Done(f"loaded, but the slot is gone: {exc}")
    nbytes = record.models[req.model].bytes
    await bus.publish(
        svc.js,
        Event(
            "model.loaded",
            ModelLoaded(
                model=req.model,
                node=node_id,
                bytes=nbytes,
                load_ms=round(load_ms, 1),
                reason=req.reason,
            ).model_dump(),
        ),
        msg_id=f"loaded.{node_id}.{gen}",
    )
    log.info("model.loaded model=%s node=%s load_ms=%.0f", req.model, node_id, load_ms)
    await svc.waiting.wake_heads(f"loaded.{node_id}.{gen}", models={req.model})
    return Done()
