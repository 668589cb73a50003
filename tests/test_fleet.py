"""Fleet state on a real nats-server: compare-and-set keeps concurrent writers honest."""

from __future__ import annotations

import asyncio
import contextlib
import time

from domain import planner, state
from domain.state import NodeRecord
from events import bus
from events.keys import node_key
from stores.fleet import Fleet

from .conftest import wait_until

MIB = 1 << 20


async def _fleets(nats_url: str, n: int) -> tuple[list[Fleet], list]:
    conns = [await bus.connect(nats_url) for _ in range(n)]
    await bus.provision(conns[0].jetstream())
    fleets = [Fleet(await c.jetstream().key_value(bus.FLEET_BUCKET), c.jetstream()) for c in conns]
    return fleets, conns


async def _node_with_ready_model(fleet: Fleet, node_id: str) -> None:
    """A node with plenty of room and one ready model `m`."""
    node = NodeRecord(
        node_id=node_id,
        runtime="llamacpp",
        url="http://x",
        capacity_bytes=1 << 30,
        heartbeat_at=time.time(),
        models={"m": state.Slot(state="ready", bytes=1)},
    )
    await fleet.upsert(node, lambda r: r)


async def test_32_concurrent_placements_never_over_commit_in_any_revision(nats_url):
    fleets, conns = await _fleets(nats_url, 4)
    node = NodeRecord(
        node_id="cas-0",
        runtime="llamacpp",
        url="http://x",
        capacity_bytes=3 * 400 * MIB,
        heartbeat_at=time.time(),
    )
    await fleets[0].upsert(node, lambda r: r)

    async def place(i: int) -> object:
        fleet = fleets[i % len(fleets)]
        return await fleet.place(
            planner.PlanRequest(f"model-{i}", 400 * MIB), time.time(), "cost", task_id=f"t{i}"
        )

    results = await asyncio.gather(*(place(i) for i in range(32)))
    placed = [r for r in results if isinstance(r, planner.Placement)]
    assert len(placed) == 3
    assert all(isinstance(r, planner.Queue) for r in results if r not in placed)

    history = await fleets[0].kv.history(node_key("cas-0"))
    assert len(history) >= 4  # the create and three placements
    for entry in history:
        rec = NodeRecord.model_validate_json(entry.value)
        assert rec.committed_bytes() <= rec.capacity_bytes, f"over-commit at rev {entry.revision}"
    final, _ = await fleets[0].get("cas-0")
    assert sorted(final.models) == sorted(p.model for p in placed)
    for c in conns:
        await c.close()


async def test_concurrent_leases_are_never_lost(nats_url):
    fleets, conns = await _fleets(nats_url, 4)
    await _node_with_ready_model(fleets[0], "cas-1")
    await asyncio.gather(
        *(
            fleets[i % 4].update(
                "cas-1", lambda r, i=i: state.take_lease(r, "m", f"t{i}", time.time())
            )
            for i in range(32)
        )
    )
    final, _ = await fleets[0].get("cas-1")
    assert final.models["m"].active == 32
    for c in conns:
        await c.close()


async def test_one_process_commits_concurrent_changes_together_and_keeps_each_outcome(nats_url):
    """Group commit: 40 leases asked for at once in one process take far fewer writes than
    40, none is lost, and a change that is refused (lease on a model that is not there)
    fails alone without holding back the others in its batch."""
    fleets, conns = await _fleets(nats_url, 1)
    fleet = fleets[0]
    await _node_with_ready_model(fleet, "cas-2")
    before = len(await fleet.kv.history(node_key("cas-2")))
    results = await asyncio.gather(
        *(
            fleet.update(
                "cas-2",
                lambda r, i=i: state.take_lease(
                    r, "m" if i % 10 else "absent", f"t{i}", time.time()
                ),
            )
            for i in range(40)
        ),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(refused) == 4 and all(isinstance(r, state.TransitionError) for r in refused)
    final, _ = await fleet.get("cas-2")
    assert sorted(final.models["m"].leases) == sorted(f"t{i}" for i in range(40) if i % 10)
    writes = len(await fleet.kv.history(node_key("cas-2"))) - before
    assert 1 <= writes < 36  # batched: one write per batch, not per change
    for c in conns:
        await c.close()


async def test_hot_nodes_follow_other_writers_through_the_watch_and_fall_back_to_reads(nats_url):
    """The watch's copy of the node records shows another process's write (and a deleted
    node going) without a read of its own; a copy that has heard nothing for too long is
    not trusted: the records are read instead."""
    (mine, theirs), conns = await _fleets(nats_url, 2)
    await _node_with_ready_model(theirs, "hot-1")
    await mine.hot_nodes()  # starts the watch

    async def leased() -> bool:
        return any(
            r.node_id == "hot-1" and "t-hot" in r.models["m"].leases
            for r, _ in await mine.hot_nodes()
        )

    await theirs.update("hot-1", lambda r: state.take_lease(r, "m", "t-hot", time.time()))
    await wait_until(leased, timeout=10, what="the other writer's lease in the watched copy")
    assert mine._mirror_synced and "hot-1" in mine._mirror
    rev = (await theirs.get("hot-1"))[1]
    assert await theirs.forget("hot-1", rev)
    await wait_until(lambda: "hot-1" not in mine._mirror, timeout=10, what="the node's delete")
    # Stale: the watch's copy says nothing of a node written meanwhile; a read does.
    await _node_with_ready_model(theirs, "hot-2")
    mine._mirror_task.cancel()
    with contextlib.suppress(BaseException):
        await mine._mirror_task
    mine._mirror_heard -= 60
    mine._mirror.pop("hot-2", None)
    mine._ids = []
    assert "hot-2" in {r.node_id for r, _ in await mine.hot_nodes()}
    await mine.close()
    for c in conns:
        await c.close()
