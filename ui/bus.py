"""The UI's one connection to the system, shared by every browser session of the server.

Through NATS only, like any client: KV reads (fleet, catalog, tasks, parked queue), events
published (`chat.requested`, `chat.cancel`, `model.load`, `model.evict`), and a live log of
the events people want to see (loaded, evicted and why, failed, dead-lettered). It connects
in the background and reconnects by itself; `connected` says how it stands for the banner.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from events import bus
from events.codec import CodecError, decode
from functions.services import Services, Settings, open_services

log = logging.getLogger("ui.bus")
LOG_SUBJECTS = ("ollama.model.>", "ollama.chat.failed.*", "ollama.deadletter.>")


@dataclass
class LogLine:
    at: float
    kind: str
    text: str
    event_id: str | None = None


@dataclass
class UiBus:
    nats_url: str
    svc: Services | None = None
    error: str = ""
    lines: collections.deque[LogLine] = field(default_factory=lambda: collections.deque(maxlen=300))
    # memory use per node over the last minutes: node -> [(t, committed, measured_used)]
    memory: dict[str, collections.deque[tuple[float, int, int | None]]] = field(
        default_factory=dict
    )
    _task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self.svc is not None and self.svc.nc.is_connected

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_event_loop().create_task(self._run())

    async def _run(self) -> None:
        while self.svc is None:
            try:
                self.svc = await open_services(Settings(nats_url=self.nats_url))
                self.error = ""
            except Exception as exc:  # not up yet: say so, and try again
                self.error = f"cannot reach NATS at {bus.redact(self.nats_url)}: {exc}"
                await asyncio.sleep(2)
        for subject in LOG_SUBJECTS:
            await self.svc.nc.subscribe(subject, cb=self._heard)
        while True:
            with contextlib.suppress(Exception):
                await self._sample_memory()
            await asyncio.sleep(2)

    async def _sample_memory(self) -> None:
        assert self.svc is not None
        now = time.time()
        for rec, _ in await self.svc.fleet.nodes():
            used = (
                rec.capacity_bytes - rec.measured_free_bytes
                if rec.measured_free_bytes is not None
                else None
            )
            series = self.memory.setdefault(rec.node_id, collections.deque(maxlen=150))
            series.append((now, rec.committed_bytes(), used))

    async def _heard(self, msg: Any) -> None:
        try:
            if msg.subject.startswith("ollama.deadletter."):
                rec = json.loads(msg.data)
                self.lines.append(
                    LogLine(
                        time.time(),
                        "dead-letter",
                        f"{rec.get('event_type') or '?'}: {rec.get('reason', '')[:200]}",
                        rec.get("event_id"),
                    )
                )
                return
            ev = decode(msg.headers, msg.data)
        except (CodecError, ValueError):
            return
        if ev.type == "model.pull.progress":
            return  # many a second: the Models view shows them, the log would drown
        d = ev.data if isinstance(ev.data, dict) else {}
        text = {
            "model.loaded": lambda: (
                f"{d.get('model')} loaded on {d.get('node')} in {d.get('load_ms', 0):.0f} ms"
            ),
            "model.evicted": lambda: (
                f"{d.get('model')} evicted from {d.get('node')}: {d.get('reason', '')}"
            ),
            "model.load.failed": lambda: (
                f"load of {d.get('model')} on {d.get('node')} failed: {d.get('error', '')}"
            ),
            "model.load": lambda: f"load {d.get('model')} ({d.get('reason', '')})",
            "model.evict": lambda: f"evict {d.get('model')} ({d.get('reason', '')})",
            "chat.failed": lambda: (
                f"chat {d.get('chat_id')} failed: "
                f"{(d.get('error') or {}).get('code')}: {(d.get('error') or {}).get('message', '')}"
            ),
        }.get(ev.type, lambda: ev.type)()
        self.lines.append(LogLine(time.time(), ev.type, text[:300], ev.id))
