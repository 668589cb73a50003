"""The offline lower bound on load cost: the flow relaxation of optimal caching with variable
object sizes (FOO-L; Berger, Beckmann & Harchol-Balter, "Practical Bounds on Optimal Caching
with Variable Object Sizes", SIGMETRICS 2018).

Requests in arrival order are nodes 0..N-1. For every pair of consecutive requests (i, j) of
one model, `size` units of flow leave i and arrive at j, either along the central path
i -> i+1 -> ... -> j (the model stays resident; every central edge has capacity C, the pooled
memory) or along an outer edge i -> j (the model is reloaded for j, cost = its load time,
charged per unit of size). The minimum-cost flow is a lower bound on the load-seconds of any
policy, plus one compulsory load per model. It assumes: requests are served in arrival order
and instantaneously (no model is pinned by in-flight work), memory is pooled across GPUs (no
fragmentation), loads are free of queueing, and a request may be served without its model
occupying memory (FOO's interval model: only the gaps between requests hold memory). Solved as an LP with HiGHS (scipy): the flow
LP is exact for this network, scipy is a well-kept dependency, and it needs no integer scaling.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

from .sim import Request

GB = 1e9


def lower_bound(
    requests: list[Request],
    capacity_bytes: int,
    size: Callable[[str], int],
    load_seconds: Callable[[str], float],
) -> tuple[float, int]:
    """(lower bound on load-seconds, compulsory loads)."""
    reqs = sorted(requests, key=lambda r: (r.t, r.id))
    n = len(reqs)
    last: dict[str, int] = {}
    intervals: list[tuple[int, int, float, float]] = []  # (i, j, size GB, cost per GB)
    compulsory_s = 0.0
    for idx, r in enumerate(reqs):
        if r.model in last:
            s = size(r.model) / GB
            intervals.append((last[r.model], idx, s, load_seconds(r.model) / s))
        else:
            compulsory_s += load_seconds(r.model)
        last[r.model] = idx
    if not intervals:
        return compulsory_s, len(last)
    k = len(intervals)
    # Variables: central edges t -> t+1 (n-1), then outer edges (k).
    rows, cols, vals = [], [], []
    for t in range(n - 1):
        rows += [t, t + 1]
        cols += [t, t]
        vals += [-1.0, 1.0]  # leaves t, enters t+1
    for e, (i, j, _, _) in enumerate(intervals):
        rows += [i, j]
        cols += [n - 1 + e, n - 1 + e]
        vals += [-1.0, 1.0]
    a_eq = coo_matrix((vals, (rows, cols)), shape=(n, n - 1 + k)).tocsr()
    b_eq = np.zeros(n)
    for i, j, s, _ in intervals:
        b_eq[i] -= s  # supply at i ...
        b_eq[j] += s  # ... delivered at j
    cost = np.concatenate([np.zeros(n - 1), [c for *_, c in intervals]])
    bounds = [(0, capacity_bytes / GB)] * (n - 1) + [(0, s) for _, _, s, _ in intervals]
    res = linprog(cost, A_eq=a_eq, b_eq=b_eq, bounds=bounds, method="highs")
    if res.status != 0:
        raise RuntimeError(f"lower-bound LP failed: {res.message}")
    return float(res.fun) + compulsory_s, len(last)
