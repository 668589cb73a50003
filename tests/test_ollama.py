"""The Ollama runtime adapter against a WIRE-LEVEL FAKE of Ollama's HTTP API (Ollama cannot be
installed here; the fake is written from Ollama's published API), plus a live test that runs
only when OLLAMA_HOST answers."""

from __future__ import annotations

import os

import httpx
import pytest

from autoscaler.client import chat
from functions.services import Settings
from runtimes.base import RuntimeFailure
from runtimes.ollama import OllamaRuntime
from stack.local import LocalStack, StackConfig

from .conftest import Collector, wait_until


async def test_adapter_lists_loads_streams_and_unloads(fake_ollama_app):
    state, client = fake_ollama_app
    rt = OllamaRuntime("http://fake-ollama", client=client)
    assert await rt.available() == ["gemma3:270m", "llama3.2:1b"]
    await rt.load("gemma3:270m", timeout=10)
    assert await rt.loaded() == {"gemma3:270m": "loaded"}
    # We own eviction: the load pins the model with keep_alive -1.
    assert state.requests[-1] == ("/api/generate", {"model": "gemma3:270m", "keep_alive": -1})
    pieces = [
        p
        async for p in rt.chat(
            "gemma3:270m", [{"role": "user", "content": "hi"}], {"max_tokens": 5, "temperature": 0}
        )
    ]
    assert len(pieces) == 5 and "".join(pieces).startswith("the sky")
    assert state.requests[-1][1]["options"] == {"num_predict": 5, "temperature": 0}
    await rt.unload("gemma3:270m", timeout=10)  # Ollama unloads asynchronously; we poll /api/ps
    assert await rt.loaded() == {}
    await rt.aclose()


async def test_adapter_reports_unknown_models_with_a_code(fake_ollama_app):
    _, client = fake_ollama_app
    rt = OllamaRuntime("http://fake-ollama", client=client)
    with pytest.raises(RuntimeFailure) as err:
        await rt.load("nope:1b", timeout=5)
    assert err.value.code == "unknown_model" and "not found" in str(err.value)
    with pytest.raises(RuntimeFailure):
        async for _ in rt.chat("nope:1b", [{"role": "user", "content": "x"}], {}):
            pass
    await rt.aclose()


async def test_chat_through_the_system_on_an_ollama_node(fake_ollama, nats_url, nc, tmp_path):
    """The whole control plane (in-process functions) serving from the fake Ollama node."""
    state, url = fake_ollama
    # No llama-server nodes: the catalog comes from the fake's /api/tags, sizes estimated as
    # file x 1.2 + 256 MiB (616 MB and 1.85 GB), so a 2 GiB node fits one of the two.
    cfg = StackConfig(
        state_dir=tmp_path,
        nodes=0,
        node_memory=2 << 30,
        transport="inprocess",
        settings=Settings(nats_url=nats_url),
    )
    stack = LocalStack(cfg)
    stack.nats_url = nats_url
    stack.runtime_urls, stack.runtime_kinds = {"ollama-0": url}, {"ollama-0": "ollama"}
    events = await Collector().attach(nc, "ollama.model.>")
    await stack.start_control_plane(None)
    try:
        first = await chat(nc, "gemma3:270m", "hi", timeout=30, max_tokens=4)
        assert first.end.type == "chat.completed", first.end.data
        assert [t.seq for t in first.tokens] == [0, 1, 2, 3]
        # The node fits one of them: the second name evicts the idle first one.
        second = await chat(nc, "llama3.2:1b", "hi", timeout=30, max_tokens=3)
        assert second.end.type == "chat.completed", second.end.data
        await wait_until(lambda: events.of_type("model.evicted"), what="model.evicted")
        assert events.of_type("model.evicted")[0].data["model"] == "gemma3:270m"
        assert set(state.loaded) == {"llama3.2:1b"}
    finally:
        await stack.stop()


def _ollama_host() -> str | None:
    host = os.environ.get("OLLAMA_HOST")
    if not host:
        return None
    url = host if host.startswith("http") else f"http://{host}"
    try:
        httpx.get(url, timeout=2).raise_for_status()
    except httpx.HTTPError:
        return None
    return url


@pytest.mark.live_ollama
@pytest.mark.skipif(_ollama_host() is None, reason="no Ollama answers at OLLAMA_HOST")
async def test_live_ollama_lists_and_streams():
    rt = OllamaRuntime(_ollama_host() or "")
    models = await rt.available()
    assert models, "the live Ollama has no models pulled"
    pieces = [
        p
        async for p in rt.chat(
            models[0], [{"role": "user", "content": "Say hi"}], {"max_tokens": 8}
        )
    ]
    assert "".join(pieces).strip()
    await rt.aclose()


def test_a_dead_model_process_is_reported_with_its_last_output(tmp_path):
    """The router says only "exited with status 1": the failure carries what the process
    printed (from the router's log), and says when it printed no error (a signal)."""
    from runtimes.llamacpp import LlamaCppRuntime, child_log_tail

    log = tmp_path / "llama-server.log"
    log.write_text(
        "srv load: spawning server instance with name=m1 on port 40001\n"
        "[40001] load_tensors: loading model\n"
        "srv load: spawning server instance with name=m2 on port 40002\n"
        "[40002] print_info: file type = Q4_K - Medium\n"
        "[40001] llama_model_load: error loading model: bad magic\n"
        "[40002] load_tensors: CPU_REPACK model buffer size = 100 MiB\n"
        "srv operator(): instance name=m2 exited with status 1\n"
    )
    assert child_log_tail(log, "m1") == [
        "load_tensors: loading model",
        "llama_model_load: error loading model: bad magic",
    ]
    quiet = LlamaCppRuntime("http://x", log_path=log).death_report("m2", 1)
    assert "killed by a signal" in quiet and "CPU_REPACK model buffer size" in quiet
    loud = LlamaCppRuntime("http://x", log_path=log).death_report("m1", 1)
    assert "bad magic" in loud and "signal (SIGILL" not in loud
