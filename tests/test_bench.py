"""Smoke tests of the benchmarks' code paths (the benchmarks themselves are not tests)."""

from __future__ import annotations

import asyncio
import csv
import json
import random
import time

import pytest

from bench import planner as bench_planner
from bench.catalog import load_catalog, traces_dir
from domain.planner import Candidate, min_cost_cover
from events import bus
from events.dispatcher import Dispatcher, in_process
from functions import chat as chat_fn
from functions.services import Settings, open_services

from .conftest import ROOT, wait_until


def test_catalog_has_the_real_models():
    models = {m.name: m for m in load_catalog()}
    assert models["llama3.1:8b"].file_bytes == 4920753328 and len(models) == 42


def test_seed_brute_force_agrees_with_the_exact_solver():
    rng = random.Random(7)
    for _ in range(30):
        cands = [Candidate(f"m{i}", rng.choice([3, 5, 5, 8, 13]), 0) for i in range(9)]
        need = rng.randint(0, 40)
        got = min_cost_cover(cands, need)
        assert bench_planner.seed_brute_force(cands, need) == (
            None if got is None else tuple(c.name for c in got)
        )


def test_planner_bench_quick_run_writes_its_csv(tmp_path, capsys):
    assert bench_planner.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "planner.csv").open()))
    assert {r["n"] for r in rows} >= {"8", "12", "32"}
    assert "speed-up" in capsys.readouterr().out


def test_sched_bench_quick_run_writes_table_csv_and_plots(tmp_path, capsys):
    from bench import sched

    args = ["--alphas", "1.0", "--limit", "300", "--seeds", "3,4", "--out", str(tmp_path)]
    assert sched.main(args) == 0
    rows = list(csv.DictReader((tmp_path / "sched.csv").open()))
    assert {r["policy"] for r in rows} == {"ollama", "fewest", "lru", "cost"}
    assert {r["seed"] for r in rows} == {"3", "4"}
    # the shared workloads and the other ServeGen segments of the report half (ServeGen's
    # traces are only in shared/traces, not vendored: without them only azure-zipf runs)
    workloads = {r["workload"] for r in rows}
    if (traces_dir() / "servegen" / "servegen_m-mid_clients.csv").is_file():
        assert {"azure-zipf-1.0", "servegen-m-mid"} <= workloads
        assert len(workloads) == 2 + len(sched.SEGMENTS["report"])
    else:
        assert workloads == {"azure-zipf-1.0"}
    summary = list(csv.DictReader((tmp_path / "sched_summary.csv").open()))
    assert {r["seeds"] for r in summary} == {"2"}
    for r in rows:
        # every policy serves everything; none can load less than the bound on its own order
        assert int(r["requests"]) + int(r["unserved"]) == 300
        assert float(r["load_s"]) >= float(r["lb_served_s"]) - 1e-6
    assert (tmp_path / "sched_wait_cdf.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "SIMULATION" in out and "goals for `cost`" in out and "p99 <= best" in out


def test_lower_bound_is_exact_on_a_tiny_instance():
    from bench import bound
    from bench.sim import Request

    # Two models of size 1 alternate (a b a b a b), 10 s per load.
    reqs = [Request(i, float(i), "ab"[i % 2], 1, 1) for i in range(6)]
    size, load = (lambda m: int(1e9)), (lambda m: 10.0)
    # Memory 1, each request's model resident at its request (the default): every request
    # after the first two reloads: 2 compulsory + 4 = 60 s.
    lb, first = bound.lower_bound(reqs, int(1e9), size, load)
    assert first == 2 and abs(lb - 60.0) < 1e-6
    # Plain FOO-L lets a request bypass memory, so `a` stays and only b's re-requests miss.
    lb_bypass, _ = bound.lower_bound(reqs, int(1e9), size, load, resident_at_request=False)
    assert abs(lb_bypass - 40.0) < 1e-6
    # Memory 2: both stay resident; only the compulsory loads remain.
    lb2, _ = bound.lower_bound(reqs, int(2e9), size, load)
    assert abs(lb2 - 20.0) < 1e-6


def test_servegen_arrivals_follow_the_scaled_rates():
    import pytest

    from bench import sim, workloads

    catalog = [m for m in load_catalog() if sim.memory_bytes(m) <= 80e9]
    try:
        reqs, factor = workloads.servegen(catalog, seed=3, hours=1 / 6, target_rps=2.0)
    except FileNotFoundError:
        pytest.skip("ServeGen traces are only in shared/traces (not vendored: 8 MB)")
    # one 10-minute window at a mean of 2 req/s: about 1200 arrivals, all inside the window
    assert 900 < len(reqs) < 1500 and 0 < factor < 1
    assert all(0 <= r.t < 600 for r in reqs) and [r.t for r in reqs] == sorted(r.t for r in reqs)


def test_admission_lets_requests_for_a_cold_model_share_one_load():
    """One GPU fits one of two 8 GB models. `hot` is asked every 2 s; `cold` six times in
    12 s. Loading `cold` at once on every request thrashes; `cost` defers the evicting load
    until the cold requests have waited long enough, then serves them from one load."""
    from bench import sim
    from bench.catalog import CatalogModel

    models = {name: CatalogModel(name, 8.0, "q4_K_M", 5 * 10**9, 4096) for name in ("hot", "cold")}
    capacity = int(sim.memory_bytes(models["hot"]) * 1.5)
    reqs = [sim.Request(i, 2.0 * i, "hot", 100, 10) for i in range(60)]
    reqs += [sim.Request(100 + i, 31.0 + 2 * i, "cold", 100, 10) for i in range(6)]
    reqs.sort(key=lambda r: r.t)
    results = {p: sim.simulate(p, reqs, models, 1, capacity) for p in ("fewest", "cost")}
    for r in results.values():
        assert len(r.waits) == len(reqs) and r.unserved == 0  # nothing dropped
    assert results["cost"].loads < results["fewest"].loads
    cold_loads = results["cost"].loads - 1  # hot was loaded once at the start ...
    assert cold_loads <= 2  # ... cold once, and hot back once


async def test_overhead_throughput_and_profile_code_path(nats_url, tmp_path):
    """bench-overhead's throughput half on a real nats-server, with the labelled stub runtime,
    and its pyinstrument profile (the latency half needs llama-server: see the e2e one)."""
    from bench import overhead

    r = await overhead.throughput(nats_url, clients=2, seconds=0.5)
    assert r["completed"] > 0 and r["chats_per_s"] > 0
    await overhead.profiled_throughput(nats_url, 1, 1.0, tmp_path)
    tree = (tmp_path / "overhead_profile.txt").read_text()
    assert "handle" in tree  # the chat function shows up in the sampled call tree


@pytest.mark.e2e
def test_overhead_bench_quick_run_on_the_real_stack(tmp_path, capsys):
    from bench import overhead

    argv = ["--pairs", "2", "--transports", "inprocess", "--clients", "1", "--seconds", "0.3"]
    argv += ["--workers", "0,1"]
    assert overhead.main([*argv, "--profile", "0", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "overhead_latency.csv").open()))
    assert rows[0]["transport"] == "inprocess" and int(rows[0]["pairs"]) == 2
    assert float(rows[0]["system_ttft_p50_ms"]) > 0 and float(rows[0]["direct_ttft_p50_ms"]) > 0
    # the gateway, paired with the NATS path: both APIs measured
    assert (
        float(rows[0]["ollama_gw_ttft_p50_ms"]) > 0 and float(rows[0]["openai_gw_ttft_p50_ms"]) > 0
    )
    assert "ollama_gw_over_nats_ttft_p50_ms" in rows[0]
    assert int(rows[0]["round_trips_to_runtime"]) >= 2  # the claim and the lease at least
    assert float(rows[0]["control_plane_ttft_p50_ms"]) > 0
    out = capsys.readouterr().out
    assert "chats/s" in out and "NATS round trips, to runtime" in out
    # ... and served by a worker process too (`ollama-autoscaler worker`, the stub plugin)
    served = list(csv.DictReader((tmp_path / "overhead_throughput.csv").open()))
    assert {r["workers"] for r in served} == {"0", "1"}
    assert all(int(r["completed"]) > 0 for r in served)


def test_the_dashboard_json_is_the_one_its_panels_make():
    """docs/grafana-dashboard.json is generated from bench.dashboard.PANELS (the plot's
    panels): the two never drift apart."""
    from bench import dashboard

    shipped = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    assert shipped == dashboard.grafana_json()
    assert all(
        p["targets"] and p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in shipped["panels"]
    )


def test_the_dashboard_plot_evaluates_rates_and_quantiles_as_promql_would():
    from bench.dashboard import P, evaluate

    h = f"{P}_time_to_first_token_seconds_bucket"

    def scrape(t, counts, total):
        m = {(h, (("le", le), ("model", "a"))): n for le, n in counts.items()}
        m[(f"{P}_requests_total", (("model", "a"), ("outcome", "completed")))] = total
        return (t, m)

    old = scrape(0.0, {"0.1": 0, "1.0": 0, "+Inf": 0}, 10)
    new = scrape(10.0, {"0.1": 50, "1.0": 100, "+Inf": 100}, 30)
    assert evaluate(("rate", f"{P}_requests_total", "outcome", 1.0), old, new) == {"completed": 2.0}
    # half the observations at or under 0.1 s, all under 1 s: the median is 0.1, p75 is halfway
    assert evaluate(("quantile", h, 0.5), old, new) == {"": pytest.approx(0.1)}
    assert evaluate(("quantile", h, 0.75), old, new) == {"": pytest.approx(0.55)}


async def test_a_request_for_a_resident_model_needs_two_round_trips_before_the_runtime(nats_url):
    """The chat path's cost, counted on the wire: between a new request's publish and the
    runtime's call, the worker makes exactly two round trips, the task's claim and the lease,
    sent together (node records come from the watch, the catalog from its cache, the
    decision's event is sent after)."""
    from bench import overhead
    from bench.roundtrips import Tracer, round_trips
    from bench.stub import STUB_MODEL, StubRuntime

    called: list[float] = []

    class Timed(StubRuntime):
        async def chat(self, *a, **kw):  # type: ignore[no-untyped-def]
            called.append(time.perf_counter())
            async for piece in super().chat(*a, **kw):
                yield piece

    svc = await open_services(Settings(nats_url=nats_url, client_rate=0), provision=True)
    await overhead.stub_fleet(svc)  # the node's agent is not beating: nothing else writes
    svc.runtimes[("stub", "stub://bench")] = Timed()
    stop = asyncio.Event()
    d = Dispatcher(
        svc.js, bus.CONSUMERS["chat"], in_process(lambda e, a: chat_fn.handle(svc, e, a))
    )
    runner = asyncio.create_task(d.run(stop))
    nc = await bus.connect(nats_url)
    ends = await overhead.Ends(nc, "client").start()
    tracer = Tracer().install()
    try:
        assert await ends.chat(STUB_MODEL) == "chat.completed"  # warm: watch, subscriptions
        counts, kinds = [], set()
        for _ in range(5):
            # The previous chat's tail (its acknowledgement, the release's look at the
            # waiting queue) is over before this one starts: only this chat is counted.
            await wait_until(
                lambda: not d._tasks and (svc.waiting._waker is None or svc.waiting._waker.done()),
                timeout=10,
                what="the previous chat's tail",
            )
            tracer.ops.clear()
            tracer.on = True
            t0 = time.perf_counter()
            assert await ends.chat(STUB_MODEL) == "chat.completed"
            tracer.on = False
            before = [
                op
                for op in tracer.between(t0, called[-1])
                if op.what != "JS publish chat.requested" and op.kind != "pull"
            ]
            counts.append(round_trips(before))
            kinds |= {op.what for op in before if op.kind == "rt"}
        assert counts == [2] * 5, counts
        assert kinds == {"KV write tasks", "KV write fleet"}
    finally:
        tracer.uninstall()
        stop.set()
        await runner
        await ends.stop()
        await nc.close()
        await svc.close()


def test_runtime_plugins_add_kinds_and_a_bad_one_is_named():
    """OA_RUNTIME_PLUGINS: each module named is imported and adds its runtime kinds; one
    that cannot be imported stops the start with its name, not a bare ImportError."""
    from runtimes import RUNTIMES, load_plugins, make_runtime

    load_plugins(" bench.stub , ")
    assert "stub" in RUNTIMES and make_runtime("stub", "stub://x").url == "stub://x"
    with pytest.raises(ValueError, match="'no_such_plugin_module'"):
        load_plugins("bench.stub,no_such_plugin_module")


def test_planner_bench_goals_say_met_or_missed():
    rows: list[dict[str, object]] = [
        {"n": 20, "policy": "fewest", "speedup_p50": 1500.0},
        {"n": 64, "policy": "cost", "exact_p99_ms": 0.9, "unproven": 0},
        {"n": 128, "policy": "cost", "exact_p99_ms": 2.5, "unproven": 0},
        {
            "n": 64,
            "policy": "fewest",
            "exact_max_ms": 30.0,
            "unproven": 0,
            "unproven_max_gap_bytes": 0,
            "unproven_count_open": 0,
        },
        {
            "n": 128,
            "policy": "fewest",
            "exact_max_ms": 400.0,
            "unproven": 2,
            "unproven_max_gap_bytes": 1234,
            "unproven_count_open": 1,
        },
    ]
    lines = bench_planner.goals(rows)
    assert "n=64 (cost): 0.900 ms -> met" in lines[0]
    assert "n=128 (cost): 2.500 ms -> MISSED" in lines[1]
    assert "max 400.0 ms, 2 answer(s) not proven optimal, 1 of them with the count" in lines[2]
    assert "the others at most 1234 bytes above the floor" in lines[2]
    assert lines[2].endswith("-> met") and lines[4].endswith("1500x -> met")
    rows[4]["exact_max_ms"] = 5000.0
    assert bench_planner.goals(rows)[2].endswith("-> MISSED")
