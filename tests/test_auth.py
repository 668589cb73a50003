"""NATS auth and least privilege, on a real nats-server with the generated permissions.

Each identity tries what it must not do — publish, subscribe, KV put, JetStream API calls —
and gets the server's permissions violation; what it needs works. Then a whole chat flow runs
with every component under its own identity and two clients that cannot read or forge each
other's chats, and a forged node URL is never called.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from nats.js.api import ConsumerConfig, StreamConfig
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from agent.node import NodeAgent, TickWaker
from autoscaler.client import ChatSession
from domain.state import NodeRecord
from events import auth, bus
from events.codec import Event
from events.types import ChatRequested
from functions import entry
from functions.services import Services, Settings, open_services
from runtimes.ollama import OllamaRuntime
from stores.catalog import ModelInfo

from .conftest import TEST_CLIENTS, Collector, serve_app, start_nats, url_as, wait_until

GIB = 1 << 30
A = "gemma3:270m"  # in the Ollama fake's library


# -- the permission table, tried for real ---------------------------------------------------------
@dataclass
class Bus:
    url: str  # admin's
    conns: dict[str, Any]

    async def as_(self, user: str) -> Any:
        if user not in self.conns:
            self.conns[user] = await bus.connect(url_as(self.url, user), name=f"test-{user}")
        return self.conns[user]


@pytest.fixture(scope="module")
async def authbus(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Bus]:
    url, proc = start_nats(tmp_path_factory.mktemp("auth") / "js")
    admin = await bus.connect(url)
    await bus.provision(admin.jetstream())
    b = Bus(url, {auth.ADMIN: admin})
    yield b
    for nc in b.conns.values():
        await nc.close()
    proc.terminate()
    proc.wait(10)


Action = Callable[[Any], Awaitable[Any]]


def pub(subject: str) -> Action:
    """A JetStream publish where a stream takes the subject (the ack proves it went in),
    a core publish elsewhere (`ollama.planner.*` is core NATS only)."""

    async def go(nc: Any) -> Any:
        if subject.startswith(("ollama.", "$KV.")) and not subject.startswith("ollama.planner."):
            return await nc.jetstream().publish(subject, b"{}", timeout=2)
        await nc.publish(subject, b"{}")
        await nc.flush()

    go.__name__ = f"publish {subject}"
    return go


def sub(subject: str) -> Action:
    async def go(nc: Any) -> Any:
        s = await nc.subscribe(subject)
        await nc.flush()
        await asyncio.sleep(0.05)  # the server's -ERR, if any, comes right after
        return s

    go.__name__ = f"subscribe {subject}"
    return go


def kv_put(bucket: str, key: str) -> Action:
    async def go(nc: Any) -> Any:
        return await bus.bucket(nc.jetstream(), bucket).put(key, b"{}")

    go.__name__ = f"KV put {bucket} {key}"
    return go


def kv_get(bucket: str) -> Action:
    async def go(nc: Any) -> Any:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            await bus.bucket(nc.jetstream(), bucket).get("model.x" if bucket == "models" else "x")

    go.__name__ = f"KV get {bucket}"
    return go


def consumer(name: str) -> Action:
    async def go(nc: Any) -> Any:
        return await nc.jetstream().consumer_info(bus.EVENTS_STREAM, name)

    go.__name__ = f"read consumer {name}"
    return go


def stream_create(nc_name: str = "EVIL") -> Action:
    async def go(nc: Any) -> Any:
        return await nc.jetstream().add_stream(StreamConfig(name=nc_name, subjects=["evil.>"]))

    go.__name__ = "create a stream"
    return go


def consumer_create() -> Action:
    async def go(nc: Any) -> Any:
        return await nc.jetstream().add_consumer(
            bus.EVENTS_STREAM, ConsumerConfig(durable_name=f"evil{uuid.uuid4().hex[:6]}")
        )

    go.__name__ = "create a consumer on OLLAMA_EVENTS"
    return go


def stream_delete() -> Action:
    async def go(nc: Any) -> Any:
        return await nc.jetstream().delete_stream(f"KV_{bus.TASKS_BUCKET}")

    go.__name__ = "delete a stream"
    return go


async def attempt(b: Bus, user: str, action: Action) -> str | None:
    """Run `action` as `user`: the server's violation for it, or None if it was let through.
    A refused request is never answered, so the action is raced against the server's word."""
    nc = await b.as_(user)
    before = len(bus.VIOLATIONS)

    def violation() -> str | None:
        mine = [v for v in bus.VIOLATIONS[before:] if v.startswith(f"{user}:")]
        return mine[-1] if mine else None

    task = asyncio.ensure_future(action(nc))
    deadline = asyncio.get_running_loop().time() + 5
    while not task.done() and violation() is None:
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.01)
    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        return violation()
    with contextlib.suppress(nats.js.errors.APIError):  # JetStream answered: let through
        task.result()
    if action.__name__.startswith("subscribe") and violation() is None:
        # A subscription is refused after the fact: give the server's -ERR a moment.
        with contextlib.suppress(AssertionError):
            await wait_until(violation, timeout=0.5)
    return violation()


# (identity, action, allowed?) — every forbidden action the README's table names is here.
CASES: list[tuple[str, Action, bool]] = [
    # a client: its own requests and cancels, its own tokens and ends, the catalog
    ("alice", pub("ollama.chat.requested.alice"), True),
    ("alice", pub("ollama.chat.cancel.alice"), True),
    ("alice", sub("ollama.chat.token.alice.*"), True),
    ("alice", sub("ollama.chat.completed.alice"), True),
    ("alice", sub("ollama.chat.failed.alice"), True),
    ("alice", kv_get("models"), True),
    ("alice", pub("ollama.chat.requested.bob"), False),
    ("alice", pub("ollama.chat.cancel.bob"), False),
    ("alice", pub("ollama.chat.token.alice.c1"), False),
    ("alice", pub("ollama.chat.completed.alice"), False),
    ("alice", pub("ollama.chat.failed.alice"), False),
    ("alice", pub("ollama.chat.completed.bob"), False),
    ("alice", pub("ollama.model.load"), False),
    ("alice", pub("ollama.model.evict"), False),
    ("alice", pub("ollama.model.pull"), False),
    ("alice", pub("ollama.fleet.tick"), False),
    ("alice", pub("ollama.deadletter.chat"), False),
    ("alice", sub("ollama.chat.token.bob.*"), False),
    ("alice", sub("ollama.chat.token.*.*"), False),
    ("alice", sub("ollama.chat.completed.bob"), False),
    ("alice", sub("ollama.chat.completed.*"), False),
    ("alice", sub("ollama.chat.requested.*"), False),
    ("alice", sub("ollama.>"), False),
    ("alice", sub("_INBOX.>"), False),
    ("alice", sub("_INBOX_bob.>"), False),
    ("alice", kv_put("fleet", "node.n1"), False),
    ("alice", kv_put("fleet", "reg.n1"), False),
    ("alice", kv_put("tasks", "task.x.y"), False),
    ("alice", kv_put("models", "model.x"), False),
    ("alice", kv_get("fleet"), False),
    ("alice", kv_get("tasks"), False),
    ("alice", consumer("chat"), False),
    ("alice", stream_create(), False),
    ("alice", consumer_create(), False),
    ("alice", stream_delete(), False),
    # a node agent: its own node's record and registration only
    ("agent-n1", kv_put("fleet", "reg.n1"), True),
    ("agent-n1", kv_put("fleet", "node.n1"), True),
    ("agent-n1", kv_get("fleet"), True),
    ("agent-n1", kv_put("fleet", "reg.n2"), False),
    ("agent-n1", kv_put("fleet", "node.n2"), False),
    ("agent-n1", kv_put("tasks", "task.x.y"), False),
    ("agent-n1", kv_get("tasks"), False),
    ("agent-n1", pub("ollama.chat.token.alice.c1"), False),
    ("agent-n1", pub("ollama.model.load"), False),
    ("agent-n1", pub("ollama.fleet.tick"), True),  # how it wakes the queue when it joins
    ("agent-n1", pub("ollama.chat.requested.alice"), False),
    ("agent-n1", pub("ollama.waiting.p100.x"), False),
    ("agent-n1", kv_put("fleet", "node.n1x"), False),
    ("agent-n1", consumer("chat"), False),
    ("agent-n1", stream_create(), False),
    # the functions: their own consumer, the subjects and keys they write
    ("chat", consumer("chat"), True),
    ("chat", pub("ollama.chat.token.alice.c1"), True),
    ("chat", pub("ollama.chat.completed.alice"), True),
    ("chat", pub("ollama.model.load"), True),
    ("chat", kv_put("fleet", "node.n1"), True),
    ("chat", kv_put("tasks", "task.x.y"), True),
    ("chat", kv_put("fleet", "reg.n1"), False),
    ("chat", kv_put("models", "model.x"), False),
    ("chat", consumer("load"), False),
    ("chat", pub("ollama.model.pull"), False),
    ("chat", pub("ollama.deadletter.load"), False),
    ("chat", sub("ollama.chat.token.*.*"), False),
    ("chat", stream_create(), False),
    ("chat", consumer_create(), False),
    ("cancel", consumer("cancel"), True),
    ("cancel", pub("ollama.chat.failed.alice"), True),
    ("cancel", pub("ollama.chat.token.alice.c1"), False),
    ("cancel", kv_put("fleet", "node.n1"), False),
    ("cancel", consumer("chat"), False),
    ("load", consumer("load"), True),
    ("load", pub("ollama.model.loaded"), True),
    ("load", pub("ollama.chat.completed.alice"), False),
    ("load", kv_put("tasks", "task.x.y"), False),
    ("load", kv_put("fleet", "reg.n1"), False),
    ("evict", consumer("evict"), True),
    ("evict", pub("ollama.model.evicted"), True),
    ("evict", kv_put("models", "model.x"), False),
    ("evict", consumer("load"), False),
    ("pull", consumer("pull"), True),
    ("pull", kv_put("models", "model.x"), True),
    ("pull", pub("ollama.chat.token.alice.c1"), False),
    ("pull", kv_put("tasks", "task.x.y"), False),
    ("pull", kv_put("tasks", "pull.x.y"), True),  # its records of pulls
    ("reconcile", consumer("reconcile"), True),
    ("reconcile", pub("ollama.model.evict"), True),
    ("reconcile", pub("ollama.model.load"), True),  # a lost load sent again
    ("reconcile", kv_put("fleet", "reg.n1"), False),
    ("reconcile", pub("ollama.chat.token.alice.c1"), False),
    ("worker", consumer("chat"), True),
    ("worker", consumer("reconcile"), True),
    ("worker", kv_put("fleet", "reg.n1"), False),
    ("worker", stream_create(), False),
    ("bridge", consumer("bridge"), True),
    ("bridge", consumer("chat"), False),
    ("bridge", kv_get("fleet"), True),  # /demand, for KEDA
    ("bridge", kv_get("tasks"), False),
    ("bridge", pub("ollama.chat.requested.alice"), False),
    ("tick", pub("ollama.fleet.tick"), True),
    ("tick", pub("ollama.model.load"), False),
    ("tick", kv_get("fleet"), False),
    # the UI: a client under its own name, plus the fleet view and model actions
    ("ui", pub("ollama.chat.requested.ui"), True),
    ("ui", pub("ollama.model.load"), True),
    ("ui", kv_get("fleet"), True),
    ("ui", pub("ollama.chat.requested.alice"), False),
    ("ui", sub("ollama.chat.token.alice.*"), False),
    ("ui", kv_put("fleet", "node.n1"), False),
    ("ui", pub("ollama.chat.token.ui.c1"), False),
    # the gateway: a client under its own name (every HTTP caller), the fleet view, model
    # actions, and every end (its metrics) — but never another client's tokens or requests
    ("gateway", pub("ollama.chat.requested.gateway"), True),
    ("gateway", sub("ollama.chat.token.gateway.*"), True),
    ("gateway", sub("ollama.chat.completed.*"), True),
    ("gateway", sub("ollama.planner.decided"), True),
    ("gateway", pub("ollama.model.pull"), True),
    ("gateway", kv_get("tasks"), True),
    ("gateway", pub("ollama.chat.requested.alice"), False),
    ("gateway", sub("ollama.chat.token.alice.*"), False),
    ("gateway", pub("ollama.chat.completed.gateway"), False),
    ("gateway", kv_put("fleet", "node.n1"), False),
    ("gateway", consumer("chat"), False),
    ("chat", pub("ollama.planner.decided"), True),
    ("admin", stream_create("ADMINS_OWN"), True),
]


@pytest.mark.parametrize(
    ("user", "action", "allowed"),
    CASES,
    ids=[f"{u}-{'may' if ok else 'may-not'}-{a.__name__}" for u, a, ok in CASES],
)
async def test_each_identity_may_do_what_it_needs_and_nothing_else(authbus, user, action, allowed):
    violation = await attempt(authbus, user, action)
    if allowed:
        assert violation is None, f"{user} was refused {action.__name__}: {violation}"
    else:
        assert violation is not None, f"{user} was allowed {action.__name__}"
        assert "permissions violation" in violation.lower()


def test_the_config_nats_server_reads_holds_every_identity_and_is_private(tmp_path: Path):
    creds = auth.ensure_credentials(tmp_path / "a", auth.stack_users(["node-0"], ["client"]))
    conf = auth.write_server_config(tmp_path / "a", creds)
    auth.write_env_files(tmp_path / "a", creds, "nats://127.0.0.1:4222")
    for path in (conf, creds.path, tmp_path / "a" / "client.env"):
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    assert (tmp_path / "a").stat().st_mode & 0o077 == 0
    users = json.loads(conf.read_text().split("users = ", 1)[1].rsplit("}", 1)[0])
    assert {u["user"] for u in users} == set(auth.COMPONENTS) | {"agent-node-0", "client"}
    again = auth.ensure_credentials(tmp_path / "a", ["client", "carol"])
    assert again.passwords["client"] == creds.passwords["client"]  # kept across restarts
    assert "carol" in again.passwords
    with pytest.raises(ValueError):
        auth.check_new_client("chat")  # a component's name
    with pytest.raises(ValueError):
        auth.check_new_client("a.b")  # a subject separator


async def test_a_connection_without_credentials_is_refused_with_a_clear_error(authbus):
    plain = authbus.url.split("@")[-1]
    with pytest.raises(ConnectionError, match="NATS_USER"):
        await bus.connect(f"nats://{plain}")
    user_pw = authbus.url.split("//")[1].split("@")[0].split(":")[0]
    with pytest.raises(ConnectionError, match="refused user"):
        await bus.connect(f"nats://{user_pw}:wrong@{plain}")


def test_an_event_on_another_types_subject_is_refused_by_the_dispatcher():
    """The Broker routes by type: a client must not pass a model.pull off as its chat."""
    from events.dispatcher import with_client
    from events.types import CLIENT_EXTENSION

    smuggled = Event("model.pull", {"model": "x", "url": "http://evil.example/x.gguf"})
    with pytest.raises(ValueError, match="its own subject"):
        with_client(smuggled, "ollama.chat.requested.alice")
    chat = Event("chat.requested", {}, extensions={CLIENT_EXTENSION: "bob"})  # it lies
    assert with_client(chat, "ollama.chat.requested.alice").extensions[CLIENT_EXTENSION] == "alice"
    with pytest.raises(ValueError, match="client's name"):
        with_client(chat, "ollama.chat.requested.Alice")
    tick = Event("fleet.tick", {}, extensions={CLIENT_EXTENSION: "bob"})
    assert CLIENT_EXTENSION not in with_client(tick, "ollama.fleet.tick").extensions


# -- a whole flow under least privilege -----------------------------------------------------------
@dataclass
class Fleet:
    admin: Services
    stop: asyncio.Event
    tasks: list[asyncio.Task[None]]
    url: str


@pytest.fixture
async def least_privilege(tmp_path, fake_ollama) -> AsyncIterator[Fleet]:
    """Every component under its own identity, as `up` runs them: the node agent as
    agent-n1, each function's dispatcher and handler as that function."""
    _, fake_url = fake_ollama
    url, proc = start_nats(tmp_path / "js", log=tmp_path / "nats.log")
    admin = await open_services(Settings(nats_url=url), provision=True, reconfigure=True)
    await admin.catalog.put(ModelInfo(name=A, bytes=GIB, context=4096))
    own: list[Services] = []

    async def as_(user: str) -> Services:
        svc = await open_services(Settings(nats_url=url_as(url, user)))
        own.append(svc)
        return svc

    node = await as_("agent-n1")
    await NodeAgent(
        node.fleet, "n1", OllamaRuntime(fake_url), 2 * GIB, waiting=TickWaker(node.js)
    ).register()
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(entry.dispatcher(await as_(name), name).run(stop))
        for name in ("chat", "cancel", "load", "evict", "reconcile")
    ]
    yield Fleet(admin, stop, tasks, url)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    for svc in [*own, admin]:
        await svc.close()
    proc.terminate()
    proc.wait(10)
    # The components never needed more than their permissions allow: the only violations
    # the server saw are the clients' deliberate attempts.
    refused = [
        line for line in (tmp_path / "nats.log").read_text().splitlines() if "Violation" in line
    ]
    assert all(any(f"user:{c}" in line for c in TEST_CLIENTS) for line in refused), refused


def _request(prompt: str = "hi", **options: Any) -> ChatRequested:
    return ChatRequested(
        chat_id=uuid.uuid4().hex[:12],
        model=A,
        messages=[{"role": "user", "content": prompt}],
        options={"max_tokens": 8, **options},
    )


async def test_clients_cannot_read_or_forge_each_others_chats(least_privilege):
    url = least_privilege.url
    alice = await bus.connect(url_as(url, "alice"))
    bob = await bus.connect(url_as(url, "bob"))
    before = len(bus.VIOLATIONS)
    # Bob tries to listen to alice's chats: every such subscription is refused.
    bob_heard = await Collector().attach(bob, "ollama.chat.completed.bob", "ollama.chat.failed.bob")
    for subject in ("ollama.chat.token.alice.*", "ollama.chat.completed.alice", "ollama.>"):
        await bob.subscribe(subject)
    await bob.flush()
    session = await ChatSession(alice, _request()).start()
    assert session.client == "alice"
    # Bob forges a token and an end into alice's chat, and cancels it: refused, all three.
    await bob.publish(f"ollama.chat.token.alice.{session.request.chat_id}", b"forged")
    await bob.publish("ollama.chat.completed.alice", b"{}")
    await bob.publish("ollama.chat.cancel.alice", b"{}")
    await bob.flush()
    # A cancel bob may publish (on his own subject) naming alice's task changes nothing.
    await ChatSession(bob, _request()).start()  # bob's own chat, for contrast
    await bus.publish(
        bob.jetstream(),
        Event(
            "chat.cancel", {"chat_id": session.request.chat_id, "task_id": session.result.task_id}
        ),
    )
    result = await session.wait(60)
    assert result.end.type == "chat.completed", result.end.data
    assert result.text() and all(t.text != "forged" for t in result.tokens)
    refused = [v for v in bus.VIOLATIONS[before:] if v.startswith("bob:")]
    assert len(refused) >= 6, refused  # 3 subscriptions + 3 publishes
    # Bob reuses alice's request identity (source + id): he is told it is taken, and never
    # hears her answer.
    stolen = Event(
        "chat.requested",
        _request().model_dump(),
        id=session.result.task_id,
        source=session.event.source,
    )
    await bus.publish(bob.jetstream(), stolen, msg_id=uuid.uuid4().hex)
    dup = await wait_until(
        lambda: [e for e in bob_heard.of_type("chat.failed") if e.data["task_id"] == stolen.id],
        what="bob told the id is taken",
    )
    assert dup[0].data["error"]["code"] == "duplicate_id"
    assert not [e for e in bob_heard.of_type("chat.completed") if e.data["task_id"] == stolen.id]
    await alice.close()
    await bob.close()


class Counting:
    """A local HTTP server that counts every request it gets (a would-be SSRF target)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def app(self) -> Starlette:
        async def any_path(request: Any) -> JSONResponse:
            self.calls.append(f"{request.method} {request.url.path}")
            return JSONResponse({"models": []})

        return Starlette(routes=[Route("/{p:path}", any_path, methods=["GET", "POST", "DELETE"])])


@pytest.fixture
async def counting() -> AsyncIterator[tuple[Counting, str]]:
    target = Counting()
    async with serve_app(target.app(), "the counting server") as url:
        yield target, url


async def test_a_forged_node_url_is_refused_or_never_called(least_privilege, counting):
    target, target_url = counting
    admin = least_privilege.admin
    record, _ = await admin.fleet.get("n1")
    forged = record.model_copy(update={"url": target_url}).model_dump_json().encode()
    # A client cannot write a node record at all.
    client = await bus.connect(url_as(least_privilege.url, "client"))
    before = len(bus.VIOLATIONS)
    with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
        await asyncio.wait_for(
            bus.bucket(client.jetstream(), bus.FLEET_BUCKET).put("node.n1", forged), 2
        )
    assert any(v.startswith("client:") for v in bus.VIOLATIONS[before:])
    # Written anyway (by the operator's identity, standing in for any writer of node records
    # but the node): the functions keep calling the node's registered runtime, never that URL.
    await admin.fleet.update("n1", lambda r: NodeRecord.model_validate_json(forged))
    session = await ChatSession(client, _request()).start()
    result = await session.wait(60)
    assert result.end.type == "chat.completed", result.end.data
    await bus.publish(admin.js, Event("model.evict", {"model": A, "node": "n1"}))

    async def evicted() -> bool:
        rec, _ = await admin.fleet.get("n1")
        return A not in rec.models

    await wait_until(evicted, what="the evict done, at the registered runtime")
    assert target.calls == [], target.calls
    await client.close()


async def test_add_client_makes_an_identity_the_running_server_takes_at_once(tmp_path):
    """`add-client` writes the new client's password and the server's config, and a running
    nats-server reloads it (SIGHUP): the new client connects and may use its own subjects."""
    import subprocess

    from stack.local import _bin, free_port

    from .conftest import _wait_port, cli_env, spawn_cli

    state = tmp_path / "state"
    creds = auth.ensure_credentials(state / "auth", auth.stack_users([], ["client"]))
    conf = auth.write_server_config(state / "auth", creds)
    port = free_port()
    auth.write_env_files(state / "auth", creds, f"nats://127.0.0.1:{port}")
    proc = subprocess.Popen(
        [_bin("nats-server"), "-js", "-sd", str(tmp_path / "js"), "-a", "127.0.0.1",
         "-p", str(port), "-c", str(conf)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_port(port, proc)
        (state / "pids.json").write_text(
            json.dumps([{"name": "nats-server", "pgid": proc.pid, "program": "nats-server"}])
        )

        class Stack:  # what cli_env needs of a stack
            class cfg:
                state_dir = state

        cli = await spawn_cli("add-client", "carol", env=cli_env(Stack))
        out, err = await cli.communicate()
        assert cli.returncode == 0, err.decode()
        assert "reloaded" in out.decode()
        env = auth.read_env_file(state / "auth" / "carol.env")
        assert (state / "auth" / "carol.env").stat().st_mode & 0o077 == 0

        async def connects() -> Any:
            with contextlib.suppress(ConnectionError):
                return await bus.connect(
                    env["NATS_URL"], user="carol", password=env["NATS_PASSWORD"]
                )

        carol = await wait_until(connects, timeout=10, what="carol admitted")
        await carol.publish("ollama.chat.requested.carol", b"{}")
        await carol.flush()
        await carol.close()
        bad = await spawn_cli("add-client", "chat", env=cli_env(Stack))
        _, err = await bad.communicate()
        assert bad.returncode == 2 and "component" in err.decode()
    finally:
        proc.terminate()
        proc.wait(10)


# -- TLS, as an option ----------------------------------------------------------------------------
async def test_nats_over_tls_verifies_the_server_and_never_sends_a_password_in_the_clear(tmp_path):
    import os
    import stat
    import subprocess

    from events.auth import write_private
    from events.tls import ensure_tls
    from stack.local import _bin, free_port

    from .conftest import _wait_port

    files = ensure_tls(tmp_path / "tls")
    assert stat.S_IMODE(os.stat(files.key).st_mode) == 0o600
    assert ensure_tls(tmp_path / "tls").ca.read_bytes() == files.ca.read_bytes()  # kept
    other = ensure_tls(tmp_path / "other")  # another stack's CA
    port = free_port()
    conf = tmp_path / "server.conf"
    write_private(
        conf,
        f'tls {{ cert_file: "{files.cert}", key_file: "{files.key}", handshake_first: true }}\n',
    )
    argv = [_bin("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-c", str(conf)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    heard: list[bytes] = []

    async def plain_impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b'INFO {"server_id":"x","version":"2.15.1","proto":1,"max_payload":1048576}\r\n'
        )
        with contextlib.suppress(Exception):
            heard.append(await asyncio.wait_for(reader.read(4096), 5))
        writer.close()

    impostor = await asyncio.start_server(plain_impostor, "127.0.0.1", 0)
    impostor_port = impostor.sockets[0].getsockname()[1]
    try:
        _wait_port(port, proc)
        nc = await bus.connect(f"tls://127.0.0.1:{port}", ca=str(files.ca))
        got = await nc.subscribe("tls.check")
        await nc.publish("tls.check", b"over tls")
        assert (await got.next_msg(timeout=5)).data == b"over tls"
        await nc.close()
        for url, ca in (
            (f"tls://127.0.0.1:{port}", str(other.ca)),  # a server it cannot verify
            (f"nats://127.0.0.1:{port}", None),  # no TLS at all
        ):
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(bus.connect(url, ca=ca), 30)
        # Something else answering on the port in plain text never hears the password.
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(
                bus.connect(f"tls://alice:s3cret@127.0.0.1:{impostor_port}", ca=str(files.ca)),
                30,
            )
        assert heard and not any(b"s3cret" in h or b"CONNECT" in h for h in heard), heard
    finally:
        impostor.close()
        proc.terminate()
        proc.wait(10)
