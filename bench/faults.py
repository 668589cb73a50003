"""The fault suite (`make faults`): chats under memory pressure on the real local stack while
its parts are killed, and a table of what every chat saw.

The stack is the one `make run` starts — nats-server with auth, a llama-server router with
Gemma 3 270M aliases and SmolLM2, the functions as functions-framework processes fed by the
dispatchers — on a node too small for the models asked for, so loads, evictions and waiting
all happen. The chats go in windows of equal size; in each, once answers stream and others
wait, one fault is injected:

    function   kill -9 of the chat function's process (functions-framework) mid-stream
    child      kill -9 of the llama-server child process serving a model in use
    router     kill -9 of the llama-server router (all its children go with it)
    nats       kill -9 of nats-server; the stack restarts it (JetStream is on disk)
    cluster    on a second stack with a 3-server JetStream cluster (replicas 3): kill -9 of
               the server leading the event stream

Per window: chats started; chats with exactly one terminal event (chat.completed or
chat.failed, as JetStream stored them); lost (none within the deadline); duplicated ends;
token gaps inside one `attempt` (a missing or repeated seq); time to recover (from the
fault to the first chat completed after it); leases still held once all ended; and
over-commit (committed bytes above capacity) in any revision of any node key, every
revision read from the KV stream as it was written. Then 64 concurrent placements across 2
nodes on one bucket, every revision checked.

    python -m bench.faults                # 200 chats + the cluster window
    python -m bench.faults --chats 20 --no-cluster   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import itertools
import logging
import os
import random
import signal
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import psutil

from domain import planner
from domain.state import NodeRecord
from events import bus
from events.codec import Event, decode
from events.keys import node_key
from events.types import ChatRequested
from functions.services import Services, Settings
from stack.local import CHAT_MODEL, DEFAULT_MODELS, GEMMA_BYTES, LocalStack, Proc, StackConfig
from stores.fleet import Fleet

OUT = Path("docs/bench")
MIB = 1 << 20
LOCAL_FAULTS = ("function", "child", "router", "nats")
NEVER = "<never-emitted>"  # a stop string no model writes: answers run to max_tokens
PROMPTS = (
    "Tell a short story about a lighthouse.",
    "What is the capital of France?",
    "Write two lines about the sea.",
    "Explain what a GPU is.",
    "List three colours.",
)
log = logging.getLogger("bench.faults")


@dataclass
class Row:
    fault: str
    chats: int = 0
    one_end: int = 0
    completed: int = 0
    failed: int = 0
    lost: int = 0
    duplicated: int = 0
    gaps: int = 0
    retried: int = 0  # chats whose answer came from a second attempt (a redelivery)
    recover_s: float | None = None
    leases_left: int = 0
    revisions: int = 0  # node-key revisions checked during the window
    overcommit: int = 0  # revisions placing more than the node's capacity
    samples: int = 0  # runtime samples taken during the window
    held_over: int = 0  # samples where the node's model processes held more than its capacity
    missed_revisions: int = 0  # revisions gone before the checker read them (none expected)
    violations: int = 0  # permissions violations nats-server logged (none expected)
    injected: str = ""  # what was killed
    streaming_at_fault: int = 0  # chats of the window streaming when it was injected
    live_ends: int = 0  # a second terminal event, under another message id, heard live
    resent_ends: int = 0  # the same end heard live again (same message id: a re-send)
    peak_held: int = 0  # the most the node's model processes held in a sample (bytes)
    failures: Counter[str] = field(default_factory=Counter)  # chat.failed codes

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.gaps == 0
            and self.leases_left == 0
            and self.overcommit == 0
            and self.held_over == 0
            and self.violations == 0
            and self.live_ends == 0
            and self.one_end == self.chats
        )


# -- watching every revision of every node key, and the runtime's processes ----------------------
def placed_bytes(rec: NodeRecord) -> int:
    """What a node record commits to the models placed on it: every slot but those being
    evicted. A placement marks its victims `evicting` and its model `loading` in one revision
    (so that revision's slots add up to more than the node); the load itself starts only once
    no eviction is pending on the node (functions/load.py), which the runtime sampler checks
    from the other side."""
    return sum(s.bytes for s in rec.models.values() if s.state != "evicting")


class RevisionChecker:
    """Reads the fleet bucket's stream by sequence as it grows (so every revision is seen, not
    only the last; the bucket keeps 64 per key, far more than the checker ever lags) and
    checks each node record: placed bytes within capacity. Survives a nats-server restart."""

    def __init__(self, js: Any) -> None:
        self.js = js
        self.stream = f"KV_{bus.FLEET_BUCKET}"
        self.next_seq = 1
        self.checked = 0
        self.missed = 0
        self.overcommit: list[str] = []
        self.stopped = asyncio.Event()

    async def catch_up(self) -> None:
        last = (await self.js.stream_info(self.stream)).state.last_seq
        prefix = f"$KV.{bus.FLEET_BUCKET}.node."
        while self.next_seq <= last:
            try:
                msg = await self.js.get_msg(self.stream, self.next_seq)
            except nats.js.errors.NotFoundError:
                self.missed += 1
            else:
                if msg.subject.startswith(prefix) and msg.data:
                    rec = NodeRecord.model_validate_json(msg.data)
                    self.checked += 1
                    if placed_bytes(rec) > rec.capacity_bytes:
                        slots = ", ".join(
                            f"{m} {s.state} {s.bytes / MIB:.0f}" for m, s in rec.models.items()
                        )
                        self.overcommit.append(
                            f"{rec.node_id} seq {self.next_seq}: {placed_bytes(rec) / MIB:.0f}"
                            f" > {rec.capacity_bytes / MIB:.0f} MiB ({slots})"
                        )
            self.next_seq += 1

    async def run(self) -> None:
        while not self.stopped.is_set():
            try:
                await self.catch_up()
            except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError) as exc:
                log.debug("revision checker waits for NATS: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), 0.05)


class RuntimeSampler:
    """What the node really holds: every 50 ms, the llama-server router's model processes
    alive (each child names its model in its arguments), at the bytes the catalog reserves
    for them. More than the node's capacity in any sample is a physical over-commit."""

    def __init__(self, stack: LocalStack, sizes: dict[str, int]) -> None:
        self.stack, self.sizes = stack, sizes
        self.samples = 0
        self.over: list[str] = []
        self.peak = 0
        self.stopped = asyncio.Event()

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error, StopIteration):
            router = psutil.Process(_proc(self.stack, "llama-server-node-0").popen.pid)
            held: dict[str, int] = {}
            for child in router.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    args = child.cmdline()
                    for model, nbytes in self.sizes.items():
                        if model in args:
                            held[model] = nbytes
            total = sum(held.values())
            self.samples += 1
            self.peak = max(self.peak, total)
            if total > self.stack.cfg.node_memory:
                self.over.append(f"{total / MIB:.0f} MiB: {sorted(held)}")

    async def run(self) -> None:
        while not self.stopped.is_set():
            await asyncio.to_thread(self.sample)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), 0.05)


# -- what JetStream stored ------------------------------------------------------------------------
async def _read_stream(js: Any, stream: str, first: int, keep: Callable[[str], bool]) -> list[Any]:
    last = (await js.stream_info(stream)).state.last_seq
    out = []
    for seq in range(first, last + 1):
        try:
            msg = await js.get_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            continue
        if keep(msg.subject):
            out.append(decode(msg.headers or {}, msg.data or b""))
    return out


async def _last_seq(js: Any, stream: str) -> int:
    return int((await js.stream_info(stream)).state.last_seq)


async def _ends(js: Any, first: int) -> dict[str, list[Event]]:
    ends: dict[str, list[Event]] = defaultdict(list)
    for ev in await _read_stream(
        js,
        bus.EVENTS_STREAM,
        first,
        lambda s: s.startswith(("ollama.chat.completed.", "ollama.chat.failed.")),
    ):
        ends[ev.data["task_id"]].append(ev)
    return ends


def _gaps(tokens: list[Event]) -> int:
    """Missing or repeated seqs inside one attempt of one chat."""
    by_attempt: dict[tuple[str, int], list[int]] = defaultdict(list)
    for ev in tokens:
        by_attempt[ev.data["task_id"], int(ev.data.get("attempt", 1))].append(ev.data["seq"])
    gaps = 0
    for seqs in by_attempt.values():
        seqs.sort()
        gaps += sum(1 for a, b in itertools.pairwise(seqs) if b != a + 1)
        gaps += 1 if seqs and seqs[0] != 0 else 0
    return gaps


async def _wait(
    cond: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.25
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if await cond():
                return True
        await asyncio.sleep(interval)
    return False


async def _leases(svc: Services) -> int:
    return sum(slot.active for rec, _ in await svc.fleet.nodes() for slot in rec.models.values())


async def _quiet(svc: Services) -> bool:
    """No lease held and nobody waiting."""
    return await _leases(svc) == 0 and not await svc.waiting.all()


# -- faults ----------------------------------------------------------------------------------------
def _proc(stack: LocalStack, name: str) -> Proc:
    return next(p for p in stack.procs if p.name == name)


def _kill_group(stack: LocalStack, name: str) -> str:
    proc = _proc(stack, name)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.popen.pid, signal.SIGKILL)
    return f"{name} pid {proc.popen.pid}"


async def _kill_child_in_use(stack: LocalStack) -> str:
    """kill -9 of the llama-server child process of a model that holds a lease."""
    router = psutil.Process(_proc(stack, "llama-server-node-0").popen.pid)
    assert stack.svc is not None
    for _ in range(200):
        rec, _ = await stack.svc.fleet.get("node-0")
        busy = [m for m, s in rec.models.items() if s.active and s.state == "ready"]
        for child in router.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                args = child.cmdline()
                hit = next((m for m in busy if m in args), None)
                if hit:
                    child.kill()
                    return f"child of {hit} pid {child.pid}"
        await asyncio.sleep(0.05)
    raise RuntimeError("no model process in use to kill")


async def _kill_stream_leader(stack: LocalStack) -> str:
    """In a cluster: kill -9 of the server that leads the event stream."""
    assert stack.svc is not None
    info = await stack.svc.js.stream_info(bus.EVENTS_STREAM)
    leader = int((info.cluster.leader or "nats-0").rsplit("-", 1)[1])
    return _kill_group(stack, "nats-server" if leader == 0 else f"nats-server-{leader}")


async def inject(stack: LocalStack, fault: str) -> str:
    if fault == "function":
        return _kill_group(stack, "function-chat")
    if fault == "child":
        return await _kill_child_in_use(stack)
    if fault == "router":
        return _kill_group(stack, "llama-server-node-0")
    if fault == "nats":
        return _kill_group(stack, "nats-server")
    if fault == "cluster":
        return await _kill_stream_leader(stack)
    raise ValueError(f"unknown fault {fault!r}")


# -- one window ------------------------------------------------------------------------------------
def _requests(n: int, rng: random.Random, models: list[str]) -> list[Event]:
    out = []
    for _ in range(n):
        req = ChatRequested(
            chat_id=uuid.uuid4().hex[:12],
            model=rng.choice(models),
            messages=[{"role": "user", "content": rng.choice(PROMPTS)}],
            options={"max_tokens": rng.randint(12, 40), "stop": [NEVER], "temperature": 0.7},
        )
        out.append(Event("chat.requested", req.model_dump(exclude_none=True)))
    return out


class Observer:
    """Live view of the chats' tokens and ends (core NATS, as admin): when to inject and
    when service came back. The figures come from what JetStream stored."""

    def __init__(self) -> None:
        self.tokens: Counter[str] = Counter()
        self.completed_at: list[float] = []
        self.ended: set[str] = set()
        self.end_ids: dict[str, list[str]] = defaultdict(list)  # live ends' message ids

    async def attach(self, nc: Any) -> None:
        async def on_token(msg: Any) -> None:
            self.tokens[msg.subject.rsplit(".", 1)[-1]] += 1

        async def on_end(msg: Any) -> None:
            ev = decode(msg.headers or {}, msg.data)
            self.ended.add(ev.data.get("task_id", ""))
            msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
            self.end_ids[ev.data.get("task_id", "")].append(msg_id)
            if ev.type == "chat.completed":
                self.completed_at.append(time.monotonic())

        await nc.subscribe("ollama.chat.token.>", cb=on_token)
        await nc.subscribe("ollama.chat.completed.>", cb=on_end)
        await nc.subscribe("ollama.chat.failed.>", cb=on_end)


async def window(
    stack: LocalStack,
    client_js: Any,
    observer: Observer,
    checker: RevisionChecker,
    sampler: RuntimeSampler,
    fault: str,
    n: int,
    rng: random.Random,
    models: list[str],
    deadline_s: float,
) -> Row:
    svc = stack.svc
    assert svc is not None
    row = Row(fault, chats=n)
    first_event = await _last_seq(svc.js, bus.EVENTS_STREAM) + 1
    first_token = await _last_seq(svc.js, bus.TOKENS_STREAM) + 1
    checked0, missed0 = checker.checked, checker.missed
    over0, samples0 = len(checker.overcommit), sampler.samples
    held0 = len(sampler.over)
    violations0 = _violations(stack)
    expired0 = _expired_leases(stack)
    events = _requests(n, rng, models)
    ids = {ev.id for ev in events}
    chats = {ev.data["chat_id"] for ev in events}
    for ev in events:
        await bus.publish(client_js, ev)

    def streaming() -> bool:  # answers stream and others are still to come
        ended = len(ids & observer.ended)
        return any(observer.tokens[c] >= 3 for c in chats) and ended <= n // 2

    async def ready() -> bool:
        return streaming()

    await _wait(ready, timeout=deadline_s)
    row.streaming_at_fault = sum(1 for c in chats if observer.tokens[c] >= 1) - len(
        ids & observer.ended
    )
    t_fault = time.monotonic()
    what = row.injected = await inject(stack, fault)
    log.info("%s: injected (%s) with %d of %d ended", fault, what, len(ids & observer.ended), n)

    async def all_ended() -> bool:
        return len(await _ends(svc.js, first_event)) >= n

    await _wait(all_ended, timeout=deadline_s, interval=1.0)
    after = [t for t in observer.completed_at if t > t_fault]
    row.recover_s = round(after[0] - t_fault, 2) if after else None
    ends = await _ends(svc.js, first_event)
    # Every chat has ended, so no lease should be held: one still held 15 s on (the lease
    # TTL is 60 s, so reconcile has not expired it yet) is a leak, and so is one reconcile
    # had to expire during the window.
    await _wait(lambda: _quiet(svc), timeout=15)
    row.leases_left = await _leases(svc) + _expired_leases(stack) - expired0
    mine = {t: evs for t, evs in ends.items() if t in ids}
    row.one_end = sum(1 for evs in mine.values() if len(evs) == 1)
    row.duplicated = sum(len(evs) - 1 for evs in mine.values() if len(evs) > 1)
    row.lost = n - len(mine)
    for evs in mine.values():
        end = evs[0]
        if end.type == "chat.completed":
            row.completed += 1
            row.retried += int(end.data["stats"].get("attempt", 1) > 1)
        else:
            row.failed += 1
            row.failures[end.data["error"]["code"]] += 1
    tokens = await _read_stream(
        svc.js, bus.TOKENS_STREAM, first_token, lambda s: s.startswith("ollama.chat.token.")
    )
    mine_tokens = [t for t in tokens if t.data.get("task_id") in ids]
    row.gaps = _gaps(mine_tokens) + _short_answers(mine_tokens, mine)
    heard = [observer.end_ids[t] for t in ids]
    row.live_ends = sum(len(set(h)) - 1 for h in heard if h)
    row.resent_ends = sum(len(h) - len(set(h)) for h in heard)
    if row.gaps:
        seen: dict[tuple[str, int], list[int]] = defaultdict(list)
        for t in tokens:
            if t.data.get("task_id") in ids:
                seen[t.data["task_id"][:8], t.data.get("attempt", 1)].append(t.data["seq"])
        log.warning("%s: token seqs with gaps: %s", fault, {k: v for k, v in seen.items()})
    await checker.catch_up()
    row.revisions = checker.checked - checked0
    row.missed_revisions = checker.missed - missed0
    row.overcommit = len(checker.overcommit) - over0
    row.samples = sampler.samples - samples0
    row.held_over = len(sampler.over) - held0
    row.violations = _violations(stack) - violations0
    row.peak_held = sampler.peak
    return row


def _short_answers(tokens: list[Event], ends: dict[str, list[Event]]) -> int:
    """Completed chats whose answer's attempt is not all in the token stream: its last
    tokens missing (a gap `_gaps` cannot see), or none at all."""
    seqs: dict[tuple[str, int], set[int]] = defaultdict(set)
    for t in tokens:
        seqs[t.data["task_id"], int(t.data.get("attempt", 1))].add(t.data["seq"])
    short = 0
    for task, evs in ends.items():
        end = evs[0]
        if end.type == "chat.completed":
            stats = end.data["stats"]
            short += seqs[task, stats["attempt"]] != set(range(stats["tokens"]))
    return short


def _expired_leases(stack: LocalStack) -> int:
    """Leases reconcile had to expire (their run never released them), from its log."""
    path = stack.cfg.state_dir / "logs" / "function-reconcile.log"
    try:
        return path.read_text(errors="replace").count("expired stale leases")
    except OSError:
        return 0


def _violations(stack: LocalStack) -> int:
    """Permissions violations in the nats-servers' logs: a component refused something."""
    n = 0
    for log_file in (stack.cfg.state_dir / "logs").glob("nats-server*.log"):
        with contextlib.suppress(OSError):
            n += log_file.read_text(errors="replace").count("Violation")
    return n


# -- the stacks ------------------------------------------------------------------------------------
def _config(state: Path, servers: int, node_memory: int) -> StackConfig:
    return StackConfig(
        state_dir=state,
        nodes=1,
        node_memory=node_memory,
        models=DEFAULT_MODELS,
        nats_port=0,
        runtime_port=0,
        function_port=0,
        nats_servers=servers,
        transport="http",
        tick_s=1.0,
        fresh=True,
        settings=Settings(),
    )


async def run_stack(
    state: Path,
    faults: tuple[str, ...],
    per_window: int,
    seed: int,
    servers: int = 1,
    node_memory: int = 2 * GEMMA_BYTES + 100 * MIB,
    deadline_s: float = 300.0,
) -> list[Row]:
    stack = LocalStack(_config(state, servers, node_memory))
    await stack.start(progress=False)
    rows = []
    conns: list[Any] = []
    watchers: list[asyncio.Task[None]] = []
    try:
        assert stack.svc is not None
        admin = await bus.connect(stack.admin_url, name="faults-observer")
        client = await bus.connect(stack.url_for("client"), name="faults-client")
        conns += [admin, client]
        observer = Observer()
        await observer.attach(admin)
        checker = RevisionChecker(admin.jetstream())
        sizes = {m.name: m.bytes for m in await stack.svc.catalog.all()}
        sampler = RuntimeSampler(stack, sizes)
        watchers = [asyncio.create_task(checker.run()), asyncio.create_task(sampler.run())]
        rng = random.Random(seed)
        models = [*DEFAULT_MODELS, CHAT_MODEL]
        for fault in faults:
            row = await window(
                stack, client.jetstream(), observer, checker, sampler, fault, per_window, rng,
                models, deadline_s,
            )  # fmt: skip
            print(_line(row), flush=True)
            rows.append(row)
        for what, seen in (("placed", checker.overcommit), ("held", sampler.over)):
            if seen:
                log.error("over-commit (%s): %s", what, seen[:5])
        log.info("peak held by the node's model processes: %.0f MiB", sampler.peak / MIB)
        checker.stopped.set()
        sampler.stopped.set()
        await asyncio.gather(*watchers)
    finally:
        for task in watchers:
            task.cancel()
        for c in conns:
            with contextlib.suppress(Exception):
                await c.close()
        await stack.stop()
    return rows


async def contention(state: Path, placements: int = 64, nodes: int = 2, fit: int = 3) -> Row:
    """`placements` concurrent placements of distinct models across `nodes` nodes that hold
    `fit` each, from 4 connections: exactly nodes x fit are placed, the rest queue, and no
    revision of either node key commits more than its capacity."""
    cfg = StackConfig(
        state_dir=state, nodes=0, chat_model=None, nats_port=0, functions=(),
        transport="inprocess", fresh=True, settings=Settings(),
    )  # fmt: skip
    stack = LocalStack(cfg)
    await stack.start(progress=False)
    row = Row("contention", chats=placements)
    conns = [await bus.connect(stack.admin_url) for _ in range(4)]
    try:
        fleets = [Fleet(bus.bucket(c.jetstream(), bus.FLEET_BUCKET), c.jetstream()) for c in conns]
        for i in range(nodes):
            rec = NodeRecord(
                node_id=f"contend-{i}", runtime="llamacpp", url="http://127.0.0.1:9",
                capacity_bytes=fit * 400 * MIB, heartbeat_at=time.time(),
            )  # fmt: skip
            await fleets[0].upsert(rec, lambda r: r)

        async def place(i: int) -> object:
            return await fleets[i % len(fleets)].place(
                planner.PlanRequest(f"model-{i}", 400 * MIB), time.time(), "cost", task_id=f"t{i}"
            )

        results = await asyncio.gather(*(place(i) for i in range(placements)))
        placed = [r for r in results if isinstance(r, planner.Placement)]
        row.completed = len(placed)  # placed
        row.failed = sum(isinstance(r, planner.Queue) for r in results)  # queued
        row.lost = placements - row.completed - row.failed
        for i in range(nodes):
            kv = await conns[0].jetstream().key_value(bus.FLEET_BUCKET)
            for entry in await kv.history(node_key(f"contend-{i}")):
                rec = NodeRecord.model_validate_json(entry.value)
                row.revisions += 1
                row.overcommit += int(rec.committed_bytes() > rec.capacity_bytes)
        resident = 0
        for i in range(nodes):
            rec, _ = await fleets[0].get(f"contend-{i}")
            resident += len(rec.models)
        row.one_end = placements if resident == row.completed == nodes * fit else 0
    finally:
        for c in conns:
            await c.close()
        await stack.stop()
    return row


# -- report ----------------------------------------------------------------------------------------
HEADER = (
    f"{'fault':<11}{'chats':>6}{'one end':>8}{'done':>6}{'failed':>7}{'lost':>5}{'dup':>4}"
    f"{'gaps':>5}{'retried':>8}{'recover s':>10}{'leases':>7}{'revisions':>10}{'over':>5}"
    f"{'samples':>8}{'held>cap':>9}"
)


def _line(r: Row) -> str:
    rec = f"{r.recover_s:.1f}" if r.recover_s is not None else "-"
    return (
        f"{r.fault:<11}{r.chats:>6}{r.one_end:>8}{r.completed:>6}{r.failed:>7}{r.lost:>5}"
        f"{r.duplicated:>4}{r.gaps:>5}{r.retried:>8}{rec:>10}{r.leases_left:>7}"
        f"{r.revisions:>10}{r.overcommit:>5}{r.samples:>8}{r.held_over:>9}"
    )


def report(rows: list[Row], contend: Row | None, seconds: float) -> str:
    lines = ["", HEADER, *(_line(r) for r in rows)]
    total = Row("all", *(sum(getattr(r, k) for r in rows) for k in ("chats", "one_end")))
    for k in ("completed", "failed", "lost", "duplicated", "gaps", "retried", "leases_left"):
        setattr(total, k, sum(getattr(r, k) for r in rows))
    for k in ("revisions", "overcommit", "samples", "held_over"):
        setattr(total, k, sum(getattr(r, k) for r in rows))
    lines.append(_line(total))
    codes = Counter[str]()
    for r in rows:
        codes.update(r.failures)
    if codes:
        lines.append("failed chats by code: " + ", ".join(f"{c} {n}" for c, n in codes.items()))
    missed = sum(r.missed_revisions for r in rows)
    lines.append(f"node-key revisions gone before the checker read them: {missed}")
    lines.append(
        "ends a live subscriber heard twice: "
        f"{sum(r.live_ends for r in rows)} under two message ids, "
        f"{sum(r.resent_ends for r in rows)} re-sent under the same one (the stream kept one)"
    )
    lines.append(
        "chats streaming when each fault hit: "
        + ", ".join(f"{r.fault} {r.streaming_at_fault}" for r in rows)
    )
    refused = sum(r.violations for r in rows)
    lines.append(f"permissions violations logged by nats-server: {refused}")
    if contend is not None:
        lines.append(
            f"contention: {contend.chats} concurrent placements on 2 nodes (3 fit each): "
            f"{contend.completed} placed, {contend.failed} queued, {contend.lost} neither; "
            f"{contend.revisions} revisions checked, {contend.overcommit} over-committed"
        )
    goal = all(r.ok for r in rows) and (contend is None or contend.overcommit == 0)
    lines.append(
        f"goal (0 lost, 0 duplicated, 0 gaps, 0 leaked, 0 over-commit): "
        f"{'met' if goal else 'MISSED'}; {seconds:.0f} s"
    )
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        fields = [k for k in asdict(rows[0]) if k != "failures"] + ["failures"]
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            d = asdict(r)
            d["failures"] = " ".join(f"{c}={n}" for c, n in r.failures.items())
            w.writerow(d)


async def run(
    chats: int, seed: int, faults: tuple[str, ...], state: Path | None = None
) -> tuple[list[Row], Row]:
    local = tuple(f for f in faults if f in LOCAL_FAULTS)
    per = max(1, chats // max(1, len(local)))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="oa-faults-") as tmp:
        root = state or Path(tmp)
        if local:
            rows += await run_stack(root / "local", local, per, seed)
        if "cluster" in faults:
            rows += await run_stack(root / "cluster", ("cluster",), per, seed + 1, servers=3)
        contend = await contention(root / "contention")
    return rows, contend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--chats", type=int, default=200, help="chats over the local faults")
    ap.add_argument(
        "--faults",
        default=",".join((*LOCAL_FAULTS, "cluster")),
        help="which windows to run, in order (default: all)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--csv", default=str(OUT / "faults.csv"))
    ap.add_argument("--state", help="keep the stacks' state and logs here (default: a temp dir)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    log.setLevel(logging.INFO)
    started = time.monotonic()
    print(HEADER, flush=True)
    state = Path(args.state) if args.state else None
    faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
    unknown = set(faults) - {*LOCAL_FAULTS, "cluster"}
    if unknown:
        ap.error(f"unknown faults {sorted(unknown)}; choose from {[*LOCAL_FAULTS, 'cluster']}")
    rows, contend = asyncio.run(run(args.chats, args.seed, faults, state))
    print(report(rows, contend, time.monotonic() - started))
    write_csv([*rows, contend], Path(args.csv))
    print(f"CSV: {args.csv}")


if __name__ == "__main__":
    main()
