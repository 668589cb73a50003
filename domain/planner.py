"""The placement planner: where a model goes and which idle models make room. Pure, no I/O.

The eviction set on a node is a minimum-cost subset of its evictable models whose bytes cover
the shortfall (a covering knapsack), solved exactly by branch and bound with the LP
(fractional) bound. Costs are integers so that "equal" means equal; ties are broken the same
way by every policy and by the brute-force oracle in the tests (see `tie_key`):
    (policy cost, number of victims, bytes freed, a bitmask of victim names).

Policies:
  fewest - the seed's rule: fewest models, then least bytes freed.
  lru    - never evict a more recently used model when older ones would do
           (cost 2**recency_rank, so one newer victim outweighs all older ones together).
  cost   - default: expected reload cost = load time x probability of reuse within the
           keep-alive horizon, from each model's decayed request rate; plus admission
           (rent-or-buy): a load that must evict waits until the requests queued for the
           model have waited, together, ADMIT_RATIO x the victims' expected reload cost,
           with each request's own deferral bounded (a crowd's first waiter by
           CROWD_WAIT_RATIO x that cost, any waiter by OWN_LOAD_RATIO x its own model's load
           time). Requests for a cold model then share one load instead of each evicting a
           warm one; nobody waits forever (see `admission`).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Literal

from .state import NodeRecord, Slot, decayed_rate

Policy = Literal["fewest", "lru", "cost"]
POLICIES: tuple[Policy, ...] = ("fewest", "lru", "cost")

# Load-time model when a model has never been loaded on the node: fixed start + bytes/bandwidth.
LOAD_FIXED_MS = 300.0
LOAD_BYTES_PER_MS = 1.0e6  # 1 GB/s
REUSE_HORIZON_S = 60.0
RECENCY_PRIOR = 0.1
# Admission (policy `cost`), chosen on the tuning half of `make bench-sched` (README):
ADMIT_RATIO = 8.0  # evict once the model's waiters have waited, summed, this x the reload
CROWD_WAIT_RATIO = 4.0  # ... or once a crowd's (2+) oldest waiter has waited this x the reload
OWN_LOAD_RATIO = 6.0  # ... or once the oldest has waited this x the model's own load time
HEARTBEAT_STALE_S = 30.0
TAIL_STEP = 8  # the cardinality bound sorts the remaining items every TAIL_STEP positions


@dataclass(frozen=True, slots=True)
class Candidate:
    """An evictable resident model and what evicting it costs under the policy."""

    name: str
    bytes: int
    cost: int


@dataclass(frozen=True, slots=True)
class Placement:
    node_id: str
    model: str
    bytes: int
    evict: tuple[str, ...] = ()
    cost: int = 0


@dataclass(frozen=True, slots=True)
class Queue:
    """Nothing can be freed now (wait for an active model to finish), or the load is
    deferred by admission: `retry_s` says when the deferral ends if nothing else changes."""

    reason: str
    retry_s: float | None = None


@dataclass(frozen=True, slots=True)
class Reject:
    """The request can never be placed (bigger than every node, or no node serves the
    model); do not wait. `code` is the chat.failed error code."""

    reason: str
    code: str = "model_too_large"


@dataclass(frozen=True, slots=True)
class PlanRequest:
    model: str
    bytes: int
    reserved: frozenset[str] = field(default_factory=frozenset)  # needed by queued requests
    # Admission (policy `cost`): the seconds that the requests waiting for this model have
    # waited in total, and how many they are. inf = admit now (explicit loads, tests).
    waited_s: float = math.inf
    waiting: int = 1
    # The longest wait among them (None: not known; taken as waited_s / waiting, the mean,
    # which is a lower bound on it).
    oldest_s: float | None = None


def estimate_load_ms(nbytes: int, measured_ms: float | None = None) -> float:
    if measured_ms is not None:
        return measured_ms
    return LOAD_FIXED_MS + nbytes / LOAD_BYTES_PER_MS


def reuse_rate(slot: Slot, now: float) -> float:
    """Expected requests/s: the decayed observed rate plus a weak recency prior (one request
    per idle age, scaled down), so a model that was just loaded or used is not the first
    victim merely because it has no history yet."""
    idle = max(0.0, now - slot.last_used)
    return decayed_rate(slot, now) + RECENCY_PRIOR / (idle + REUSE_HORIZON_S)


def evictable(node: NodeRecord, reserved: Iterable[str] = ()) -> list[str]:
    """Ready, idle, not pinned, not needed by a queued request."""
    res = set(reserved)
    return sorted(
        name
        for name, s in node.models.items()
        if s.state == "ready" and not s.leases and not s.pinned and name not in res
    )


def candidates(
    node: NodeRecord, policy: Policy, now: float, reserved: Iterable[str] = ()
) -> list[Candidate]:
    names = evictable(node, reserved)
    if policy == "fewest":
        return [Candidate(n, node.models[n].bytes, 0) for n in names]
    if policy == "lru":
        by_age = sorted(names, key=lambda n: (node.models[n].last_used, n))
        return [Candidate(n, node.models[n].bytes, 1 << rank) for rank, n in enumerate(by_age)]
    if policy == "cost":
        out = []
        for n in names:
            slot = node.models[n]
            p_reuse = 1.0 - math.exp(-reuse_rate(slot, now) * REUSE_HORIZON_S)
            load_ms = estimate_load_ms(slot.bytes, slot.load_ms)
            out.append(Candidate(n, slot.bytes, round(load_ms * p_reuse * 1000)))
        return out
    raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")


def tie_key(chosen: Sequence[Candidate], all_names: Sequence[str]) -> tuple[int, int, int, int]:
    """The order every policy minimises: cost, count, bytes, then a name bitmask.

    The last term is sum(2**rank(name)) over the victims, ranks from the sorted names of all
    candidates: among sets equal in everything else, keep the models whose names sort last.
    It makes the optimum unique, so the solver never has to explore ties.
    """
    rank = {name: r for r, name in enumerate(sorted(all_names))}
    return (
        sum(c.cost for c in chosen),
        len(chosen),
        sum(c.bytes for c in chosen),
        sum(1 << rank[c.name] for c in chosen),
    )


def min_cost_cover(cands: Sequence[Candidate], shortfall: int) -> tuple[Candidate, ...] | None:
    """Exact minimum of `tie_key` over subsets whose bytes cover `shortfall`.

    Returns () when nothing is short, None when even all candidates do not cover it.
    One integer weight per item folds the whole key in. A greedy cover is the incumbent; a
    reduction fixes the items that the LP bound says no better cover can flip; branch and
    bound searches the rest with the Martello-Toth bound, a cardinality bound and dominance,
    all in exact integers. (bench/planner.py times it against the brute force.)
    """
    if shortfall <= 0:
        return ()
    names = sorted(c.name for c in cands)
    useful = sorted((c for c in cands if c.bytes > 0), key=lambda c: c.name)
    total = sum(c.bytes for c in useful)
    if total < shortfall:
        return None
    n = len(cands)
    rank = {name: r for r, name in enumerate(names)}
    # weight = ((cost*(n+1) + 1)*(total+1) + bytes) * 2**n + 2**rank: lexicographic in
    # (cost, count, bytes, bitmask) because count <= n, bytes <= total, bitmask < 2**n.
    weight = {
        c.name: (((c.cost * (n + 1) + 1) * (total + 1) + c.bytes) << n) + (1 << rank[c.name])
        for c in useful
    }

    # Ratio order (weight per byte), exact: two different ratios w/b differ by at least
    # 1/(b*b'), more than 2**-shift, so floor(w * 2**shift / b) never ties them.
    shift = 2 * max(c.bytes for c in useful).bit_length() + 2
    items = sorted(useful, key=lambda c: ((weight[c.name] << shift) // c.bytes, c.name))
    w = [weight[c.name] for c in items]
    b = [c.bytes for c in items]

    # A good incumbent first: greedy in ratio order, then drop what the cover does not need
    # (dearest first). Any cover is a valid start; a tight one prunes most of the tree.
    greedy: list[int] = []
    need = shortfall
    for i in range(len(items)):
        if need <= 0:
            break
        greedy.append(i)
        need -= b[i]
    for i in sorted(greedy, key=lambda i: -w[i]):
        if need + b[i] <= 0:
            greedy.remove(i)
            need += b[i]
    best_w = sum(w[i] for i in greedy)
    costs = [c.cost for c in items]
    bits = [1 << rank[c.name] for c in items]
    # Reduction, then an exact search over the items it leaves free.
    fixed = _reduce(w, b, shortfall, best_w)
    free = [i for i in range(len(items)) if fixed[i] == 0]
    taken_in = [i for i in range(len(items)) if fixed[i] > 0]
    need = shortfall - sum(b[i] for i in taken_in)
    acc = sum(w[i] for i in taken_in)
    found = _search(
        [w[i] for i in free],
        [b[i] for i in free],
        [costs[i] for i in free],
        [bits[i] for i in free],
        need,
        acc,
        best_w,
        n,
        total,
    )
    best = greedy if found is None else taken_in + [free[k] for k in found]
    return tuple(sorted((items[i] for i in best), key=lambda c: c.name))


def _reduce(w: list[int], b: list[int], need: int, incumbent: int) -> list[int]:
    """Fix items before the search (Dembo and Hammer's reduction): +1 must be taken, -1
    must be left, 0 free. In ratio order the LP takes items[:p] whole, p the critical item.
    If the LP bound with item j flipped (left out for j < p, forced in for j > p) cannot
    beat the incumbent, no better cover flips j."""
    m = len(b)
    pre_b = list(accumulate(b, initial=0))
    pre_w = list(accumulate(w, initial=0))
    out = [0] * m
    p = bisect_left(pre_b, need) - 1
    for j in range(m):
        if j < p:
            q = bisect_left(pre_b, need + b[j]) - 1  # critical item without j (q > j)
            if q >= m:
                out[j] = 1  # nothing covers without j
                continue
            lb = pre_w[q] - w[j] + w[q] * (need + b[j] - pre_b[q]) // b[q]
            if lb >= incumbent:
                out[j] = 1
        elif j > p:
            rest = need - b[j]
            lb = w[j]
            if rest > 0:
                q = bisect_left(pre_b, rest) - 1  # critical item for the rest (q < j)
                lb += pre_w[q] + w[q] * (rest - pre_b[q]) // b[q]
            if lb >= incumbent:
                out[j] = -1
    return out


def _search(
    w: list[int],
    b: list[int],
    costs: list[int],
    bits: list[int],
    need: int,
    acc0: int,
    incumbent: int,
    n: int,
    total: int,
) -> list[int] | None:
    """Branch and bound over items in ratio order: the indices of the least-weight cover of
    `need` (plus `acc0` already taken) if it weighs less than `incumbent`, else None."""
    if need <= 0:
        return [] if acc0 < incumbent else None
    m = len(b)
    pre_b = list(accumulate(b, initial=0))
    pre_w = list(accumulate(w, initial=0))
    suffix = [pre_b[m] - pre_b[k] for k in range(m + 1)]
    tails: dict[int, tuple[list[int], list[int], list[int], list[int]]] = {}

    def count_bound(k: int, need: int) -> int:
        """A lower bound on the weight any cover of `need` from items[k:] adds.

        It takes at least kmin items (largest first); any j >= kmin of them cost, weigh and
        name-sum at least the kmin smallest of each, and cover at least `need` bytes.
        """
        k -= k % TAIL_STEP  # items[k:] only grows: still a valid bound, sorted less often
        tail = tails.get(k)
        if tail is None:
            tail = (
                list(accumulate(sorted(b[k:], reverse=True), initial=0)),
                list(accumulate(sorted(b[k:]), initial=0)),
                list(accumulate(sorted(costs[k:]), initial=0)),
                list(accumulate(sorted(bits[k:]), initial=0)),
            )
            tails[k] = tail
        largest, smallest, cheapest, lowest = tail
        kmin = bisect_left(largest, need)
        nbytes = max(need, smallest[kmin])
        return ((((cheapest[kmin] * (n + 1)) + kmin) * (total + 1) + nbytes) << n) + lowest[kmin]

    def bound(k: int, need: int) -> int:
        """A lower bound over items[k:], at least the LP one. Items k..p-1 in ratio order
        are taken whole and item p (critical) completes the cover. The LP takes a fraction
        of p; an integer cover either leaves p out (the rest of the need at p+1's ratio or
        worse) or takes it whole (the overshoot given back at most at p-1's ratio): the
        smaller of those two (Martello and Toth's bound, for covering) is still valid."""
        p = bisect_left(pre_b, pre_b[k] + need) - 1  # items[k:p] are taken whole
        if p >= m:
            return pre_w[m] - pre_w[k]
        whole = pre_w[p] - pre_w[k]
        left = need - (pre_b[p] - pre_b[k])
        with_p = whole + w[p]
        if p > k:
            with_p -= -(-(b[p] - left) * w[p - 1] // b[p - 1])  # ceil of what it gives back
        if p + 1 < m:
            return min(with_p, whole + w[p + 1] * left // b[p + 1])
        return with_p

    # Dominance: if model j frees at least the bytes of model i and weighs no more, a cover
    # never needs i without j (swapping i for j keeps the cover and lowers the weight). Such a
    # j precedes i in ratio order, so when the search reaches i, j is already decided: take i
    # only if every j that dominates it was taken. (Same size, cheaper: the common case.)
    dominators = [[j for j in range(i) if b[j] >= b[i] and w[j] <= w[i]] for i in range(m)]
    taken = [False] * m
    chosen: list[int] = []
    best_w, best = incumbent, None

    def dfs(k: int, need: int, acc: int) -> None:
        nonlocal best_w, best
        if need <= 0:
            if acc < best_w:
                best_w, best = acc, list(chosen)
            return
        if k == m or suffix[k] < need:
            return
        if acc + bound(k, need) >= best_w or acc + count_bound(k, need) >= best_w:
            return
        dom = dominators[k]
        if not dom or all(taken[j] for j in dom):
            chosen.append(k)
            taken[k] = True
            dfs(k + 1, need - b[k], acc + w[k])
            taken[k] = False
            chosen.pop()
        dfs(k + 1, need, acc)

    dfs(0, need, acc0)
    return best


def node_is_live(node: NodeRecord, now: float) -> bool:
    return now - node.heartbeat_at <= HEARTBEAT_STALE_S


def node_takes_work(node: NodeRecord, now: float) -> bool:
    """Live and not draining: new leases, loads and pulls may go there."""
    return node_is_live(node, now) and not node.draining


def plan(
    req: PlanRequest, nodes: Sequence[NodeRecord], now: float, policy: Policy = "cost"
) -> Placement | Queue | Reject:
    """Choose a node and a minimum-cost eviction set for `req`, or say why it must wait.

    Never evicts a model that is loading, evicting, leased (active), pinned or reserved.
    """
    live = [n for n in nodes if node_takes_work(n, now)]
    if not live:
        return Queue(
            "every live node is draining (scaling down)"
            if any(node_is_live(n, now) for n in nodes)
            else f"no live node: no heartbeat within {HEARTBEAT_STALE_S:.0f}s"
            if nodes
            else "no node registered yet"
        )
    if all(req.bytes > n.capacity_bytes for n in live):
        biggest = max(n.capacity_bytes for n in live)
        return Reject(
            f"{req.model} needs {req.bytes / 2**30:.2f} GiB ({req.bytes} bytes); the largest "
            f"node has {biggest / 2**30:.2f} GiB: add a bigger node or use a smaller quant"
        )
    best: tuple[tuple[int, int, int, int, str], Placement] | None = None
    for node in live:
        if req.model in node.models:
            continue  # already loading/ready/evicting there: the caller waits on that slot
        shortfall = req.bytes - node.free_bytes()
        cands = candidates(node, policy, now, req.reserved)
        chosen = min_cost_cover(cands, shortfall)
        if chosen is None:
            continue
        cost, count, freed, _ = tie_key(chosen, [c.name for c in cands])
        free_after = node.free_bytes() + freed - req.bytes
        key = (cost, count, freed, -free_after, node.node_id)
        if best is None or key < best[0]:
            best = (
                key,
                Placement(node.node_id, req.model, req.bytes, tuple(c.name for c in chosen), cost),
            )
    if best is None:
        return Queue(
            f"no node can free {req.bytes} bytes for {req.model} now: "
            "the resident models are active, loading or pinned"
        )
    placement = best[1]
    if policy == "cost" and placement.evict:
        deferred = admission(req, placement)
        if deferred is not None:
            return deferred
    return placement


def admission(req: PlanRequest, placement: Placement) -> Queue | None:
    """Rent or buy, with each request's deferral bounded by what its own waiting costs.

    Buying (evicting) costs R, the victims' expected reload seconds; renting (deferring) costs
    the waiting requests their time. The load goes ahead as soon as
      - the model's waiters together have waited ADMIT_RATIO x R (a crowd, or a long-waiting
        lone request, has paid for the eviction), or
      - they are a crowd (2 or more) and the oldest has waited CROWD_WAIT_RATIO x R: the first
        of a crowd does not wait out the whole rent alone, or
      - the oldest has waited OWN_LOAD_RATIO x the requested model's own load time: a request
        for a model that loads in 2 s never waits a minute to spare a 40 s reload.
    Until then, defer; `retry_s` is when the first of these is reached if nothing changes."""
    reload_s = placement.cost / 1e6  # candidate costs are load ms x p(reuse) x 1000
    k = max(1, req.waiting)
    oldest = req.oldest_s if req.oldest_s is not None else req.waited_s / k
    own_s = estimate_load_ms(req.bytes) / 1000
    cap_s = OWN_LOAD_RATIO * own_s
    if k >= 2:
        cap_s = min(cap_s, CROWD_WAIT_RATIO * reload_s)
    crowd_left = ADMIT_RATIO * reload_s - req.waited_s
    own_left = cap_s - oldest
    if crowd_left <= 1e-3 or own_left <= 1e-3:  # a millisecond's slack: no retry storm
        return None
    retry_s = min(crowd_left / k, own_left)
    return Queue(
        f"deferred: loading {req.model} now would evict {', '.join(placement.evict)} "
        f"(expected reload {reload_s:.1f}s); waiting {retry_s:.1f}s more so that requests "
        f"for {req.model} share one load",
        retry_s=retry_s,
    )
