"""Scheduling quality on real traces — a SIMULATION (see bench/sim.py for the fleet model).

For each workload, every policy runs on the same request stream (same seed), and the offline
lower bound (bench/bound.py) is computed twice: on the arrival order (the bound's own
assumption) and on the order in which each policy actually began serving requests (a policy
that queues requests can batch them behind one load, which arrival-order service forbids;
the second bound is valid for the order that policy chose).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import time
from collections.abc import Iterator
from pathlib import Path

from domain import planner

from . import bound, sim, workloads
from .catalog import CatalogModel, load_catalog

POLICIES = ("ollama", "fewest", "lru", "cost")
OUT = Path("docs/bench")


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"


def run_workload(
    name: str,
    requests: list[sim.Request],
    models: dict[str, CatalogModel],
    gpus: int,
    capacity: int,
) -> list[dict[str, object]]:
    size = lambda m: sim.memory_bytes(models[m])  # noqa: E731
    cost = lambda m: sim.load_s(sim.memory_bytes(models[m]))  # noqa: E731
    lb_arrival, compulsory = bound.lower_bound(requests, gpus * capacity, size, cost)
    rows = []
    for policy in POLICIES:
        t0 = time.perf_counter()
        result = sim.simulate(policy, requests, models, gpus, capacity)
        lb_served, _ = bound.lower_bound(result.served, gpus * capacity, size, cost)
        row: dict[str, object] = {
            "workload": name,
            "policy": policy,
            **result.summary(),
            "lb_arrival_s": lb_arrival,
            "lb_served_s": lb_served,
            "ratio_to_lb_served": result.load_seconds / lb_served,
            "sim_s": time.perf_counter() - t0,
        }
        rows.append(row)
        row["_waits"] = result.waits
    print(
        f"\n== {name}: {len(requests)} requests, {len(models)} models, {gpus} x "
        f"{capacity / 1e9:.0f} GB; lower bound (arrival order) {lb_arrival:,.0f} load-s, "
        f"{compulsory} compulsory loads"
    )
    print(
        f"{'policy':<8} {'loads':>6} {'GB loaded':>10} {'load-s':>9} {'p50 wait':>9} "
        f"{'p95 wait':>9} {'p99 wait':>9} {'<=2s':>6} {'<=10s':>6} {'mem':>5} "
        f"{'LB(served)':>10} {'/LB':>5}"
    )
    for r in rows:
        print(
            f"{r['policy']:<8} {r['loads']:>6} {_fmt(r['gb_loaded']):>10} "  # type: ignore[arg-type]
            f"{_fmt(r['load_s']):>9} {_fmt(r['wait_p50_s']):>9} "  # type: ignore[arg-type]
            f"{_fmt(r['wait_p95_s']):>9} {_fmt(r['wait_p99_s']):>9} "  # type: ignore[arg-type]
            f"{r['slo_2s']:>6.1%} {r['slo_10s']:>6.1%} {r['mem_util']:>5.0%} "
            f"{_fmt(r['lb_served_s']):>10} {r['ratio_to_lb_served']:>5.2f}"
        )  # type: ignore[arg-type]
    by = {r["policy"]: r for r in rows}
    ours = float(by["cost"]["load_s"])  # type: ignore[arg-type]
    for base in ("ollama", "fewest", "lru"):
        theirs = float(by[base]["load_s"])  # type: ignore[arg-type]
        print(
            f"cost vs {base}: {abs(100 * (1 - ours / theirs)):.1f} % "
            f"{'fewer' if ours < theirs else 'more'} load-seconds"
        )
    return rows


# How `cost` got where it is: each step changes one constant of functions/planner.py.
STEPS: tuple[tuple[str, float, float], ...] = (
    ("v1: reload cost x p(reuse in 300 s), no admission", 300.0, 0.0),
    ("reuse horizon 60 s", 60.0, 0.0),
    ("+ admission, ratio 3", 60.0, 3.0),
    ("+ admission, ratio 8", 60.0, 8.0),
    ("+ admission, ratio 12", 60.0, 12.0),
    ("ratio 8, horizon 300 s", 300.0, 8.0),
)


@contextlib.contextmanager
def planner_constants(horizon_s: float, admit_ratio: float) -> Iterator[None]:
    saved = planner.REUSE_HORIZON_S, planner.ADMIT_RATIO
    planner.REUSE_HORIZON_S, planner.ADMIT_RATIO = horizon_s, admit_ratio
    try:
        yield
    finally:
        planner.REUSE_HORIZON_S, planner.ADMIT_RATIO = saved


def policy_steps(
    name: str,
    requests: list[sim.Request],
    models: dict[str, CatalogModel],
    gpus: int,
    capacity: int,
    base: dict[str, float] | None = None,
) -> list[dict[str, object]]:
    """Each step of the `cost` policy against `fewest` on one workload (`base`: the `fewest`
    summary when the main table already simulated it on the same requests)."""
    if base is None:
        base = sim.simulate("fewest", requests, models, gpus, capacity).summary()
    print(f"\n== policy steps on {name}: `cost` variants against `fewest` (simulation)")
    print(
        f"{'step':<52} {'horizon':>7} {'ratio':>5} {'load-s':>8} {'vs fewest':>9} "
        f"{'p50':>6} {'p95':>6} {'p99':>6} {'<=2s':>6} {'<=10s':>6}"
    )
    rows: list[dict[str, object]] = []
    default = (planner.REUSE_HORIZON_S, planner.ADMIT_RATIO)
    for label, horizon, ratio in (("fewest (the seed's rule)", 0.0, 0.0), *STEPS):
        if (horizon, ratio) == default:
            label += " (default)"
        if label.startswith("fewest"):
            summary = base
        else:
            with planner_constants(horizon, ratio):
                summary = sim.simulate("cost", requests, models, gpus, capacity).summary()
        change = summary["load_s"] / base["load_s"] - 1
        rows.append(
            {
                "workload": name,
                "step": label,
                "horizon_s": horizon,
                "admit_ratio": ratio,
                **summary,
                "load_s_vs_fewest": change,
            }
        )
        print(
            f"{label:<52} {horizon:>7.0f} {ratio:>5.0f} {summary['load_s']:>8,.0f} "
            f"{change:>+9.1%} {summary['wait_p50_s']:>6.1f} {summary['wait_p95_s']:>6.1f} "
            f"{summary['wait_p99_s']:>6.1f} {summary['slo_2s']:>6.1%} {summary['slo_10s']:>6.1%}"
        )
    return rows


def write_csv(rows: list[dict[str, object]], path: Path) -> None:
    fields = [k for k in rows[0] if not k.startswith("_")]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def plot(rows: list[dict[str, object]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    workloads_ = sorted({str(r["workload"]) for r in rows})
    fig, axes = plt.subplots(1, len(workloads_), figsize=(5 * len(workloads_), 4), squeeze=False)
    for ax, wl in zip(axes[0], workloads_, strict=True):
        for r in rows:
            if r["workload"] != wl:
                continue
            waits = sorted(r["_waits"])  # type: ignore[arg-type]
            ys = [(i + 1) / len(waits) for i in range(len(waits))]
            ax.plot([max(w, 1e-3) for w in waits], ys, label=str(r["policy"]))
        ax.set_xscale("log")
        ax.set_xlabel("wait: arrival -> first token (s, log)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{wl} (simulation)")
        ax.axvline(2, color="grey", lw=0.5, ls=":")
        ax.axvline(10, color="grey", lw=0.5, ls=":")
        ax.legend()
    fig.tight_layout()
    paths.append(out / "sched_wait_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    fig, axes = plt.subplots(1, len(workloads_), figsize=(5 * len(workloads_), 4), squeeze=False)
    for ax, wl in zip(axes[0], workloads_, strict=True):
        sel = [r for r in rows if r["workload"] == wl]
        ax.bar([str(r["policy"]) for r in sel], [float(r["load_s"]) for r in sel])  # type: ignore[arg-type]
        ax.axhline(
            float(sel[0]["lb_arrival_s"]),
            color="red",
            ls="--",  # type: ignore[arg-type]
            label="lower bound (arrival order)",
        )
        for i, r in enumerate(sel):
            ax.plot([i - 0.4, i + 0.4], [float(r["lb_served_s"])] * 2, color="black")  # type: ignore[arg-type]
        ax.set_ylabel("load-seconds")
        ax.set_title(
            f"{wl}: load-seconds\n(black: bound on each policy's service order)", fontsize=9
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "sched_load_seconds.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close("all")
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--gpu-gb", type=float, default=80.0)
    ap.add_argument("--alphas", default="0.8,1.0,1.2")
    ap.add_argument("--limit", type=int, default=None, help="first N requests only")
    ap.add_argument("--servegen", default="m-mid", help="ServeGen model trace ('' to skip)")
    ap.add_argument("--servegen-rps", type=float, default=2.5)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument(
        "--steps",
        default="1.0",
        help="Zipf alpha of the azure-zipf workload for the policy-steps table ('' to skip)",
    )
    args = ap.parse_args(argv)
    capacity = int(args.gpu_gb * 1e9)
    catalog = [m for m in load_catalog() if sim.memory_bytes(m) <= capacity]
    models = {m.name: m for m in catalog}
    print("SIMULATION of a GPU fleet (not a measurement): " + sim.constants())
    print(f"catalog: {len(catalog)} models that fit one GPU; seed {args.seed}")
    rows: list[dict[str, object]] = []
    for alpha in (float(a) for a in args.alphas.split(",") if a):
        reqs = workloads.azure_zipf(catalog, alpha, args.seed, args.limit)
        rows += run_workload(f"azure-zipf-{alpha}", reqs, models, args.gpus, capacity)
    if args.servegen:
        try:
            reqs, factor = workloads.servegen(
                catalog, args.seed, args.servegen, target_rps=args.servegen_rps
            )
        except FileNotFoundError as exc:
            print(f"\nservegen skipped: {exc}")
        else:
            print(
                f"\nservegen {args.servegen}: rates scaled by {factor:.2e} to a mean "
                f"{args.servegen_rps} req/s"
            )
            rows += run_workload(
                f"servegen-{args.servegen}", reqs[: args.limit], models, args.gpus, capacity
            )
    steps: list[dict[str, object]] = []
    if args.steps:
        alpha = float(args.steps)
        reqs = workloads.azure_zipf(catalog, alpha, args.seed, args.limit)
        name = f"azure-zipf-{alpha}"
        done = [r for r in rows if r["workload"] == name and r["policy"] == "fewest"]
        keys = sim.Result("fewest").summary().keys()
        base = {k: done[0][k] for k in keys} if done else None
        steps = policy_steps(name, reqs, models, args.gpus, capacity, base)
    args.out.mkdir(parents=True, exist_ok=True)
    print()
    write_csv(rows, args.out / "sched.csv")
    if steps:
        write_csv(steps, args.out / "sched_steps.csv")
    if not args.no_plots:
        for p in plot(rows, args.out):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
