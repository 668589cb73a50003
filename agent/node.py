"""The node agent: one per runtime. Registers the node, then heartbeats its measured memory.

Memory: on a GPU, NVML (`pynvml`, from nvidia-ml-py) gives the device's free bytes; on a CPU
node the budget is the configured capacity, checked against the resident memory of the
runtime's processes (llama-server spawns one child per loaded model).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import psutil
from nats.js import JetStreamContext

from domain import footprint
from domain.state import NodeRecord, Registration
from events import bus
from events.codec import Event
from runtimes.base import Runtime
from stores.catalog import Catalog
from stores.fleet import Fleet
from stores.waiting import Waiting

from .gpu import GpuProbe

log = logging.getLogger("agent.node")
MemoryProbe = Callable[[], int | None]


def nvml_probe(index: int = 0) -> MemoryProbe | None:
    """Free bytes of GPU `index` via NVML, or None when there is no NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # no driver / no GPU: pynvml raises NVMLError subclasses
        return None

    def probe() -> int | None:
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)

    return probe


def process_tree_probe(pid: Callable[[], int], capacity_bytes: int) -> MemoryProbe:
    """Capacity minus the RSS of the runtime's children (the model processes); `pid` gives
    the runtime's current process (it changes when the runtime is restarted)."""

    def probe() -> int | None:
        try:
            children = psutil.Process(pid()).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        used = 0
        for child in children:
            try:
                used += child.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return max(0, capacity_bytes - used)

    return probe


class TickWaker:
    """What a node agent wakes the parked requests with when it joins or leaves, under least
    privilege: a `fleet.tick`, on which the reconcile function wakes the queue's heads (an
    agent may not read or re-publish other clients' parked requests itself)."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js

    async def wake_heads(self, trigger: str, models: set[str] | None = None) -> int:
        await bus.publish(self.js, Event("fleet.tick", {"trigger": trigger}))
        return 0


class NodeAgent:
    def __init__(
        self,
        fleet: Fleet,
        node_id: str,
        runtime: Runtime,
        capacity_bytes: int,
        probe: MemoryProbe | None = None,
        interval_s: float = 2.0,
        runtime_log: str | None = None,
        waiting: Waiting | TickWaker | None = None,
        models_dir: str | None = None,
        gpu: GpuProbe | None = None,
        catalog: Catalog | None = None,
        advertise_url: str | None = None,
    ) -> None:
        self.fleet, self.node_id, self.runtime = fleet, node_id, runtime
        # On a GPU: NVML-true free memory, and each resident model's bytes corrected from its
        # process's reading (written back to the catalog, so the next load books it right).
        self.gpu, self.catalog = gpu, catalog
        # Where the functions reach the runtime (a pod's DNS name), if not where the agent does.
        self.url = advertise_url or runtime.url
        self.capacity_bytes, self.probe, self.interval_s = capacity_bytes, probe, interval_s
        self.runtime_log, self.models_dir = runtime_log, models_dir
        self.waiting = waiting  # woken when the node (re)joins: its memory is free

    async def register(self, runtime_started_at: float | None = None) -> NodeRecord:
        """First beat after the runtime (re)started: forget residency it cannot have.

        A previous run may have left `loading`/`ready` slots in KV for a runtime that has
        just started empty; keeping them would hold phantom memory until reconcile caught up.
        A load placed since the runtime started (`runtime_started_at`) is kept: its
        `model.load` is on its way to the new process.
        """
        loaded = await self.runtime.loaded()
        await self.fleet.register(
            Registration(
                node_id=self.node_id,
                runtime=self.runtime.kind,  # type: ignore[arg-type]
                url=self.url,
                runtime_log=self.runtime_log,
                models_dir=self.models_dir,
                registered_at=time.time(),
            )
        )
        record = await self.beat(
            await self.runtime.available(),
            keep_only=set(loaded),
            fresh=True,
            keep_loading_since=runtime_started_at,
        )
        if self.waiting is not None:
            await self.waiting.wake_heads(f"join.{self.node_id}.{int(time.time())}")
        return record

    async def beat(
        self,
        available: list[str] | None = None,
        keep_only: set[str] | None = None,
        fresh: bool = False,
        keep_loading_since: float | None = None,
    ) -> NodeRecord:
        measured = self.probe() if self.probe else None
        reading, used = self.gpu.read() if self.gpu else (None, {})
        now = time.time()
        learned: dict[str, int] = {}

        def transition(r: NodeRecord) -> NodeRecord:
            new = r.model_copy(deep=True)
            new.heartbeat_at, new.measured_free_bytes = now, measured
            if reading is not None:
                for m, slot in new.models.items():
                    if slot.state == "ready" and m in used:
                        slot.bytes = footprint.corrected(slot.bytes, used[m])
                        learned[m] = slot.bytes
                booked = {m: s.bytes for m, s in new.models.items() if s.state != "evicting"}
                new.measured_free_bytes = footprint.true_free(reading.free, booked, used)
            new.url, new.runtime = self.url, self.runtime.kind  # type: ignore[assignment]
            new.capacity_bytes = self.capacity_bytes
            if available is not None:
                new.available = available
            new.runtime_log, new.models_dir = self.runtime_log, self.models_dir
            if keep_only is not None:
                new.models = {
                    m: s
                    for m, s in new.models.items()
                    if m in keep_only
                    or (
                        keep_loading_since is not None
                        and s.state == "loading"
                        and s.since >= keep_loading_since
                    )
                }
            if fresh:
                new.errors = {}  # a previous run's load errors say nothing about this one
                new.draining = False
            return new

        fresh = NodeRecord(
            node_id=self.node_id,
            runtime=self.runtime.kind,  # type: ignore[arg-type]
            url=self.url,
            capacity_bytes=self.capacity_bytes,
            measured_free_bytes=measured,
            heartbeat_at=now,
            available=available or [],
            runtime_log=self.runtime_log,
            models_dir=self.models_dir,
        )
        record = await self.fleet.upsert(fresh, transition)
        if self.catalog is not None:
            await self._learn(learned)
        return record

    async def _learn(self, measured: dict[str, int]) -> None:
        """Write measured footprints into the catalog (what the planner books next time)."""
        assert self.catalog is not None
        for model, nbytes in measured.items():
            info = await self.catalog.get(model)
            if info is not None and info.bytes != nbytes:
                await self.catalog.put(info.model_copy(update={"bytes": nbytes}))
                log.info(
                    "footprint model=%s node=%s bytes=%d (measured)", model, self.node_id, nbytes
                )

    async def drain(self, timeout_s: float, poll_s: float = 0.5) -> bool:
        """Leave the fleet gracefully (scale-down, SIGTERM): mark the node draining so nothing
        new is placed or leased on it, wait up to `timeout_s` for the chats it serves to end,
        then delete its record. True when no chat was still active at the end."""

        def mark(r: NodeRecord) -> NodeRecord:
            new = r.model_copy(deep=True)
            new.draining, new.heartbeat_at = True, time.time()
            return new

        await self.fleet.update(self.node_id, mark)
        log.info("node %s draining (up to %.0fs)", self.node_id, timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            record, rev = await self.fleet.get(self.node_id)
            busy = sum(len(s.leases) for s in record.models.values())
            if busy == 0 or time.monotonic() >= deadline:
                break
            await asyncio.sleep(poll_s)
        while not await self.fleet.forget(self.node_id, rev):  # a beat raced us: re-read
            record, rev = await self.fleet.get(self.node_id)
        log.info("node %s left the fleet (%d chats still active)", self.node_id, busy)
        if self.waiting is not None:  # its residency is gone: parked requests re-plan
            await self.waiting.wake_heads(f"leave.{self.node_id}.{int(time.time())}")
        return busy == 0

    async def run(self, stop: asyncio.Event) -> None:
        beats = 0
        while not stop.is_set():
            try:
                available = await self.runtime.available() if beats % 15 == 0 else None
                await self.beat(available)
                beats += 1
            except Exception as exc:  # keep beating through runtime/NATS blips
                log.warning("heartbeat of %s failed: %s", self.node_id, exc)
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except TimeoutError:
                pass
