"""Request streams from the real traces in shared/traces (see its PROVENANCE.md)."""

from __future__ import annotations

import csv
import math
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


def servegen(
    models: list[CatalogModel],
    seed: int,
    source: str = "m-mid",
    start_s: float = 72_000,
    hours: float = 1.0,
    target_rps: float = 2.5,
) -> tuple[list[Request], float]:
    """Arrivals generated from ServeGen's per-client, per-window fits (Xiang et al.,
    arXiv:2505.09999; Apache-2.0): in each 10-minute window, each client's inter-arrival times
    are drawn from its fitted Gamma/Weibull (shape, scale) and rescaled to the window's rate, as
    ServeGen's own generator does. Rates are scaled by one factor so the mean aggregate rate is
    `target_rps` (returned). Each client is mapped to one catalog model at random; token counts
    are drawn from the Azure code trace (ServeGen's length distributions are not in the data).
    Default segment: 20:00-21:00 of day 1, the one ServeGen's README uses."""
    import numpy as np

    path = traces_dir() / "servegen" / f"servegen_{source}_clients.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: ServeGen traces live in shared/traces (set OA_TRACES)"
        )
    end_s = start_s + hours * 3600
    with path.open() as fh:
        rows = [r for r in csv.DictReader(fh) if start_s <= float(r["window_start_s"]) < end_s]
    mean_rps = sum(float(r["rate_rps"]) for r in rows) * 600 / (hours * 3600)
    factor = target_rps / mean_rps
    rng = random.Random(seed)
    gen = np.random.default_rng(seed)
    names = [m.name for m in models]
    client_model: dict[str, str] = {}
    tokens = azure_code()
    arrivals: list[tuple[float, str]] = []
    for r in rows:
        rate = float(r["rate_rps"]) * factor
        if rate <= 0:
            continue
        client = r["client_id"]
        model = client_model.setdefault(client, rng.choice(names))
        shape, scale = float(r["iat_shape"] or 1), float(r["iat_scale"] or 1)
        if r["iat_dist"] == "Weibull":
            mean = scale * math.gamma(1 + 1 / shape)
            draw = lambda n, s=shape, c=scale: c * gen.weibull(s, n)  # noqa: E731
        else:  # Gamma (and the rare empty fit): mean = shape x scale
            mean = shape * scale
            draw = lambda n, s=shape, c=scale: gen.gamma(s, c, n)  # noqa: E731
        w0 = float(r["window_start_s"])
        t = w0 + float(draw(1)[0]) / mean / rate
        while t < w0 + 600:
            arrivals.append((t - start_s, model))
            t += float(draw(1)[0]) / mean / rate
    arrivals.sort()
    picks = [tokens[rng.randrange(len(tokens))] for _ in arrivals]
    reqs = [
        Request(i, t, m, p, g)
        for i, ((t, m), (_, p, g)) in enumerate(zip(arrivals, picks, strict=True))
    ]
    return reqs, factor
