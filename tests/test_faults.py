"""The short fault run (`make faults` runs 200 chats and a cluster window): on the real stack
under memory pressure, the chat function, a model process, the router and nats-server are each
killed while answers stream, and a 3-server cluster loses its stream leader. Every chat ends
exactly once, no token is missing or repeated inside an attempt, no lease is left held, and no
revision of a node key places more than the node holds; 64 concurrent placements on 2 nodes
place exactly what fits."""

from __future__ import annotations

import pytest

from bench.faults import LOCAL_FAULTS, Row, _gaps, contention, report, run_stack
from events.codec import Event

from .conftest import llama_available

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not llama_available(), reason="OA_SKIP_E2E=1"),
]


def _token(task: str, seq: int, attempt: int = 1) -> Event:
    return Event("chat.token", {"task_id": task, "seq": seq, "attempt": attempt})


def test_the_gap_count_sees_missing_repeated_and_late_starting_tokens():
    whole = [_token("a", i) for i in range(5)] + [_token("a", i, 2) for i in range(3)]
    assert _gaps(whole) == 0
    assert _gaps([_token("a", i) for i in (0, 1, 3)]) == 1  # one missing
    assert _gaps([_token("a", i) for i in (0, 1, 1, 2)]) == 1  # one repeated
    assert _gaps([_token("a", i) for i in (2, 3)]) == 1  # the first ones missing
    assert _gaps([_token("a", 0), _token("b", 1)]) == 1  # per chat


def _assert_clean(rows: list[Row]) -> None:
    for r in rows:
        assert r.injected, f"{r.fault}: nothing was killed"
        assert r.lost == 0 and r.one_end == r.chats, r
        assert r.duplicated == 0 and r.gaps == 0, r
        assert r.leases_left == 0, r
        assert r.overcommit == 0 and r.held_over == 0, r
        assert r.revisions > 0 and r.samples > 0, r  # the checkers did look
        assert r.violations == 0, r
        assert r.live_ends == 0, r
        assert r.peak_held > 0, r  # the sampler saw the model processes


async def test_every_chat_ends_once_while_each_part_of_the_stack_is_killed(tmp_path):
    rows = await run_stack(tmp_path / "local", LOCAL_FAULTS, per_window=4, seed=5)
    print(report(rows, None, 0))
    assert [r.fault for r in rows] == list(LOCAL_FAULTS)
    _assert_clean(rows)
    # The faults bit: they hit answers as they streamed, and took some with them.
    assert sum(r.streaming_at_fault for r in rows) > 0, rows
    assert sum(r.failed for r in rows) + sum(r.retried for r in rows) > 0, rows


@pytest.mark.cluster_failover
async def test_a_cluster_that_loses_its_stream_leader_loses_no_chat_and_no_token(tmp_path):
    rows = await run_stack(tmp_path / "cluster", ("cluster",), per_window=6, seed=2, servers=3)
    print(report(rows, None, 0))
    _assert_clean(rows)


async def test_64_concurrent_placements_on_2_nodes_place_what_fits_in_every_revision(tmp_path):
    row = await contention(tmp_path / "contention", placements=64, nodes=2, fit=3)
    assert row.completed == 6 and row.failed == 58 and row.lost == 0, row
    assert row.one_end == 64, "the nodes do not hold what was placed"
    assert row.revisions >= 8 and row.overcommit == 0, row
