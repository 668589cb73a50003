"""The HTTP gateway against the real stack (nats-server + llama-server + Gemma), driven by
clients nobody here wrote: the official `ollama` and `openai` Python packages, and raw HTTP
for the error shapes. Ollama's own server is not here: the Ollama node of these tests is the
WIRE-LEVEL FAKE of Ollama's API (tests/fakes/ollama.py), used only for `pull`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from events import bus
from functions.services import Settings
from gateway.app import serve
from gateway.http import RefusedToServe
from stack.local import LocalStack, StackConfig
from stores.fleet import Fleet

from .conftest import ROOT, serve_app, wait_until

pytestmark = pytest.mark.e2e
MIB = 1 << 20
A, B = "gemma3-270m", "gemma3-270m-b"
NEVER = "<never-emitted>"  # a stop string the model never writes: a long stream
GREEDY = {"temperature": 0, "seed": 1}


class Env:
    def __init__(self, stack: LocalStack, served: Any, fake: Any, admin: Any) -> None:
        self.stack, self.served, self.fake, self.admin = stack, served, fake, admin
        self.url = served.url
        self.fleet = Fleet(bus.bucket(admin.jetstream(), bus.FLEET_BUCKET), admin.jetstream())

    async def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with httpx.AsyncClient() as client:
            text = (await client.get(self.url + "/metrics")).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    async def idle(self, model: str, timeout: float = 20) -> None:
        """Wait until no request holds a lease on `model` (its release is written)."""

        async def free() -> bool:
            rec, _ = await self.fleet.get("node-0")
            slot = rec.models.get(model)
            return slot is None or not slot.leases

        await wait_until(free, timeout=timeout, what=f"{model} released")


def metric(m: dict[Any, float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    from tests.fakes.ollama import FakeOllama

    fake = FakeOllama()
    async with serve_app(fake.app(), "fake ollama") as fake_url:
        stack = LocalStack(
            StackConfig(
                state_dir=tmp_path_factory.mktemp("gw") / "stack",
                nodes=1,
                node_memory=600 * MIB,  # one 400 MiB Gemma at a time: a second one evicts
                models=(A, B),
                nats_port=0,
                runtime_port=0,
                function_port=0,
                transport="inprocess",
                tick_s=1.0,
                chat_model=None,
                ollama_urls=(fake_url,),
                settings=Settings(client_max_waiting=1),
            )
        )
        await stack.start(progress=True)
        served = await serve(stack.url_for("gateway"), "127.0.0.1:0", stack.ca)
        admin = await bus.connect(stack.admin_url)
        try:
            yield Env(stack, served, fake, admin)
        finally:
            await admin.close()
            await served.stop()
            await stack.stop()
        log = (stack.cfg.state_dir / "logs" / "nats-server.log").read_text()
        refused = [line for line in log.splitlines() if "Violation" in line]
        assert not refused, f"a component was refused by NATS: {refused[:5]}"


# -- the official ollama client ---------------------------------------------------------------
async def test_ollama_client_chats_streamed_and_whole_and_generates(env: Env) -> None:
    client = ollama.AsyncClient(host=env.url)
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    opts = {"num_predict": 12, **GREEDY}
    whole = await client.chat(model=A, messages=messages, options=opts)
    assert whole.done and whole.message.role == "assistant" and whole.message.content.strip()
    assert whole.done_reason in ("stop", "length")
    assert whole.eval_count and 0 < whole.eval_count <= 12
    assert whole.prompt_eval_count and whole.prompt_eval_count > 3  # the runtime counted them
    assert whole.total_duration >= whole.eval_duration > 0
    assert whole.load_duration is not None

    parts = [
        p async for p in await client.chat(model=A, messages=messages, options=opts, stream=True)
    ]
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    streamed = "".join(p.message.content for p in parts)
    assert streamed == whole.message.content  # greedy: the same answer, nothing lost
    assert parts[-1].eval_count == whole.eval_count
    assert parts[-1].message.content == "" and parts[-1].done_reason == whole.done_reason

    gen = await client.generate(model=A, prompt="Name three rivers.", options=opts)
    assert gen.done and gen.response.strip() and gen.eval_count
    chunks = [
        c
        async for c in await client.generate(
            model=A, prompt="Name three rivers.", options=opts, stream=True
        )
    ]
    assert "".join(c.response for c in chunks) == gen.response


async def test_ollama_client_lists_shows_and_sees_what_is_resident(env: Env) -> None:
    client = ollama.Client(host=env.url)  # the blocking client, in a thread (the gateway is here)
    listed = await asyncio.to_thread(client.list)
    names = {m.model for m in listed.models}
    assert {A, B, "gemma3:270m"} <= names
    a = next(m for m in listed.models if m.model == A)
    assert a.size and a.size > 100 * MIB and a.details.family == "gemma3" and a.modified_at

    await ollama.AsyncClient(host=env.url).chat(
        model=A, messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 2}
    )
    ps = await asyncio.to_thread(client.ps)
    resident = {m.model: m for m in ps.models}
    assert A in resident and B not in resident  # one Gemma fits the node at a time
    assert resident[A].size == 400 * MIB
    assert resident[A].expires_at.timestamp() > time.time()

    shown = await asyncio.to_thread(client.show, A)
    assert shown.details.family == "gemma3" and shown.details.quantization_level
    assert shown.modelinfo["general.architecture"] == "gemma3"
    with pytest.raises(ollama.ResponseError) as err:
        await asyncio.to_thread(client.show, "no-such-model:1b")
    assert err.value.status_code == 404


async def test_ollama_client_pulls_with_progress_through_the_bus(env: Env) -> None:
    client = ollama.AsyncClient(host=env.url)
    progress = [p async for p in await client.pull("qwen2.5:0.5b", stream=True)]
    assert progress[-1].status == "success"
    sized = [p for p in progress if p.total]
    assert sized and sized[-1].total == 397_821_319
    assert "qwen2.5:0.5b" in {m.model for m in (await client.list()).models}
    whole = await client.pull("qwen2.5:0.5b")  # "stream": false: one object at the end
    assert whole.status == "success"
    with pytest.raises(ollama.ResponseError, match="does not exist"):
        async for _ in await client.pull("no-such:1b", stream=True):
            pass


async def test_ollama_load_and_unload_with_an_empty_prompt(env: Env) -> None:
    client = ollama.AsyncClient(host=env.url)
    await env.idle(A)
    loaded = await client.generate(model=B)
    assert loaded.done_reason == "load"
    assert B in {m.model for m in (await client.ps()).models}
    unloaded = await client.generate(model=B, keep_alive=0)
    assert unloaded.done_reason == "unload"

    async def gone() -> bool:
        return B not in {m.model for m in (await client.ps()).models}

    await wait_until(gone, timeout=30, what=f"{B} unloaded")


# -- the official openai client ----------------------------------------------------------------
async def test_openai_client_chats_streamed_and_whole_and_lists_models(env: Env) -> None:
    client = openai.AsyncOpenAI(base_url=env.url + "/v1", api_key="not-needed-on-loopback")
    messages = [{"role": "user", "content": "What is rain?"}]
    whole = await client.chat.completions.create(
        model=A, messages=messages, max_tokens=12, temperature=0, seed=1
    )
    assert whole.object == "chat.completion" and whole.model == A
    text = whole.choices[0].message.content
    assert text and text.strip() and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage and 0 < whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 3
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    stream = await client.chat.completions.create(
        model=A,
        messages=messages,
        max_tokens=12,
        temperature=0,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    deltas = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert deltas == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    done = await client.completions.create(model=A, prompt="Describe a cat.", max_tokens=8)
    assert done.choices[0].text.strip() and done.usage.completion_tokens > 0

    models = [m.id async for m in client.models.list()]
    assert A in models and B in models
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=messages)


async def test_unchanged_client_code_works_against_the_gateway(env: Env) -> None:
    """Code written for Ollama and for OpenAI, run as is, pointed at the fleet by the
    environment alone (OLLAMA_HOST; OPENAI_BASE_URL)."""
    code = (
        "import json, ollama, openai\n"
        f"r = ollama.chat(model={A!r}, messages=[{{'role': 'user', 'content': 'Hello'}}],"
        " options={'num_predict': 6})\n"
        f"c = openai.OpenAI().chat.completions.create(model={A!r}, max_tokens=6,"
        " messages=[{'role': 'user', 'content': 'Hello'}])\n"
        "print(json.dumps({'ollama': r.message.content, 'openai': c.choices[0].message.content}))\n"
    )
    env_vars = {
        **os.environ,
        "OLLAMA_HOST": env.url,
        "OPENAI_BASE_URL": env.url + "/v1",
        "OPENAI_API_KEY": "unused",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        env=env_vars,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    # The answers are sampled text, newlines and all (one began with two blank lines, and
    # the test read it by line): read them whole.
    answers = json.loads(out.decode().strip().splitlines()[-1])
    assert answers["ollama"] and answers["openai"], answers


# -- errors, in each API's shape -----------------------------------------------------------------
async def test_errors_come_in_each_apis_shape_and_status(env: Env) -> None:
    async with httpx.AsyncClient(base_url=env.url, timeout=60) as http:
        msg = [{"role": "user", "content": "x"}]
        r = await http.post("/api/chat", json={"model": "no-such-model", "messages": msg})
        assert r.status_code == 404 and "no-such-model" in r.json()["error"]
        r = await http.post(
            "/api/chat", json={"model": "no-such-model", "messages": msg, "stream": False}
        )
        assert r.status_code == 404 and set(r.json()) == {"error"}
        r = await http.post(
            "/v1/chat/completions", json={"model": "no-such-model", "messages": msg}
        )
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model"
        r = await http.post("/api/chat", content=b"{not json")
        assert r.status_code == 400 and "JSON" in r.json()["error"]
        r = await http.post("/api/chat", json={"messages": msg})
        assert r.status_code == 400 and r.json() == {"error": "model is required"}
        r = await http.post(
            "/api/generate", json={"model": A, "prompt": "x", "options": {"temperature": 9}}
        )
        assert r.status_code == 400 and "temperature" in r.json()["error"]
        r = await http.post("/api/chat", json={"model": A, "messages": msg, "keep_alive": "soon"})
        assert r.status_code == 400 and "keep_alive" in r.json()["error"]
        r = await http.post("/v1/chat/completions", json={"model": A, "messages": []})
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert r.json()["error"]["param"] == "messages"
        r = await http.post(
            "/v1/chat/completions", json={"model": A, "messages": msg, "tools": [{}]}
        )
        assert r.status_code == 400 and "tools" in r.json()["error"]["message"]
        r = await http.get("/api/v1/task/no-such-task")
        assert r.status_code == 404


async def test_queue_full_is_503_and_a_client_that_goes_frees_the_model(env: Env) -> None:
    """A long answer holds A on the node (only one Gemma fits): a request for B waits (this
    gateway may have 1 waiting), the next one is refused 503 with Retry-After. The long
    answer's client then goes away: its lease is freed within seconds and B is served."""
    before = await env.scrape()
    await env.idle(A)
    async with httpx.AsyncClient(base_url=env.url, timeout=120) as http:
        long_body = {
            "model": A,
            "messages": [{"role": "user", "content": "Tell a long story."}],
            "options": {"num_predict": 2000, "stop": [NEVER]},
        }
        async with http.stream("POST", "/api/chat", json=long_body) as story:
            assert story.status_code == 200
            task_id = story.headers["x-oa-task-id"]
            lines = story.aiter_lines()
            for _ in range(3):
                assert json.loads(await lines.__anext__())["done"] is False

            waiting = asyncio.create_task(
                http.post(
                    "/api/generate",
                    json={
                        "model": B,
                        "prompt": "Name a river.",
                        "stream": False,
                        "options": {"num_predict": 4},
                    },
                )
            )

            async def parked() -> bool:
                m = await env.scrape()
                return metric(m, "ollama_autoscaler_queue_depth_total") == 1

            await wait_until(parked, timeout=30, what="the request for B parked")
            refused = await http.post("/api/generate", json={"model": B, "prompt": "x"})
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            assert "waiting" in refused.json()["error"]
            refused_ai = await http.post("/v1/completions", json={"model": B, "prompt": "x"})
            assert refused_ai.status_code == 503
            assert refused_ai.json()["error"]["code"] == "queue_full"
            # The stream is closed here, mid-answer: the client went away.
        # Freed by the cancel, not by the lease running out (60 s without renewal).
        await env.idle(A, timeout=10)
        served = await asyncio.wait_for(waiting, 120)
        assert served.status_code == 200 and served.json()["response"].strip()
        status = (await http.get(f"/api/v1/task/{task_id}")).json()
        assert status["state"] == "failed" and status["error"]["code"] == "cancelled"
    after = await env.scrape()
    assert (
        metric(after, "ollama_autoscaler_gateway_disconnect_cancels_total")
        - metric(before, "ollama_autoscaler_gateway_disconnect_cancels_total")
        == 1
    )
    for outcome, n in (("cancelled", 1), ("queue_full", 2)):
        name, model = "ollama_autoscaler_requests_total", A if outcome == "cancelled" else B
        got = metric(after, name, model=model, outcome=outcome) - metric(
            before, name, model=model, outcome=outcome
        )
        assert got == n, (outcome, got)


# -- eviction and metrics ------------------------------------------------------------------------
async def test_models_beyond_memory_evict_through_the_gateway_and_metrics_count_it(
    env: Env,
) -> None:
    client = ollama.AsyncClient(host=env.url)
    opts = {"num_predict": 6}
    ask = [{"role": "user", "content": "Say hello."}]
    await client.chat(model=A, messages=ask, options=opts)  # A resident, to start from
    await env.idle(A)
    before = await env.scrape()
    b = await client.chat(model=B, messages=ask, options=opts)  # evicts A
    await env.idle(B)
    a = await client.chat(model=A, messages=ask, options=opts)  # evicts B
    ps = await client.ps()
    assert [m.model for m in ps.models if m.model in (A, B)] == [A]

    want = {
        ("ollama_autoscaler_requests_total", (("model", A), ("outcome", "completed"))): 1,
        ("ollama_autoscaler_requests_total", (("model", B), ("outcome", "completed"))): 1,
        (
            "ollama_autoscaler_model_loads_total",
            (("model", A), ("node", "node-0"), ("reason", "chat")),
        ): 1,
        (
            "ollama_autoscaler_model_loads_total",
            (("model", B), ("node", "node-0"), ("reason", "chat")),
        ): 1,
        (
            "ollama_autoscaler_model_evictions_total",
            (("model", A), ("node", "node-0"), ("reason", "make_room")),
        ): 1,
        (
            "ollama_autoscaler_model_evictions_total",
            (("model", B), ("node", "node-0"), ("reason", "make_room")),
        ): 1,
        ("ollama_autoscaler_planner_decisions_total", (("decision", "evict_and_load"),)): 2,
        ("ollama_autoscaler_tokens_generated_total", (("model", A),)): a.eval_count,
        ("ollama_autoscaler_tokens_generated_total", (("model", B),)): b.eval_count,
        ("ollama_autoscaler_time_to_first_token_seconds_count", (("model", B),)): 1,
        ("ollama_autoscaler_model_load_seconds_count", (("model", B), ("reason", "chat"))): 1,
    }

    async def moved() -> dict[Any, float] | None:
        after = await env.scrape()
        got = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in want}
        return got if got == want else None

    try:
        await wait_until(moved, timeout=20, what="the counters to move")
    except AssertionError:
        after = await env.scrape()
        raise AssertionError({k: after.get(k, 0.0) - before.get(k, 0.0) for k in want}) from None
    after = await env.scrape()
    # (The cost policy may first defer an eviction of a model used moments ago: such waits
    # are `queue` decisions, as many as the wake-ups; the two placements are exact.)
    assert (
        metric(after, "ollama_autoscaler_planner_decision_seconds_count", decision="evict_and_load")
        - metric(
            before, "ollama_autoscaler_planner_decision_seconds_count", decision="evict_and_load"
        )
        == 2
    )
    assert metric(after, "ollama_autoscaler_node_capacity_bytes", node="node-0") == 600 * MIB
    assert (
        metric(after, "ollama_autoscaler_resident_bytes", node="node-0", model=A, state="ready")
        == 400 * MIB
    )
    assert metric(after, "ollama_autoscaler_node_measured_free_bytes", node="node-0") > 0


async def test_every_metric_parses_and_is_documented(env: Env) -> None:
    async with httpx.AsyncClient() as client:
        resp = await client.get(env.url + "/metrics")
    assert resp.headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(resp.text))
    names = {f.name for f in families if f.name.startswith("ollama_autoscaler_")}
    assert len(names) >= 20
    readme = (ROOT / "README.md").read_text()
    undocumented = sorted(n for n in names if f"`{n}" not in readme)
    assert not undocumented, f"series missing from the README: {undocumented}"
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    assert not sorted(
        n
        for n in re.findall(r"ollama_autoscaler_\w+", exprs)
        if re.sub(r"_(bucket|count|sum|total)$", "", n)
        not in {re.sub(r"_total$", "", x) for x in names}
    ), "the dashboard names a series that does not exist"


# -- API keys --------------------------------------------------------------------------------------
async def test_api_keys_are_required_when_set_and_a_public_address_needs_them(
    env: Env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# the gateway's keys\nkey-from-the-file-0123456789\n")
    monkeypatch.setenv("OA_GATEWAY_API_KEYS", "key-from-the-env-0123456789")
    monkeypatch.setenv("OA_GATEWAY_API_KEYS_FILE", str(keys))
    served = await serve(env.stack.url_for("gateway"), "127.0.0.1:0", env.stack.ca)
    try:
        async with httpx.AsyncClient(base_url=served.url) as http:
            assert (await http.get("/")).status_code == 200  # the "is it running?" probe
            r = await http.get("/api/tags")
            assert r.status_code == 401 and "API key" in r.json()["error"]
            r = await http.get(
                "/v1/models", headers={"Authorization": "Bearer wrong-key-0123456789"}
            )
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert (await http.get("/metrics")).status_code == 401
        for key in ("key-from-the-env-0123456789", "key-from-the-file-0123456789"):
            client = ollama.AsyncClient(host=served.url, headers={"Authorization": f"Bearer {key}"})
            assert A in {m.model for m in (await client.list()).models}
        ai = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="key-from-the-env-0123456789")
        assert A in [m.id async for m in ai.models.list()]
    finally:
        await served.stop()
    monkeypatch.delenv("OA_GATEWAY_API_KEYS")
    monkeypatch.delenv("OA_GATEWAY_API_KEYS_FILE")
    with pytest.raises(RefusedToServe, match="without API keys"):
        await serve(env.stack.url_for("gateway"), "0.0.0.0:0", env.stack.ca)


def _readme_curls() -> list[str]:
    """The curl lines of the README's gateway section, as printed."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The HTTP gateway") :]
    block = section[section.index("```sh") + 5 : section.index("```", section.index("```sh") + 5)]
    return [line for line in block.splitlines() if line.startswith("curl ")]


async def test_the_readme_curl_examples_work_as_printed(env: Env) -> None:
    lines = _readme_curls()
    assert len(lines) >= 8
    task_id = ""
    for line in lines:
        # As printed, but at this test's gateway, with this stack's model (the README's is
        # make run's chat model), and the task id the example before printed.
        cmd = line.replace("http://127.0.0.1:11434", env.url).replace("smollm2-135m", A)
        cmd = cmd.replace("TASK_ID", task_id)
        proc = await asyncio.create_subprocess_shell(
            cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        text = out.decode()
        assert proc.returncode == 0 and text.strip(), (line, err.decode())
        if "x-oa-task-id" in line:
            task_id = text.split(":", 1)[1].strip()
            continue
        if "/metrics" in line:
            assert text.startswith("ollama_autoscaler_requests_total{"), text
            continue
        for raw in text.splitlines():
            payload = raw.removeprefix("data: ").strip()
            if payload and payload != "[DONE]":
                obj = json.loads(payload)
                assert not obj.get("error"), (line, obj)
        if "/api/v1/task/" in line:
            assert json.loads(text)["state"] == "done"


async def test_a_bus_that_is_gone_gives_503_in_each_apis_shape(env: Env) -> None:
    served = await serve(env.stack.url_for("gateway"), "127.0.0.1:0", env.stack.ca)
    try:
        await served.gateway.svc.nc.close()  # this gateway's NATS connection is gone
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as http:
            r = await http.get("/api/tags")
            assert r.status_code == 503 and "did not answer" in r.json()["error"]
            assert r.headers["retry-after"] == "1"
            r = await http.get("/v1/models")
            assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
            msg = [{"role": "user", "content": "x"}]
            r = await http.post("/api/chat", json={"model": A, "messages": msg})
            assert r.status_code == 503 and "did not take" in r.json()["error"]
    finally:
        await served.stop()


async def test_hostile_bodies_get_a_400_and_nothing_is_left_behind(env: Env) -> None:
    async with httpx.AsyncClient(base_url=env.url, timeout=60) as http:
        r = await http.post("/api/chat", content=b"[" * 100_000)  # nested beyond reason
        assert r.status_code == 400 and "JSON" in r.json()["error"]
        # A body declared too big is refused before any of it is read.
        host, port = env.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST /api/chat HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {9 << 20}\r\n\r\n{{".encode()
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 30)
        writer.close()
        assert status_line.split()[1] == b"413", status_line
        r = await http.post(
            "/v1/chat/completions", json={"model": A, "messages": [{"role": ["user"]}]}
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0]"
        r = await http.post(
            "/api/chat",
            json={
                "model": A,
                "messages": [{"role": "user", "content": "x"}],
                "keep_alive": 10**400,
            },
        )
        assert r.status_code == 400 and "keep_alive" in r.json()["error"]
        for stream in (True, False):  # refused by the chat function, streamed or not
            r = await http.post(
                "/api/chat",
                json={
                    "model": "no-such-model",
                    "stream": stream,
                    "messages": [{"role": "user", "content": "x"}],
                },
            )
            assert r.status_code == 404
        m = await env.scrape()
    assert env.served.gateway.chats == {}  # no chat left waiting in the gateway
    assert metric(m, "ollama_autoscaler_gateway_chats_in_flight") == 0
    assert metric(m, "ollama_autoscaler_requests_total", model="other", outcome="unknown_model") > 0


async def test_an_end_the_gateway_never_heard_is_taken_from_the_task_record(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ends come over core NATS: one published while the gateway was reconnecting is lost.
    After a quiet spell the gateway reads the task record and takes the end stored there."""
    from events.codec import Event
    from gateway import core

    async with httpx.AsyncClient(base_url=env.url, timeout=120) as http:
        r = await http.post(
            "/api/generate",
            json={"model": A, "prompt": "Say hi.", "stream": False, "options": {"num_predict": 4}},
        )
        assert r.status_code == 200
    task_id = r.headers["x-oa-task-id"]
    monkeypatch.setattr(core, "QUIET_S", 0.2)
    gw = env.served.gateway
    late = core.Chat(
        gw, core.ChatRequested(chat_id="late", model=A, messages=[{"role": "user", "content": "x"}])
    )
    late.event = Event("chat.requested", late.event.data, id=task_id)  # the one that ended
    end = await asyncio.wait_for(late.until_end(), 10)  # its end was published long ago
    assert end.type == "chat.completed" and end.data["text"] == r.json()["response"]
