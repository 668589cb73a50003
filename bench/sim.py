"""A discrete-event SIMULATION of a GPU fleet serving many models from too little memory.

Our policies (`cost`, `fewest`, `lru`) run through the very planner and state transitions the
functions use (`domain.planner.plan`, `domain.state.*`); `ollama` emulates Ollama's
documented scheduler (shared/notes/ollama.md §1.3-1.4). Nothing here touches a GPU.

Model of the fleet (printed with every run):
  memory(model)  = file bytes + KV cache + runtime overhead
                   KV cache  = ctx x kv_bytes_per_token, kv_bytes_per_token = 54,700 x params_b^0.42
                   (fitted to GQA Llama 3.1 8B: 128 KiB/token and 70B: 320 KiB/token, fp16 KV)
  load time      = LOAD_FIXED_S + memory / LOAD_BYTES_PER_S
  unload time    = UNLOAD_S (Ollama's VRAM-recovery wait, "typically 0.5-1.5 s")
  decode tok/s   = DECODE_BW x efficiency / file bytes   (memory-bandwidth bound)
  prefill tok/s  = PREFILL_FLOPS / (2 x params)         (compute bound)
Requests run concurrently on a loaded model (no batching slowdown); a request's wait is
arrival -> first token = queueing + loading + prefill.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from domain import planner, state
from domain.state import NodeRecord

from .catalog import CatalogModel

GB = 1e9
CTX = 4096
OVERHEAD_BYTES = 256 * 2**20
LOAD_FIXED_S = 0.8  # llama-server child start, measured here (Gemma 270M loads in ~0.8 s)
LOAD_BYTES_PER_S = 1.0 * GB  # gemma4:31b ~20 GB "llama-server started in 20.44 s" (Ollama #16599)
UNLOAD_S = 1.0
DECODE_BW = 3.35e12 * 0.5  # H100 SXM HBM3 bandwidth x 50 % achieved
PREFILL_FLOPS = 989e12 * 0.3  # H100 dense BF16 x 30 % MFU
OLLAMA_KEEP_ALIVE_S = 300.0
OLLAMA_MAX_LOADED_PER_GPU = 3


def kv_bytes(m: CatalogModel, ctx: int = CTX) -> int:
    return int(min(ctx, m.context) * 54_700 * m.params_b**0.42)


def memory_bytes(m: CatalogModel) -> int:
    return m.file_bytes + kv_bytes(m) + OVERHEAD_BYTES


def load_s(nbytes: int) -> float:
    return LOAD_FIXED_S + nbytes / LOAD_BYTES_PER_S


def constants() -> str:
    return (
        f"memory = file + ctx {CTX} x 54700 x params_b^0.42 B/token (KV) + "
        f"{OVERHEAD_BYTES / 2**20:.0f} MiB; load = {LOAD_FIXED_S} s + bytes / "
        f"{LOAD_BYTES_PER_S / GB:.1f} GB/s; unload {UNLOAD_S} s; decode = "
        f"{DECODE_BW / 1e12:.2f} TB/s / file bytes; prefill = {PREFILL_FLOPS / 1e12:.0f} "
        f"TFLOP/s / (2 x params)"
    )


@dataclass(frozen=True)
class Request:
    id: int
    t: float
    model: str
    prompt_tokens: int
    output_tokens: int


@dataclass
class Result:
    policy: str
    waits: list[float] = field(default_factory=list)  # arrival -> first token, per request
    served: list[Request] = field(default_factory=list)  # re-timed to when service began
    loads: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0
    mem_time: float = 0.0  # integral of committed bytes over time
    span_s: float = 0.0
    capacity: int = 0
    unserved: int = 0

    def summary(self) -> dict[str, float]:
        w = sorted(self.waits)

        def pct(q: float) -> float:
            return w[min(len(w) - 1, int(q * len(w)))] if w else math.nan

        n = max(1, len(w))
        return {
            "requests": len(w),
            "loads": self.loads,
            "gb_loaded": self.bytes_loaded / GB,
            "load_s": self.load_seconds,
            "wait_p50_s": pct(0.50),
            "wait_p95_s": pct(0.95),
            "wait_p99_s": pct(0.99),
            "slo_2s": sum(x <= 2 for x in w) / n,
            "slo_10s": sum(x <= 10 for x in w) / n,
            "unserved": self.unserved,
            "mem_util": self.mem_time / max(1e-9, self.span_s * self.capacity),
        }


class Fleet:
    """The event loop and the bookkeeping shared by every policy."""

    def __init__(
        self, gpus: int, capacity: int, models: dict[str, CatalogModel], policy: str
    ) -> None:
        self.models = models
        self.mem = {name: memory_bytes(m) for name, m in models.items()}
        self.nodes = {
            f"gpu{i}": NodeRecord(
                node_id=f"gpu{i}",
                runtime="llamacpp",
                url="sim",
                capacity_bytes=capacity,
                heartbeat_at=0.0,
            )
            for i in range(gpus)
        }
        self.now = 0.0
        self.events: list[tuple[float, int, str, tuple[object, ...]]] = []
        self.seq = itertools.count()
        self.waiting: list[Request] = []  # requests that could not be placed yet
        self.attached: dict[tuple[str, str], list[Request]] = {}  # waiting on a loading slot
        self.result = Result(policy, capacity=capacity * gpus)
        self.last_mem_t = 0.0

    # -- time and memory accounting -----------------------------------------------------------
    def at(self, t: float, kind: str, *args: object) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, args))

    def advance(self, t: float) -> None:
        used = sum(n.committed_bytes() for n in self.nodes.values())
        self.result.mem_time += used * (t - self.last_mem_t)
        self.last_mem_t = self.now = t

    def set(self, node_id: str, record: NodeRecord) -> None:
        record.heartbeat_at = self.now
        self.nodes[node_id] = record

    def where(self, model: str) -> tuple[str, str] | None:
        for node_id, rec in self.nodes.items():
            slot = rec.models.get(model)
            if slot and slot.state in ("ready", "loading"):
                return node_id, slot.state
        return None

    # -- the life of a request ----------------------------------------------------------------
    def start(self, node_id: str, req: Request) -> None:
        m = self.models[req.model]
        prefill = req.prompt_tokens * 2 * m.params_b * 1e9 / PREFILL_FLOPS
        decode = req.output_tokens * m.file_bytes / DECODE_BW
        self.result.waits.append(self.now + prefill - req.t)
        self.result.served.append(
            Request(req.id, self.now, req.model, req.prompt_tokens, req.output_tokens)
        )
        self.at(self.now + prefill + decode, "done", node_id, req)

    def lease(self, node_id: str, req: Request) -> None:
        self.set(node_id, state.take_lease(self.nodes[node_id], req.model, f"r{req.id}", self.now))
        if self.nodes[node_id].models[req.model].state == "ready":
            self.start(node_id, req)
        else:
            self.attached.setdefault((node_id, req.model), []).append(req)

    def begin_load(self, node_id: str, model: str, after: float) -> None:
        seconds = load_s(self.mem[model])
        self.result.loads += 1
        self.result.bytes_loaded += self.mem[model]
        self.result.load_seconds += seconds
        self.at(self.now + after + seconds, "loaded", node_id, model, seconds)

    def on_loaded(self, node_id: str, model: str, seconds: float) -> None:
        self.set(
            node_id,
            state.mark_ready(
                self.nodes[node_id], model, seconds * 1000, self.now, self.keep_alive_s
            ),
        )
        for req in self.attached.pop((node_id, model), []):
            self.start(node_id, req)

    def on_done(self, node_id: str, req: Request) -> None:
        self.set(
            node_id,
            state.release_lease(
                self.nodes[node_id], req.model, f"r{req.id}", self.now, self.keep_alive_s
            ),
        )
        self.after_release(node_id, req.model)

    def on_unloaded(self, node_id: str, model: str) -> None:
        self.set(node_id, state.remove(self.nodes[node_id], model))

    def retry_waiting(self) -> None:
        pending, self.waiting = self.waiting, []
        for req in pending:
            self.arrive(req)

    # -- policy hooks ---------------------------------------------------------------------------
    keep_alive_s = math.inf

    def arrive(self, req: Request) -> None:
        raise NotImplementedError

    def after_release(self, node_id: str, model: str) -> None:
        self.retry_waiting()

    def on_expire(self, node_id: str, model: str, due: float) -> None:
        pass

    def on_retry(self, model: str) -> None:
        pass

    def run(self, requests: list[Request]) -> Result:
        for req in requests:
            if self.mem[req.model] > max(n.capacity_bytes for n in self.nodes.values()):
                self.result.unserved += 1
                continue
            self.at(req.t, "arrive", req)
        handlers: dict[str, Callable[..., None]] = {
            "arrive": self.arrive,
            "loaded": self.on_loaded,
            "done": self.on_done,
            "unloaded": self.on_unloaded_then_retry,
            "expire": self.on_expire,
            "retry": self.on_retry,
        }
        while self.events:
            t, _, kind, args = heapq.heappop(self.events)
            self.advance(t)
            handlers[kind](*args)
        self.result.span_s = self.now
        self.result.unserved += len(self.waiting)
        return self.result

    def on_unloaded_then_retry(self, node_id: str, model: str) -> None:
        self.on_unloaded(node_id, model)
        self.retry_waiting()


class PlannerFleet(Fleet):
    """Our scheduler: the product's planner, evicting only on demand (no keep-alive expiry).

    Waiting requests are retried model by model, oldest first, each model with the summed
    wait and count of its queued requests (what the chat function reads from the queue key),
    so `cost`'s admission sees the same inputs here as in the product."""

    def __init__(self, *args: object, policy: planner.Policy) -> None:
        super().__init__(*args, policy=policy)  # type: ignore[misc]
        self.policy = policy
        self.retry_at: dict[str, float] = {}

    def arrive(self, req: Request) -> None:
        found = self.where(req.model)
        if found:
            self.lease(found[0], req)
            return
        self.waiting.append(req)
        self.try_place(req.model, [r for r in self.waiting if r.model == req.model])

    def retry_waiting(self) -> None:
        groups: dict[str, list[Request]] = {}
        for r in self.waiting:
            groups.setdefault(r.model, []).append(r)
        for model, reqs in groups.items():
            found = self.where(model)
            if found:
                self.waiting = [r for r in self.waiting if r.model != model]
                for r in reqs:
                    self.lease(found[0], r)
            else:
                self.try_place(model, reqs)

    def try_place(self, model: str, reqs: list[Request]) -> None:
        """Plan a load of `model` for its waiting requests `reqs` (oldest first)."""
        for node in self.nodes.values():
            node.heartbeat_at = self.now  # simulated nodes are always alive
        reserved = frozenset(r.model for r in self.waiting if r.model != model)
        first_t = min(r.t for r in reqs)
        result = planner.plan(
            planner.PlanRequest(
                model,
                self.mem[model],
                reserved,
                waited_s=sum(self.now - r.t for r in reqs),
                waiting=len(reqs),
                oldest_s=self.now - first_t,
            ),
            list(self.nodes.values()),
            self.now,
            self.policy,
        )
        if isinstance(result, planner.Placement):
            node = state.reserve(
                self.nodes[result.node_id],
                model,
                result.bytes,
                list(result.evict),
                f"r{reqs[0].id}",
                self.now,
            )
            self.set(result.node_id, node)
            for victim in result.evict:
                self.at(self.now + UNLOAD_S, "unloaded", result.node_id, victim)
            self.begin_load(result.node_id, model, UNLOAD_S if result.evict else 0.0)
            self.waiting = [r for r in self.waiting if r.model != model]
            first, *rest = reqs
            self.attached.setdefault((result.node_id, model), []).append(first)
            for r in rest:
                self.lease(result.node_id, r)
        elif isinstance(result, planner.Queue):
            if result.retry_s is not None:
                due = self.now + result.retry_s
                if not self.now < self.retry_at.get(model, -1.0) <= due:
                    self.retry_at[model] = due
                    self.at(due, "retry", model)
        else:
            self.waiting = [r for r in self.waiting if r.model != model]
            self.result.unserved += len(reqs)

    def on_retry(self, model: str) -> None:
        reqs = [r for r in self.waiting if r.model == model]
        if reqs and not self.where(model):
            self.try_place(model, reqs)


class OllamaFleet(Fleet):
    """Ollama's scheduler as documented: at most 3 loaded models per GPU, keep-alive 5 min,
    evict ONE idle runner at a time (shortest keep-alive, then name: effectively by name
    when all share the default), re-check the fit after each unload; one pending load at a
    time (head-of-line); a model that cannot fit waits."""

    keep_alive_s = OLLAMA_KEEP_ALIVE_S

    def __init__(self, *args: object) -> None:
        super().__init__(*args, policy="ollama")  # type: ignore[misc]
        self.busy_until = 0.0  # the single scheduler goroutine

    def arrive(self, req: Request) -> None:
        found = self.where(req.model)
        if found:
            self.lease(found[0], req)
            return
        self.waiting.append(req)  # FIFO: one pending request is scheduled at a time
        self.schedule_head()

    def schedule_head(self) -> None:
        if not self.waiting or self.busy_until > self.now:
            return
        req = self.waiting[0]
        found = self.where(req.model)
        if found:
            self.waiting.pop(0)
            self.lease(found[0], req)
            self.schedule_head()
            return
        need = self.mem[req.model]
        loaded = sum(len(n.models) for n in self.nodes.values())
        # OLLAMA_MAX_LOADED_MODELS defaults to 3 x GPUs, compared with the total (§1.3).
        fits = [n for n in self.nodes.values() if n.free_bytes() >= need]
        if fits and loaded < OLLAMA_MAX_LOADED_PER_GPU * len(self.nodes):
            node = max(fits, key=lambda n: (n.free_bytes(), n.node_id))
            self.waiting.pop(0)
            self.set(node.node_id, state.reserve(node, req.model, need, [], f"r{req.id}", self.now))
            self.attached.setdefault((node.node_id, req.model), []).append(req)
            self.begin_load(node.node_id, req.model, 0.0)
            self.busy_until = self.now + load_s(need)  # the load blocks the scheduler
            return
        # Evict one idle runner (all share the default keep-alive: so by name), then re-check.
        idle = sorted(
            (name, n.node_id)
            for n in self.nodes.values()
            for name, s in n.models.items()
            if s.state == "ready" and not s.leases
        )
        if not idle:
            return  # wait until a runner goes idle
        name, node_id = idle[0]
        self.set(node_id, state.mark_evicting(self.nodes[node_id], name, self.now, "ollama"))
        self.busy_until = self.now + UNLOAD_S
        self.at(self.now + UNLOAD_S, "unloaded", node_id, name)

    def after_release(self, node_id: str, model: str) -> None:
        slot = self.nodes[node_id].models.get(model)
        if slot and not slot.leases and slot.state == "ready":
            self.at(self.now + self.keep_alive_s, "expire", node_id, model, self.now)
        self.schedule_head()

    def on_expire(self, node_id: str, model: str, due: float) -> None:
        slot = self.nodes[node_id].models.get(model)
        if slot and slot.state == "ready" and not slot.leases and slot.last_used <= due:
            self.set(
                node_id, state.mark_evicting(self.nodes[node_id], model, self.now, "keep_alive")
            )
            self.at(self.now + UNLOAD_S, "unloaded", node_id, model)

    def on_unloaded_then_retry(self, node_id: str, model: str) -> None:
        self.on_unloaded(node_id, model)
        self.schedule_head()

    def on_loaded(self, node_id: str, model: str, seconds: float) -> None:
        super().on_loaded(node_id, model, seconds)
        self.schedule_head()


def simulate(
    policy: str,
    requests: list[Request],
    models: dict[str, CatalogModel],
    gpus: int = 2,
    capacity: int = int(80 * GB),
) -> Result:
    if policy == "ollama":
        return OllamaFleet(gpus, capacity, models).run(requests)
    if policy not in planner.POLICIES:
        raise ValueError(f"unknown policy {policy!r}")
    return PlannerFleet(gpus, capacity, models, policy=policy).run(requests)  # type: ignore[arg-type]
