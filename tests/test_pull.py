"""`model.pull`: from the Ollama library on an Ollama node (the WIRE-LEVEL FAKE of Ollama's API),
and a GGUF from an http URL onto a real llama-server node (served by a local HTTP server)."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.node import NodeAgent
from autoscaler.client import chat
from events import bus
from events.codec import Event
from functions import pull
from functions.services import Settings, open_services
from runtimes.ollama import OllamaRuntime
from stack.assets import ensure_smollm2
from stack.local import LocalStack, StackConfig

from .conftest import Collector, wait_until


async def test_an_ollama_node_pulls_by_name_with_progress_into_the_catalog(
    fresh_nats_url, fake_ollama
):
    _, url = fake_ollama
    svc = await open_services(Settings(nats_url=fresh_nats_url), provision=True)
    await NodeAgent(svc.fleet, "o1", OllamaRuntime(url), capacity_bytes=8 << 30).register()
    events = await Collector().attach(svc.nc, "ollama.model.pull.>", "ollama.model.pulled")
    ev = Event("model.pull", {"model": "qwen2.5:0.5b"})
    assert isinstance(await pull.handle(svc, ev, 1), pull.Done)
    progress = events.of_type("model.pull.progress")
    assert progress and progress[-1].data["total"] == 397_821_319
    done = await wait_until(lambda: events.of_type("model.pulled"), what="model.pulled")
    assert done[0].data["node"] == "o1"
    info = await svc.catalog.get("qwen2.5:0.5b")
    assert info is not None and info.file_bytes == 397_821_319
    rec, _ = await svc.fleet.get("o1")
    assert "qwen2.5:0.5b" in rec.available
    bad = Event("model.pull", {"model": "no-such:1b"})
    await pull.handle(svc, bad, 1)
    failed = await wait_until(lambda: events.of_type("model.pull.failed"), what="the failure")
    assert "does not exist" in failed[0].data["error"]["message"]
    await svc.close()


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server for GGUF files (the machine reaches no model hub)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: _Files(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


@pytest.mark.e2e
async def test_a_llamacpp_node_pulls_a_gguf_checks_it_and_can_serve_it(file_server, tmp_path):
    base, root = file_server
    gguf = ensure_smollm2()
    shutil.copy(gguf, root / "smol.gguf")
    (root / "junk.gguf").write_bytes(b"not a gguf at all" * 1000)
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    stack = LocalStack(
        StackConfig(
            state_dir=tmp_path / "stack",
            nodes=1,
            models=("gemma3-270m",),
            chat_model=None,
            nats_port=0,
            runtime_port=0,
            function_port=0,
            transport="inprocess",
            tick_s=1.0,
        )
    )
    await stack.start(progress=False)
    try:
        nc = await bus.connect(stack.admin_url)
        js = nc.jetstream()
        events = await Collector().attach(nc, "ollama.model.pull.>", "ollama.model.pulled")
        models_dir = stack.models_dir("node-0")

        async def ended(task_id: str) -> Event:
            found = [
                e
                for e in events.of_type("model.pulled") + events.of_type("model.pull.failed")
                if e.data["task_id"] == task_id
            ]
            return found[0] if found else None  # type: ignore[return-value]

        async def pull_and_wait(data: dict[str, str]) -> Event:
            ev = Event("model.pull", data)
            await bus.publish(js, ev)
            return await wait_until(lambda: ended(ev.id), timeout=120, what=f"pull {data}")

        wrong = await pull_and_wait(
            {"model": "smol-wrong", "url": f"{base}/smol.gguf", "sha256": "0" * 64}
        )
        assert wrong.type == "model.pull.failed"
        assert wrong.data["error"]["code"] == "checksum_mismatch"
        missing = await pull_and_wait({"model": "smol-404", "url": f"{base}/missing.gguf"})
        assert missing.data["error"]["code"] == "download_failed"
        junk = await pull_and_wait({"model": "junk", "url": f"{base}/junk.gguf"})
        assert junk.data["error"]["code"] == "not_gguf"
        assert sorted(p.name for p in models_dir.iterdir()) == []  # nothing half-written

        ok = await pull_and_wait(
            {"model": "smol-pulled", "url": f"{base}/smol.gguf", "sha256": sha}
        )
        assert ok.type == "model.pulled", ok.data
        assert [p.name for p in models_dir.iterdir()] == ["smol-pulled.gguf"]
        progress = [
            e for e in events.of_type("model.pull.progress") if e.data["model"] == "smol-pulled"
        ]
        assert progress and progress[-1].data["completed"] == gguf.stat().st_size
        info = await stack.svc.catalog.get("smol-pulled")
        assert info is not None
        assert (info.family, info.params, info.quant) == ("llama", "135M", "Q4_1")
        answer = await chat(nc, "smol-pulled", "Say hello.", timeout=120, max_tokens=8)
        assert answer.end.type == "chat.completed", answer.end.data
        await nc.close()
    finally:
        await stack.stop()
    await asyncio.sleep(0)
