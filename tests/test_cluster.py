"""What the Kubernetes manifests rely on, run for real here: KEDA's lag read from the real
monitoring endpoint, the pool scaling from zero (worker and node agent as the processes the
pods run), a 3-server JetStream cluster losing a server mid-stream, graceful drain on SIGTERM,
and the JetStream -> Broker bridge.

The runtime is the WIRE-LEVEL FAKE of Ollama's HTTP API (tests/fakes/ollama.py), not Ollama.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.js.errors
import pytest

from agent.node import NodeAgent
from events import bus
from events.codec import Event, decode
from functions import entry
from functions.services import Services, Settings, open_services
from runtimes.ollama import OllamaRuntime
from stack.local import _bin, free_port, register_ollama_models

from .conftest import _wait_port, spawn_cli, wait_until

GIB = 1 << 30
MODEL = "gemma3:270m"


# -- helpers --------------------------------------------------------------------------------------
def keda_lag(monitoring: str, stream: str, consumer: str, account: str = "$G") -> int:
    """The lag KEDA's nats-jetstream scaler computes (kedacore/keda
    pkg/scalers/nats_jetstream_scaler.go): GET /jsz?acc=<account>&consumers=true&config=true,
    find the stream and the durable consumer, lag = num_pending + num_ack_pending."""
    resp = httpx.get(
        f"{monitoring}/jsz",
        params={"acc": account, "consumers": "true", "config": "true"},
        timeout=5,
    )
    resp.raise_for_status()
    for acc in resp.json().get("account_details") or []:
        for st in acc.get("stream_detail") or []:
            if st["name"] != stream:
                continue
            for c in st.get("consumer_detail") or []:
                if c["name"] == consumer:
                    return int(c["num_pending"]) + int(c["num_ack_pending"])
    raise LookupError(f"no consumer {stream}/{consumer} at {monitoring}")


def start_nats_monitored(store: Path) -> tuple[str, str, subprocess.Popen[bytes]]:
    port, mport = free_port(), free_port()
    proc = subprocess.Popen(
        [
            _bin("nats-server"),
            "-js",
            "-sd",
            str(store),
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
            "-m",
            str(mport),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_port(port, proc)
    _wait_port(mport, proc)
    return f"nats://127.0.0.1:{port}", f"http://127.0.0.1:{mport}", proc


def chat_event(model: str = MODEL, max_tokens: int = 4) -> Event:
    return Event(
        "chat.requested",
        {
            "chat_id": uuid.uuid4().hex[:12],
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "options": {"max_tokens": max_tokens},
        },
    )


async def stored_ends(js: Any) -> Counter[str]:
    """Terminal events as JetStream stored them (what any consumer of the stream sees),
    counted per task: every message of the stream, read by sequence."""
    state = (await js.stream_info(bus.EVENTS_STREAM)).state
    ends: Counter[str] = Counter()
    for seq in range(state.first_seq, state.last_seq + 1):
        try:
            msg = await js.get_msg(bus.EVENTS_STREAM, seq)
        except nats.js.errors.NotFoundError:
            continue  # deleted
        if msg.subject.startswith(("ollama.chat.completed.", "ollama.chat.failed.")):
            ends[decode(msg.headers or {}, msg.data or b"").data["task_id"]] += 1
    return ends


async def stop_process(proc: asyncio.subprocess.Process, timeout: float = 60) -> str:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return out.decode(errors="replace") if out else ""


async def http_ok(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            return (await client.get(url)).status_code == 200
    except httpx.HTTPError:
        return False


# -- KEDA's rule, and the pool scaling from zero --------------------------------------------------
async def test_keda_lag_scales_the_pool_from_zero_and_back(tmp_path, fake_ollama):
    """provision as the Job does; N chats with no worker: KEDA reads lag N on the chat
    consumer. A worker takes them: no node exists (the pool is at zero), so they park and
    the lag moves to the waiting consumer (the queue). A node agent joins (the scaled-up
    pod): the queue drains to 0 and every chat ends once. SIGTERM: the node leaves."""
    _fake, fake_url = fake_ollama
    url, mon, server = start_nats_monitored(tmp_path / "js")
    worker = agent = None
    try:
        prov = await spawn_cli("--nats", url, "provision", "--delivery", "pull")
        out, err = await asyncio.wait_for(prov.communicate(), 30)
        assert prov.returncode == 0, err.decode()
        assert "consumers on OLLAMA_EVENTS: cancel, chat, evict, load, pull, reconcile" in (
            out.decode()
        )
        nc = await bus.connect(url)
        js = nc.jetstream()
        from stores.catalog import Catalog

        await register_ollama_models(Catalog(await js.key_value(bus.MODELS_BUCKET), js), fake_url)
        n = 5
        events = [chat_event() for _ in range(n)]
        for ev in events:
            await bus.publish(js, ev)
        assert keda_lag(mon, bus.EVENTS_STREAM, "chat") == n
        assert keda_lag(mon, bus.WAITING_STREAM, bus.WAITING_CONSUMER) == 0

        hport = free_port()
        worker = await spawn_cli(
            "--nats", url, "worker", "--no-provision", "--health-port", str(hport),
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        await wait_until(lambda: http_ok(f"http://127.0.0.1:{hport}/readyz"), what="worker")
        await wait_until(
            lambda: keda_lag(mon, bus.WAITING_STREAM, bus.WAITING_CONSUMER) == n,
            what="every chat parked (no node: the pool is at zero)",
        )
        assert keda_lag(mon, bus.EVENTS_STREAM, "chat") == 0

        aport = free_port()
        agent = await spawn_cli(
            "--nats", url, "agent", "--runtime", "ollama", "--runtime-url", fake_url,
            "--node-id", "ollama-runtime-0", "--capacity", "4GiB",
            "--health-port", str(aport), "--drain-timeout", "20",
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        await wait_until(lambda: http_ok(f"http://127.0.0.1:{aport}/readyz"), what="agent")
        await wait_until(
            lambda: keda_lag(mon, bus.WAITING_STREAM, bus.WAITING_CONSUMER) == 0,
            timeout=60,
            what="the queue to drain once a node joined",
        )

        async def all_ended() -> bool:
            return sum((await stored_ends(js)).values()) >= n

        await wait_until(all_ended, timeout=60, what="every chat to end")
        ends = await stored_ends(js)
        assert len(ends) == n and set(ends.values()) == {1}, ends
        from stores.fleet import Fleet

        fleet = Fleet(await js.key_value(bus.FLEET_BUCKET), js)
        assert [r.node_id for r, _ in await fleet.nodes()] == ["ollama-runtime-0"]

        # Scale-down: the pod's agent gets SIGTERM, drains (nothing active) and leaves.
        log = await stop_process(agent)
        assert agent.returncode == 0, log
        assert "left the fleet (clean)" in log
        assert await Fleet(await js.key_value(bus.FLEET_BUCKET), js).nodes() == []
        log = await stop_process(worker)
        assert worker.returncode == 0, log
        assert "drained; 0 handed back" in log
        await nc.close()
    finally:
        for proc in (agent, worker):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
        server.terminate()
        server.wait(10)


# -- graceful drain -------------------------------------------------------------------------------
@pytest.fixture
async def node(fresh_nats_url, fake_ollama) -> Any:
    """Streams, a catalog entry and a registered fake Ollama node (the runtime pod)."""
    fake, url = fake_ollama
    svc = await open_services(Settings(nats_url=fresh_nats_url), provision=True, reconfigure=True)
    await register_ollama_models(svc.catalog, url)
    agent = NodeAgent(svc.fleet, "n1", OllamaRuntime(url), 4 * GIB, waiting=svc.waiting)
    await agent.register()
    stop = asyncio.Event()
    beating = asyncio.create_task(agent.run(stop))
    yield svc, fake, fresh_nats_url
    stop.set()
    await beating
    await svc.close()


async def _first_token(svc: Services, chat_id: str) -> None:
    got = asyncio.Event()

    async def cb(_: Any) -> None:
        got.set()

    sub = await svc.nc.subscribe(f"ollama.chat.token.*.{chat_id}", cb=cb)
    try:
        await asyncio.wait_for(got.wait(), 60)
    finally:
        await sub.unsubscribe()


async def test_sigterm_lets_an_in_flight_chat_finish(node):
    svc, fake, url = node
    fake.token_s = 0.03  # 60 tokens: ~2 s of streaming
    worker = await spawn_cli(
        "--nats", url, "worker", "--functions", "chat,load", "--drain-timeout", "60",
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        ev = chat_event(max_tokens=60)
        await bus.publish(svc.js, ev)
        await _first_token(svc, ev.data["chat_id"])
        log = await stop_process(worker)
        assert worker.returncode == 0, log
        assert "drained; 0 handed back" in log
        ends = await stored_ends(svc.js)
        assert list(ends.values()) == [1], ends
        end = await _end_of(svc, ev)
        assert end["type"] == "chat.completed" and end["data"]["stats"]["tokens"] == 60
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()


async def test_sigterm_past_the_drain_timeout_hands_the_chat_to_another_worker(node):
    svc, fake, url = node
    fake.token_s = 0.05  # 400 tokens: ~20 s, far past the first worker's drain timeout
    first = await spawn_cli(
        "--nats", url, "worker", "--functions", "chat,load", "--drain-timeout", "0.5",
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    second = None
    try:
        ev = chat_event(max_tokens=400)
        await bus.publish(svc.js, ev)
        await _first_token(svc, ev.data["chat_id"])
        log = await stop_process(first)
        assert first.returncode == 0, log
        assert "drained; 1 handed back" in log
        # Handed back at once: not after the consumer's ack wait, and the claim released.
        task = (await svc.tasks.get(ev.source, ev.id)).record
        assert task.owner is None and task.end is None
        fake.token_s = 0.002
        second = await spawn_cli("--nats", url, "worker", "--functions", "chat,load")
        end = await _end_of(svc, ev)
        assert end["type"] == "chat.completed", end
        assert end["data"]["stats"]["attempt"] == 2 and end["data"]["stats"]["tokens"] == 400
        # The end is stored in the task before it is published: wait for the stream to have it.
        ends = await wait_until(lambda: stored_ends(svc.js), timeout=10, what="the end stored")
        assert list(ends.values()) == [1], ends
        # No lease is left held on the node by the handed-back run.
        rec, _ = await svc.fleet.get("n1")
        assert all(not s.leases for s in rec.models.values()), rec.models
    finally:
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _end_of(svc: Services, ev: Event, timeout: float = 60) -> dict[str, Any]:
    async def ended() -> dict[str, Any] | None:
        got = await svc.tasks.get(ev.source, ev.id)
        return got.record.end if got is not None and got.record.end else None

    return await wait_until(ended, timeout=timeout, what=f"the end of {ev.id}")


# -- a 3-server JetStream cluster losing one server mid-stream -----------------------------------
def start_cluster(tmp: Path, n: int = 3) -> list[tuple[str, subprocess.Popen[bytes]]]:
    """n nats-servers on loopback as one JetStream cluster, as knative/ runs them (3
    replicas, file storage, routes between them)."""
    ports = [(free_port(), free_port()) for _ in range(n)]
    routes = ",".join(f"nats://127.0.0.1:{cp}" for _, cp in ports)
    servers = []
    for i, (port, cport) in enumerate(ports):
        cmd = [
            _bin("nats-server"), "-js", "-sd", str(tmp / f"js{i}"), "-a", "127.0.0.1",
            "-p", str(port), "-n", f"nats-{i}", "--cluster_name", "oa",
            "--cluster", f"nats://127.0.0.1:{cport}", "--routes", routes,
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        servers.append((f"nats://127.0.0.1:{port}", proc))
    for (_url, proc), (port, _) in zip(servers, ports, strict=True):
        _wait_port(port, proc)
    return servers


@pytest.mark.cluster_failover
async def test_a_jetstream_cluster_loses_a_server_mid_stream_and_every_chat_ends_once(
    tmp_path, fake_ollama
):
    fake, fake_url = fake_ollama
    fake.token_s = 0.02
    servers = start_cluster(tmp_path)
    urls = [u for u, _ in servers]
    conns: list[Any] = []
    stop = asyncio.Event()
    runners: list[asyncio.Task[None]] = []
    try:
        # The worker's connection prefers server 0 (the one that dies); the observer's is
        # pinned to server 1. Provision waits for the cluster's meta leader.
        svc: Services | None = None

        async def provisioned() -> bool:
            nonlocal svc
            try:
                svc = await _open_clustered(urls)
                return True
            except Exception:
                return False

        await wait_until(provisioned, timeout=60, interval=0.5, what="a JetStream meta leader")
        assert svc is not None
        info = await svc.js.stream_info(bus.EVENTS_STREAM)
        assert info.config.num_replicas == 3 and len(info.cluster.replicas or []) == 2
        await register_ollama_models(svc.catalog, fake_url)
        agent = NodeAgent(svc.fleet, "n1", OllamaRuntime(fake_url), 8 * GIB, waiting=svc.waiting)
        await agent.register()
        runners.append(asyncio.create_task(agent.run(stop)))
        for name in ("chat", "load", "evict"):
            runners.append(asyncio.create_task(entry.dispatcher(svc, name).run(stop)))
        observer = await nats.connect(urls[1])
        conns.append(observer)

        n = 20
        events = [chat_event(max_tokens=40) for _ in range(n)]
        tokens: Counter[str] = Counter()

        async def on_token(msg: Any) -> None:
            tokens[msg.subject.rsplit(".", 1)[-1]] += 1

        await observer.subscribe("ollama.chat.token.*.*", cb=on_token)
        for ev in events:
            await bus.publish(svc.js, ev)
        await wait_until(lambda: sum(tokens.values()) >= 40, timeout=60, what="chats streaming")
        servers[0][1].kill()  # kill -9 of the server the worker is connected to
        servers[0][1].wait(10)

        js1 = observer.jetstream()

        async def all_ended() -> bool:
            with contextlib.suppress(Exception):
                return len(await stored_ends(js1)) >= n
            return False

        try:
            await wait_until(all_ended, timeout=90, interval=0.5, what="every chat to end")
        except AssertionError:
            states = [await svc.tasks.get(ev.source, ev.id) for ev in events]
            ends = await stored_ends(js1)
            raise AssertionError(
                f"{len(ends)}/{n} ended; tasks: "
                f"{[(g.record.state, g.record.runs, bool(g.record.end)) if g else None for g in states]}"  # noqa: E501
            ) from None
        ends = await stored_ends(js1)
        assert len(ends) == n, f"{n - len(ends)} chats never ended"
        assert set(ends.values()) == {1}, f"duplicated ends: {ends}"
        assert svc.nc.connected_url is not None and svc.nc.connected_url.port != int(
            urls[0].rsplit(":", 1)[1]
        )
        await svc.close()
    finally:
        stop.set()
        for task in runners:
            task.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
        for c in conns:
            await c.close()
        for _, proc in servers:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)


async def _open_clustered(urls: list[str]) -> Services:
    """Services connected to a cluster: the server list, in order (no randomising)."""
    from nats.aio.client import Client

    nc = Client()
    await nc.connect(
        servers=urls,
        dont_randomize=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        connect_timeout=2,
    )
    try:
        return await open_services(
            Settings(nats_url=urls[0]), provision=True, ack_wait_s=5, reconfigure=True,
            nc=nc, replicas=3,
        )  # fmt: skip
    except Exception:
        await nc.close()
        raise


# -- the JetStream -> Broker bridge ---------------------------------------------------------------
async def test_the_bridge_forwards_client_events_to_the_broker_and_serves_demand(
    fresh_nats_url, tmp_path
):
    """A stand-in Broker ingress (HTTP, answers 202 like Knative's, 400 for one event) gets
    every client event published on NATS in binary mode; the refused one is dead-lettered."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    got: list[dict[str, str]] = []

    async def ingress(request: Request) -> Response:
        headers = dict(request.headers)
        got.append(headers)
        return Response(status_code=400 if headers.get("ce-id") == "refused" else 202)

    port = free_port()
    sink = uvicorn.Server(
        uvicorn.Config(
            Starlette(routes=[Route("/", ingress, methods=["POST"])]),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    serving = asyncio.create_task(sink.serve())
    bridge = None
    try:
        prov = await spawn_cli("--nats", fresh_nats_url, "provision", "--delivery", "knative")
        out, err = await asyncio.wait_for(prov.communicate(), 30)
        assert prov.returncode == 0, err.decode()
        assert f"consumers on OLLAMA_EVENTS: {bus.BRIDGE_CONSUMER}" in out.decode()
        hport = free_port()
        bridge = await spawn_cli(
            "--nats", fresh_nats_url, "bridge", "--health-port", str(hport),
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "K_SINK": f"http://127.0.0.1:{port}/"},
        )  # fmt: skip
        await wait_until(lambda: http_ok(f"http://127.0.0.1:{hport}/readyz"), what="bridge")
        nc = await bus.connect(fresh_nats_url)
        js = nc.jetstream()
        sent = [
            chat_event(),
            Event("chat.cancel", {"task_id": "t1"}),
            Event("model.load", {"model": MODEL}),
            Event("model.evict", {"model": MODEL}),
            Event("model.pull", {"model": MODEL}),
            Event("model.load", {"model": MODEL}, id="refused"),
        ]
        dead: list[dict[str, Any]] = []

        async def on_dead(msg: Any) -> None:
            dead.append(json.loads(msg.data))

        await nc.subscribe("ollama.deadletter.>", cb=on_dead)
        for ev in sent:
            await bus.publish(js, ev)
        await wait_until(lambda: len(got) == len(sent) and dead, what="every event forwarded")
        assert [h["ce-type"] for h in got] == [e.type for e in sent]
        assert {h["ce-id"] for h in got} == {e.id for e in sent}
        assert dead[0]["event_id"] == "refused" and dead[0]["consumer"] == bus.BRIDGE_CONSUMER
        await wait_until(
            lambda: keda_lag_zero(js), what="the bridge consumer to have acked everything"
        )
        async with httpx.AsyncClient() as client:
            demand = (await client.get(f"http://127.0.0.1:{hport}/demand")).json()
        assert demand == {"waiting": 0, "active": 0, "loading": 0, "demand": 0}
        await nc.close()
        log = await stop_process(bridge)
        assert bridge.returncode == 0, log
    finally:
        if bridge is not None and bridge.returncode is None:
            bridge.kill()
            await bridge.wait()
        sink.should_exit = True
        await serving


async def keda_lag_zero(js: Any) -> bool:
    info = await js.consumer_info(bus.EVENTS_STREAM, bus.BRIDGE_CONSUMER)
    return info.num_pending == 0 and info.num_ack_pending == 0
