"""`ollama-autoscaler`: run the local stack and talk to a running one, through NATS only."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import nats.errors

from domain import planner
from events import bus
from events.auth import ADMIN, DEFAULT_CLIENT, read_env_file
from events.codec import Event
from events.types import ChatCompleted, ChatFailed, ChatRequested, ChatToken, ModelEvict, ModelLoad

from .daemons import add_commands

GIB = 1 << 30
MIB = 1 << 20


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


async def _open(nats_url: str):  # type: ignore[no-untyped-def]
    """Connect to a running stack; never changes its streams or consumers."""
    from nats.js.errors import NotFoundError

    from functions.services import Settings, open_services

    try:
        return await open_services(Settings(nats_url=nats_url))
    except NotFoundError as exc:
        raise ConnectionError(
            f"NATS at {nats_url} has no ollama-autoscaler buckets ({exc!r}); is the stack "
            "running? start it with `make run`"
        ) from exc


# -- up ------------------------------------------------------------------------------------------
async def cmd_up(args: argparse.Namespace) -> int:
    from functions.services import Settings
    from stack.local import LocalStack, StackConfig, parse_bytes

    settings = Settings()
    if args.policy:
        settings = settings.but(policy=args.policy)
    cfg = StackConfig(
        nodes=args.nodes,
        node_memory=parse_bytes(args.node_memory),
        nats_port=args.nats_port,
        nats_servers=args.nats_servers,
        tls=args.tls,
        runtime_port=args.runtime_port,
        function_port=args.function_port,
        transport=args.transport,
        settings=settings,
        fresh=args.fresh,
        ollama_urls=tuple(args.ollama),
        auth=not args.no_auth,
        state_dir=Path(args.state_dir) if args.state_dir else StackConfig().state_dir,
    )
    if args.models:
        cfg.models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    stack = LocalStack(cfg)
    if cfg.tls:  # this process's own clients (the UI) check the server against the stack's CA
        os.environ.update(NATS_CA=str(cfg.state_dir / "auth" / "tls" / "ca.pem"))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"starting ollama-autoscaler (state in {cfg.state_dir}) ...", flush=True)
    try:
        await stack.start()
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"error: the stack did not start: {exc}", file=sys.stderr)
        return 1
    ui_server = None
    if args.ui_port:
        from ui.serve import RefusedToServe, serve

        try:
            ui_server = serve(stack.url_for("ui"), args.ui_host, args.ui_port)
            ui_server.start()
        except (RefusedToServe, OSError) as exc:
            print(f"warning: the UI did not start: {exc}", file=sys.stderr)
    gateway = None
    if args.gateway_listen:
        from gateway.app import serve as serve_gateway
        from gateway.http import RefusedToServe as GatewayRefused

        try:
            gateway = await serve_gateway(stack.url_for("gateway"), args.gateway_listen, stack.ca)
        except (GatewayRefused, OSError, ValueError, TimeoutError) as exc:
            print(f"warning: the gateway did not start: {exc}", file=sys.stderr)
    print(stack.describe(), flush=True)
    if gateway is not None:
        print(
            f"  {'gateway':<26} in this process  {gateway.url}  (Ollama API; OpenAI API at "
            f"{gateway.url}/v1; metrics at {gateway.url}/metrics)"
        )
    if ui_server is not None:
        print(f"  {'ui':<26} in this process  http://{args.ui_host}:{args.ui_port}/")
        print(f"\nopen the UI:  http://{args.ui_host}:{args.ui_port}/", flush=True)
    first = (cfg.chat_model or cfg.models[0]) if cfg.nodes else "MODEL"
    http_tries = (
        f'      curl {gateway.url}/api/chat -d \'{{"model": "{first}", "messages": '
        '[{"role": "user", "content": "Why is the sky blue?"}]}\'\n'
        f"      OLLAMA_HOST={gateway.url} python -c 'import ollama; print(ollama.list())'\n"
        if gateway is not None
        else ""
    )
    print(
        f"\ntry:  ollama-autoscaler chat --model {first} "
        '"Why is the sky blue?"\n      ollama-autoscaler models\n      ollama-autoscaler status\n'
        f"{http_tries}A child that exits is restarted (see the logs). Ctrl-C stops everything.",
        flush=True,
    )
    if stack.creds is not None:
        where = "" if args.state_dir is None else f"OA_STATE_DIR={cfg.state_dir} "
        print(
            f"NATS runs with auth: one identity per component, credentials in {stack.auth_dir}"
            f" (0600).\n  the CLI finds them itself ({where}ollama-autoscaler chat ... runs as "
            f"'{DEFAULT_CLIENT}');\n  the nats CLI: set -a; . {stack.auth_dir}/admin.env; set +a"
            f"\n  a new client: {where}ollama-autoscaler add-client NAME",
            flush=True,
        )
    await stop.wait()
    print("\nstopping ...", flush=True)
    if gateway is not None:
        await gateway.stop()
    await stack.stop()
    print("stopped.", flush=True)
    return 0


async def until_signalled() -> None:
    """Return on SIGINT or SIGTERM (a server command's life)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# -- ui ------------------------------------------------------------------------------------------
async def cmd_ui(args: argparse.Namespace) -> int:
    from ui.serve import RefusedToServe, serve

    try:
        server = serve(args.nats, args.host, args.port)
    except RefusedToServe as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server.start()
    print(
        f"ollama-autoscaler UI at http://{args.host}:{args.port}/ (NATS {bus.redact(args.nats)})",
        flush=True,
    )
    await until_signalled()
    server.stop()
    return 0


# -- gateway -------------------------------------------------------------------------------------
async def cmd_gateway(args: argparse.Namespace) -> int:
    from gateway.app import serve
    from gateway.http import RefusedToServe

    try:
        served = await serve(args.nats, args.listen, os.environ.get("NATS_CA"))
    except (RefusedToServe, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"ollama-autoscaler gateway at {served.url} (Ollama API; OpenAI API at {served.url}/v1; "
        f"metrics at {served.url}/metrics; NATS {bus.redact(args.nats)})",
        flush=True,
    )
    await until_signalled()
    await served.stop()
    return 0


# -- chat ----------------------------------------------------------------------------------------
async def cmd_chat(args: argparse.Namespace) -> int:
    from stores.tasks import Tasks

    from .client import ChatSession

    nc = await bus.connect(args.nats, name="ollama-autoscaler-cli")
    options: dict[str, Any] = {"max_tokens": args.max_tokens}
    if args.temperature is not None:
        options["temperature"] = args.temperature
    try:
        req = ChatRequested(
            chat_id=args.chat_id or uuid.uuid4().hex[:16],
            model=args.model,
            messages=[{"role": "user", "content": args.prompt}],
            options=options,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    attempt = 0

    def on_token(tok: ChatToken) -> None:
        nonlocal attempt
        if tok.attempt > attempt:
            if attempt:
                print(f"\n[worker restarted; attempt {tok.attempt} regenerates]", flush=True)
            attempt = tok.attempt
        if tok.attempt == attempt:
            print(tok.text, end="", flush=True)

    session = await ChatSession(nc, req, on_token).start()
    task_id = session.result.task_id
    # Only the operator may read task records (a client reads just its own chat's events).
    tasks = Tasks(bus.bucket(nc.jetstream(), bus.TASKS_BUCKET))
    may_read_tasks = bus.user_of(nc) in ("", ADMIN)
    source = session.event.source
    said_queued = False
    deadline = time.monotonic() + args.timeout
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    while not session.done and time.monotonic() < deadline:
        if interrupted.is_set():  # Ctrl-C: cancel it in the system, then show how it ended
            print("\n[cancelling ...]", file=sys.stderr, flush=True)
            await session.cancel()
            deadline = min(deadline, time.monotonic() + 10)
            interrupted.clear()
        if (
            not await session.ended_within(1.0)
            and may_read_tasks
            and not said_queued
            and not session.result.tokens
        ):
            got = await tasks.get(source, task_id)
            rec = got.record if got else None
            if rec and rec.state == "queued":
                print(f"[queued: {rec.reason}]", file=sys.stderr, flush=True)
                said_queued = True
    try:
        result = await session.wait(timeout=max(0.1, deadline - time.monotonic()))
    except TimeoutError:
        print(
            f"\nerror: no answer within {args.timeout:.0f}s; see "
            f"`ollama-autoscaler task {task_id}`",
            file=sys.stderr,
        )
        await nc.close()
        return 3
    await nc.close()
    assert result.end is not None
    if result.end.type == "chat.failed":
        failed = ChatFailed.model_validate(result.end.data)
        print(
            f"\nerror: {failed.error.code}: {failed.error.message} (task {failed.task_id})",
            file=sys.stderr,
        )
        return 130 if failed.error.code == "cancelled" else 1
    done = ChatCompleted.model_validate(result.end.data)
    if not result.tokens:
        print(done.text, end="")
    s = done.stats
    print(
        f"\n\n[queue_ms={s.queue_ms:.0f} load_ms={s.load_ms:.0f} ttft_ms={s.ttft_ms:.0f} "
        f"tokens={s.tokens} tokens/s={s.tokens_per_s:.1f} node={s.node} model={s.model} "
        f"task={done.task_id}]"
    )
    return 0


# -- add-client ---------------------------------------------------------------------------------
def cmd_add_client(args: argparse.Namespace) -> int:
    """A new client identity for the local stack: its password, the server's config, and
    its env file; a running nats-server reloads the config (SIGHUP) and takes it at once."""
    from events.auth import check_new_client, write_identities

    try:
        name = check_new_client(args.name)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    auth_dir = state_dir() / "auth"
    if not (auth_dir / "credentials.json").exists():
        print(
            f"error: no stack credentials in {auth_dir}; start the stack once (make run)",
            file=sys.stderr,
        )
        return 2
    known = json.loads((auth_dir / "credentials.json").read_text())
    admin_env = read_env_file(auth_dir / f"{ADMIN}.env")
    ca = Path(admin_env["NATS_CA"]) if "NATS_CA" in admin_env else None  # a --tls stack
    write_identities(auth_dir, [*known, name], admin_env["NATS_URL"], ca)
    reloaded = _reload_nats(state_dir() / "pids.json")
    print(f"client {name!r}: {auth_dir / (name + '.env')}")
    print(f"  it may publish ollama.chat.requested.{name} and ollama.chat.cancel.{name}, and read")
    print(f"  ollama.chat.token.{name}.* ollama.chat.completed.{name} ollama.chat.failed.{name}")
    print(
        "  nats-server reloaded its config"
        if reloaded
        else "  (no running nats-server found: the stack takes it when it starts)"
    )
    print(f"use it:  set -a; . {auth_dir / (name + '.env')}; set +a")
    return 0


def cmd_auth_config(args: argparse.Namespace) -> int:
    """The NATS identities of a deployment elsewhere (Kubernetes): the server's
    `authorization` block and one env file per identity, in --out (0700/0600)."""
    from events.auth import check_new_client, stack_users, write_identities

    try:
        nodes = [n for n in args.nodes.split(",") if n]
        clients = [check_new_client(c) for c in args.clients.split(",") if c]
        out = Path(args.out)
        creds = write_identities(out, stack_users(nodes, clients), args.nats)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(creds.passwords)} identities in {out} (passwords kept if already there)")
    print(f"  server: include {out / 'nats.conf'} in nats-server's config (`authorization`)")
    print(f"  each component: NATS_USER / NATS_PASSWORD from {out}/<user>.env")
    return 0


def _reload_nats(pids_file: Path) -> bool:
    try:
        recorded = json.loads(pids_file.read_text())
    except (OSError, ValueError):
        return False
    reloaded = False
    for entry in recorded:  # every server of a cluster: nats-server, nats-server-1, ...
        if str(entry.get("name", "")).startswith("nats-server"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry["pgid"]), signal.SIGHUP)  # nats-server: reload the config
                reloaded = True
    return reloaded


# -- status / models / task ----------------------------------------------------------------------
async def cmd_status(args: argparse.Namespace) -> int:
    svc = await _open(args.nats)
    nodes = await svc.fleet.nodes()
    queue = await svc.waiting.all()
    now = time.time()
    if args.json:
        print(
            json.dumps(
                {
                    "nodes": [r.model_dump() for r, _ in nodes],
                    "queue": [
                        {
                            "task_id": w.task_id,
                            "model": w.model,
                            "priority": w.priority,
                            "since": w.since,
                        }
                        for w in queue
                    ],
                },
                indent=2,
            )
        )
        await svc.close()
        return 0
    if not nodes:
        print("no nodes registered (is the stack running? `make run`)")
    for rec, rev in nodes:
        age = now - rec.heartbeat_at
        cap = _fmt_bytes(rec.capacity_bytes)
        print(
            f"node {rec.node_id}  {rec.runtime} {rec.url}  capacity {cap}"
            f"  free {_fmt_bytes(rec.free_bytes())}  measured free "
            f"{_fmt_bytes(rec.measured_free_bytes)}  heartbeat {age:.1f}s ago  rev {rev}"
        )
        if not planner.node_is_live(rec, now):
            print(
                f"    STALE: no heartbeat for {age:.0f}s; the planner ignores this node "
                "(reconcile forgets it after 10 min)"
            )
        if not rec.models:
            print("    (no models loaded)")
        for name, slot in sorted(rec.models.items()):
            ka = (
                f"keep-alive {max(0, slot.keep_alive_until - now):.0f}s"
                if slot.keep_alive_until
                else ""
            )
            print(
                f"    {name:<28} {slot.state:<9} active {slot.active}  "
                f"{_fmt_bytes(slot.bytes):>9}  {ka}"
                + (f"  load {slot.load_ms:.0f} ms" if slot.load_ms else "")
            )
        for name, err in rec.errors.items():
            print(f"    ! {name}: {err}")
    print(f"queue depth: {len(queue)}")
    for w in queue:
        got = await svc.tasks.get(w.source, w.task_id)
        why = got.record.reason if got else "?"
        print(f"    {w.task_id}  {w.model}  waiting {now - w.since:.1f}s  ({why})")
    await svc.close()
    return 0


async def cmd_models(args: argparse.Namespace) -> int:
    svc = await _open(args.nats)
    where: dict[str, list[str]] = {}
    for rec, _ in await svc.fleet.nodes():
        for name, slot in rec.models.items():
            where.setdefault(name, []).append(f"{rec.node_id}:{slot.state}")
    models = await svc.catalog.all()
    if not models:
        print("the catalog is empty (is the stack running?)")
    for m in models:
        print(
            f"{m.name:<28} {_fmt_bytes(m.bytes):>9}  {m.family or '':<8} {m.params or '':<6} "
            f"{m.quant or '':<8} ctx {m.context or '-':<6} "
            f"{', '.join(where.get(m.name, [])) or 'not loaded'}"
        )
    await svc.close()
    return 0


async def cmd_task(args: argparse.Namespace) -> int:
    svc = await _open(args.nats)
    found = await svc.tasks.find(args.task_id)
    await svc.close()
    if not found:
        print(f"no task {args.task_id!r} (tasks are kept for 24 h)", file=sys.stderr)
        return 1
    for rec in found:
        print(json.dumps(rec.model_dump(exclude={"end"}), indent=2))
    return 0


async def _manual(args: argparse.Namespace, kind: str) -> int:
    svc = await _open(args.nats)
    data = (
        ModelLoad(model=args.model, node=args.node, reason="manual")
        if kind == "model.load"
        else ModelEvict(model=args.model, node=args.node, reason="manual")
    )
    event = Event(kind, data.model_dump())
    rejected: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_dead(msg: Any) -> None:
        rec = json.loads(msg.data)
        if rec.get("event_id") == event.id and not rejected.done():
            rejected.set_result(rec.get("reason", "rejected"))

    await svc.nc.subscribe("ollama.deadletter.>", cb=on_dead)
    if kind == "model.evict":
        resident = [
            r.node_id
            for r, _ in await svc.fleet.nodes()
            if args.model in r.models and args.node in (None, r.node_id)
        ]
        if not resident:
            where = f" on {args.node}" if args.node else ""
            print(f"{args.model} is not resident{where}: nothing to evict")
            await svc.close()
            return 0
    await bus.publish(svc.js, event)
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    while time.monotonic() < deadline:
        if rejected.done():
            print(f"error: {rejected.result()}", file=sys.stderr)
            await svc.close()
            return 1
        nodes = [r for r, _ in await svc.fleet.nodes()]
        slots = [(r.node_id, r.models[args.model]) for r in nodes if args.model in r.models]
        errors = [r.errors[args.model] for r in nodes if args.model in r.errors]
        if kind == "model.load" and any(s.state == "ready" for _, s in slots):
            node, slot = next((n, s) for n, s in slots if s.state == "ready")
            print(f"{args.model} ready on {node} (load {slot.load_ms or 0:.0f} ms)")
            await svc.close()
            return 0
        if kind == "model.load" and not slots and errors and time.monotonic() - t0 > 1:
            print(f"error: load failed: {errors[0]}", file=sys.stderr)
            await svc.close()
            return 1
        if kind == "model.evict" and not slots:
            print(f"{args.model} evicted")
            await svc.close()
            return 0
        await asyncio.sleep(0.1)
    print(f"error: timed out after {args.timeout:.0f}s", file=sys.stderr)
    await svc.close()
    return 3


async def cmd_load(args: argparse.Namespace) -> int:
    return await _manual(args, "model.load")


async def cmd_evict(args: argparse.Namespace) -> int:
    return await _manual(args, "model.evict")


async def cmd_prepare(args: argparse.Namespace) -> int:
    from stack.assets import (
        ensure_gemma,
        ensure_llama_server,
        ensure_llama_server_cuda,
        ensure_smollm2,
        noise_check_model,
    )

    if args.cuda:
        check = None if args.no_check else noise_check_model()
        print(f"llama-server (CUDA): {ensure_llama_server_cuda(args.cuda_arch, check)}")
        return 0
    print(f"llama-server: {ensure_llama_server()}")
    print(f"gemma 3 270m: {ensure_gemma()}")
    print(f"smollm2 135m instruct: {ensure_smollm2()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ollama-autoscaler", description="VRAM-aware, event-driven serving for LLM fleets"
    )
    p.add_argument("--nats", default=bus.DEFAULT_NATS_URL, help="NATS URL (default %(default)s)")
    p.add_argument(
        "--as",
        dest="identity",
        metavar="USER",
        help="the NATS identity to connect as, from the local stack's <state>/auth/USER.env "
        "(default: the command's own; NATS_USER/NATS_PASSWORD in the environment win)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="run the whole local stack (Ctrl-C stops it)")
    up.add_argument("--nodes", type=int, default=1, help="llama-server nodes (0: none)")
    up.add_argument(
        "--ollama",
        action="append",
        default=[],
        metavar="URL",
        help="also front this Ollama server as a node (repeatable)",
    )
    up.add_argument("--node-memory", default="1.5GiB", help="memory budget per node")
    up.add_argument("--models", help="comma-separated model names (aliases of Gemma 3 270M)")
    up.add_argument("--policy", choices=["cost", "fewest", "lru"])
    up.add_argument(
        "--transport",
        choices=["http", "inprocess"],
        default="http",
        help="http: functions-framework servers (the Knative shape); "
        "inprocess: handlers called by the dispatchers",
    )
    up.add_argument("--nats-port", type=int, default=4222)
    up.add_argument(
        "--tls",
        action="store_true",
        help="NATS over TLS with a CA of the stack's own (<state>/auth/tls/ca.pem; clients "
        "get tls:// URLs and NATS_CA in their env files)",
    )
    up.add_argument(
        "--nats-servers",
        type=int,
        default=1,
        help="a JetStream cluster of this many nats-servers on loopback, streams replicated "
        "on all (3 survives the loss of one); default 1",
    )
    up.add_argument("--runtime-port", type=int, default=8081)
    up.add_argument("--function-port", type=int, default=8090)
    up.add_argument("--state-dir")
    up.add_argument("--fresh", action="store_true", help="wipe JetStream state first")
    up.add_argument(
        "--no-auth",
        action="store_true",
        help="run NATS without authentication (anyone on this machine may do anything)",
    )
    up.add_argument("--ui-port", type=int, default=8501, help="the web UI's port (0: no UI)")
    up.add_argument("--ui-host", default="127.0.0.1")
    up.add_argument(
        "--gateway-listen",
        default="127.0.0.1:11434",
        metavar="HOST:PORT",
        help="the HTTP gateway (Ollama and OpenAI APIs, /metrics); '' for none "
        "(default %(default)s)",
    )
    up.set_defaults(fn=cmd_up)

    prep = sub.add_parser(
        "prepare",
        help="build llama-server (once, cached) and assemble the Gemma "
        "GGUF, without starting anything",
    )
    prep.set_defaults(fn=cmd_prepare)
    prep.add_argument(
        "--cuda", action="store_true", help="build the CUDA llama-server (GPU machines) only"
    )
    prep.add_argument("--cuda-arch", help="CUDA compute capability, e.g. 90 (default: GPU 0's)")
    prep.add_argument(
        "--no-check", action="store_true", help="do not check the build on the GPU afterwards"
    )

    u = sub.add_parser("ui", help="the web UI (Panel) against a running bus")
    u.add_argument("--host", default="127.0.0.1", help="listen address (non-loopback needs auth)")
    u.add_argument("--port", type=int, default=8501)
    u.set_defaults(fn=cmd_ui)

    g = sub.add_parser(
        "gateway", help="the HTTP front door: Ollama's and OpenAI's APIs over the fleet, /metrics"
    )
    g.add_argument(
        "--listen",
        default="127.0.0.1:11434",
        metavar="HOST:PORT",
        help="address to listen on (default %(default)s; a non-loopback one needs API keys: "
        "OA_GATEWAY_API_KEYS or OA_GATEWAY_API_KEYS_FILE)",
    )
    g.set_defaults(fn=cmd_gateway)

    add_commands(sub)  # serve, provision, worker, agent, bridge: the cluster's processes

    c = sub.add_parser("chat", help="send a prompt, stream the answer, print stats")
    c.add_argument("--model", required=True)
    c.add_argument("--chat-id")
    c.add_argument("--max-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float)
    c.add_argument("--timeout", type=float, default=600.0)
    c.add_argument("prompt")
    c.set_defaults(fn=cmd_chat)

    s = sub.add_parser("status", help="nodes, memory, loaded models, queue")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)
    sub.add_parser("models", help="the model catalog and where each is loaded").set_defaults(
        fn=cmd_models
    )
    for name, fn, hlp in (
        ("load", cmd_load, "load a model (plans; may evict)"),
        ("evict", cmd_evict, "unload a model (refused while in use)"),
    ):
        m = sub.add_parser(name, help=hlp)
        m.add_argument("model")
        m.add_argument("--node")
        m.add_argument("--timeout", type=float, default=300.0)
        m.set_defaults(fn=fn)
    a = sub.add_parser(
        "add-client", help="a new client identity for the local stack (its own chats only)"
    )
    a.add_argument("name", help="a-z 0-9 _ - (its subject segment and NATS user)")
    a.set_defaults(fn=cmd_add_client, sync=True)
    ac = sub.add_parser(
        "auth-config", help="NATS identities for a deployment elsewhere (server config + env)"
    )
    ac.add_argument("--out", required=True, help="a folder for credentials.json, nats.conf, *.env")
    ac.add_argument("--nodes", default="", help="comma-separated node ids (an agent each)")
    ac.add_argument("--clients", default=DEFAULT_CLIENT, help="comma-separated client names")
    ac.set_defaults(fn=cmd_auth_config, sync=True)
    t = sub.add_parser("task", help="a task's state and timings")
    t.add_argument("task_id")
    t.set_defaults(fn=cmd_task)
    return p


# Who each command connects as, when NATS_USER is not set: its identity's file in the local
# stack's state (`<state>/auth/<user>.env`, written by `up`). `--as USER` picks another.
DEFAULT_IDENTITY = {
    "chat": DEFAULT_CLIENT,
    "ui": "ui",
    "gateway": "gateway",
    "status": ADMIN,
    "models": ADMIN,
    "task": ADMIN,
    "load": ADMIN,
    "evict": ADMIN,
    "tick": "tick",
    "provision": ADMIN,
}


def state_dir() -> Path:
    from stack.assets import CACHE_DIR

    return Path(os.environ.get("OA_STATE_DIR") or CACHE_DIR / "state")


def use_identity(args: argparse.Namespace) -> None:
    """Take the command's NATS identity from the local stack's auth files, unless the
    environment (NATS_USER) or the URL (user:password@) names one already."""
    user = args.identity or DEFAULT_IDENTITY.get(args.cmd)
    if user is None or "@" in args.nats or (os.environ.get("NATS_USER") and not args.identity):
        return
    path = state_dir() / "auth" / f"{user}.env"
    if not path.exists():
        if args.identity:
            raise ConnectionError(
                f"no credentials for {user!r} at {path}; add a client with "
                f"`ollama-autoscaler add-client {user}`, or set NATS_USER and NATS_PASSWORD"
            )
        return  # a bus without auth, or credentials from elsewhere
    env = read_env_file(path)
    os.environ.update(NATS_USER=env["NATS_USER"], NATS_PASSWORD=env["NATS_PASSWORD"])
    if "NATS_CA" in env and "NATS_CA" not in os.environ:  # a stack started with --tls
        os.environ.update(NATS_CA=env["NATS_CA"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO
        if args.verbose or args.cmd in ("up", "worker", "agent", "bridge")
        else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("nats").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        use_identity(args)
        if getattr(args, "sync", False):
            return int(args.fn(args))
        return asyncio.run(args.fn(args))
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (TimeoutError, nats.errors.TimeoutError) as exc:
        if bus.VIOLATIONS:
            print(f"error: refused by NATS: {bus.VIOLATIONS[-1]}", file=sys.stderr)
            return 77  # EX_NOPERM
        print(f"error: NATS did not answer in time ({exc!r})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
