"""The placement planner: where a model goes and which idle models make room. Pure, no I/O.

The eviction set on a node is a minimum-cost subset of its evictable models whose bytes cover
the shortfall (a covering knapsack), solved exactly by a dynamic programme over a core of
items that grows outward from the LP's critical item, with LP bounds and dominance (see
`_search`); a state budget bounds it, and `solve_cover` says when an answer is not proven
optimal (in practice only `fewest`'s subset-sum-like bytes tie-break at large n). Costs are
integers so that "equal" means equal; ties are broken the same way by every policy and by the
brute-force oracle in the tests (see `tie_key`):
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
from itertools import accumulate, pairwise
from operator import attrgetter, le
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


# The solver's budget: states looked at before each step keeps only the BEAM of least bound.
STATE_BUDGET = 100_000
BEAM = 256


@dataclass(frozen=True, slots=True)
class Cover:
    """`solve_cover`'s answer. `proven`: it is the exact minimum of `tie_key`, as always unless
    the search ran out of its state budget (STATE_BUDGET); then `floor` is a proven lower bound
    on the optimum's (cost, count, bytes), lexicographic: no cover's key is below it."""

    chosen: tuple[Candidate, ...] | None
    proven: bool = True
    floor: tuple[int, int, int] | None = None


def min_cost_cover(cands: Sequence[Candidate], shortfall: int) -> tuple[Candidate, ...] | None:
    """The minimum of `tie_key` over subsets whose bytes cover `shortfall` (exact unless the
    state budget runs out: see `solve_cover`).

    Returns () when nothing is short, None when even all candidates do not cover it.
    """
    return solve_cover(cands, shortfall).chosen


def solve_cover(cands: Sequence[Candidate], shortfall: int) -> Cover:
    """`min_cost_cover` with its proof status.

    One integer weight per item folds the whole key in. A greedy cover is the incumbent; then
    an exact dynamic programme over a core that grows outward from the LP's critical item
    (`_search`), all in exact integers. (bench/planner.py times it against the brute force
    and against the previous branch and bound, bench/planner_v1.py.)
    """
    if shortfall <= 0:
        return Cover(())
    by_name = sorted(cands, key=attrgetter("name"))  # position = rank of the name
    useful = [r for r, c in enumerate(by_name) if c.bytes > 0]
    sizes = [by_name[r].bytes for r in useful]
    total = sum(sizes)
    if total < shortfall:
        return Cover(None)
    n = len(cands)
    # weight = ((cost*(n+1) + 1)*(total+1) + bytes) * 2**n + 2**rank: lexicographic in
    # (cost, count, bytes, bitmask) because count <= n, bytes <= total, bitmask < 2**n.
    n1, scale = n + 1, total + 1
    weights = [
        (((by_name[r].cost * n1 + 1) * scale + by_name[r].bytes) << n) + (1 << r) for r in useful
    ]
    order, ratio = _ratio_order(weights, sizes)
    w = [weights[i] for i in order]
    b = [sizes[i] for i in order]
    pre_b = list(accumulate(b, initial=0))
    pre_w = list(accumulate(w, initial=0))

    # A good incumbent first: greedy in ratio order, then drop what the cover does not need
    # (dearest first). Any cover is a valid start; a tight one prunes most of the tree.
    k = bisect_left(pre_b, shortfall)  # items[:k] cover, items[:k-1] do not
    need = shortfall - pre_b[k]
    greedy = list(range(k))
    if -need >= min(b[:k]):  # something can go
        for i in sorted(greedy, key=w.__getitem__, reverse=True):
            if need + b[i] <= 0:
                greedy.remove(i)
                need += b[i]
    best_w = pre_w[k] if len(greedy) == k else sum(w[i] for i in greedy)
    # Another: the items before the critical one, then from the critical one on each item
    # that fits in what is left to cover, and the cheapest single item that covers the rest.
    left = shortfall - pre_b[k - 1]
    fill, fill_w, finish = list(range(k - 1)), pre_w[k - 1], -1
    for j in range(k - 1, len(b)):
        if b[j] < left:
            fill.append(j)
            fill_w += w[j]
            left -= b[j]
        elif finish < 0 or w[j] < w[finish]:
            finish = j
    if finish >= 0:
        fill.append(finish)
        fill_w += w[finish]
        extra = b[finish] - left
        if extra >= min(b[i] for i in fill):  # something can go
            for i in sorted(fill, key=w.__getitem__, reverse=True):
                if b[i] <= extra:
                    fill.remove(i)
                    fill_w -= w[i]
                    extra -= b[i]
        if fill_w < best_w:
            greedy, best_w = fill, fill_w
    found, floor_w = _search(w, b, pre_b, pre_w, shortfall, best_w, ratio)
    best = greedy if found is None else found
    chosen = tuple(by_name[r] for r in sorted(useful[order[i]] for i in best))
    if floor_w is None:
        return Cover(chosen)
    # The floor weight in the same mixed radix: (cost, count, bytes) that no cover is below.
    # Raised to (that cost, the fewest models that can cover, the shortfall), also a floor:
    # a cover of that cost has at least so many models and frees at least the shortfall.
    q, nbytes = divmod(floor_w >> n, scale)
    cost, count = divmod(q, n1)
    fewest = bisect_left(list(accumulate(sorted(sizes, reverse=True))), shortfall) + 1
    floor = max((cost, count, nbytes), (cost, fewest, shortfall))
    return Cover(chosen, proven=False, floor=floor)


def _ratio_order(w: list[int], b: list[int]) -> tuple[list[int], list[float]]:
    """Indices in ascending weight-per-byte order, exactly (the LP bounds depend on it), and
    the ratios in that order as floats (approximate).

    Sorted by the float ratio (int / int is correctly rounded: a relative error of at most
    2**-53 each), so where two floats differ by more than 2**-50 of their size the order is
    exact; the pairs closer than that are checked exactly (w1*b2 <= w2*b1). If one is
    misordered, all are sorted again by an exact key: two different ratios w/b differ by at
    least 1/(b*b'), more than 2**-shift, so floor(w * 2**shift / b) never ties them. (Equal
    ratios may go in either order.)
    """
    m = len(w)
    sh = max(0, max(w).bit_length() - 1000)  # a float holds the ratio of what is left
    ratio = [(x >> sh) / y for x, y in zip(w, b, strict=True)]
    order = sorted(range(m), key=ratio.__getitem__)
    ordered = [ratio[i] for i in order]
    grow = 1.0 + 2.0**-50  # (a neighbour at most this much above may be misordered)
    if sh or (
        any(map(le, ordered[1:], [r * grow for r in ordered]))
        and not all(
            w[i] * b[j] <= w[j] * b[i] for i, j in pairwise(order) if ratio[j] <= ratio[i] * grow
        )
    ):
        shift = 2 * max(b).bit_length() + 2
        order = sorted(range(m), key=lambda i: (w[i] << shift) // b[i])
        ordered = [ratio[i] for i in order]
    return order, ordered


def _search(
    w: list[int],
    b: list[int],
    pre_b: list[int],
    pre_w: list[int],
    need: int,
    incumbent: int,
    ratio: list[float],
) -> tuple[list[int] | None, int | None]:
    """The indices of the least-weight cover of `need` from items in ratio order if it weighs
    less than `incumbent` (else None), and None if that is proven, else a proven lower bound
    on the least weight (the state budget ran out). `ratio`: each item's weight per byte,
    approximately (it only orders the work); `pre_b`, `pre_w`: the prefix sums of `b` and `w`.

    Pisinger's expanding-core idea, for covering: the LP solution takes items[:p] whole. A
    state fixes the core items[s:t] one way or the other and leaves the rest as the LP has them
    (below s taken, from t on left); each step adds one item to the core, on the side whose
    ratio is nearer the critical one's, and doubles the states (item flipped or not). A state
    is dropped when another covers at least as many bytes and weighs no more (its completions
    do no better), or when its LP bound cannot beat the incumbent; each state's LP solution
    rounded to a whole cover is tried as the incumbent. An item whose flip the LP bound rules
    out against the incumbent is never added to the core (Dembo and Hammer's reduction, tested
    as the incumbent improves). Dominance between items: a state takes an item only with every
    core item that frees at least as much and weighs no more, and gives one back only without
    any core item that frees no more and weighs more (a swap would do better). Weights are
    unique (the name bitmask), so the least-weight cover, and the answer, are unique.

    Budget: once STATE_BUDGET states have been looked at, each step keeps only the BEAM states
    of least bound; the least bound dropped is then the lower bound returned (exact again if
    the incumbent is at or below it). A subset-sum-like instance (equal costs, policy fewest,
    bytes the only tie-break) is where that happens: see `make bench-planner`.
    """
    m = len(b)
    p = bisect_left(pre_b, need) - 1  # the LP takes items[:p] whole; p is the critical item
    if p >= m:
        return None, None
    # A state is (need - bytes, weight, mask) for one assignment of the core items[s:t]; the
    # items below s are taken and those from t on are left, as in the LP solution. Sorted,
    # the states run from most bytes to fewest, the lightest first among equal bytes.
    states = [(need - pre_b[p], pre_w[p], (1 << p) - 1)]
    s = t = p
    best_w, best_mask = incumbent, -1
    twice_p = 2 * ratio[p]
    bp, wp = b[p], w[p]
    root_w, root_left = pre_w[p], need - pre_b[p]  # root LP = root_w + root_left * wp / bp
    bisect = bisect_left
    heaviest = pre_w[m] + 1  # more than any state weighs
    budget = STATE_BUDGET
    floor_w = heaviest  # the least bound of a state dropped for the budget
    core: list[int] = []
    while states and (s > 0 or t < m):
        # expand on the side whose next item's ratio is nearer the critical one's (in floats:
        # any order is exact, this one is quick)
        if t < m and (s == 0 or ratio[t] + ratio[s - 1] <= twice_p):
            j = t
            t += 1
            # Reduction (Dembo and Hammer) against the current incumbent: if the LP bound
            # with j forced in cannot beat it, no better cover takes j. First a quick test:
            # the LP's value is convex in the bytes, of slope w[p]/b[p] at `need`, so forcing
            # j in costs at least the root LP + b[j] * (w[j]/b[j] - w[p]/b[p]).
            if (root_w + w[j] - best_w) * bp + (root_left - b[j]) * wp >= 0:
                continue
            rest = need - b[j]
            lb = w[j]
            if rest > 0:
                q = bisect(pre_b, rest) - 1
                lb += pre_w[q] + w[q] * (rest - pre_b[q]) // b[q]
            if lb >= best_w:
                continue
            bt, wt, bit = b[j], w[j], 1 << j
            # never take j without a core item that frees as much and weighs no more
            dom = 0
            if len(states) > 8:
                for i in core:
                    if b[i] >= bt and w[i] <= wt:
                        dom |= 1 << i
            core.append(j)
            if dom:
                states += [(x - bt, y + wt, z | bit) for x, y, z in states if z & dom == dom]
            else:
                states += [(x - bt, y + wt, z | bit) for x, y, z in states]
        else:
            s -= 1
            j = s
            # ... and if the LP bound with j left out cannot beat it, every better cover takes j
            # (quick test: at least the root LP + b[j] * (w[p]/b[p] - w[j]/b[j]))
            if (root_w - w[j] - best_w) * bp + (root_left + b[j]) * wp >= 0:
                continue
            q = bisect(pre_b, need + b[j]) - 1
            if q >= m:
                continue
            lb = pre_w[q] - w[j] + w[q] * (need + b[j] - pre_b[q]) // b[q]
            if lb >= best_w:
                continue
            bt, wt, bit = b[j], w[j], 1 << j
            # never give j back while keeping a core item that frees no more and weighs more
            sub = 0
            if len(states) > 8:
                for i in core:
                    if b[i] <= bt and w[i] >= wt:
                        sub |= 1 << i
            core.append(j)
            if sub:
                states += [(x + bt, y - wt, z & ~bit) for x, y, z in states if not z & sub]
            else:
                states += [(x + bt, y - wt, z & ~bit) for x, y, z in states]
        states.sort()  # two sorted runs: a merge
        budget -= len(states)
        kept: list[tuple[int, int, int]] = []
        bounds = []  # each kept state's bound, once over budget
        keep, over = kept.append, budget < 0
        lightest = heaviest
        top_b, top_w = pre_b[s], pre_w[s]  # what the items below s give back at most
        base_b, base_w = pre_b[t], pre_w[t]  # items from t on are what can still be added
        b_out, w_out = (b[s - 1], w[s - 1]) if s else (0, 0)  # the next to give back
        b_in, w_in = (b[t], w[t]) if t < m else (0, 0)  # the next to add
        bit_in = 1 << t
        # Bounds are compared without dividing (division is the dear part):
        # base - a // d < best  <=>  base - best < 0 or a >= (base - best + 1) * d, and
        # base + a // d < best  <=>  a < (best - base) * d   (a >= 0, d > 0).
        for state in states:  # x = need - bytes: most bytes first
            x, y, z = state
            if y >= lightest:
                continue  # one with as many bytes or more weighs no more
            lightest = y
            if x <= 0:
                if y < best_w:
                    best_w, best_mask = y, z
                # LP: give back the dearest items below s, a fraction of the last one
                if -x < b_out:  # (the usual case: a fraction of the next one only)
                    base, num, den = y, -x * w_out, b_out
                else:
                    q = bisect(pre_b, top_b + x)
                    base = y - top_w + pre_w[q]
                    if q < s and base < best_w:  # giving back items[q:s] whole is a cover too
                        best_w, best_mask = base, z & ~((1 << s) - (1 << q))
                    if q:
                        num, den = (pre_b[q] - top_b - x) * w[q - 1], b[q - 1]
                    else:
                        num, den = 0, 1
                over_by = base - best_w
                if over_by >= 0 and num < (over_by + 1) * den:
                    continue
                if over:
                    bounds.append(base - num // den)
            else:
                if x <= b_in:  # LP: a fraction of the next item to add covers it
                    if y + w_in < best_w:  # adding it whole is a cover
                        best_w, best_mask = y + w_in, z | bit_in
                    base, num, den = y, x * w_in, b_in
                else:
                    # LP: add the cheapest items from t on, a fraction of the last one
                    q = bisect(pre_b, base_b + x) - 1
                    if q >= m:
                        continue
                    base = y + pre_w[q] - base_w
                    if base + w[q] < best_w:  # adding items[t:q+1] whole is a cover
                        best_w, best_mask = base + w[q], z | ((2 << q) - (1 << t))
                    num, den = (base_b + x - pre_b[q]) * w[q], b[q]
                if num >= (best_w - base) * den:
                    continue
                if over:
                    bounds.append(base + num // den)
            keep(state)
        if budget < 0 and len(kept) > BEAM:
            rank = sorted(range(len(kept)), key=bounds.__getitem__)
            floor_w = min(floor_w, bounds[rank[BEAM]])
            kept = [kept[i] for i in sorted(rank[:BEAM])]
        states = kept
    found = None if best_mask < 0 else [i for i, c in enumerate(bin(best_mask)[:1:-1]) if c > "0"]
    return found, None if best_w <= floor_w else floor_w


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
