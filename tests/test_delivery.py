"""The delivery core: parked waiting, exactly one end per request, and the defects of issue 7,
each with the test that failed before its fix. Real nats-server (one per test); the runtime is
the WIRE-LEVEL FAKE of Ollama's API (tests/fakes/ollama.py), through the real adapter, because
faults (a stream cut short, a load that hangs) can be injected into it."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import nats.js.errors
import pytest

from agent.node import NodeAgent
from autoscaler.client import ChatSession, chat
from domain import state
from domain.state import NodeRecord, Registration, Slot
from events import bus
from events.codec import Event, to_structured
from events.dispatcher import MAX_FAILED_DELIVERIES, Dispatcher
from events.outcome import Done, Reject, Retry
from events.types import CLIENT_EXTENSION, ChatRequested, ModelEvict, ModelLoad
from functions import chat as chat_fn
from functions import entry, evict, load, reconcile
from functions.services import Services, Settings, open_services
from runtimes.ollama import OllamaRuntime
from stores.catalog import ModelInfo
from stores.tasks import TaskRecord

from .conftest import Collector, wait_until

GIB = 1 << 30
A, B = "gemma3:270m", "llama3.2:1b"  # the fake's library; 1 GiB each here, 1.5 GiB nodes


@dataclass
class World:
    svc: Services
    fake: Any
    url: str
    dispatchers: dict[str, Dispatcher]

    async def session(self, model: str, **options: Any) -> ChatSession:
        req = ChatRequested(
            chat_id=uuid.uuid4().hex[:12],
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            options=options,
        )
        return await ChatSession(self.svc.nc, req).start()

    async def node(self) -> NodeRecord:
        rec, _ = await self.svc.fleet.get("n1")
        return rec


@pytest.fixture
async def world(fresh_nats_url, fake_ollama) -> AsyncIterator[World]:
    fake, url = fake_ollama
    svc = await open_services(Settings(nats_url=fresh_nats_url), provision=True, reconfigure=True)
    for name in (A, B):
        await svc.catalog.put(ModelInfo(name=name, bytes=GIB, context=4096))
    agent = NodeAgent(
        svc.fleet, "n1", OllamaRuntime(url), capacity_bytes=3 * GIB // 2, waiting=svc.waiting
    )
    await agent.register()
    stop = asyncio.Event()
    dispatchers = {name: entry.dispatcher(svc, name) for name in ("chat", "load", "evict")}
    runners = [asyncio.create_task(d.run(stop)) for d in dispatchers.values()]
    yield World(svc, fake, url, dispatchers)
    stop.set()
    await asyncio.gather(*runners, return_exceptions=True)
    await svc.close()


def ends_of(events: Collector, task_id: str) -> list[Event]:
    return [
        e
        for _, e in events.events
        if isinstance(e, Event)
        and e.type in ("chat.completed", "chat.failed")
        and e.data["task_id"] == task_id
    ]


async def _consumer(svc: Services, name: str = "chat") -> Any:
    return await svc.js.consumer_info(bus.EVENTS_STREAM, name)


# -- parked waiting -------------------------------------------------------------------------------
async def test_a_request_that_cannot_fit_is_parked_acked_and_woken_by_the_release(world):
    world.fake.token_s = 0.02  # A streams for ~2 s
    long = await world.session(A, max_tokens=100)
    await wait_until(lambda: long.result.tokens, what="A streaming")
    waiting = await world.session(B, max_tokens=4)
    await wait_until(lambda: world.svc.waiting.all(), what="B parked")

    async def task_b():  # the waiter is stored just before its task says `queued`
        got = await world.svc.tasks.get(waiting.event.source, waiting.event.id)
        return got.record if got and got.record.state == "queued" else None

    task = await wait_until(task_b, timeout=5, what="B's task queued")
    assert task.state == "queued" and not long.done
    # Only A's delivery is outstanding: B's was acknowledged, not NAK-looped.
    await wait_until(lambda: _ack_pending_is(world.svc, 1), what="only A's delivery pending")
    assert (await _consumer(world.svc)).num_redelivered == 0
    a, b = await long.wait(60), await waiting.wait(60)
    assert a.end.type == "chat.completed" and b.end.type == "chat.completed", b.end.data
    assert b.end.data["stats"]["queue_ms"] > 0 and b.end.data["stats"]["attempt"] == 1
    assert await world.svc.waiting.depth() == 0
    assert (await _consumer(world.svc)).num_redelivered == 0


async def test_hundreds_of_waiters_never_block_a_request_for_a_resident_model(world):
    # A resident and leased by a long task: B can never fit while the test runs.
    await load.handle(world.svc, Event("model.load", ModelLoad(model=A).model_dump()), 1)
    await world.svc.fleet.update(
        "n1", lambda r: state.take_lease(r, A, "long-task", time.time() + 3600)
    )
    js = world.svc.js
    n = bus.CONSUMERS["chat"].max_ack_pending + 44  # more than the consumer lets be unacked
    for i in range(n):
        ev = Event(
            "chat.requested",
            {"chat_id": f"w{i}", "model": B, "messages": [{"role": "user", "content": "x"}]},
        )
        await bus.publish(js, ev)
    await wait_until(lambda: _depth_at_least(world, n), timeout=240, what=f"{n} requests parked")
    quick = await chat(world.svc.nc, A, "resident", timeout=60, max_tokens=2)
    assert quick.end.type == "chat.completed", quick.end.data
    assert await world.svc.waiting.depth() == n
    info = await _consumer(world.svc)
    assert info.num_redelivered == 0


async def _ack_pending_is(svc: Services, n: int) -> bool:
    return (await _consumer(svc)).num_ack_pending == n


async def _depth_at_least(world: World, n: int) -> bool:
    return await world.svc.waiting.depth() >= n


async def test_a_chat_dead_lettered_by_the_dispatcher_ends_with_chat_failed(world):
    """Defect 2: a dispatcher dead-letter sent no chat.failed and left the task behind."""
    events = await Collector().attach(world.svc.nc, "ollama.chat.failed.*")
    d = world.dispatchers["chat"]

    async def always_failing(event: Event, attempt: int) -> Retry:
        # The handler's first step ran (the task exists), then a transient error each time.
        client = event.extensions[CLIENT_EXTENSION]
        req = ChatRequested.model_validate(event.data)
        await chat_fn._claim(world.svc, event, client, req, attempt)
        return Retry(0.01, "transient trouble")

    d.deliver = always_failing
    s = await world.session(A)
    end = await s.wait(60)
    assert end.end.type == "chat.failed" and end.end.data["error"]["code"] == "gave_up"
    assert f"{MAX_FAILED_DELIVERIES} deliveries" in end.end.data["error"]["message"]
    rec = (await world.svc.tasks.get(s.event.source, s.event.id)).record
    assert rec.state == "failed" and len(ends_of(events, s.event.id)) == 1


# -- exactly one end ------------------------------------------------------------------------------
def _lose_the_first_end(monkeypatch: Any) -> list[str]:
    """Make the first `chat.completed` publish fail; returns the ids of those that failed."""
    real = bus.publish
    failed: list[str] = []

    async def flaky(js, event, chat_id=None, msg_id=None, client=None):
        if event.type == "chat.completed" and not failed:
            failed.append(event.id)
            raise ConnectionError("publish lost")
        await real(js, event, chat_id, msg_id, client)

    monkeypatch.setattr(bus, "publish", flaky)
    return failed


async def test_an_end_whose_publish_failed_is_resent_by_the_redelivery(world, monkeypatch):
    """Defect 1: the task was marked done before the end was published; a redelivery of a
    done task was acked silently, so the client never heard the end."""
    events = await Collector().attach(world.svc.nc, "ollama.chat.>")
    failed = _lose_the_first_end(monkeypatch)
    await world.svc.fleet.update("n1", lambda r: _with_ready(r, A))  # resident: no load needed
    ev = Event(
        "chat.requested",
        {"chat_id": "c1", "model": A, "messages": [{"role": "user", "content": "hi"}]},
        extensions={CLIENT_EXTENSION: "client"},  # as the dispatcher names it
    )
    with pytest.raises(ConnectionError):
        await chat_fn.handle(world.svc, ev, 1)
    assert failed and not events.of_type("chat.completed")
    outcome = await chat_fn.handle(world.svc, ev, 2)  # the redelivery
    assert isinstance(outcome, Done)
    done = await wait_until(lambda: events.of_type("chat.completed"), what="the end")
    assert len(done) == 1 and done[0].data["task_id"] == ev.id and done[0].data["text"]


async def test_a_wake_whose_run_failed_is_served_by_its_redelivery(world, monkeypatch):
    """Found by the cluster fail-over run: a woken request whose run failed mid-end (the
    stream leader moving) was acked by its own redelivery as "another run has it" (the dead
    run's claim) or "already done" (the end stored, never published): no end, ever."""
    from stores.tasks import TaskRecord

    events = await Collector().attach(world.svc.nc, "ollama.chat.>")
    _lose_the_first_end(monkeypatch)
    await world.svc.fleet.update("n1", lambda r: _with_ready(r, A))
    data = {"chat_id": "w1", "model": A, "messages": [{"role": "user", "content": "hi"}]}
    ev = Event(
        "chat.requested",
        data,
        extensions={chat_fn.WAKE_EXTENSION: "t", CLIENT_EXTENSION: "client"},
    )
    now = time.time()
    parked = TaskRecord(
        task_id=ev.id, source=ev.source, client="client", chat_id="w1", model=A, state="queued",
        created_at=now, updated_at=now,
    )  # fmt: skip
    rev = await world.svc.tasks.create(parked)
    # A run that died holding the claim: the redelivery of its wake waits for the claim.
    dead = parked.model_copy(update={"state": "running", "owner": "dead", "owner_until": now + 5})
    rev = await world.svc.tasks.update(dead, rev)
    assert isinstance(await chat_fn.handle(world.svc, ev, 1), Done)  # a duplicate wake
    outcome = await chat_fn.handle(world.svc, ev, 2)  # its own wake, redelivered
    assert isinstance(outcome, Retry) and 4 < outcome.delay_s < 6 and not outcome.failure
    await world.svc.tasks.update(dead.model_copy(update={"owner_until": 0.0}), rev)
    # The run stores the end, its publish fails: the run gives its claim up...
    with pytest.raises(ConnectionError):
        await chat_fn.handle(world.svc, ev, 3)
    rec = (await world.svc.tasks.get(ev.source, ev.id)).record
    assert (
        rec.state == "done"
        and rec.end
        and rec.owner is None
        and not events.of_type("chat.completed")
    )
    # ...and the redelivery sends the stored end, once.
    assert isinstance(await chat_fn.handle(world.svc, ev, 4), Done)
    done = await wait_until(lambda: events.of_type("chat.completed"), what="the end")
    assert len(done) == 1 and done[0].data["task_id"] == ev.id
    assert len([r for r in world.fake.requests if r[0] == "/api/chat"]) == 1


def _with_ready(r: NodeRecord, model: str, gen: int = 7) -> NodeRecord:
    new = r.model_copy(deep=True)
    new.models[model] = Slot(state="ready", bytes=GIB, gen=gen, keep_alive_until=time.time() + 300)
    return new


async def test_the_same_structured_event_twice_runs_once_and_never_releases_under_the_other(
    world,
):
    """Defect 6: `nats pub` twice (no Nats-Msg-Id) ran two handlers on one lease; the first
    to finish released it under the other."""
    world.fake.token_s = 0.02
    events = await Collector().attach(world.svc.nc, "ollama.chat.>")
    ev = Event(
        "chat.requested",
        {
            "chat_id": "twice",
            "model": A,
            "messages": [{"role": "user", "content": "hi"}],
            "options": {"max_tokens": 40},
        },
    )
    body = to_structured(ev)[1]
    await world.svc.js.publish("ollama.chat.requested.client", body)
    await world.svc.js.publish("ollama.chat.requested.client", body)
    await wait_until(lambda: len(ends_of(events, ev.id)) >= 2, timeout=60, what="two ends")
    chats = [r for r in world.fake.requests if r[0] == "/api/chat"]
    assert len(chats) == 1, "the duplicate generated a second answer"
    ends = ends_of(events, ev.id)
    assert {e.type for e in ends} == {"chat.completed"}
    assert len({e.data["text"] for e in ends}) == 1  # the stored answer, sent again
    assert (await world.node()).models[A].leases == {}


async def test_a_reused_event_id_gets_its_stored_answer_again(world):
    """Defect 13: the README's `demo-1` example run twice dropped the second silently."""
    events = await Collector().attach(world.svc.nc, "ollama.chat.>")
    ev = Event(
        "chat.requested",
        {"chat_id": "demo", "model": A, "messages": [{"role": "user", "content": "Hi"}]},
        id="demo-1",
        source="cli",
    )
    body = to_structured(ev)[1]
    await world.svc.js.publish("ollama.chat.requested.client", body)
    await wait_until(lambda: ends_of(events, "demo-1"), timeout=60, what="first end")
    await world.svc.js.publish("ollama.chat.requested.client", body)
    await wait_until(lambda: len(ends_of(events, "demo-1")) == 2, timeout=30, what="second end")
    first, second = ends_of(events, "demo-1")
    assert first.data == second.data and first.type == "chat.completed"
    # Another source may use the same id: it is another request.
    other = Event(ev.type, {**ev.data, "chat_id": "demo2"}, id="demo-1", source="someone-else")
    await world.svc.js.publish("ollama.chat.requested.client", to_structured(other)[1])
    await wait_until(
        lambda: any(e.data["chat_id"] == "demo2" for e in ends_of(events, "demo-1")),
        timeout=30,
        what="the other source's end",
    )
    assert len([r for r in world.fake.requests if r[0] == "/api/chat"]) == 2


async def test_a_stream_cut_short_is_a_failure_with_the_partial_text(world):
    """Defect 12: a truncated answer was reported as chat.completed."""
    world.fake.cut_after = 3
    s = await world.session(A, max_tokens=20)
    result = await s.wait(60)
    assert result.end.type == "chat.failed", result.end.data
    err = result.end.data["error"]
    assert err["code"] == "interrupted" and "without" in err["message"]
    assert result.end.data["text"] == "the sky looks "
    assert (await world.node()).models[A].leases == {}


async def test_a_model_process_gone_before_the_first_token_is_retried_not_failed(world):
    """Found by the fault suite: 19 of 31 chats failed when a model's process died, though
    none had shown the client a token; they are now placed and served again."""
    world.fake.cut_after = 0  # the first stream ends before its first token
    s = await world.session(A, max_tokens=5)

    def chats() -> int:
        return len([r for r in world.fake.requests if r[0] == "/api/chat"])

    await wait_until(lambda: chats() >= 1, what="the first stream")
    world.fake.cut_after = None
    result = await s.wait(60)
    assert result.end.type == "chat.completed", result.end.data
    assert result.end.data["stats"]["attempt"] == 2 and chats() == 2
    assert {t.attempt for t in result.tokens} == {2}


async def test_an_unreachable_runtime_fails_the_chat_and_releases_its_lease(world):
    """Defect 9: httpx errors escaped load/evict/chat: blind retries, a lease never released."""
    await world.svc.fleet.update("n1", lambda r: _with_ready(r, A))
    dead = "http://127.0.0.1:9"  # the node re-registered at a runtime that is gone
    await world.svc.fleet.update("n1", lambda r: r.model_copy(update={"url": dead}))
    await world.svc.fleet.register(Registration(node_id="n1", runtime="ollama", url=dead))
    world.svc.runtimes.clear()
    s = await world.session(A)
    result = await s.wait(60)
    assert result.end.data["error"]["code"] == "runtime_unreachable", result.end.data
    rec = await world.node()
    assert rec.models[A].leases == {}
    # A load on it fails cleanly too: the slot is not left `loading`.
    runtime = OllamaRuntime("http://127.0.0.1:9")
    with pytest.raises(Exception) as err:
        await runtime.load(B, 5)
    assert getattr(err.value, "code", None) == "runtime_unreachable"
    await runtime.aclose()


async def test_the_lease_is_renewed_while_the_chat_waits_for_a_long_load(world, monkeypatch):
    """Defect 4: the lease was renewed only once streaming began; a load longer than the
    lease TTL let reconcile drop it, and the model could be evicted mid-stream."""
    monkeypatch.setattr(state, "LEASE_TTL_S", 1.5)
    monkeypatch.setattr(chat_fn, "LEASE_RENEW_S", 0.4)
    monkeypatch.setattr(chat_fn, "OWNER_RENEW_S", 0.2)
    world.fake.load_gate = asyncio.Event()
    s = await world.session(A, max_tokens=4)
    await wait_until(lambda: _slot_state(world, A, "loading"), what="A loading")
    deadline = time.monotonic() + 4.0  # well past the TTL
    while time.monotonic() < deadline:
        await reconcile.handle(world.svc, Event("fleet.tick", {}), 1)
        assert s.event.id in (await world.node()).models[A].leases, "the lease lapsed"
        await asyncio.sleep(0.3)
    world.fake.load_gate.set()
    assert (await s.wait(60)).end.type == "chat.completed"


async def _slot_state(world: World, model: str, want: str) -> bool:
    slot = (await world.node()).models.get(model)
    return slot is not None and slot.state == want


# -- loads and evictions --------------------------------------------------------------------------
async def test_a_manual_load_on_a_named_node_loads_there(world):
    """Defect 7: `load M --node N` returned at once and the CLI waited 300 s for nothing."""
    outcome = await load.handle(
        world.svc, Event("model.load", ModelLoad(model=B, node="n1").model_dump()), 1
    )
    assert isinstance(outcome, Done), outcome
    assert (await world.node()).models[B].state == "ready"
    assert B in world.fake.loaded


async def test_a_placement_whose_load_was_never_sent_is_loaded_by_reconcile(world, monkeypatch):
    """Defect 8: a crash between the placement's CAS and `model.load` left the slot loading,
    with no load ever sent, until the load timeout (300+ s)."""
    from domain import planner

    monkeypatch.setattr(reconcile, "LOAD_RESEND_S", 0.001)
    placed = await world.svc.fleet.place(
        planner.PlanRequest(B, GIB), time.time(), "cost", "crashed-task"
    )
    assert isinstance(placed, planner.Placement)  # ... and then the process died
    await reconcile.handle(world.svc, Event("fleet.tick", {}), 1)
    await wait_until(lambda: _slot_state(world, B, "ready"), timeout=30, what="B loaded")


async def test_a_late_evict_never_unloads_a_newer_copy(world):
    """Defect 10: a re-sent evict of copy 1 unloaded the freshly reloaded copy 2."""
    await load.handle(world.svc, Event("model.load", ModelLoad(model=B).model_dump()), 1)
    gen = (await world.node()).models[B].gen
    stale = ModelEvict(model=B, node="n1", reason="late re-send", gen=gen - 1)
    outcome = await evict.handle(world.svc, Event("model.evict", stale.model_dump()), 1)
    assert isinstance(outcome, Done) and "stale" in outcome.note
    assert (await world.node()).models[B].state == "ready" and B in world.fake.loaded


async def test_a_load_never_starts_while_the_nodes_evictions_are_pending(world):
    world.svc.settings = world.svc.settings.but(unload_timeout_s=0.5)
    await world.svc.fleet.update("n1", lambda r: _with_ready(r, A))
    await world.svc.fleet.update("n1", lambda r: state.mark_evicting(r, A, time.time(), "stuck"))
    await world.svc.fleet.update(
        "n1", lambda r: state.reserve(r, B, GIB // 4, [], None, time.time())
    )
    gen = (await world.node()).models[B].gen
    ev = Event("model.load", ModelLoad(model=B, node="n1", gen=gen).model_dump())
    outcome = await load.handle(world.svc, ev, 1)
    assert isinstance(outcome, Retry) and "evictions" in outcome.reason
    assert B not in world.fake.loaded


# -- bad input ------------------------------------------------------------------------------------
async def test_an_oversized_dead_letter_is_cut_and_the_message_terminated(world):
    """Defect 3: a ~530 KB hostile event made a 1 MB+ record that failed to publish; the
    message was never terminated and looped forever."""
    dead = await Collector().attach(world.svc.nc, "ollama.deadletter.>")
    hostile = b"\x01" * 530_000  # each byte becomes \\u0001 (six) in a JSON record
    await world.svc.js.publish("ollama.chat.requested.client", hostile)
    record = (await wait_until(dead.dead, what="the dead letter"))[0]
    assert record["body_truncated"] and record["body_bytes"] == 530_000
    assert record["body_sha256"] == hashlib.sha256(hostile).hexdigest()  # of the whole body
    assert "malformed event" in record["reason"]
    await wait_until(lambda: _settled(world.svc), what="the message terminated, nothing pending")


async def test_options_beyond_the_model_or_the_limits_end_with_a_clear_error(world):
    """Bounds on what a client sets: num_ctx within the model's context (it reached Ollama's
    allocator), max_tokens and keep_alive_s within the deployment's limits; a default
    max_tokens when unset. Nothing is loaded for a refused request."""
    limits = world.svc.settings
    cases = {
        "num_ctx": ({"num_ctx": 8192}, "exceeds the 4096-token context"),
        "max_tokens": ({"max_tokens": limits.max_tokens + 1}, "options.max_tokens"),
        "keep_alive_s": ({"keep_alive_s": limits.max_keep_alive_s * 2}, "options.keep_alive_s"),
    }
    for name, (options, says) in cases.items():
        session = await world.session(A, **options)
        end = (await session.wait(30)).end
        assert end.type == "chat.failed", (name, end.data)
        assert (
            end.data["error"]["code"] == "invalid_request" and says in end.data["error"]["message"]
        ), (name, end.data)
    assert not world.fake.loaded and not [r for r in world.fake.requests if r[0] == "/api/chat"]
    ok = await (await world.session(A, num_ctx=4096)).wait(60)  # the model's own: allowed
    assert ok.end.type == "chat.completed", ok.end.data
    (sent,) = [body for path, body in world.fake.requests if path == "/api/chat"]
    assert sent["options"]["num_predict"] == limits.default_max_tokens


async def test_a_client_s_event_time_never_shortens_its_wait(world):
    """The event `time` is the client's to set: it was trusted (within a minute) as the
    arrival, so a client could claim to have waited longer and jump admission's queue."""
    await world.svc.fleet.update("n1", lambda r: _with_ready(r, A))
    past = datetime.fromtimestamp(time.time() - 55, UTC).isoformat()
    ev = Event(
        "chat.requested",
        {"chat_id": "early", "model": A, "messages": [{"role": "user", "content": "hi"}]},
        time=past,
    )
    before = time.time()
    await bus.publish(world.svc.js, ev)
    got = await wait_until(lambda: world.svc.tasks.get(ev.source, ev.id), what="its task")
    assert got.record.created_at >= before - 1, "the client's time was taken as its arrival"


async def _settled(svc: Services) -> bool:
    info = await _consumer(svc)
    return info.num_ack_pending == 0 and info.num_pending == 0


async def test_a_poison_datacontenttype_is_dead_lettered_and_reconcile_goes_on(world):
    """Defect 11: a numeric datacontenttype made the HTTP transport raise before any outcome;
    on fleet.tick (one in flight) it stopped reconcile for good."""
    stop = asyncio.Event()
    d = entry.dispatcher(world.svc, "reconcile")
    runner = asyncio.create_task(d.run(stop))
    poison = {
        "specversion": "1.0",
        "type": "fleet.tick",
        "source": "x",
        "id": "p1",
        "datacontenttype": 5,
        "data": {},
    }
    await world.svc.js.publish("ollama.fleet.tick", json.dumps(poison).encode())
    await bus.publish(world.svc.js, Event("fleet.tick", {}))
    await wait_until(lambda: d.stats.rejected == 1 and d.stats.done >= 1, what="both handled")
    stop.set()
    await runner
    # The function's HTTP target: the same decoder, a 422, and it refuses other types.
    app = _function_app("reconcile_fn")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://f") as c:
        resp = await c.post(
            "/",
            content=json.dumps(poison),
            headers={"content-type": "application/cloudevents+json"},
        )
        assert resp.status_code == 422 and "datacontenttype" in resp.text
        wrong = Event("model.evict", {"model": A})
        resp = await c.post(
            "/",
            content=to_structured(wrong)[1],
            headers={"content-type": "application/cloudevents+json"},
        )
        assert resp.status_code == 422 and "takes 'fleet.tick'" in resp.text


def _function_app(target: str) -> Any:
    from functions_framework.aio import create_asgi_app

    return create_asgi_app(target=target, source=str(entry.__file__))


async def test_provisioning_keeps_the_ack_wait_of_an_existing_consumer(fresh_nats_url):
    """Defect 5: whoever provisioned last set every consumer's ack wait."""
    svc = await open_services(
        Settings(nats_url=fresh_nats_url), provision=True, ack_wait_s=30, reconfigure=True
    )
    other = await open_services(Settings(nats_url=fresh_nats_url), provision=True, ack_wait_s=3)
    info = await svc.js.consumer_info(bus.EVENTS_STREAM, "chat")
    assert info.config.ack_wait == 30
    await other.close()
    await svc.close()


async def test_full_streams_refuse_requests_and_drop_only_old_tokens(fresh_nats_url, monkeypatch):
    """Disk bounds a client cannot exceed: a full request stream refuses the new request (the
    publisher hears it) and keeps every queued one; a full token stream drops its oldest."""
    import nats.js.errors

    small = {**bus.LIMITS, "events": 64 * 1024, "tokens": 64 * 1024}
    monkeypatch.setattr(bus, "LIMITS", small)
    svc = await open_services(Settings(nats_url=fresh_nats_url), provision=True, reconfigure=True)
    try:
        body = json.dumps({"pad": "x" * 4000}).encode()
        accepted = 0
        with pytest.raises(nats.js.errors.APIError, match="maximum bytes"):
            for _ in range(100):
                await svc.js.publish("ollama.chat.requested.client", body)
                accepted += 1
        events = await svc.js.stream_info(bus.EVENTS_STREAM)
        assert 0 < accepted < 100 and events.state.messages == accepted
        assert events.state.first_seq == 1  # nothing queued was dropped
        for _ in range(100):
            await svc.js.publish("ollama.chat.token.client.c1", body)  # never refused
        tokens = await svc.js.stream_info(bus.TOKENS_STREAM)
        assert tokens.state.bytes <= 64 * 1024 and tokens.state.first_seq > 1
        for name in (bus.DLQ_STREAM, bus.WAITING_STREAM):
            assert (await svc.js.stream_info(name)).config.max_bytes == bus.LIMITS[
                {bus.DLQ_STREAM: "deadletter", bus.WAITING_STREAM: "waiting"}[name]
            ]
        tasks = await svc.js.stream_info(f"KV_{bus.TASKS_BUCKET}")
        assert tasks.config.max_bytes == bus.LIMITS[bus.TASKS_BUCKET]
    finally:
        await svc.close()


async def test_reconcile_removes_ghost_waiters_and_wakes_ended_deferrals(world):
    """Defect 14: a queued-then-abandoned request stayed queued forever."""
    ghost = Event(
        "chat.requested",
        {"chat_id": "g", "model": B, "messages": [{"role": "user", "content": "x"}]},
    )
    # No task: its run never recorded one.
    await world.svc.waiting.park(ghost, B, 0, time.time(), "client")
    assert await world.svc.waiting.depth() == 1
    outcome = await reconcile.handle(world.svc, Event("fleet.tick", {}), 1)
    assert "removed ghost waiter" in outcome.note
    assert await world.svc.waiting.depth() == 0


async def test_a_waiter_whose_wake_was_lost_is_woken_by_reconcile_s_sweep(world):
    """Found by the cluster fault run (CI): a release's wake failed while the stream elected
    a new leader, and the waiters stayed parked beside free memory until a keep-alive
    eviction 5 minutes later happened to wake them."""
    await load.handle(world.svc, Event("model.load", ModelLoad(model=A).model_dump()), 1)
    await world.svc.fleet.update(  # A resident and leased: B cannot fit
        "n1", lambda r: state.take_lease(r, A, "long-task", time.time() + 3600)
    )
    s = await world.session(B, max_tokens=4)
    await wait_until(lambda: _depth_at_least(world, 1), what="B parked")

    async def queued():
        got = await world.svc.tasks.get(s.event.source, s.event.id)
        return got.record if got and got.record.state == "queued" else None

    await wait_until(queued, timeout=10, what="B's task queued")
    # The lease goes, and its wake is lost: nothing but the sweep is left to wake B.
    await world.svc.fleet.update(
        "n1", lambda r: state.release_lease(r, A, "long-task", time.time(), 0.0)
    )
    # A head looked at just now is left alone (no wake storm every tick) ...
    assert await reconcile.reconcile_waiters(world.svc, time.time()) == []
    assert not s.done and await world.svc.waiting.depth() == 1
    # ... one nothing has looked at for WAKE_SWEEP_S is planned again, and served.
    later = time.time() + reconcile.WAKE_SWEEP_S + 1
    actions = await reconcile.reconcile_waiters(world.svc, later)
    assert len(actions) == 1 and actions[0].startswith(f"woke {s.event.id}"), actions

    async def served() -> bool:  # reconcile's ticks: the admission rule may defer B a moment
        await reconcile.reconcile_waiters(world.svc, time.time())
        return s.done

    await wait_until(served, timeout=60, what="B served")
    result = await s.wait(5)
    assert result.end.type == "chat.completed", result.end.data
    assert await world.svc.waiting.depth() == 0


async def test_a_wake_the_bus_does_not_answer_is_sent_again(world, monkeypatch):
    calls: list[str] = []
    real = world.svc.waiting.wake_heads

    async def flaky(trigger: str, models: set[str] | None = None) -> int:
        calls.append(trigger)
        if len(calls) <= 2:  # a stream electing its leader
            raise nats.js.errors.NoStreamResponseError()
        return await real(trigger, models)

    monkeypatch.setattr(world.svc.waiting, "wake_heads", flaky)
    world.svc.waiting.wake_heads_soon("release.t1")
    await wait_until(lambda: len(calls) >= 3, timeout=10, what="the wake sent again")
    assert calls == ["release.t1"] * 3


async def test_two_deferrals_ending_within_one_second_each_wake_their_waiter(fresh_nats_url):
    """Found by the sweep test on a fresh clone: the deferral's wake was named by its whole
    second, so a request deferred again (0.1 s) within that second was woken under the same
    message id, JetStream dropped it as a duplicate, and it stayed parked."""
    svc = await open_services(Settings(nats_url=fresh_nats_url), provision=True, reconfigure=True)
    try:  # no chat function runs: the wakes stay in the stream, to be counted
        ev = _request_of("client", B, 0)
        now = time.time()
        seq = await svc.waiting.park(ev, B, 0, now, "client")
        rec = TaskRecord(
            task_id=ev.id, source=ev.source, client="client", chat_id="client0", model=B,
            state="queued", created_at=now, updated_at=now, waiter_seq=seq,
        )  # fmt: skip
        rev = await svc.tasks.create(rec)
        second = float(int(now) + 5)
        woken = []
        for wake_at in (second + 0.2, second + 0.4):  # deferred, then deferred again
            rev = await svc.tasks.update(rec.model_copy(update={"wake_at": wake_at}), rev)
            actions = await reconcile.reconcile_waiters(svc, wake_at + 0.05)
            assert actions == [f"woke {ev.id}: its deferral ended"], actions
            info = await svc.js.stream_info(
                bus.EVENTS_STREAM, subjects_filter="ollama.chat.requested.>"
            )
            woken.append(info.state.messages)
        assert woken == [1, 2], f"the second wake was dropped as a duplicate: {woken}"
    finally:
        await svc.close()


async def test_no_node_serving_the_model_is_not_reported_as_too_large(world):
    await world.svc.catalog.put(ModelInfo(name="elsewhere:1b", bytes=GIB))
    s = await world.session("elsewhere:1b")
    result = await s.wait(30)
    assert result.end.data["error"]["code"] == "model_unavailable", result.end.data


# -- chat.cancel ----------------------------------------------------------------------------------
async def test_cancel_stops_a_running_chat_within_a_second_with_one_end(world):
    stop = asyncio.Event()
    canceller = asyncio.create_task(entry.dispatcher(world.svc, "cancel").run(stop))
    events = await Collector().attach(
        world.svc.nc, "ollama.chat.completed.*", "ollama.chat.failed.*"
    )
    world.fake.token_s = 0.05  # 400 tokens would take 20 s
    s = await world.session(A, max_tokens=400)
    await wait_until(lambda: len(s.result.tokens) >= 3, what="streaming")
    t0 = time.monotonic()
    await s.cancel()
    result = await s.wait(30)
    stopped_in = time.monotonic() - t0
    assert result.end.type == "chat.failed" and result.end.data["error"]["code"] == "cancelled"
    assert stopped_in < 1.0, f"took {stopped_in:.2f}s"
    assert result.end.data["text"] == result.text()
    n = len(result.tokens)
    await asyncio.sleep(0.3)  # tokens that would still come, had generation gone on
    assert len(result.tokens) == n and n < 50
    assert len(ends_of(events, s.event.id)) == 1
    assert (await world.node()).models[A].leases == {}
    stop.set()
    await canceller


async def test_cancel_of_a_parked_request_takes_it_out_of_the_queue(world):
    stop = asyncio.Event()
    canceller = asyncio.create_task(entry.dispatcher(world.svc, "cancel").run(stop))
    await load.handle(world.svc, Event("model.load", ModelLoad(model=A).model_dump()), 1)
    await world.svc.fleet.update(
        "n1", lambda r: state.take_lease(r, A, "long-task", time.time() + 3600)
    )
    s = await world.session(B)
    await wait_until(lambda: _depth_at_least(world, 1), what="parked")
    await s.cancel()
    result = await s.wait(30)
    assert result.end.data["error"]["code"] == "cancelled"
    assert await world.svc.waiting.depth() == 0
    rec = (await world.svc.tasks.get(s.event.source, s.event.id)).record
    assert rec.state == "failed"
    stop.set()
    await canceller


async def test_a_cancel_that_cut_the_run_s_own_write_short_still_ends_the_request(world):
    """Found by test_cancel_of_a_parked_request (1 run in ~20): the cancel stopped a woken
    run while its park's write (`owner=None`) was in flight; the write landed, the run never
    heard, read its own release as a take-over, and sent no end. The task stayed queued."""
    now = time.time()
    rec = TaskRecord(
        task_id=uuid.uuid4().hex, source="test", client="client", chat_id="c1", model=B,
        state="placing", created_at=now, updated_at=now, owner="run-1", owner_until=now + 15,
    )  # fmt: skip
    rev = await world.svc.tasks.create(rec)
    run = chat_fn.Run(world.svc, rec, rev, "run-1")
    # The park's write landed, its answer did not: the run still holds the old revision.
    released = rec.model_copy(update={"state": "queued", "owner": None, "cancel_requested": True})
    await world.svc.tasks.update(released, rev)
    events = await Collector().attach(world.svc.nc, "ollama.chat.failed.*")
    with pytest.raises(chat_fn.Lost):  # what the run did before
        await chat_fn._fail(chat_fn.Run(world.svc, rec, rev, "run-1"), "cancelled", "x")
    await chat_fn._fail_taking_back(run, "cancelled", "cancelled after 0 tokens")
    got = (await world.svc.tasks.get("test", rec.task_id)).record
    assert got.state == "failed" and got.end["data"]["error"]["code"] == "cancelled"
    await wait_until(lambda: events.of_type("chat.failed"), what="the end sent")
    # A task another run holds is that run's to end: not taken from it.
    other = rec.model_copy(update={"task_id": uuid.uuid4().hex})
    rev = await world.svc.tasks.create(other)
    await world.svc.tasks.update(other.model_copy(update={"owner": "run-2"}), rev)
    with pytest.raises(chat_fn.Lost):
        await chat_fn._fail_taking_back(
            chat_fn.Run(world.svc, other, rev, "run-1"), "cancelled", "x"
        )
    assert (await world.svc.tasks.get("test", other.task_id)).record.state == "placing"


async def test_an_oversized_prompt_is_refused_with_a_short_reason_and_its_client_told(world):
    """Found by the fuzz run: the reason quoted the whole 900 KB prompt, so the failed end
    (and the task record) could not be sent; the handler raised until it gave up, and the
    client never heard why."""
    events = await Collector().attach(world.svc.nc, "ollama.chat.failed.*")
    data = {"chat_id": "big1", "model": A, "messages": [{"role": "user", "content": "x" * 900_000}]}
    ev = Event("chat.requested", data, extensions={CLIENT_EXTENSION: "client"})
    outcome = await chat_fn.handle(world.svc, ev, 1)
    assert isinstance(outcome, Reject) and len(outcome.reason) <= 2000, outcome
    failed = await wait_until(lambda: events.of_type("chat.failed"), what="the client told")
    error = failed[0].data["error"]
    assert error["code"] == "invalid_request" and "200000 characters" in error["message"]
    assert len(error["message"]) <= 2000


def _request_of(client: str, model: str, n: int) -> Event:
    data = {
        "chat_id": f"{client}{n}",
        "model": model,
        "messages": [{"role": "user", "content": "x"}],
    }
    return Event("chat.requested", data, extensions={CLIENT_EXTENSION: client})


async def test_a_client_over_its_rate_is_refused_and_told_while_another_is_served(world):
    world.svc.settings = world.svc.settings.but(client_rate=0.01, client_burst=2)
    events = await Collector().attach(world.svc.nc, "ollama.chat.failed.*", "ollama.deadletter.>")
    sent = [_request_of("alice", A, i) for i in range(3)]
    outcomes = [await chat_fn.handle(world.svc, ev, 1) for ev in sent]
    assert [type(o).__name__ for o in outcomes] == ["Done", "Done", "Reject"], outcomes
    assert "more than 0.01 chats a second" in outcomes[2].reason
    failed = await wait_until(lambda: events.of_type("chat.failed"), what="alice told")
    assert failed[0].data["chat_id"] == "alice2"
    assert failed[0].data["error"]["code"] == "rate_limited"
    # Another client has its own share; a redelivery of alice's is not a new request.
    assert isinstance(await chat_fn.handle(world.svc, _request_of("bob", A, 0), 1), Done)
    again = await chat_fn.handle(world.svc, sent[0], 2)
    assert isinstance(again, Done) and "re-sent" in again.note, again


async def test_a_client_s_share_of_the_queue_is_bounded_and_every_client_s_head_is_woken(world):
    world.svc.settings = world.svc.settings.but(client_max_waiting=2)
    await load.handle(world.svc, Event("model.load", ModelLoad(model=A).model_dump()), 1)
    await world.svc.fleet.update(  # A resident and leased: B cannot fit while the test runs
        "n1", lambda r: state.take_lease(r, A, "long-task", time.time() + 3600)
    )
    events = await Collector().attach(world.svc.nc, "ollama.chat.failed.*")
    outcomes = [await chat_fn.handle(world.svc, _request_of("alice", B, i), 1) for i in range(3)]
    assert [o.note.split(":")[0] for o in outcomes[:2]] == ["parked", "parked"], outcomes
    assert (
        isinstance(outcomes[2], Reject) and "already has 2 requests waiting" in outcomes[2].reason
    )
    failed = await wait_until(lambda: events.of_type("chat.failed"), what="alice told")
    assert failed[0].data["error"]["code"] == "queue_full"
    bob = await chat_fn.handle(world.svc, _request_of("bob", B, 0), 1)
    assert bob.note.startswith("parked"), bob
    assert await world.svc.waiting.count_of("alice") == 2
    assert await world.svc.waiting.count_of("bob") == 1
    heads = await world.svc.waiting.heads()  # one per client: bob does not wait behind alice
    assert sorted(h.headers[f"ce-{CLIENT_EXTENSION}"] for h in heads) == ["alice", "bob"]
    assert {h.model for h in heads} == {B}


async def test_a_load_whose_slot_went_while_it_loaded_is_unloaded_again(world):
    """Found by the fault suite: a router restart forgot a load in flight; the load function
    sent it again to the new router, found no slot to mark ready and left the model loaded,
    holding memory the planner had given to others."""
    world.fake.load_s = 1.0
    outcome = asyncio.create_task(
        load.handle(world.svc, Event("model.load", ModelLoad(model=A).model_dump()), 1)
    )

    async def loading() -> bool:
        slot = (await world.node()).models.get(A)
        return slot is not None and slot.load_seen_at is not None

    await wait_until(loading, timeout=10, what="the load in hand")
    gen = (await world.node()).models[A].gen
    await world.svc.fleet.update("n1", lambda r: state.remove_gen(r, A, gen, "forgotten"))
    done = await outcome
    assert isinstance(done, Done) and "unloaded again" in done.note, done
    assert A not in world.fake.loaded


# -- the pull loop and the lease taken on arrival (issue 12) ---------------------------------------
async def test_a_stopped_dispatcher_hands_back_what_its_open_pull_request_still_brings(
    fresh_nats_url,
):
    """A dispatcher keeps one pull request open; one that stops with it open must not take
    a message onto an inbox nobody reads (it would wait out the 30 s ack wait): what still
    comes is handed back, and the next dispatcher serves it at once."""
    svc = await open_services(Settings(nats_url=fresh_nats_url), provision=True)
    got: dict[str, list[str]] = {"first": [], "second": []}

    def recorder(name: str) -> Any:
        async def deliver(event: Event, attempt: int) -> Done:
            got[name].append(event.id)
            return Done()

        return deliver

    spec = bus.CONSUMERS["cancel"]
    stop1, stop2 = asyncio.Event(), asyncio.Event()
    first = Dispatcher(svc.js, spec, recorder("first"))
    run1 = asyncio.create_task(first.run(stop1))

    async def pull_open() -> bool:
        return (await _consumer(svc, "cancel")).num_waiting >= 1

    await wait_until(pull_open, timeout=10, what="the first dispatcher's pull request")
    stop1.set()
    ev = Event("chat.cancel", {"chat_id": "c1", "task_id": "t1"})
    await bus.publish(svc.js, ev, client="client")
    await asyncio.wait_for(run1, 10)
    second = Dispatcher(svc.js, spec, recorder("second"))
    run2 = asyncio.create_task(second.run(stop2))
    await wait_until(lambda: ev.id in got["second"], timeout=10, what="the second dispatcher")
    assert got["first"] == [] and first.stats.handed_back == 1
    stop2.set()
    await run2
    await svc.close()


async def test_a_lease_taken_on_arrival_is_given_back_when_the_request_does_not_use_it(world):
    """A new request for a resident model takes its lease beside its claim. A request that
    then ends without serving (refused for its options, or seen again after its end) gives
    that lease back at once: it would otherwise hold the model against eviction for 60 s."""
    await load.handle(world.svc, Event("model.load", ModelLoad(model=A).model_dump()), 1)
    done = await (await world.session(A, max_tokens=2)).wait(30)
    assert done.end.type == "chat.completed"
    refused = await (await world.session(A, max_tokens=100_000)).wait(30)
    assert refused.end.type == "chat.failed"
    assert refused.end.data["error"]["code"] == "invalid_request"
    # The first request again, as a new message (its own message id, so JetStream does not
    # drop it as a copy): its stored end is sent again.
    ends = await Collector().attach(world.svc.nc, "ollama.chat.completed.>")
    first = await world.session(A, max_tokens=2)
    again = dataclasses.replace(first.event, id=done.task_id)
    await first.wait(30)
    await bus.publish(world.svc.js, again, msg_id=f"{done.task_id}.again", client=first.client)
    await wait_until(
        lambda: len(ends_of(ends, done.task_id)) >= 1, timeout=30, what="the end sent again"
    )

    async def no_leases() -> bool:
        return not (await world.node()).models[A].leases

    await wait_until(no_leases, timeout=10, what="every lease given back")


async def test_a_dispatcher_whose_consumer_goes_away_backs_off_and_resumes_when_it_is_back(
    fresh_nats_url, caplog
):
    """A consumer deleted under a running dispatcher (an operator's mistake, a re-provision):
    the open pull request's 409 makes the dispatcher look the consumer up again, backing off
    while it is missing — not a storm of pull requests — and serve again once it is back."""
    from bench.roundtrips import Tracer

    svc = await open_services(Settings(nats_url=fresh_nats_url), provision=True)
    got: list[str] = []

    async def deliver(event: Event, attempt: int) -> Done:
        got.append(event.id)
        return Done()

    spec = bus.CONSUMERS["cancel"]
    stop = asyncio.Event()
    d = Dispatcher(svc.js, spec, deliver)
    runner = asyncio.create_task(d.run(stop))

    async def pull_open() -> bool:
        return (await _consumer(svc, "cancel")).num_waiting >= 1

    await wait_until(pull_open, timeout=10, what="the dispatcher's pull request")
    tracer = Tracer().install()
    tracer.on = True
    try:
        await svc.js.delete_consumer(bus.EVENTS_STREAM, "cancel")
        await wait_until(
            lambda: sum("dispatcher cancel" in r.getMessage() for r in caplog.records) >= 3,
            timeout=20,
            what="three failed looks at the missing consumer",
        )
        pulls = sum(op.kind == "pull" for op in tracer.ops)
        assert pulls <= 3, f"{pulls} pull requests while the consumer was missing"
    finally:
        tracer.uninstall()
    await bus.provision(svc.js)  # the consumer is back
    ev = Event("chat.cancel", {"chat_id": "c1", "task_id": "t1"})
    await bus.publish(svc.js, ev, client="client")
    await wait_until(lambda: ev.id in got, timeout=20, what="the event served again")
    stop.set()
    await runner
    await svc.close()
