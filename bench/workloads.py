"""Request streams from the real traces in shared/traces (see its PROVENANCE.md)."""

from __future__ import annotations

import csv
import random
from datetime import datetime
from pathlib import Path

from .catalog import CatalogModel, traces_dir
from .sim import Request


def azure_code(path: Path | None = None) -> list[tuple[float, int, int]]:
    """(seconds since the first request, prompt tokens, output tokens) of the Azure 2023 code
    trace (Patel et al., Splitwise, ISCA 2024; CC-BY 4.0)."""
    path = path or traces_dir() / "azure_llm_2023_code.csv"
    rows = []
    with path.open() as fh:
        for r in csv.DictReader(fh):
            ts = datetime.strptime(r["TIMESTAMP"][:26], "%Y-%m-%d %H:%M:%S.%f").timestamp()
            rows.append((ts, int(r["ContextTokens"]), int(r["GeneratedTokens"])))
    t0 = rows[0][0]
    return [(t - t0, p, g) for t, p, g in rows]


def zipf_models(
    models: list[CatalogModel],
    alpha: float,
    rng: random.Random,
) -> tuple[list[str], list[float]]:
    """A random popularity order over the catalog and Zipf(alpha) weights for it."""
    names = [m.name for m in models]
    rng.shuffle(names)
    weights = [1.0 / (rank + 1) ** alpha for rank in range(len(names))]
    return names, weights


def azure_zipf(
    models: list[CatalogModel], alpha: float, seed: int, limit: int | None = None
) -> list[Request]:
    rng = random.Random(seed)
    names, weights = zipf_models(models, alpha, rng)
    arrivals = azure_code()[:limit] if limit else azure_code()
    picks = rng.choices(names, weights, k=len(arrivals))
    return [
        Request(i, t, m, p, g) for i, ((t, p, g), m) in enumerate(zip(arrivals, picks, strict=True))
    ]
