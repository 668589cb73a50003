"""Fleet state in JetStream KV: read node records, change them by compare-and-set, watch them.

Every change to a node is `update(node_id, transition)`: read the record and its revision,
apply the pure transition, write with `last=revision`. A lost race re-reads and re-applies, so
two writers can never both commit against the same revision (no over-commit, no locks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from domain import planner
from domain.state import NodeRecord, Registration, TransitionError, reserve
from events.bus import FLEET_BUCKET, keys_matching
from events.keys import node_key, reg_key

log = logging.getLogger("stores.fleet")
NODE_LIST_TTL_S = 2.0
# The watch's copy of the node records is trusted while it has heard something this recently
# (every live node's agent writes its record every 2 s); else records are read.
MIRROR_STALE_S = 5.0

Transition = Callable[[NodeRecord], NodeRecord]


class Fleet:
    def __init__(self, kv: KeyValue, js: JetStreamContext) -> None:
        self.kv, self.js = kv, js
        # The last record and revision this process read or wrote, per node: the first
        # guess of the next update (records are never changed in place). A stale guess
        # costs one failed CAS, then a fresh read; it is never trusted beyond that.
        self._last: dict[str, tuple[NodeRecord, int]] = {}
        self._pending: dict[str, list[tuple[Transition, asyncio.Future[NodeRecord]]]] = {}
        self._committing: set[str] = set()
        self._committers: set[asyncio.Task[None]] = set()
        self._ids: list[str] = []
        self._ids_at = 0.0
        # A watch on every node record, started by the first `hot_nodes`: its latest value
        # and revision per node (parsed when asked for, once per revision).
        self._mirror: dict[str, tuple[bytes, int]] = {}
        self._parsed: dict[str, tuple[NodeRecord, int]] = {}
        self._mirror_synced = False
        self._mirror_heard = 0.0
        self._mirror_task: asyncio.Task[None] | None = None

    async def get(self, node_id: str) -> tuple[NodeRecord, int]:
        entry = await self.kv.get(node_key(node_id))
        if entry.value is None:
            self._last.pop(node_id, None)
            raise KeyNotFoundError
        got = NodeRecord.model_validate_json(entry.value), entry.revision or 0
        self._last[node_id] = got
        return got

    async def register(self, reg: Registration) -> None:
        """Write the node's registration (only the node's own identity may)."""
        await self.kv.put(reg_key(reg.node_id), reg.model_dump_json().encode())

    async def registration(self, node_id: str) -> Registration | None:
        try:
            entry = await self.kv.get(reg_key(node_id))
        except (KeyNotFoundError, KeyDeletedError):
            return None
        return Registration.model_validate_json(entry.value) if entry.value else None

    async def node_ids(self) -> list[str]:
        """The registered nodes. The list is kept for NODE_LIST_TTL_S (one round trip less
        per chat): a node registered meanwhile by another process is seen that much later."""
        now = time.monotonic()
        if self._ids and now - self._ids_at < NODE_LIST_TTL_S:
            return self._ids
        keys = await keys_matching(self.js, FLEET_BUCKET, "node.*")
        self._ids, self._ids_at = [key.removeprefix("node.") for key in keys], now
        return self._ids

    async def nodes(self) -> list[tuple[NodeRecord, int]]:
        out = []
        for node_id in await self.node_ids():
            try:
                out.append(await self.get(node_id))
            except (KeyNotFoundError, KeyDeletedError):
                self._ids = []  # gone: list them again next time
                continue
        return out

    async def hot_nodes(self) -> list[tuple[NodeRecord, int]]:
        """The node records with no round trip, from a watch kept on them, while it is live;
        else read (`nodes`). A record here may be a moment old: whoever changes a node does
        so by compare-and-set on its revision, so an old one costs a failed CAS, never a
        wrong change."""
        if self._mirror_task is None or self._mirror_task.done():
            self._mirror_task = asyncio.create_task(self._watch_nodes())
        if not self._mirror_synced or time.monotonic() - self._mirror_heard > MIRROR_STALE_S:
            return await self.nodes()
        out = []
        for node_id, (raw, rev) in list(self._mirror.items()):
            parsed = self._parsed.get(node_id)
            if parsed is None or parsed[1] != rev:
                parsed = self._parsed[node_id] = NodeRecord.model_validate_json(raw), rev
            out.append(parsed)
        return sorted(out, key=lambda rv: rv[0].node_id)

    async def _watch_nodes(self) -> None:
        """Keep `_mirror` in step with the bucket's node records; on any trouble, start over
        (the mirror is not trusted meanwhile)."""
        while True:
            self._mirror_synced = False
            watcher = None
            try:
                watcher = await self.kv.watch("node.*")
                while True:
                    try:
                        entry = await watcher.updates(timeout=MIRROR_STALE_S)  # type: ignore[no-untyped-call]
                    except nats.errors.TimeoutError:
                        continue
                    self._mirror_heard = time.monotonic()
                    if entry is None:  # the initial values are all in
                        self._mirror_synced = True
                        continue
                    node_id = entry.key.removeprefix("node.")
                    if entry.operation in ("DEL", "PURGE") or not entry.value:
                        self._mirror.pop(node_id, None)
                        self._parsed.pop(node_id, None)
                    else:
                        self._mirror[node_id] = (entry.value, entry.revision or 0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("node watch ended (%r); starting it again", exc)
                await asyncio.sleep(0.5)
            finally:
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        await watcher.stop()  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        if self._mirror_task is not None:
            self._mirror_task.cancel()
            with contextlib.suppress(BaseException):
                await self._mirror_task
            self._mirror_task = None

    async def update(
        self,
        node_id: str,
        transition: Transition,
        budget_s: float = 30.0,
        known: tuple[NodeRecord, int] | None = None,
    ) -> NodeRecord:
        """Apply `transition` by CAS, retrying on conflict. TransitionError propagates.

        Group commit: the transitions that callers in this process ask for on one node while
        a write to it is in flight are applied in order to one record and written with one
        CAS (each caller gets the record with its change, or its own TransitionError). A lost
        race re-reads and re-applies them all, backing off with full jitter (capped at 50 ms).
        `known` (a record and its revision just read) saves the first read; a stale guess
        costs one failed CAS.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[NodeRecord] = loop.create_future()
        self._pending.setdefault(node_id, []).append((transition, done))
        if node_id not in self._committing:
            self._committing.add(node_id)
            committer = asyncio.create_task(self._commit_all(node_id, known, budget_s))
            self._committers.add(committer)
            committer.add_done_callback(self._committers.discard)
        return await done

    async def _commit_all(
        self, node_id: str, known: tuple[NodeRecord, int] | None, budget_s: float
    ) -> None:
        try:
            while batch := self._pending.pop(node_id, []):
                try:
                    await self._commit(node_id, batch, known, budget_s)
                except Exception as exc:  # handed to every caller in the batch
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                known = None
        finally:
            self._committing.discard(node_id)

    async def _commit(
        self,
        node_id: str,
        batch: list[tuple[Transition, asyncio.Future[NodeRecord]]],
        known: tuple[NodeRecord, int] | None,
        budget_s: float,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget_s
        lost = 0
        guess = known or self._last.get(node_id)
        while True:
            record, rev = guess if guess is not None else await self.get(node_id)
            guessed, guess = guess is not None, None
            new = record
            results: list[NodeRecord | TransitionError] = []
            for transition, _ in batch:
                try:
                    new = transition(new)
                    results.append(new)
                except TransitionError as exc:
                    results.append(exc)
            if guessed and any(isinstance(r, TransitionError) for r in results):
                continue  # judged on a guess: judge again on a fresh read
            if new is not record:
                try:
                    rev = await self.kv.update(
                        node_key(node_id), new.model_dump_json().encode(), last=rev
                    )
                except KeyWrongLastSequenceError:
                    if guessed:
                        continue  # a stale guess is not a lost race: re-read at once
                    lost += 1
                    if loop.time() > deadline:
                        raise TimeoutError(
                            f"CAS on {node_key(node_id)} lost {lost} races in {budget_s:.0f}s"
                        ) from None
                    await asyncio.sleep(random.uniform(0, min(0.05, 0.0005 * 2 ** min(lost, 10))))
                    continue
                self._last[node_id] = (new, rev)
            for (_, fut), result in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, TransitionError):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
            return

    async def forget(self, node_id: str, revision: int) -> bool:
        """Delete the node's record if it is still at `revision`; False if it changed."""
        self._last.pop(node_id, None)
        self._ids = []
        try:
            await self.kv.delete(node_key(node_id), last=revision)
            return True
        except KeyWrongLastSequenceError:
            return False

    async def upsert(self, record: NodeRecord, transition: Transition) -> NodeRecord:
        """Create the node record, or apply `transition` to the existing one."""
        try:
            await self.kv.create(node_key(record.node_id), record.model_dump_json().encode())
            self._ids = []  # a new node: list them again next time
            return record
        except KeyWrongLastSequenceError:
            return await self.update(record.node_id, transition)

    async def place(
        self,
        req: planner.PlanRequest,
        now: float,
        policy: planner.Policy,
        task_id: str | None,
        reason: str = "",
        only_node: str | None = None,
    ) -> planner.Placement | planner.Queue | planner.Reject:
        """Plan and commit a placement with one CAS on the chosen node (or on `only_node`);
        re-plan on conflict."""
        for _ in range(100):
            records = [rv for rv in await self.nodes() if only_node in (None, rv[0].node_id)]
            nodes = [r for r, _ in records if not r.available or req.model in r.available]
            if not nodes and records:
                return planner.Reject(
                    f"no node serves model {req.model!r}: it is in the catalog, but no "
                    "registered runtime lists it (pull it on a node, or add a node that has it)",
                    code="model_unavailable",
                )
            result = planner.plan(req, nodes, now, policy)
            if not isinstance(result, planner.Placement):
                return result
            record, rev = next(rv for rv in records if rv[0].node_id == result.node_id)
            try:
                new = reserve(
                    record, req.model, req.bytes, list(result.evict), task_id, now, reason
                )
            except TransitionError:
                continue
            try:
                rev = await self.kv.update(
                    node_key(record.node_id), new.model_dump_json().encode(), last=rev
                )
                self._last[record.node_id] = (new, rev)
                return result
            except KeyWrongLastSequenceError:
                log.debug("placement CAS conflict on %s; re-planning", record.node_id)
                continue
        raise TimeoutError(f"placement of {req.model} lost 100 CAS races in a row")

    async def wait_for(
        self, node_id: str, predicate: Callable[[NodeRecord], bool], timeout: float
    ) -> NodeRecord:
        """Watch the node's key until `predicate(record)` holds. Raises TimeoutError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        watcher = await self.kv.watch(node_key(node_id))
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError(f"timed out after {timeout:.0f}s waiting on {node_id}")
                try:
                    entry = await watcher.updates(timeout=remaining)  # type: ignore[no-untyped-call]
                except nats.errors.TimeoutError:
                    continue
                if entry is None or entry.value is None:
                    continue
                record = NodeRecord.model_validate_json(entry.value)
                if predicate(record):
                    return record
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
