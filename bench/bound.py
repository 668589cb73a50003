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
fragmentation) and loads are free of queueing. Plain FOO-L also lets a request be served
without its model occupying memory; by default we add the constraint that it does (see
`lower_bound`), which keeps the bound valid and makes it tighter. Solved as an LP with HiGHS
(scipy): the LP is exact for this network, scipy is a well-kept dependency, and it needs no
integer scaling.
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
    resident_at_request: bool = True,
) -> tuple[float, int]:
    """(lower bound on load-seconds, compulsory loads).

    With `resident_at_request` (default), the bound also requires every request's model to be
    in memory at its own request, as any real server does: at request t, the models cached
    across t plus the requested one fit in C. With central edge flow e_t (t -> t+1) and y_t the
    outer (reload) flow of the interval that starts at t, that is e_t + y_t <= C, or
    e_t <= C - size(model_t) when the model is not requested again. It stays a lower bound and
    is tighter than plain FOO-L, which lets a request bypass memory.
    """
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
    cap = capacity_bytes / GB
    bounds = [(0.0, cap)] * (n - 1) + [(0.0, s) for _, _, s, _ in intervals]
    a_ub, b_ub = None, None
    if resident_at_request:
        starts = {i: e for e, (i, _, _, _) in enumerate(intervals)}
        urows, ucols, uvals = [], [], []
        for t in range(n - 1):
            if t in starts:
                urows += [t, t]
                ucols += [t, n - 1 + starts[t]]
                uvals += [1.0, 1.0]
            else:
                bounds[t] = (0.0, max(0.0, cap - size(reqs[t].model) / GB))
        a_ub = coo_matrix((uvals, (urows, ucols)), shape=(n - 1, n - 1 + k)).tocsr()
        b_ub = np.full(n - 1, cap)
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=bounds, method="highs")
    if res.status != 0:
        raise RuntimeError(f"lower-bound LP failed: {res.message}")
    return float(res.fun) + compulsory_s, len(last)
