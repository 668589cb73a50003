"""The reconcile function and the dispatcher's outcome vocabulary, on a real nats-server and the
WIRE-LEVEL FAKE of Ollama's API (labelled; Ollama cannot be installed here)."""

from __future__ import annotations

import asyncio
import time

from domain import state
from domain.state import NodeRecord, Registration, Slot
from events import bus
from events.codec import Event
from events.dispatcher import MAX_FAILED_DELIVERIES, Dispatcher, in_process
from events.outcome import Done, Reject, Retry
from functions import reconcile
from functions.services import Settings, open_services
from stores.catalog import ModelInfo

from .conftest import Collector, wait_until

M = "gemma3:270m"


async def _svc(nats_url: str, node_id: str, url: str, **models: Slot):
    svc = await open_services(Settings(nats_url=nats_url, keep_alive_s=300), provision=True)
    await svc.catalog.put(ModelInfo(name=M, bytes=300_000_000))
    record = NodeRecord(
        node_id=node_id,
        runtime="ollama",
        url=url,
        capacity_bytes=1 << 30,
        heartbeat_at=time.time(),
        models=models,
    )
    await svc.fleet.kv.put(f"node.{node_id}", record.model_dump_json().encode())
    await svc.fleet.register(Registration(node_id=node_id, runtime="ollama", url=url))
    return svc


async def test_idle_model_past_keep_alive_is_evicted_and_active_one_is_not(nats_url, fake_ollama):
    fake, url = fake_ollama
    fake.loaded.update({M: float("inf"), "llama3.2:1b": float("inf")})
    past = time.time() - 1
    svc = await _svc(
        nats_url,
        "r1",
        url,
        **{
            M: Slot(state="ready", bytes=1, keep_alive_until=past),
            "llama3.2:1b": Slot(
                state="ready", bytes=1, keep_alive_until=past, leases={"t": time.time() + 60}
            ),
        },
    )
    evicts = await Collector().attach(svc.nc, "ollama.model.evict")
    await reconcile.handle(svc, Event("fleet.tick", {}), 1)
    rec, _ = await svc.fleet.get("r1")
    assert rec.models[M].state == "evicting"
    assert rec.models["llama3.2:1b"].state == "ready"  # active: never expired
    await wait_until(lambda: evicts.of_type("model.evict"), what="model.evict")
    assert [e.data["model"] for e in evicts.of_type("model.evict")] == [M]
    await svc.close()


async def test_stale_leases_expire_and_drift_is_repaired(nats_url, fake_ollama):
    fake, url = fake_ollama
    fake.loaded.clear()
    fake.loaded[M] = float("inf")  # loaded behind the planner's back
    svc = await _svc(
        nats_url,
        "r2",
        url,
        **{"llama3.2:1b": Slot(state="ready", bytes=1, leases={"dead-worker": time.time() - 5})},
    )
    await reconcile.handle(svc, Event("fleet.tick", {}), 1)
    rec, _ = await svc.fleet.get("r2")
    # KV said ready, the runtime had nothing: dropped, with the reason kept.
    assert "llama3.2:1b" not in rec.models and "no longer" in rec.errors["llama3.2:1b"]
    # The runtime had a model KV did not know: adopted as idle, with the catalog's bytes.
    assert rec.models[M].state == "ready" and rec.models[M].bytes == 300_000_000
    await svc.close()


async def test_stale_lease_is_expired(nats_url, fake_ollama):
    fake, url = fake_ollama
    fake.loaded[M] = float("inf")
    svc = await _svc(
        nats_url,
        "r3",
        url,
        **{
            M: Slot(
                state="ready", bytes=1, leases={"gone": time.time() - 1, "alive": time.time() + 60}
            )
        },
    )
    await reconcile.handle(svc, Event("fleet.tick", {}), 1)
    rec, _ = await svc.fleet.get("r3")
    assert set(rec.models[M].leases) == {"alive"}
    assert state.expire_leases(rec, time.time()).models[M].active == 1
    await svc.close()


async def test_dispatcher_outcomes_ack_retry_and_dead_letter(nats_url):
    svc = await open_services(Settings(nats_url=nats_url), provision=True)
    seen: dict[str, int] = {}

    async def handler(event: Event, attempt: int):
        key = event.data["model"]
        seen[key] = attempt
        if key == "retry-twice":
            return Done() if attempt >= 3 else Retry(0.05, "not yet")
        if key == "reject":
            return Reject("cannot ever work")
        if key == "crash":
            raise RuntimeError("handler bug")
        return Done()

    dead = await Collector().attach(svc.nc, "ollama.deadletter.>")
    d = Dispatcher(
        svc.js,
        bus.ConsumerSpec("evict", "model.evict", ack_wait_s=5),
        in_process(handler, retry_base_s=0.01),
    )
    d_stop = asyncio.Event()
    runner = asyncio.create_task(d.run(d_stop))
    for model in ("ok", "retry-twice", "reject", "crash"):
        await bus.publish(svc.js, Event("model.evict", {"model": model}))
    await wait_until(lambda: seen.get("retry-twice") == 3, what="third delivery")
    await wait_until(lambda: len(dead.dead()) >= 2, timeout=60, what="two dead letters")
    reasons = {d_["event_type"] + ":" + d_["reason"] for d_ in dead.dead()}
    assert "model.evict:cannot ever work" in reasons
    assert any("gave up after" in r and "handler bug" in r for r in reasons)
    assert seen["crash"] == MAX_FAILED_DELIVERIES and seen["ok"] == 1
    d_stop.set()
    await runner
    await svc.close()


async def test_node_agent_registration_forgets_residency_the_runtime_does_not_have(
    nats_url, fake_ollama
):
    from agent.node import NodeAgent
    from runtimes.ollama import OllamaRuntime

    fake, url = fake_ollama
    fake.loaded.clear()
    fake.loaded[M] = float("inf")
    svc = await _svc(
        nats_url,
        "r4",
        url,
        **{
            M: Slot(state="ready", bytes=1),
            "llama3.2:1b": Slot(state="loading", bytes=1, since=time.time() - 999),
        },
    )
    await svc.fleet.update(
        "r4", lambda r: r.model_copy(update={"errors": {M: "a previous run's load error"}})
    )
    agent = NodeAgent(svc.fleet, "r4", OllamaRuntime(url), capacity_bytes=1 << 30)
    rec = await agent.register()
    assert set(rec.models) == {M}  # the phantom `loading` slot of a previous run is gone
    assert rec.errors == {}  # and `status` no longer shows the previous run's errors
    assert rec.available == ["gemma3:270m", "llama3.2:1b"] and rec.heartbeat_at > 0
    await svc.close()


async def test_a_node_gone_for_ten_minutes_is_forgotten_and_a_live_one_is_kept(
    nats_url, fake_ollama
):
    _, url = fake_ollama
    svc = await _svc(nats_url, "r5", url, **{M: Slot(state="ready", bytes=1)})
    gone = NodeRecord(
        node_id="gone-1",
        runtime="ollama",
        url=url,
        capacity_bytes=1,
        heartbeat_at=time.time() - 3600,
        models={M: Slot(state="ready", bytes=1)},
    )
    await svc.fleet.kv.put("node.gone-1", gone.model_dump_json().encode())
    outcome = await reconcile.handle(svc, Event("fleet.tick", {}), 1)
    assert "gone-1: forgotten" in outcome.note
    assert {r.node_id for r, _ in await svc.fleet.nodes()} >= {"r5"}
    assert "gone-1" not in {r.node_id for r, _ in await svc.fleet.nodes()}
    await svc.close()


def test_leftovers_of_a_killed_stack_are_ended_by_the_next_one(tmp_path):
    """Defect 15: a child's orphaned worker kept its port and the next `make run` failed."""
    import json
    import subprocess
    import sys

    import psutil

    from stack.local import kill_leftovers

    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
            "time.sleep(300)",
        ],
        start_new_session=True,
    )

    def orphans() -> list[psutil.Process]:
        return [
            p for p in psutil.process_iter() if p.pid != parent.pid and _pgid(p.pid) == parent.pid
        ]

    deadline = time.monotonic() + 20
    while not orphans() and time.monotonic() < deadline:
        time.sleep(0.05)
    parent.kill()  # the master dies; its worker keeps running in the group
    parent.wait()
    assert orphans(), "the worker should have outlived its master"
    pids = tmp_path / "pids.json"
    pids.write_text(json.dumps([{"name": "fn", "pgid": parent.pid, "program": sys.executable}]))
    assert kill_leftovers(pids) == [f"fn (pgid {parent.pid})"]
    assert not orphans() and not pids.exists()


def _pgid(pid: int) -> int | None:
    import os

    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


async def test_a_model_loaded_behind_the_planner_s_back_that_does_not_fit_is_unloaded(
    nats_url, fake_ollama
):
    """Found by the fault suite: after a router restart a model was adopted beside what the
    planner had given its memory to, and the node held more than its capacity."""
    fake, url = fake_ollama
    fake.loaded.clear()
    fake.loaded[M] = float("inf")  # 300 MB, loaded by no one we know of
    big = Slot(state="loading", bytes=(1 << 30) - 10**8, since=time.time())  # room placed
    svc = await _svc(nats_url, "r6", url, **{"llama3.2:1b": big})
    await reconcile.handle(svc, Event("fleet.tick", {}), 1)
    rec, _ = await svc.fleet.get("r6")
    assert M not in rec.models  # not booked beyond the node's capacity
    assert sum(s.bytes for s in rec.models.values()) <= rec.capacity_bytes

    async def unloaded() -> bool:
        return M not in fake.loaded

    await wait_until(unloaded, timeout=10, what="the unbooked model unloaded")
    await svc.close()
