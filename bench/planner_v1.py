"""The previous exact solver (branch and bound, 2026-11-27), kept verbatim as a reference.

The bench times it beside `domain.planner.min_cost_cover` on the same instances (a baseline in
the same run), and the tests check that the new solver returns the same answers where the brute
force cannot run. Same contract: the exact minimum of `tie_key` over covering subsets.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from itertools import accumulate

from domain.planner import Candidate

TAIL_STEP = 8


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
