"""Fleet state: one record per node with its residency table, and the pure transitions on it.

A node record is the value of KV key `node.<node_id>` in bucket `fleet`. Every change to a
node's residency is a function old record -> new record, committed by one compare-and-set
(see `stores.fleet`). Nothing here does I/O.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field

SlotState = Literal["loading", "ready", "evicting"]

# Request-rate memory for the `cost` policy: an exponentially decayed count of requests.
RATE_TAU_S = 300.0
LEASE_TTL_S = 60.0


class Slot(BaseModel):
    """One model's residency on one node."""

    state: SlotState
    bytes: int = Field(ge=0)
    leases: dict[str, float] = Field(default_factory=dict)  # task_id -> lease expiry (epoch s)
    last_used: float = 0.0
    keep_alive_until: float | None = None
    load_ms: float | None = None
    since: float = 0.0  # when the slot entered its current state
    pinned: bool = False
    rate: float = 0.0  # decayed requests/s at rate_at
    rate_at: float = 0.0
    reason: str = ""
    gen: int = 0  # which copy: a later load of the same model on the node has a higher gen
    load_seen_at: float | None = None  # when a load function took the load in hand

    @property
    def active(self) -> int:
        return len(self.leases)


class NodeRecord(BaseModel):
    node_id: str
    # "stub" is the benchmark-only in-process runtime of bench/overhead.py (never deployed).
    runtime: Literal["llamacpp", "ollama", "stub"]
    url: str
    capacity_bytes: int = Field(ge=0)
    measured_free_bytes: int | None = None
    heartbeat_at: float = 0.0
    models: dict[str, Slot] = Field(default_factory=dict)
    available: list[str] = Field(default_factory=list)  # models the runtime can load
    errors: dict[str, str] = Field(default_factory=dict)  # model -> last load error
    next_gen: int = 1  # the gen of the next slot created on this node
    runtime_log: str | None = None  # where the node agent sees the runtime's log, if it does
    models_dir: str | None = None  # where pulled GGUFs go (llama.cpp nodes of the local stack)
    draining: bool = False  # going away (scale-down): serves what it holds, takes nothing new

    def committed_bytes(self) -> int:
        return sum(s.bytes for s in self.models.values())

    def free_bytes(self) -> int:
        """Capacity minus what is committed, capped by the measured free memory."""
        free = self.capacity_bytes - self.committed_bytes()
        if self.measured_free_bytes is not None:
            free = min(free, self.measured_free_bytes)
        return free


class Registration(BaseModel):
    """Where a node's runtime is, as its own agent registered it (key `reg.<node_id>`,
    writable only by that node's identity). The functions call a runtime only at the URL
    of its registration, never at a URL a node record merely says."""

    node_id: str
    runtime: Literal["llamacpp", "ollama", "stub"]
    url: str
    runtime_log: str | None = None
    models_dir: str | None = None
    registered_at: float = 0.0


def decayed_rate(slot: Slot, now: float) -> float:
    if slot.rate <= 0.0:
        return 0.0
    return slot.rate * math.exp(-max(0.0, now - slot.rate_at) / RATE_TAU_S)


def _copy(node: NodeRecord) -> NodeRecord:
    """A copy the transitions may change: the dicts and lists are new, the rest immutable.
    (model_copy(deep=True) goes through copy.deepcopy: 7 % of the control plane's CPU.)"""
    return node.model_copy(
        update={
            "models": {
                name: slot.model_copy(update={"leases": dict(slot.leases)})
                for name, slot in node.models.items()
            },
            "available": list(node.available),
            "errors": dict(node.errors),
        }
    )


class TransitionError(RuntimeError):
    """The record no longer allows the change (another writer got there first)."""


def reserve(
    node: NodeRecord,
    model: str,
    nbytes: int,
    victims: list[str],
    task_id: str | None,
    now: float,
    reason: str = "",
) -> NodeRecord:
    """Commit a placement: `model` becomes loading (leased by task_id), victims evicting."""
    new = _copy(node)
    if model in new.models:
        raise TransitionError(f"{model} is already {new.models[model].state} on {node.node_id}")
    for v in victims:
        slot = new.models.get(v)
        if slot is None or slot.state != "ready" or slot.leases or slot.pinned:
            raise TransitionError(f"victim {v} is no longer evictable on {node.node_id}")
        slot.state, slot.since, slot.reason = "evicting", now, reason or f"make room for {model}"
    leases = {task_id: now + LEASE_TTL_S} if task_id else {}
    new.models[model] = Slot(
        state="loading",
        bytes=nbytes,
        leases=leases,
        since=now,
        last_used=now,
        reason=reason,
        gen=new.next_gen,
    )
    new.next_gen += 1
    new.errors.pop(model, None)
    return new


def mark_ready(
    node: NodeRecord,
    model: str,
    load_ms: float,
    now: float,
    keep_alive_s: float,
    nbytes: int | None = None,
    gen: int | None = None,
) -> NodeRecord:
    new = _copy(node)
    slot = new.models.get(model)
    if slot is None or (gen is not None and slot.gen != gen):
        raise TransitionError(f"{model} (gen {gen}) has no slot on {node.node_id}")
    slot.state, slot.since, slot.load_ms = "ready", now, load_ms
    slot.keep_alive_until = now + keep_alive_s
    if nbytes is not None:
        slot.bytes = nbytes
    return new


def mark_evicting(node: NodeRecord, model: str, now: float, reason: str) -> NodeRecord:
    new = _copy(node)
    slot = new.models.get(model)
    if slot is None or slot.state != "ready":
        raise TransitionError(f"{model} is not ready on {node.node_id}")
    if slot.leases:
        raise TransitionError(f"{model} is in use on {node.node_id} ({slot.active} active)")
    if slot.pinned:
        raise TransitionError(f"{model} is pinned on {node.node_id}")
    slot.state, slot.since, slot.reason = "evicting", now, reason
    return new


def remove(node: NodeRecord, model: str, error: str | None = None) -> NodeRecord:
    new = _copy(node)
    new.models.pop(model, None)
    if error:
        new.errors[model] = error
    return new


def remove_gen(node: NodeRecord, model: str, gen: int, error: str | None = None) -> NodeRecord:
    """Drop the slot only if it is still copy `gen` (not a newer load of the same model)."""
    slot = node.models.get(model)
    return remove(node, model, error) if slot and slot.gen == gen else node


def remove_if(node: NodeRecord, model: str, in_state: SlotState, error: str) -> NodeRecord:
    """Drop the slot only if it is still `in_state` (a reconcile decision may be stale)."""
    slot = node.models.get(model)
    return remove(node, model, error) if slot and slot.state == in_state else node


def take_lease(node: NodeRecord, model: str, task_id: str, now: float) -> NodeRecord:
    new = _copy(node)
    slot = new.models.get(model)
    if slot is None or slot.state == "evicting":
        raise TransitionError(f"{model} is not available on {node.node_id}")
    slot.leases[task_id] = now + LEASE_TTL_S
    slot.last_used = now
    return new


def release_lease(
    node: NodeRecord, model: str, task_id: str, now: float, keep_alive_s: float
) -> NodeRecord:
    """Drop the task's lease, count the request for the rate, extend keep-alive."""
    new = _copy(node)
    slot = new.models.get(model)
    if slot is None:
        return new
    slot.leases.pop(task_id, None)
    slot.last_used = now
    slot.rate = decayed_rate(slot, now) + 1.0 / RATE_TAU_S
    slot.rate_at = now
    if slot.state == "ready":
        slot.keep_alive_until = now + keep_alive_s
    return new


def drop_lease(node: NodeRecord, model: str, task_id: str, until: float) -> NodeRecord:
    """Take back a lease nothing was served under, if it is still the one written with
    expiry `until` (a later one of the same task is another run's): no use counted,
    keep-alive unchanged. The record itself is returned when there is no such lease."""
    slot = node.models.get(model)
    if slot is None or slot.leases.get(task_id) != until:
        return node
    new = _copy(node)
    del new.models[model].leases[task_id]
    return new


def expire_leases(node: NodeRecord, now: float) -> NodeRecord:
    new = _copy(node)
    for slot in new.models.values():
        for task_id, until in list(slot.leases.items()):
            if until < now:
                del slot.leases[task_id]
    return new


def mark_load_seen(node: NodeRecord, model: str, gen: int, now: float) -> NodeRecord:
    """A load function has taken this load in hand (so reconcile need not re-send it)."""
    slot = node.models.get(model)
    if slot is None or slot.state != "loading" or slot.gen != gen:
        raise TransitionError(f"{model} (gen {gen}) is not loading on {node.node_id}")
    new = _copy(node)
    new.models[model].load_seen_at = now
    return new
