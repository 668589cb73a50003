"""Control-plane overhead, on the real local stack (nats-server + llama-server + Gemma).

1. Latency: the same prompts alternately (A B A B ...) straight to llama-server and through
   the system (publish `chat.requested` -> first `chat.token` at a subscriber), the model
   already resident. Reports time to first token and total time for both and the paired
   difference: the overhead we add.
2. Throughput: with a BENCHMARK-ONLY STUB RUNTIME that answers instantly (in-process, labelled
   "stub"; it isolates the control plane), how many chats/s reach `chat.completed` with 1, 8
   and 64 concurrent clients (in the same process: on 2 cores a separate client process
   measured lower), and where the time goes (pyinstrument, by call site in our code).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil

from agent.node import NodeAgent
from autoscaler.client import ChatSession, client_name
from domain.state import Slot
from events import bus
from events.codec import Event, decode
from events.dispatcher import Dispatcher
from events.dispatcher import in_process as in_process_delivery
from events.types import ChatRequested, subject_for
from functions import chat as chat_fn
from functions.services import Settings, open_services
from stack.local import LocalStack, StackConfig
from stores.catalog import ModelInfo

from .roundtrips import Op, Tracer, round_trips, typical
from .stub import STUB_MODEL, StubRuntime

OUT = Path("docs/bench")
MODEL = "gemma3-270m"
PROMPTS = [
    "Why is the sky blue?",
    "What is a knapsack?",
    "Name three rivers.",
    "How do birds fly?",
    "What is rain?",
    "Describe a cat.",
]


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


DROPPED = {"direct": 0}
# A pause before each measured request, the same for all four kinds: a chat sent within
# ~40 ms of the previous one's end waits that much longer before the chat function claims it
# (found by this bench; the chat path's issue), which would charge whichever kind came second.
PACE_S = 0.1


async def _direct(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[float, float]:
    """One streamed request straight to llama-server. Its router now and then closes the
    connection with no response (about 1 run in 10 here, llama.cpp 0.3.36 router mode); such
    a request is counted, reported and sent again, so both sides measure served requests."""
    for _ in range(3):
        try:
            return await _direct_once(client, prompt, max_tokens)
        except httpx.RemoteProtocolError:
            DROPPED["direct"] += 1
    return await _direct_once(client, prompt, max_tokens)


async def _direct_once(
    client: httpx.AsyncClient, prompt: str, max_tokens: int
) -> tuple[float, float]:
    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 1,
        "messages": [{"role": "user", "content": prompt}],
    }
    t0 = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data:") and first is None and '"content":"' in line:
                first = time.perf_counter()
    end = time.perf_counter()
    return ((first or end) - t0) * 1e3, (end - t0) * 1e3


async def _system(nc: Any, prompt: str, max_tokens: int) -> tuple[float, float]:
    """One chat through the system, timed from its publish (the subscriptions are made
    before it, as a long-lived client such as the gateway makes them once) to its first
    token and to its end. With TRACER on, the stretch's NATS operations are kept too."""
    req = ChatRequested(
        chat_id=uuid.uuid4().hex[:12],
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        options={"max_tokens": max_tokens, "temperature": 0, "seed": 1},
    )
    first: list[float] = []
    session = ChatSession(nc, req, lambda tok: first.append(time.time()) if not first else None)
    await session.start()
    result = await session.wait(120)
    end = time.time()
    if result.end is None or result.end.type != "chat.completed":
        raise RuntimeError(f"chat failed: {result.end.data if result.end else None}")
    t0 = result.published_at
    t1 = first[0] if first else end
    if TRACER.on:
        off = time.perf_counter() - time.time()
        ops = TRACER.between(t0 + off, end + off)
        runtime_at = next((op.at for op in ops if op.kind == "http"), t1 + off)
        # The worker's operations only: the client's own publish and other consumers' pulls
        # (each dispatcher polls its own) are not the chat's.
        mine = [
            op
            for op in ops
            if op.what != "JS publish chat.requested"
            and not (op.kind == "pull" and op.what != "pull chat")
        ]
        STRETCHES["to_runtime"].append([op for op in mine if op.at < runtime_at])
        STRETCHES["to_first_token"].append([op for op in mine if op.at < t1 + off])
        STRETCHES["whole_chat"].append(mine)
        TIMELINES.append(
            (t1 - t0, [(op.at - t0 - off, op.what) for op in mine if op.at < t1 + off])
        )
        token_at = next((op.at for op in ops if op.what.endswith("chat.token")), None)
        if token_at is not None and runtime_at <= token_at:
            # The control plane's own share of this request's first token: all of it but
            # the runtime's answer to the worker's call (its send to the first token sent on).
            CONTROL_PLANE.append((t1 - t0) - (token_at - runtime_at))
    return (t1 - t0) * 1e3, (end - t0) * 1e3


TRACER = Tracer()
CONTROL_PLANE: list[float] = []  # per request: TTFT less the runtime's own part (s)
TIMELINES: list[tuple[float, list[tuple[float, str]]]] = []  # (TTFT s, [(offset s, op)])
STRETCHES: dict[str, list[list[Op]]] = {"to_runtime": [], "to_first_token": [], "whole_chat": []}


async def _gateway(
    client: httpx.AsyncClient, api: str, prompt: str, max_tokens: int
) -> tuple[float, float]:
    """One streamed request through the HTTP gateway (`ollama`: /api/chat NDJSON; `openai`:
    /v1/chat/completions SSE): time to the first piece of text, and to the end."""
    messages = [{"role": "user", "content": prompt}]
    if api == "ollama":
        path = "/api/chat"
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": messages,
            "options": {"num_predict": max_tokens, "temperature": 0, "seed": 1},
        }
    else:
        path = "/v1/chat/completions"
        body = {
            "model": MODEL,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "seed": 1,
            "stream": True,
        }
    t0 = time.perf_counter()
    first = None
    async with client.stream("POST", path, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"gateway {path}: HTTP {resp.status_code}: {await resp.aread()!r}")
        async for line in resp.aiter_lines():
            if first is None and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter()
    end = time.perf_counter()
    return ((first or end) - t0) * 1e3, (end - t0) * 1e3


async def latency(
    pairs: int,
    max_tokens: int,
    transport: str,
    state_dir: Path,
) -> dict[str, float]:
    TRACER.install()
    stack = LocalStack(
        StackConfig(
            state_dir=state_dir,
            models=(MODEL,),
            nats_port=0,
            runtime_port=0,
            function_port=0,
            transport=transport,
            settings=Settings(),
        )
    )
    await stack.start(progress=True)
    from gateway.app import serve as serve_gateway

    served = await serve_gateway(stack.url_for("gateway"), "127.0.0.1:0", stack.ca)
    g_ttft: dict[str, list[float]] = {"ollama": [], "openai": []}
    g_total: dict[str, list[float]] = {"ollama": [], "openai": []}
    try:
        nc = await bus.connect(stack.admin_url)
        await _system(nc, "warm up", 4)  # loads the model; not measured
        client = httpx.AsyncClient(
            base_url=stack.runtime_urls["node-0"], timeout=120, headers=stack.runtime_headers()
        )
        gw = httpx.AsyncClient(base_url=served.url, timeout=120)
        await _direct(client, "warm up", 4)
        for api in g_ttft:
            await _gateway(gw, api, "warm up", 4)
        a_ttft, a_total, b_ttft, b_total = [], [], [], []
        for i in range(pairs):
            prompt = PROMPTS[i % len(PROMPTS)]
            await asyncio.sleep(PACE_S)
            t, total = await _direct(client, prompt, max_tokens)
            a_ttft.append(t)
            a_total.append(total)
            await asyncio.sleep(PACE_S)
            # Round trips are counted where the handler runs in this process.
            TRACER.on = transport == "inprocess"
            t, total = await _system(nc, prompt, max_tokens)
            TRACER.on = False
            TRACER.ops.clear()
            b_ttft.append(t)
            b_total.append(total)
            for api in list(g_ttft)[:: 1 if i % 2 == 0 else -1]:  # each API first every other time
                await asyncio.sleep(PACE_S)
                t, total = await _gateway(gw, api, prompt, max_tokens)
                g_ttft[api].append(t)
                g_total[api].append(total)
        await client.aclose()
        await gw.aclose()
        await nc.close()
    finally:
        await served.stop()
        await stack.stop()
        TRACER.uninstall()
    d_ttft = [b - a for a, b in zip(a_ttft, b_ttft, strict=True)]
    d_total = [b - a for a, b in zip(a_total, b_total, strict=True)]
    row = {
        "transport": transport,
        "pairs": pairs,
        "max_tokens": max_tokens,
        "direct_ttft_p50_ms": statistics.median(a_ttft),
        "system_ttft_p50_ms": statistics.median(b_ttft),
        "direct_total_p50_ms": statistics.median(a_total),
        "system_total_p50_ms": statistics.median(b_total),
    }
    for q in (0.5, 0.95, 0.99):
        row[f"overhead_ttft_p{int(q * 100)}_ms"] = pct(d_ttft, q)
        row[f"overhead_total_p{int(q * 100)}_ms"] = pct(d_total, q)
    # The gateway: its own figures, and what it adds over the NATS path (paired, same prompt,
    # same round) and over llama-server directly.
    for api in g_ttft:
        row[f"{api}_gw_ttft_p50_ms"] = statistics.median(g_ttft[api])
        row[f"{api}_gw_total_p50_ms"] = statistics.median(g_total[api])
        over_nats = [g - b for b, g in zip(b_ttft, g_ttft[api], strict=True)]
        over_direct = [g - a for a, g in zip(a_ttft, g_ttft[api], strict=True)]
        for q in (0.5, 0.95, 0.99):
            row[f"{api}_gw_over_nats_ttft_p{int(q * 100)}_ms"] = pct(over_nats, q)
        row[f"{api}_gw_over_direct_ttft_p50_ms"] = pct(over_direct, 0.5)
        row[f"{api}_gw_over_nats_total_p50_ms"] = pct(
            [g - b for b, g in zip(b_total, g_total[api], strict=True)], 0.5
        )
    for stretch, runs in STRETCHES.items():
        if runs:
            count, parts = typical(runs)
            row[f"round_trips_{stretch}"] = count
            row[f"round_trips_{stretch}_max"] = max(round_trips(r) for r in runs)
            row[f"ops_{stretch}"] = "; ".join(f"{n} x {w}" for w, n in sorted(parts.items()))
        runs.clear()
    if CONTROL_PLANE:
        for q in (0.5, 0.95, 0.99):
            row[f"control_plane_ttft_p{int(q * 100)}_ms"] = pct(CONTROL_PLANE, q) * 1e3
        CONTROL_PLANE.clear()
    if TIMELINES:
        ttft, ops = sorted(TIMELINES, key=lambda t: t[0])[len(TIMELINES) // 2]
        row["timeline_median_chat"] = " | ".join(
            [f"{at * 1e3:.2f} ms {what}" for at, what in ops] + [f"{ttft * 1e3:.2f} ms first token"]
        )
        TIMELINES.clear()
    row["direct_dropped_by_llama_server"] = DROPPED["direct"]
    DROPPED["direct"] = 0
    return row


class Ends:
    """A light client of many chats at once: one subscription to its ends (not to tokens),
    requests routed by task id, as the gateway does; each chat is one publish."""

    def __init__(self, nc: Any, client: str) -> None:
        self.nc, self.client = nc, client
        self.waiting: dict[str, asyncio.Future[str]] = {}
        self.subs: list[Any] = []

    async def start(self) -> Ends:
        async def on_end(msg: Any) -> None:
            ev = decode(msg.headers, msg.data)
            fut = self.waiting.pop(ev.data.get("task_id", ""), None)
            if fut is not None and not fut.done():
                fut.set_result(ev.type)

        for kind in ("chat.completed", "chat.failed"):
            self.subs.append(
                await self.nc.subscribe(subject_for(kind, client=self.client), cb=on_end)
            )
        await self.nc.flush()
        return self

    async def chat(self, model: str) -> str:
        req = ChatRequested(
            chat_id=uuid.uuid4().hex[:12], model=model, messages=[{"role": "user", "content": "x"}]
        )
        event = Event("chat.requested", req.model_dump(exclude_none=True))
        fut = self.waiting[event.id] = asyncio.get_running_loop().create_future()
        await bus.publish(self.nc.jetstream(), event, client=self.client)
        return await asyncio.wait_for(fut, 60)

    async def stop(self) -> None:
        for sub in self.subs:
            await sub.unsubscribe()


async def stub_fleet(svc: Any) -> tuple[NodeAgent, Any]:
    """The stub model in the catalog and one stub node holding it, its agent beating."""
    stub = StubRuntime()
    svc.runtimes[(stub.kind, stub.url)] = stub
    await svc.catalog.put(ModelInfo(name=STUB_MODEL, bytes=1))
    agent = NodeAgent(svc.fleet, "stub-0", stub, capacity_bytes=1 << 40)  # type: ignore[arg-type]
    await agent.register()
    await svc.fleet.update(
        "stub-0",
        lambda r: r.model_copy(
            update={
                "models": {
                    STUB_MODEL: Slot(state="ready", bytes=1, keep_alive_until=time.time() + 3600)
                }
            }
        ),
    )
    return agent, stub


def start_workers(nats_url: str, n: int, log_dir: Path) -> list[subprocess.Popen[bytes]]:
    """`n` processes of `ollama-autoscaler worker --functions chat`, each importing the stub
    runtime (OA_RUNTIME_PLUGINS), sharing the one `chat` consumer; returns once each serves."""
    exe = Path(sys.executable).with_name("ollama-autoscaler")
    env = {
        **os.environ,
        "OA_RUNTIME_PLUGINS": "bench.stub",
        "OA_CLIENT_RATE": "0",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    procs = []
    for i in range(n):
        log = (log_dir / f"worker-{i}.log").open("wb")
        procs.append(
            subprocess.Popen(
                [str(exe), "--nats", nats_url, "worker", "--functions", "chat", "--no-provision"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    deadline = time.monotonic() + 60
    for i, proc in enumerate(procs):
        path = log_dir / f"worker-{i}.log"
        while b"serving" not in path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {i} did not start: {path.read_text()[-2000:]}")
            time.sleep(0.05)
    return procs


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes have used so far."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


async def throughput(
    nats_url: str,
    clients: int,
    seconds: float,
    in_process: bool = True,
    pids: dict[str, list[int]] | None = None,
) -> dict[str, float]:
    """Chats/s reaching `chat.completed` with `clients` concurrent clients: served by a
    dispatcher in this process (`in_process`), or by worker processes already started."""
    # All the clients are one bus identity here: the per-client rate is off (what is measured
    # is how many chats the functions serve, not the share one client is allowed).
    svc = await open_services(Settings(nats_url=nats_url, client_rate=0), provision=True)
    agent, _ = await stub_fleet(svc)
    stop = asyncio.Event()
    beats = asyncio.create_task(agent.run(stop))
    runner = None
    if in_process:
        d = Dispatcher(
            svc.js,
            bus.CONSUMERS["chat"],
            in_process_delivery(lambda e, a: chat_fn.handle(svc, e, a)),
            concurrency=max(64, clients),
        )
        runner = asyncio.create_task(d.run(stop))
    nc = await bus.connect(nats_url)
    ends = await Ends(nc, client_name(nc)).start()
    for _ in range(3):  # warm: the first chats open subscriptions and watches
        await ends.chat(STUB_MODEL)
    done = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            if await ends.chat(STUB_MODEL) == "chat.completed":
                done += 1

    parts = {"bench process": [os.getpid()], **(pids or {})}
    cpu0 = {name: cpu_s(p) for name, p in parts.items()}
    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    cpu = {name: cpu_s(p) - cpu0[name] for name, p in parts.items()}
    stop.set()
    await asyncio.gather(beats, *([runner] if runner else []))
    await ends.stop()
    await nc.close()
    await svc.close()
    return {
        "clients": clients,
        "completed": done,
        "seconds": elapsed,
        "chats_per_s": done / elapsed,
        **{
            f"cpu_ms_per_chat_{k.replace(' ', '_')}": 1e3 * v / max(1, done) for k, v in cpu.items()
        },
    }


OWN = ("functions/", "events/", "autoscaler/", "bench/")


def _qual(frame: Any) -> str:
    return f"{frame.class_name}.{frame.function}" if frame.class_name else str(frame.function)


def top_costs(session: Any, n: int = 10) -> list[tuple[str, float]]:
    """Where the worker's time goes, by call site in our code: each call from our code into
    a library (nats-py, pydantic, asyncio ...) is charged with everything under it; our own
    functions' self time is charged to them. Idle time (waiting on the socket) is left out."""
    totals: dict[str, float] = {}
    root = session.root_frame()
    stack = [root] if root is not None else []
    while stack:
        frame = stack.pop()
        own = any(part in (frame.file_path or "") for part in OWN)
        for child in frame.children:
            child_own = any(part in (child.file_path or "") for part in OWN)
            if own and not child_own and not child.is_synthetic:
                name = f"{_qual(frame)} -> {_qual(child)} ({child.file_path_short})"
                totals[name] = totals.get(name, 0.0) + child.time
            elif own and child.is_synthetic:
                name = f"{_qual(frame)} (own code)"
                totals[name] = totals.get(name, 0.0) + child.time
            else:
                stack.append(child)
    return sorted(totals.items(), key=lambda kv: -kv[1])[:n]


async def profiled_throughput(nats_url: str, clients: int, seconds: float, out: Path) -> None:
    """The throughput run again under pyinstrument: where the control plane's CPU goes."""
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005, async_mode="disabled")
    profiler.start()
    r = await throughput(nats_url, clients, seconds)
    session = profiler.stop()
    (out / "overhead_profile.txt").write_text(
        profiler.output_text(unicode=False, color=False, show_all=False)
    )
    total = session.duration or 1.0
    print(
        f"\n== profile (pyinstrument, {clients} clients, {r['chats_per_s']:.0f} chats/s while "
        f"sampled, {session.duration:.1f} s): time by call site in our code (clients and worker)"
    )
    for name, t in top_costs(session):
        print(f"{100 * t / total:5.1f} %  {t:6.2f} s  {name}")
    print(f"full call tree: {out / 'overhead_profile.txt'}")


GOALS = {"inprocess": (2.0, 10.0), "http": (3.0, None)}  # first-token overhead p50, p99 (ms)


def _goal(transport: str, row: dict[str, Any]) -> str:
    p50, p99 = GOALS.get(transport, (None, None))
    said = []
    if p50 is not None:
        ok = row["overhead_ttft_p50_ms"] <= p50
        said.append(f"goal p50 <= {p50:g} ms: {'met' if ok else 'MISSED'}")
    if p99 is not None:
        ok = row["overhead_ttft_p99_ms"] <= p99
        said.append(f"p99 <= {p99:g} ms: {'met' if ok else 'MISSED'}")
    return "; ".join(said) or "no goal"


async def amain(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(
        "== latency: direct llama-server (A) vs through the system (B), alternating, "
        f"{args.pairs} pairs, max_tokens {args.max_tokens}, model resident"
    )
    for transport in [t for t in args.transports.split(",") if t and args.pairs > 0]:
        with tempfile.TemporaryDirectory(prefix="oa-bench-") as state:
            row = await latency(args.pairs, args.max_tokens, transport, Path(state))
        rows.append(row)
        print(
            f"transport {transport}: TTFT direct p50 {row['direct_ttft_p50_ms']:.1f} ms, "
            f"system p50 {row['system_ttft_p50_ms']:.1f} ms; overhead p50/p95/p99 "
            f"{row['overhead_ttft_p50_ms']:.1f} / {row['overhead_ttft_p95_ms']:.1f} / "
            f"{row['overhead_ttft_p99_ms']:.1f} ms ({_goal(transport, row)}); total overhead p50 "
            f"{row['overhead_total_p50_ms']:.1f} ms; direct requests dropped by llama-server "
            f"and re-sent: {row['direct_dropped_by_llama_server']}"
        )
        for stretch in STRETCHES:
            if f"round_trips_{stretch}" in row:
                print(
                    f"  NATS round trips, {stretch.replace('_', ' ')} (median chat, max "
                    f"{row[f'round_trips_{stretch}_max']}): {row[f'round_trips_{stretch}']} "
                    f"= {row[f'ops_{stretch}']}"
                )
        if "control_plane_ttft_p50_ms" in row:
            print(
                "  control plane's share of each request's first token (its TTFT less the "
                "runtime's own answer to the worker's call) p50/p95/p99: "
                + " / ".join(f"{row[f'control_plane_ttft_p{q}_ms']:.2f}" for q in (50, 95, 99))
                + " ms"
            )
        if "timeline_median_chat" in row:
            print(f"  the median chat, from its publish: {row['timeline_median_chat']}")
        for api, path in (("ollama", "/api/chat"), ("openai", "/v1/chat/completions")):
            added = row[f"{api}_gw_over_nats_ttft_p50_ms"]
            print(
                f"  gateway {path}: TTFT p50 {row[f'{api}_gw_ttft_p50_ms']:.1f} ms; adds over "
                f"the NATS path p50/p95/p99 {added:.1f} / "
                f"{row[f'{api}_gw_over_nats_ttft_p95_ms']:.1f} / "
                f"{row[f'{api}_gw_over_nats_ttft_p99_ms']:.1f} ms (goal <= 5 ms p50: "
                f"{'met' if added <= 5 else 'MISSED'}); over llama-server directly p50 "
                f"{row[f'{api}_gw_over_direct_ttft_p50_ms']:.1f} ms; total over NATS p50 "
                f"{row[f'{api}_gw_over_nats_total_p50_ms']:.1f} ms"
            )
    if rows:
        with (out / "overhead_latency.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    print(
        "\n== throughput with the BENCHMARK-ONLY STUB RUNTIME: chats/s to chat.completed; "
        "served in this process (in-process dispatch) or by `ollama-autoscaler worker` "
        "processes sharing the one bus"
    )
    state = tempfile.TemporaryDirectory(prefix="oa-bench-")
    stack = LocalStack(StackConfig(state_dir=Path(state.name), nats_port=0, nodes=0))
    await stack.start_nats()
    trows = []
    client_counts = [int(c) for c in args.clients.split(",")]
    try:
        for workers in (int(w) for w in args.workers.split(",")):
            procs = start_workers(stack.admin_url, workers, Path(state.name)) if workers else []
            try:
                for clients in client_counts:
                    pids = {
                        "nats-server": [p.popen.pid for p in stack.procs if "nats" in p.name],
                        "workers": [p.pid for p in procs],
                    }
                    r = await throughput(stack.admin_url, clients, args.seconds, not workers, pids)
                    r = {"workers": workers, **r}
                    trows.append(r)
                    where = f"{workers} worker process(es)" if workers else "in-process"
                    print(
                        f"{where:>22}, {clients:>3} clients: {r['chats_per_s']:.0f} chats/s "
                        f"({r['completed']} in {r['seconds']:.1f} s); CPU ms per chat: "
                        + ", ".join(
                            f"{k.removeprefix('cpu_ms_per_chat_').replace('_', ' ')} {v:.2f}"
                            for k, v in r.items()
                            if k.startswith("cpu_ms_per_chat_")
                        )
                    )
            finally:
                stop_workers(procs)
        if args.profile:
            await profiled_throughput(stack.admin_url, args.profile, args.seconds, out)
    finally:
        await stack.stop()
        state.cleanup()
    best = max(
        (r for r in trows if r["clients"] == max(client_counts)), key=lambda r: r["chats_per_s"]
    )
    by = {(r["workers"], r["clients"]): r["chats_per_s"] for r in trows}
    fall = {
        w: by[(w, max(client_counts))] / by[(w, 8)] - 1
        for w in {r["workers"] for r in trows}
        if (w, 8) in by and (w, max(client_counts)) in by
    }
    print(
        f"best at {max(client_counts)} clients: {best['chats_per_s']:.0f} chats/s with "
        f"{best['workers'] or 'in-process'} workers (goal >= 1,000: "
        f"{'met' if best['chats_per_s'] >= 1000 else 'MISSED'}); from 8 to "
        f"{max(client_counts)} clients: "
        + ", ".join(f"{w or 'in-process'}: {100 * f:+.0f} %" for w, f in sorted(fall.items()))
    )
    with (out / "overhead_throughput.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(trows[0]))
        w.writeheader()
        w.writerows(trows)
    print(f"wrote {out / 'overhead_latency.csv'} and {out / 'overhead_throughput.csv'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.ERROR)
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--transports", default="inprocess,http")
    ap.add_argument("--clients", default="1,8,64")
    ap.add_argument(
        "--workers", default="0,1,2,4", help="worker processes per run (0: in-process dispatch)"
    )
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument(
        "--profile", type=int, default=8, help="clients for the profiled run (0: no profile)"
    )
    ap.add_argument("--out", type=Path, default=OUT)
    return asyncio.run(amain(ap.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
