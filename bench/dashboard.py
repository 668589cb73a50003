"""The Grafana dashboard of the gateway's metrics, and the same panels plotted from real data.

Grafana cannot be run here (no package on the registries this machine reaches), so this bench
drives real traffic through the gateway on the local stack (nats-server + llama-server + three
Gemma aliases on a node that holds two: loads, evictions and waiting all happen), scrapes
`/metrics` every second, and plots each panel of the dashboard from the scrapes, evaluating
in Python what its PromQL asks (rates, histogram quantiles, sums by label).

    python -m bench.dashboard                 # the plot: docs/bench/dashboard.png (+ .csv)
    python -m bench.dashboard --write-json    # docs/grafana-dashboard.json from PANELS
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

P = "ollama_autoscaler"
OUT = Path("docs/bench")
DASHBOARD = Path("docs/grafana-dashboard.json")
MODELS = ("gemma3-270m", "gemma3-270m-b", "gemma3-270m-c")
MIB = 1 << 20


def hq(q: float, metric: str, window: str = "1m") -> str:
    """PromQL: the q-quantile of a histogram over all its labels."""
    return f"histogram_quantile({q}, sum by (le) (rate({P}_{metric}_bucket[{window}])))"


# Each panel: title, unit, and its series: (legend, PromQL, how to compute it from scrapes).
#   ("rate", metric, label|None, scale)    sum by label of rate(metric[window]) * scale
#   ("quantile", metric_bucket, q)          histogram_quantile over rate(...[window])
#   ("value", metric, label|None, {filter}) sum by label of the gauge
#   ("used", node_capacity - measured_free) summed over nodes
PANELS: list[dict[str, Any]] = [
    {
        "title": "Chats ended per second, by outcome",
        "unit": "reqps",
        "series": [
            (
                "{{outcome}}",
                f"sum by (outcome) (rate({P}_requests_total[1m]))",
                ("rate", f"{P}_requests_total", "outcome", 1.0),
            )
        ],
    },
    {
        "title": "Time to first token (arrival to first token, queue and load included)",
        "unit": "s",
        "series": [
            (
                "p50",
                hq(0.5, "time_to_first_token_seconds"),
                ("quantile", f"{P}_time_to_first_token_seconds_bucket", 0.5),
            ),
            (
                "p95",
                hq(0.95, "time_to_first_token_seconds"),
                ("quantile", f"{P}_time_to_first_token_seconds_bucket", 0.95),
            ),
        ],
    },
    {
        "title": "Requests waiting for memory, by model",
        "unit": "short",
        "series": [
            (
                "{{model}}",
                f"sum by (model) ({P}_queue_depth)",
                ("value", f"{P}_queue_depth", "model", {}),
            ),
            ("all", f"{P}_queue_depth_total", ("value", f"{P}_queue_depth_total", None, {})),
        ],
    },
    {
        "title": "Resident memory by model (ready copies, stacked)",
        "stack": True,
        "unit": "bytes",
        "series": [
            (
                "{{model}}",
                f'sum by (model) ({P}_resident_bytes{{state="ready"}})',
                ("value", f"{P}_resident_bytes", "model", {"state": "ready"}),
            ),
            (
                "capacity",
                f"sum({P}_node_capacity_bytes)",
                ("value", f"{P}_node_capacity_bytes", None, {}),
            ),
        ],
    },
    {
        "title": "Node memory: committed (evicting copies included) and measured used",
        "unit": "bytes",
        "series": [
            (
                "committed",
                f"sum({P}_node_committed_bytes)",
                ("value", f"{P}_node_committed_bytes", None, {}),
            ),
            (
                "measured used",
                f"sum({P}_node_capacity_bytes - {P}_node_measured_free_bytes)",
                ("used",),
            ),
        ],
    },
    {
        "title": "Loads and evictions per minute",
        "unit": "short",
        "series": [
            (
                "loads ({{reason}})",
                f"sum by (reason) (rate({P}_model_loads_total[1m])) * 60",
                ("rate", f"{P}_model_loads_total", "reason", 60.0),
            ),
            (
                "evictions ({{reason}})",
                f"sum by (reason) (rate({P}_model_evictions_total[1m])) * 60",
                ("rate", f"{P}_model_evictions_total", "reason", 60.0),
            ),
        ],
    },
    {
        "title": "Model load time",
        "unit": "s",
        "series": [
            (
                "p50",
                hq(0.5, "model_load_seconds", "5m"),
                ("quantile", f"{P}_model_load_seconds_bucket", 0.5),
            )
        ],
    },
    {
        "title": "Planner decisions per second",
        "unit": "short",
        "series": [
            (
                "{{decision}}",
                f"sum by (decision) (rate({P}_planner_decisions_total[1m]))",
                ("rate", f"{P}_planner_decisions_total", "decision", 1.0),
            )
        ],
    },
    {
        "title": "Planner decision time p95",
        "unit": "s",
        "series": [
            (
                "p95",
                hq(0.95, "planner_decision_seconds"),
                ("quantile", f"{P}_planner_decision_seconds_bucket", 0.95),
            )
        ],
    },
    {
        "title": "Tokens generated per second, by model",
        "unit": "short",
        "series": [
            (
                "{{model}}",
                f"sum by (model) (rate({P}_tokens_generated_total[1m]))",
                ("rate", f"{P}_tokens_generated_total", "model", 1.0),
            )
        ],
    },
    {
        "title": "Dead letters per minute, by consumer",
        "unit": "short",
        "series": [
            (
                "{{consumer}}",
                f"sum by (consumer) (rate({P}_dead_letters_total[5m])) * 60",
                ("rate", f"{P}_dead_letters_total", "consumer", 60.0),
            )
        ],
    },
    {
        "title": "Gateway HTTP requests per second, by status",
        "unit": "reqps",
        "series": [
            (
                "{{status}}",
                f"sum by (status) (rate({P}_gateway_http_requests_total[1m]))",
                ("rate", f"{P}_gateway_http_requests_total", "status", 1.0),
            )
        ],
    },
]


def grafana_json() -> dict[str, Any]:
    """The dashboard for Grafana (import it; pick the Prometheus data source at import)."""
    panels = []
    for i, panel in enumerate(PANELS):
        panels.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": panel["title"],
                "datasource": {"type": "prometheus", "uid": "${DS_PROMETHEUS}"},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {
                    "defaults": {
                        "unit": panel["unit"],
                        "custom": {
                            "stacking": {"mode": "normal" if panel.get("stack") else "none"}
                        },
                    },
                    "overrides": [],
                },
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [
                    {
                        "refId": chr(65 + j),
                        "expr": expr,
                        "legendFormat": legend,
                        "datasource": {"type": "prometheus", "uid": "${DS_PROMETHEUS}"},
                    }
                    for j, (legend, expr, _) in enumerate(panel["series"])
                ],
            }
        )
    return {
        "__inputs": [
            {
                "name": "DS_PROMETHEUS",
                "label": "Prometheus",
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            }
        ],
        "title": "Ollama Autoscaler",
        "uid": "ollama-autoscaler",
        "tags": ["ollama-autoscaler", "llm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "panels": panels,
    }


# -- evaluating the panels on scrapes ---------------------------------------------------------
Scrape = tuple[float, dict[tuple[str, tuple[tuple[str, str], ...]], float]]


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _sum_by(
    m: dict[Any, float], name: str, label: str | None, where: dict[str, str]
) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, labels), v in m.items():
        d = dict(labels)
        if n != name or any(d.get(k) != val for k, val in where.items()):
            continue
        key = d.get(label, "?") if label else ""
        out[key] = out.get(key, 0.0) + v
    return out


def evaluate(spec: tuple[Any, ...], old: Scrape, new: Scrape) -> dict[str, float]:
    """One series' values at `new` (rates over old..new), by its label."""
    (t0, m0), (t1, m1) = old, new
    kind = spec[0]
    if kind == "value":
        return _sum_by(m1, spec[1], spec[2], spec[3])
    if kind == "used":
        cap = _sum_by(m1, f"{P}_node_capacity_bytes", None, {}).get("", 0.0)
        free = _sum_by(m1, f"{P}_node_measured_free_bytes", None, {}).get("", 0.0)
        return {"": cap - free}
    dt = max(1e-9, t1 - t0)
    if kind == "rate":
        a, b = _sum_by(m0, spec[1], spec[2], {}), _sum_by(m1, spec[1], spec[2], {})
        return {k: max(0.0, v - a.get(k, 0.0)) / dt * spec[3] for k, v in b.items()}
    # quantile: the bucket counts' increase over the window, summed by le; linear within a bucket
    a, b = _sum_by(m0, spec[1], "le", {}), _sum_by(m1, spec[1], "le", {})
    buckets = sorted(((float(le), b[le] - a.get(le, 0.0)) for le in b), key=lambda x: x[0])
    if not buckets or buckets[-1][1] <= 0:
        return {}
    rank, prev_le, prev_n = spec[2] * buckets[-1][1], 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if le == float("inf"):
                return {"": prev_le}
            return {"": prev_le + (le - prev_le) * (rank - prev_n) / max(1e-9, n - prev_n)}
        prev_le, prev_n = le, n
    return {}


def plot(scrapes: list[Scrape], window_s: float, out_png: Path, out_csv: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = scrapes[0][0]
    rows = []
    cols = 2
    fig, axes = plt.subplots(
        (len(PANELS) + 1) // cols, cols, figsize=(15, 3.0 * len(PANELS) / cols)
    )
    for ax, panel in zip(axes.flat, PANELS, strict=False):
        for legend, _, spec in panel["series"]:
            lines: dict[str, list[tuple[float, float]]] = {}
            for i, new in enumerate(scrapes):
                windowed = spec[0] in ("rate", "quantile")
                if windowed and new[0] - start < window_s:
                    continue  # rates and quantiles over a full window only
                old = next((s for s in scrapes[: i + 1] if s[0] >= new[0] - window_s), scrapes[0])
                for key, v in evaluate(spec, old, new).items():
                    lines.setdefault(key, []).append((new[0] - start, v))
            scale = 1 / MIB if panel["unit"] == "bytes" else 1.0
            if panel.get("stack") and "{{" in legend and lines:  # one area per label, stacked
                times = sorted({t for pts in lines.values() for t, _ in pts})
                keys = sorted(lines)
                at = {k: dict(lines[k]) for k in keys}
                ax.stackplot(
                    times,
                    *[[at[k].get(t, 0.0) * scale for t in times] for k in keys],
                    labels=[re.sub(r"\{\{\w+\}\}", k, legend) for k in keys],
                    alpha=0.7,
                )
            for key, pts in sorted(lines.items()):
                name = re.sub(r"\{\{\w+\}\}", key, legend)
                if not (panel.get("stack") and "{{" in legend):
                    ax.plot([t for t, _ in pts], [v * scale for _, v in pts], label=name)
                rows.extend(
                    {"panel": panel["title"], "series": name, "t_s": round(t, 1), "value": v}
                    for t, v in pts
                )
        ax.set_title(panel["title"], fontsize=9)
        ax.set_ylabel(
            {"bytes": "MiB", "s": "s", "reqps": "per s"}.get(panel["unit"], ""), fontsize=8
        )
        ax.tick_params(labelsize=7)
        if ax.lines or ax.collections:
            ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(PANELS) :]:
        ax.axis("off")
    fig.suptitle(
        f"ollama-autoscaler gateway metrics, real traffic ({window_s:.0f} s windows); "
        "the panels of docs/grafana-dashboard.json",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    with out_csv.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["panel", "series", "t_s", "value"])
        w.writeheader()
        w.writerows(rows)


# -- the traffic --------------------------------------------------------------------------------
async def _client(
    http: httpx.AsyncClient, rng: random.Random, until: float, counts: dict[str, int]
) -> None:
    while time.monotonic() < until:
        model = rng.choices(MODELS, weights=(6, 3, 1))[0]
        if rng.random() < 0.03:
            model = "no-such-model"  # bad input: a 404 and a dead letter
        prompt = rng.choice(["Why is the sky blue?", "Name three rivers.", "What is rain?"])
        if rng.random() < 0.5:
            body: dict[str, Any] = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "options": {"num_predict": rng.randint(4, 24)},
                "stream": False,
            }
            path = "/api/chat"
        else:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": rng.randint(4, 24),
            }
            path = "/v1/chat/completions"
        try:
            r = await http.post(path, json=body)
            counts[str(r.status_code)] = counts.get(str(r.status_code), 0) + 1
        except httpx.HTTPError as exc:
            counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1
        await asyncio.sleep(rng.expovariate(2.0))


async def run(
    seconds: float, clients: int, window_s: float, out: Path, seed: int
) -> dict[str, int]:
    from functions.services import Settings
    from gateway.app import serve
    from stack.local import LocalStack, StackConfig

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="oa-dashboard-") as state:
        stack = LocalStack(
            StackConfig(
                state_dir=Path(state),
                nodes=1,
                node_memory=900 * MIB,
                models=MODELS,
                chat_model=None,
                nats_port=0,
                runtime_port=0,
                function_port=0,
                transport="inprocess",
                tick_s=1.0,
                settings=Settings(keep_alive_s=20.0),
            )
        )
        await stack.start(progress=True)
        served = await serve(stack.url_for("gateway"), "127.0.0.1:0", stack.ca)
        scrapes: list[Scrape] = []
        counts: dict[str, int] = {}
        try:
            async with httpx.AsyncClient(base_url=served.url, timeout=300) as http:
                stop = time.monotonic() + seconds

                async def scraper() -> None:
                    while True:
                        text = (await http.get("/metrics")).text
                        scrapes.append((time.time(), parse(text)))
                        await asyncio.sleep(1.0)

                scraping = asyncio.create_task(scraper())
                rng = random.Random(seed)
                await asyncio.gather(
                    *(
                        _client(http, random.Random(rng.random()), stop, counts)
                        for _ in range(clients)
                    )
                )
                await asyncio.sleep(2 * 1.0)  # the last scrapes see the last ends
                scraping.cancel()
        finally:
            await served.stop()
            await stack.stop()
    plot(scrapes, window_s, out / "dashboard.png", out / "dashboard.csv")
    return counts


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.ERROR)
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--window", type=float, default=15.0, help="rate window of the plot (s)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--write-json", action="store_true", help=f"write {DASHBOARD} and stop")
    args = ap.parse_args(argv)
    if args.write_json:
        DASHBOARD.write_text(json.dumps(grafana_json(), indent=2) + "\n")
        print(f"wrote {DASHBOARD} ({len(PANELS)} panels)")
        return 0
    counts = asyncio.run(run(args.seconds, args.clients, args.window, args.out, args.seed))
    by_status = dict(sorted(counts.items()))
    print(f"{sum(counts.values())} requests through the gateway, by status: {by_status}")
    print(f"wrote {args.out / 'dashboard.png'} and {args.out / 'dashboard.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
