"""End to end on real parts: nats-server, llama-server (router mode, built from source) and the
real Gemma 3 270M model. Each test starts its own stack on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from autoscaler.client import ChatSession, chat
from events import bus
from events.codec import Event, to_structured
from events.types import ChatRequested
from functions.services import Settings
from stack.local import LocalStack, StackConfig
from stores.tasks import Tasks
from stores.waiting import Waiting

from .conftest import ROOT, Collector, cli_env, spawn_cli, wait_until

pytestmark = pytest.mark.e2e
MIB = 1 << 20
A, B = "gemma3-270m", "gemma3-270m-b"
# The local preset ends an answer at the next "Question:"; tests that need a long stream
# replace that stop string with one the model never writes.
NEVER = "<never-emitted>"

StackFactory = Callable[..., Any]


async def long_story(nc: Any, chat_id: str, max_tokens: int, **options: Any) -> ChatSession:
    """A chat that streams for a while (the stop string is one the model never writes)."""
    request = ChatRequested(
        chat_id=chat_id,
        model=A,
        messages=[{"role": "user", "content": "Tell a long story."}],
        options={"max_tokens": max_tokens, "stop": [NEVER], **options},
    )
    return await ChatSession(nc, request).start()


@pytest.fixture
async def make_stack(tmp_path) -> AsyncIterator[StackFactory]:
    stacks: list[LocalStack] = []

    async def make(
        node_memory: int = 1536 * MIB,
        transport: str = "inprocess",
        functions: tuple[str, ...] = ("chat", "cancel", "load", "evict", "pull", "reconcile"),
        ack_wait_s: float | None = None,
    ) -> tuple[LocalStack, Any]:
        cfg = StackConfig(
            state_dir=tmp_path / f"stack{len(stacks)}",
            nodes=1,
            node_memory=node_memory,
            models=(A, B),
            nats_port=0,
            runtime_port=0,
            function_port=0,
            transport=transport,
            functions=functions,
            tick_s=1.0,
            chat_model=None,
            ack_wait_s=ack_wait_s,
            settings=Settings(),
        )
        stack = LocalStack(cfg)
        stacks.append(stack)
        await stack.start(progress=True)
        nc = await bus.connect(stack.admin_url)
        return stack, nc

    yield make
    for s in stacks:
        await s.stop()
    # Every component ran under its own identity and never needed more than it may do.
    for s in stacks:
        log = (s.cfg.state_dir / "logs" / "nats-server.log").read_text()
        refused = [line for line in log.splitlines() if "Violation" in line]
        assert not refused, f"a component was refused by NATS: {refused[:5]}"


async def _runtime_models(stack: LocalStack) -> dict[str, str]:
    async with httpx.AsyncClient() as client:
        resp = await client.get(
            stack.runtime_urls["node-0"] + "/models", headers=stack.runtime_headers()
        )
    return {m["id"]: m["status"]["value"] for m in resp.json()["data"]}


def _one_end(events: Collector, task_id: str) -> list[Event]:
    return [
        e
        for _, e in events.events
        if isinstance(e, Event)
        and e.type in ("chat.completed", "chat.failed")
        and e.data["task_id"] == task_id
    ]


@pytest.mark.parametrize("transport", ["inprocess", "http"])
async def test_chat_streams_real_text_with_contiguous_seq_and_one_completed(make_stack, transport):
    _stack, nc = await make_stack(transport=transport)
    ends = await Collector().attach(nc, "ollama.chat.completed.*", "ollama.chat.failed.*")
    result = await chat(nc, A, "Why is the sky blue?", timeout=120, max_tokens=24, stop=[NEVER])
    assert result.end.type == "chat.completed", result.end.data
    stats = result.end.data["stats"]
    assert [t.seq for t in result.tokens] == list(range(stats["tokens"]))
    assert stats["tokens"] > 0 and result.text().strip()
    assert result.text() == result.end.data["text"]
    assert stats["node"] == "node-0" and stats["ttft_ms"] > 0 and stats["load_ms"] > 0
    tasks = Tasks(await nc.jetstream().key_value(bus.TASKS_BUCKET), nc.jetstream())

    async def task_state() -> str | None:
        found = await tasks.find(result.task_id)
        return found[0].state if found and found[0].state in ("done", "failed") else None

    # The task record is written beside chat.completed, not before it: wait for it.
    assert await wait_until(task_state, what="the task's final state") == "done"
    assert len(_one_end(ends, result.task_id)) == 1
    await nc.close()


async def test_second_model_evicts_the_idle_first_on_a_node_that_fits_one(make_stack):
    stack, nc = await make_stack(node_memory=600 * MIB)
    events = await Collector().attach(nc, "ollama.model.>")
    first = await chat(nc, A, "Hello", timeout=120, max_tokens=8)
    assert first.end.type == "chat.completed"
    assert (await _runtime_models(stack))[A] == "loaded"
    second = await chat(nc, B, "Hello", timeout=120, max_tokens=8)
    assert second.end.type == "chat.completed", second.end.data
    evicted = await wait_until(lambda: events.of_type("model.evicted"), what="model.evicted")
    assert evicted[0].data["model"] == A and evicted[0].data["bytes_freed"] == 400 * MIB
    models = await _runtime_models(stack)  # the runtime's own view, not ours
    assert models[A] == "unloaded" and models[B] == "loaded"
    await nc.close()


@pytest.mark.parametrize("transport", ["inprocess", "http"])
async def test_request_waits_queued_while_the_only_model_is_active(make_stack, transport):
    """Parked, under the pull dispatcher and under HTTP push alike: acknowledged, never
    redelivered, woken when A's lease is released."""
    _stack, nc = await make_stack(node_memory=600 * MIB, transport=transport)
    tasks = Tasks(await nc.jetstream().key_value(bus.TASKS_BUCKET), nc.jetstream())
    long = await long_story(nc, "long", 200)
    await wait_until(lambda: long.result.tokens, timeout=120, what="first token of A")
    waiting = await ChatSession(
        nc,
        ChatRequested(
            chat_id="waiting",
            model=B,
            messages=[{"role": "user", "content": "Hi"}],
            options={"max_tokens": 8},
        ),
    ).start()
    rec = await wait_until(lambda: tasks.find(waiting.result.task_id), what="task B recorded")
    await wait_until(lambda: _is_queued(tasks, waiting.result.task_id), timeout=30, what="B queued")
    assert not long.done, "A finished before B was seen queued; the test proves nothing"
    parked = Waiting(nc.jetstream())
    assert [w.task_id for w in await parked.all()] == [waiting.result.task_id]
    a = await long.wait(timeout=400)
    b = await waiting.wait(timeout=400)
    assert a.end.type == "chat.completed" and b.end.type == "chat.completed", b.end.data
    assert b.end.data["stats"]["queue_ms"] > 0 and rec is not None
    assert await parked.all() == []
    chat_consumer = await nc.jetstream().consumer_info(bus.EVENTS_STREAM, "chat")
    assert chat_consumer.num_redelivered == 0  # waiting was never a NAK loop
    await nc.close()


async def _is_queued(tasks: Tasks, task_id: str) -> bool:
    found = await tasks.find(task_id)
    return bool(found) and found[0].state == "queued"


async def test_bad_events_go_to_dead_letter_and_the_next_good_one_is_served(make_stack):
    _stack, nc = await make_stack()
    js = nc.jetstream()
    events = await Collector().attach(nc, "ollama.deadletter.>", "ollama.chat.failed.*")
    await js.publish("ollama.chat.requested.client", b"this is not a cloudevent")
    bad_schema = Event("chat.requested", {"chat_id": "x1", "model": A})  # no messages
    await js.publish("ollama.chat.requested.client", to_structured(bad_schema)[1])
    hostile = Event(
        "chat.requested",
        {
            "chat_id": "x2",
            "model": "../../etc/passwd",
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    await js.publish("ollama.chat.requested.client", to_structured(hostile)[1])
    unknown = Event(
        "chat.requested",
        {
            "chat_id": "x3",
            "model": "no-such-model:7b",
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    await bus.publish(js, unknown)
    huge = Event(
        "chat.requested",
        {"chat_id": "x4", "model": A, "messages": [{"role": "user", "content": "w " * 60000}]},
    )
    await bus.publish(js, huge)
    await wait_until(lambda: len(events.dead()) >= 5, what="five dead letters")
    reasons = " | ".join(d["reason"] for d in events.dead())
    assert "malformed event" in reasons and "invalid chat.requested" in reasons
    assert "unknown model 'no-such-model:7b'" in reasons and "exceeds" in reasons
    assert "invalid model name" in reasons
    assert any(d["body"] == "this is not a cloudevent" for d in events.dead())
    failed = {e.data["chat_id"]: e.data["error"]["code"] for e in events.of_type("chat.failed")}
    assert failed.get("x3") == "unknown_model" and failed.get("x4") == "prompt_too_long"
    good = await chat(nc, A, "Hello", timeout=120, max_tokens=6)
    assert good.end.type == "chat.completed"
    await nc.close()


async def test_killed_worker_mid_stream_is_redelivered_and_ends_once(make_stack, tmp_path):
    stack, nc = await make_stack(functions=("load", "evict", "reconcile"), ack_wait_s=3.0)
    ends = await Collector().attach(nc, "ollama.chat.completed.*", "ollama.chat.failed.*")

    logs: list[Path] = []

    def worker() -> subprocess.Popen[bytes]:
        logs.append(tmp_path / f"worker-{len(logs)}.log")
        out = logs[-1].open("wb")
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "autoscaler.cli",
                "--nats",
                stack.url_for("worker"),
                "worker",
                "--functions",
                "chat",
            ],
            cwd=ROOT,
            start_new_session=True,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **stack.env_for("worker")},  # its identity, the runtime's key
        )

    first = worker()
    second = None
    try:
        session = await long_story(nc, uuid.uuid4().hex[:12], 120, temperature=0)
        await wait_until(
            lambda: len(session.result.tokens) >= 5,
            timeout=120,
            what="tokens from the first worker",
        )
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        assert not session.done
        second = worker()
        try:
            result = await session.wait(timeout=400)
        except TimeoutError:
            tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs)
            raise AssertionError(f"no end event after the kill; worker logs:\n{tails}") from None
        assert result.end.type == "chat.completed", result.end.data
        attempt = result.end.data["stats"]["attempt"]
        assert attempt >= 2
        final = [t.seq for t in result.tokens if t.attempt == attempt]
        assert final == list(range(result.end.data["stats"]["tokens"]))
        await asyncio.sleep(0)
        assert len(_one_end(ends, result.task_id)) == 1

        # The dead worker's lease was taken over by the same task id, then released.
        async def released() -> bool:
            rec, _ = await stack.svc.fleet.get("node-0")
            return rec.models[A].active == 0

        await wait_until(released, timeout=30, what="the lease to be released")
    finally:
        for p in (first, second):
            if p and p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
                p.wait(10)
    await nc.close()


async def _cli(stack: LocalStack, *args: str) -> tuple[int, str, str]:
    proc = await spawn_cli("--nats", stack.nats_url, *args, env=cli_env(stack))
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli_chat_prints_text_and_stats_and_status_and_manual_evict(make_stack):
    stack, nc = await make_stack()
    rc, out, err = await _cli(stack, "chat", "--model", A, "--max-tokens", "12", "Why?")
    assert rc == 0, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("[queue_ms=") and "node=node-0" in last
    assert 0 < int(last.split("tokens=")[1].split()[0]) <= 12
    rc, out, _ = await _cli(stack, "status", "--json")
    assert json.loads(out)["nodes"][0]["models"][A]["state"] == "ready"
    rc, _, err = await _cli(stack, "chat", "--model", "missing-model", "hi")
    assert rc == 1 and "unknown_model" in err and "(task " in err
    rc, out, err = await _cli(stack, "load", B)
    assert rc == 0 and f"{B} ready on node-0" in out, err
    rc, out, err = await _cli(stack, "evict", A)
    assert rc == 0 and f"{A} evicted" in out, err
    rc, out, err = await _cli(stack, "evict", A)
    assert rc == 0 and "not resident" in out and "evicted" not in out, err
    assert (await _runtime_models(stack))[A] == "unloaded"
    rc, out, _ = await _cli(stack, "models")
    assert f"{B}" in out and "node-0:ready" in out
    await nc.close()


def _child_of(stack: LocalStack, name: str) -> Any:
    import psutil

    proc = next(p for p in stack.procs if p.name == name)
    return proc, psutil.Process(proc.popen.pid)


async def test_a_model_process_killed_mid_stream_ends_in_chat_failed(make_stack):
    """Defect 12 on the real runtime: the partial text was reported as chat.completed."""
    stack, nc = await make_stack()
    session = await long_story(nc, "cut", 400)
    await wait_until(lambda: len(session.result.tokens) >= 3, timeout=120, what="tokens")
    _, router = _child_of(stack, "llama-server-node-0")
    for child in router.children(recursive=True):
        child.kill()  # the model's process dies mid-answer
    result = await session.wait(timeout=120)
    assert result.end.type == "chat.failed", result.end.data
    assert result.end.data["error"]["code"] in ("interrupted", "runtime_error")
    assert result.end.data["text"] and result.end.data["text"] == result.text()
    await nc.close()


async def test_no_web_page_may_read_from_llama_server_or_its_model_processes(make_stack):
    """llama-server's defaults reflect any Origin with credentials allowed: a page on any site
    open in a local browser could drive it. The router and each model process it starts must
    answer another origin with neither."""
    stack, nc = await make_stack()
    result = await chat(nc, A, "Hi", timeout=120, max_tokens=2)
    assert result.end.type == "chat.completed", result.end.data
    _, router = _child_of(stack, "llama-server-node-0")
    urls = [stack.runtime_urls["node-0"]]
    for child in router.children(recursive=True):
        for conn in child.net_connections(kind="tcp"):
            if conn.status == "LISTEN":
                urls.append(f"http://127.0.0.1:{conn.laddr.port}")
    assert len(urls) >= 2, "no model process listening"
    evil = {"Origin": "http://evil.example"}
    async with httpx.AsyncClient() as client:
        for url in urls:
            for resp in (
                await client.get(url + "/health", headers=evil),
                await client.options(url + "/v1/chat/completions", headers=evil),
            ):
                allowed = resp.headers.get("access-control-allow-origin", "")
                assert allowed not in ("*", evil["Origin"]), (url, allowed)
                assert resp.headers.get("access-control-allow-credentials") != "true", url
        # The router wants its API key on everything but /health; the system sends it.
        router_url = stack.runtime_urls["node-0"]
        for path in ("/models", "/v1/models"):
            assert (await client.get(router_url + path)).status_code == 401, path
            keyed = await client.get(router_url + path, headers=stack.runtime_headers())
            assert keyed.status_code == 200, (path, keyed.text)
        wrong = await client.post(
            router_url + "/models/load",
            json={"model": A},
            headers={"Authorization": "Bearer not-the-key"},
        )
        assert wrong.status_code == 401
    await nc.close()


async def test_a_prompt_past_the_runtimes_context_is_prompt_too_long(make_stack):
    """Defect 16: llama-server's context overflow was reported as model_not_loaded."""
    stack, nc = await make_stack()
    stack.svc.settings = stack.svc.settings.but(chars_per_token=1000.0)  # let it through
    result = await chat(nc, A, "word " * 3000, timeout=120, max_tokens=4)
    assert result.end.type == "chat.failed", result.end.data
    assert result.end.data["error"]["code"] == "prompt_too_long", result.end.data
    await nc.close()


async def test_up_restarts_killed_children_and_a_nats_restart_loses_nothing(make_stack):
    """Defect 15 and supervision: a dead child stopped everything, and a killed
    functions-framework master left its worker holding the port."""
    stack, nc = await make_stack(transport="http")
    first = await chat(nc, A, "Hello", timeout=120, max_tokens=4)
    assert first.end.type == "chat.completed", first.end.data
    tasks = Tasks(await nc.jetstream().key_value(bus.TASKS_BUCKET), nc.jetstream())

    for name in ("function-chat", "nats-server", "llama-server-node-0"):
        proc, _ = _child_of(stack, name)
        old_pid = proc.popen.pid
        os.killpg(old_pid, signal.SIGKILL)

        async def back(p=proc, old=old_pid) -> bool:
            return p.popen.pid != old and p.popen.poll() is None

        await wait_until(back, timeout=60, what=f"{name} restarted")
        result = await chat(nc, A, "Hello again", timeout=180, max_tokens=4)
        assert result.end.type == "chat.completed", (name, result.end.data)
    # JetStream is on disk: the first task's record survived the nats-server restart.
    assert [t.state for t in await tasks.find(first.task_id)] == ["done"]
    await nc.close()


async def test_ctrl_c_in_the_cli_cancels_the_chat_in_the_system(make_stack):
    stack, nc = await make_stack()
    ends = await Collector().attach(nc, "ollama.chat.failed.*", "ollama.chat.completed.*")
    proc = await spawn_cli(
        "--nats",
        stack.nats_url,
        "chat",
        "--model",
        A,
        "--max-tokens",
        "400",
        "Tell a long story.",
        env=cli_env(stack),
    )
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.read(8), 120)  # the answer has begun
    assert first
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 130, err.decode()
    assert "cancelled" in err.decode()
    failed = await wait_until(lambda: ends.of_type("chat.failed"), what="the cancelled end")
    assert failed[0].data["error"]["code"] == "cancelled" and not ends.of_type("chat.completed")

    async def free() -> bool:
        rec, _ = await stack.svc.fleet.get("node-0")
        return rec.models[A].active == 0

    await wait_until(free, timeout=30, what="the lease released")
    await nc.close()


async def test_up_with_tls_serves_a_chat_with_every_component_over_tls(tmp_path):
    """`up --tls`: nats-server takes only TLS; the functions (their own processes, given
    NATS_CA), the dispatchers, the agent and a client all verify it against the stack's CA."""
    cfg = StackConfig(
        state_dir=tmp_path / "tls-stack", nodes=1, models=(A,), chat_model=None, nats_port=0,
        runtime_port=0, function_port=0, transport="http", tls=True, tick_s=1.0,
        settings=Settings(),
    )  # fmt: skip
    stack = LocalStack(cfg)
    await stack.start(progress=False)
    try:
        assert stack.nats_url.startswith("tls://") and stack.ca_file is not None
        env = (cfg.state_dir / "auth" / "client.env").read_text()
        assert f"NATS_CA={stack.ca_file}" in env and "NATS_URL=tls://" in env
        nc = await bus.connect(stack.url_for("client"), ca=stack.ca)
        result = await chat(nc, A, "Hello", timeout=180, max_tokens=4)
        assert result.end.type == "chat.completed", result.end.data
        await nc.close()
    finally:
        await stack.stop()
