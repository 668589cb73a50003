"""The cluster's processes, one per command of the image (see the Dockerfile and knative/):

    serve      a functions-framework server for $FUNCTION_TARGET on $PORT (Knative Services)
    worker     pull worker: the functions fed by their durable consumers (KEDA Deployment)
    agent      node agent beside a runtime: registers the node, heartbeats, leaves on SIGTERM
    bridge     JetStream -> Knative Broker: client events published on NATS reach the Broker
    provision  create the streams, consumers and buckets (a Job), then exit

Each long-running one stops on SIGTERM the way Kubernetes expects: it stops taking work,
finishes or hands back what it holds within its drain timeout, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from events import bus

from .health import HealthServer, nats_ready

log = logging.getLogger("autoscaler.daemons")


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _health(
    port: int | None,
    alive: Callable[[], Awaitable[str | None]] | None,
    ready: Callable[[], Awaitable[str | None]] | None,
    json_routes: dict[str, Callable[[], Awaitable[dict[str, Any]]]] | None = None,
) -> HealthServer | None:
    if not port:
        return None
    server = HealthServer(port, alive=alive, ready=ready, json_routes=json_routes)
    await server.start()
    return server


# -- serve ---------------------------------------------------------------------------------------
def function_targets() -> list[str]:
    from functions import entry

    return sorted(n for n in dir(entry) if n.endswith("_fn"))


def cmd_serve(args: argparse.Namespace) -> int:
    """Replace this process with functions-framework serving one target (its convention:
    FUNCTION_TARGET and PORT from the environment)."""
    target = args.target or os.environ.get("FUNCTION_TARGET", "")
    targets = function_targets()
    if target not in targets:
        print(
            f"error: FUNCTION_TARGET {target!r} is not a target; choose one of {targets}",
            file=sys.stderr,
        )
        return 2
    from functions import entry

    port = str(args.port or os.environ.get("PORT", "8080"))
    argv = [
        "functions-framework",
        "--source",
        str(Path(entry.__file__).resolve()),
        "--target",
        target,
        "--asgi",
        "--host",
        args.host,
        "--port",
        port,
    ]
    exe = Path(sys.executable).with_name("functions-framework")
    os.execv(str(exe), argv)  # never returns


# -- provision -----------------------------------------------------------------------------------
async def cmd_provision(args: argparse.Namespace) -> int:
    nc = await bus.connect(args.nats, name="ollama-autoscaler-provision")
    try:
        js = nc.jetstream()
        await bus.provision(js, replicas=args.replicas, delivery=args.delivery, reconfigure=True)
        streams = [s.config.name for s in await js.streams_info()]
        consumers = {
            s: sorted(c.name for c in await js.consumers_info(s))
            for s in (bus.EVENTS_STREAM, bus.WAITING_STREAM)
        }
    finally:
        await nc.close()
    print(
        f"provisioned on {bus.redact(args.nats)} "
        f"(replicas {args.replicas}, delivery {args.delivery})"
    )
    print(f"  streams:   {', '.join(sorted(streams))}")
    for stream, names in consumers.items():
        print(f"  consumers on {stream}: {', '.join(names)}")
    return 0


# -- tick ----------------------------------------------------------------------------------------
async def cmd_tick(args: argparse.Namespace) -> int:
    """Publish one fleet.tick (what a CronJob runs where no PingSource does), then exit."""
    from events.codec import Event

    nc = await bus.connect(args.nats, name="ollama-autoscaler-tick")
    try:
        await bus.publish(nc.jetstream(), Event("fleet.tick", {}))
    finally:
        await nc.close()
    print("fleet.tick published")
    return 0


# -- worker --------------------------------------------------------------------------------------
async def cmd_worker(args: argparse.Namespace) -> int:
    """Dispatchers calling the handlers in-process. SIGTERM: stop fetching, let in-flight
    events finish for up to --drain-timeout, hand the rest back for another worker."""
    from functions.entry import HANDLERS, dispatcher
    from functions.services import Settings, open_services

    names = [n.strip() for n in args.functions.split(",") if n.strip()]
    unknown = [n for n in names if n not in HANDLERS]
    if unknown:
        print(f"unknown function(s) {unknown}; choose from {sorted(HANDLERS)}", file=sys.stderr)
        return 2
    settings = Settings().but(nats_url=args.nats)
    nc = await bus.connect(args.nats, name="ollama-autoscaler-worker")
    provision = args.provision and bus.user_of(nc) in ("", "admin")
    if args.provision and not provision:
        print(
            f"worker: not provisioning: {bus.user_of(nc)!r} may not create streams "
            "(`ollama-autoscaler provision` as admin does)",
            flush=True,
        )
    svc = await open_services(settings, provision=provision, nc=nc)
    stop = _stop_on_signals()
    dispatchers = [dispatcher(svc, name) for name in names]
    tasks = [asyncio.create_task(d.run(stop)) for d in dispatchers]

    async def alive() -> str | None:
        dead = [d.spec.name for d, t in zip(dispatchers, tasks, strict=True) if t.done()]
        return f"dispatchers stopped: {dead}" if dead and not stop.is_set() else None

    health = await _health(args.health_port, alive, nats_ready(svc.nc))
    print(
        f"worker {os.getpid()} serving {', '.join(names)} from {bus.redact(args.nats)}",
        flush=True,
    )
    await stop.wait()
    print(f"worker {os.getpid()}: draining (up to {args.drain_timeout:.0f}s)", flush=True)
    await asyncio.wait(tasks, timeout=5)  # fetching stops within one fetch timeout
    per = await asyncio.gather(*(d.drain(timeout=args.drain_timeout) for d in dispatchers))
    print(f"worker {os.getpid()}: drained; {sum(per)} handed back", flush=True)
    if health is not None:
        await health.stop()
    await svc.close()
    return 0


# -- agent ---------------------------------------------------------------------------------------
def _capacity(text: str) -> int:
    if text != "auto":
        from stack.local import parse_bytes

        return parse_bytes(text)
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total)
    except Exception as exc:
        raise SystemExit(
            f"error: --capacity auto reads the GPU's memory through NVML, which failed "
            f"({exc}); on a CPU node pass a size, e.g. --capacity 16GiB"
        ) from exc


async def cmd_agent(args: argparse.Namespace) -> int:
    """One node agent beside one runtime (the sidecar of an Ollama pod)."""
    from agent.node import NodeAgent, TickWaker, nvml_probe
    from runtimes import make_runtime
    from stores.fleet import Fleet

    capacity = _capacity(args.capacity)
    node_id = args.node_id or os.environ.get("POD_NAME") or socket.gethostname()
    runtime = make_runtime(
        args.runtime, args.runtime_url, api_key=os.environ.get("OA_RUNTIME_API_KEY")
    )
    nc = await bus.connect(args.nats, name=f"ollama-autoscaler-agent-{node_id}")
    js = nc.jetstream()
    agent = NodeAgent(
        Fleet(await js.key_value(bus.FLEET_BUCKET), js),
        node_id,
        runtime,
        capacity,
        probe=nvml_probe() if args.capacity == "auto" else None,
        interval_s=args.interval,
        waiting=TickWaker(js),  # reconcile wakes the parked requests on its fleet.tick
        advertise_url=args.advertise_url,
    )
    stop = _stop_on_signals()

    async def runtime_ready() -> str | None:
        if not nc.is_connected:
            return "NATS is not connected"
        try:
            await runtime.available()
        except Exception as exc:
            return f"runtime at {args.runtime_url} does not answer: {exc}"
        return None

    health = await _health(args.health_port, None, runtime_ready)
    # Wait for the runtime before joining: a node that cannot answer must not take work.
    while not stop.is_set():
        if await runtime_ready() is None:
            break
        await asyncio.sleep(1)
    else:
        await nc.close()
        return 0
    await agent.register(runtime_started_at=time.time())
    print(
        f"node {node_id} joined: {args.runtime} at {agent.url}, {capacity / 2**30:.1f} GiB",
        flush=True,
    )
    beats_stop = asyncio.Event()
    beating = asyncio.create_task(agent.run(beats_stop))
    await stop.wait()
    print(f"node {node_id}: draining (up to {args.drain_timeout:.0f}s)", flush=True)
    clean = await agent.drain(args.drain_timeout)
    beats_stop.set()
    await beating
    print(f"node {node_id}: left the fleet ({'clean' if clean else 'chats cut'})", flush=True)
    if health is not None:
        await health.stop()
    await runtime.aclose()
    await nc.drain()
    return 0


# -- bridge --------------------------------------------------------------------------------------
async def fleet_demand(svc: Any) -> dict[str, int]:
    """What the fleet is asked for now: parked requests, chats being served, models loading.
    A KEDA metrics-api trigger reads `demand` (the runtime pool's target per replica)."""
    waiting = await svc.waiting.depth()
    active = loading = 0
    for record, _ in await svc.fleet.nodes():
        for slot in record.models.values():
            active += len(slot.leases)
            loading += slot.state == "loading"
    return {
        "waiting": waiting,
        "active": active,
        "loading": loading,
        "demand": waiting + active + loading,
    }


async def cmd_bridge(args: argparse.Namespace) -> int:
    """Forward client events from JetStream to the Knative Broker (K_SINK), in binary mode;
    a message is acked once the Broker accepted it, dead-lettered if the Broker refuses it."""
    from events.dispatcher import Dispatcher, over_http
    from functions.services import Settings, open_services

    sink = args.sink or os.environ.get("K_SINK")
    if not sink:
        print(
            "error: no sink: set K_SINK (a ContainerSource or SinkBinding does) or --sink",
            file=sys.stderr,
        )
        return 2
    svc = await open_services(Settings().but(nats_url=args.nats))
    stop = _stop_on_signals()
    forward = Dispatcher(svc.js, bus.BRIDGE_SPEC, over_http(sink, timeout_s=30.0))
    task = asyncio.create_task(forward.run(stop))

    async def alive() -> str | None:
        return "forwarding stopped" if task.done() and not stop.is_set() else None

    health = await _health(
        args.health_port, alive, nats_ready(svc.nc), {"/demand": lambda: fleet_demand(svc)}
    )
    print(f"bridge: {bus.EVENTS_STREAM}/{bus.BRIDGE_CONSUMER} -> {sink}", flush=True)
    await stop.wait()
    await asyncio.wait([task], timeout=5)
    await forward.drain(timeout=args.drain_timeout)
    if health is not None:
        await health.stop()
    await svc.close()
    return 0


def add_commands(sub: Any) -> None:
    """The cluster commands' parsers (see `autoscaler.cli.build_parser`)."""
    s = sub.add_parser("serve", help="serve one function ($FUNCTION_TARGET) over HTTP")
    s.add_argument("--target", help="default: $FUNCTION_TARGET")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, help="default: $PORT or 8080")
    s.set_defaults(fn=cmd_serve, sync=True)

    p = sub.add_parser("provision", help="create streams, consumers and KV buckets, then exit")
    p.add_argument("--replicas", type=int, default=1, help="JetStream replicas (3 on a cluster)")
    p.add_argument(
        "--delivery",
        choices=["pull", "knative"],
        default="pull",
        help="pull: a consumer per function (workers); knative: the bridge's consumer",
    )
    p.set_defaults(fn=cmd_provision)

    sub.add_parser("tick", help="publish one fleet.tick (reconcile) and exit").set_defaults(
        fn=cmd_tick
    )

    w = sub.add_parser("worker", help="pull worker: run functions in-process on a running bus")
    w.add_argument("--functions", default="chat,cancel,load,evict,pull,reconcile")
    w.add_argument("--health-port", type=int, default=0, help="/healthz and /readyz (0: off)")
    w.add_argument(
        "--drain-timeout",
        type=float,
        default=float(os.environ.get("OA_DRAIN_TIMEOUT_S", "25")),
        help="on SIGTERM, seconds to finish in-flight work before handing it back",
    )
    w.add_argument(
        "--no-provision",
        dest="provision",
        action="store_false",
        help="expect streams and consumers to exist (a provision Job made them)",
    )
    w.set_defaults(fn=cmd_worker)

    a = sub.add_parser("agent", help="node agent beside one runtime (e.g. an Ollama pod)")
    a.add_argument("--runtime", choices=["ollama", "llamacpp"], default="ollama")
    a.add_argument("--runtime-url", default="http://127.0.0.1:11434")
    a.add_argument("--advertise-url", help="where the functions reach the runtime")
    a.add_argument("--node-id", help="default: $POD_NAME or the host name")
    a.add_argument(
        "--capacity", default="auto", help="memory budget, e.g. 80GiB; auto: the GPU's (NVML)"
    )
    a.add_argument("--interval", type=float, default=2.0, help="heartbeat seconds")
    a.add_argument("--health-port", type=int, default=0)
    a.add_argument("--drain-timeout", type=float, default=270.0)
    a.set_defaults(fn=cmd_agent)

    b = sub.add_parser("bridge", help="forward client events from JetStream to a Knative Broker")
    b.add_argument("--sink", help="default: $K_SINK")
    b.add_argument("--health-port", type=int, default=0, help="/healthz /readyz /demand")
    b.add_argument("--drain-timeout", type=float, default=10.0)
    b.set_defaults(fn=cmd_bridge)
