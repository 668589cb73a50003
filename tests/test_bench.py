"""Smoke tests of the benchmarks' code paths (the benchmarks themselves are not tests)."""

from __future__ import annotations

import csv
import json
import random

import pytest

from bench import planner as bench_planner
from bench.catalog import load_catalog
from domain.planner import Candidate, min_cost_cover

from .conftest import ROOT


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
    # the shared workloads and the other ServeGen segments of the report half
    assert {"azure-zipf-1.0", "servegen-m-mid"} <= {r["workload"] for r in rows}
    assert len({r["workload"] for r in rows}) == 2 + len(sched.SEGMENTS["report"])
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
    assert overhead.main([*argv, "--profile", "0", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "overhead_latency.csv").open()))
    assert rows[0]["transport"] == "inprocess" and int(rows[0]["pairs"]) == 2
    assert float(rows[0]["system_ttft_p50_ms"]) > 0 and float(rows[0]["direct_ttft_p50_ms"]) > 0
    # the gateway, paired with the NATS path: both APIs measured
    assert (
        float(rows[0]["ollama_gw_ttft_p50_ms"]) > 0 and float(rows[0]["openai_gw_ttft_p50_ms"]) > 0
    )
    assert "ollama_gw_over_nats_ttft_p50_ms" in rows[0]
    assert "chats/s" in capsys.readouterr().out


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
