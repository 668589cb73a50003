"""Smoke tests of the benchmarks' code paths (the benchmarks themselves are not tests)."""

from __future__ import annotations

import csv
import random

from bench import planner as bench_planner
from bench.catalog import load_catalog
from functions.planner import Candidate, min_cost_cover


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
