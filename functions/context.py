"""What a function needs to run, declared once and read from the environment.

`Services` is a connection pool, not state: a NATS connection, KV handles and HTTP clients
to runtimes. Everything a request needs is re-read from KV on every event.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from events import bus

from .catalog import Catalog
from .fleet import Fleet
from .planner import POLICIES, Policy
from .runtimes.base import Runtime, make_runtime
from .tasks import Tasks

log = logging.getLogger("functions")


@dataclass(frozen=True)
class Settings:
    nats_url: str = bus.DEFAULT_NATS_URL
    policy: Policy = "cost"
    keep_alive_s: float = 300.0
    load_timeout_s: float = 300.0
    unload_timeout_s: float = 60.0
    queue_retry_s: float = 0.5
    chars_per_token: float = 4.0  # prompt-size check before anything is loaded

    @classmethod
    def from_env(cls) -> Settings:
        policy = os.environ.get("OA_POLICY", "cost")
        if policy not in POLICIES:
            raise ValueError(f"OA_POLICY={policy!r}; choose one of {POLICIES}")
        return cls(
            nats_url=os.environ.get("NATS_URL", bus.DEFAULT_NATS_URL),
            policy=policy,  # type: ignore[arg-type]
            keep_alive_s=float(os.environ.get("OA_KEEP_ALIVE_S", "300")),
            load_timeout_s=float(os.environ.get("OA_LOAD_TIMEOUT_S", "300")),
            unload_timeout_s=float(os.environ.get("OA_UNLOAD_TIMEOUT_S", "60")),
            queue_retry_s=float(os.environ.get("OA_QUEUE_RETRY_S", "0.5")),
        )


@dataclass
class Services:
    settings: Settings
    nc: NATS
    js: JetStreamContext
    fleet: Fleet
    tasks: Tasks
    catalog: Catalog
    runtimes: dict[tuple[str, str], Runtime] = field(default_factory=dict)

    def runtime(self, kind: str, url: str) -> Runtime:
        key = (kind, url)
        if key not in self.runtimes:
            self.runtimes[key] = make_runtime(kind, url)
        return self.runtimes[key]

    async def close(self) -> None:
        for rt in self.runtimes.values():
            await rt.aclose()
        try:
            await asyncio.wait_for(self.nc.drain(), 5)
        except Exception:  # closing anyway: nothing is lost, JetStream redelivers
            await self.nc.close()


async def open_services(
    settings: Settings | None = None, provision: bool = False, ack_wait_s: float | None = None
) -> Services:
    """Connect and bind the KV buckets; `provision` creates streams/consumers/buckets first
    (the stack and the CLI do; a function expects them to exist)."""
    settings = settings or Settings.from_env()
    nc = await bus.connect(settings.nats_url, name="ollama-autoscaler-functions")
    js = nc.jetstream()
    if provision:
        await bus.provision(js, consumer_ack_wait_s=ack_wait_s)
    return Services(
        settings,
        nc,
        js,
        Fleet(await js.key_value(bus.FLEET_BUCKET), js),
        Tasks(await js.key_value(bus.TASKS_BUCKET)),
        Catalog(await js.key_value(bus.MODELS_BUCKET), js),
    )


_shared: Services | None = None
_lock = asyncio.Lock()


async def shared_services() -> Services:
    """One pool per process, opened on first use (functions-framework entry points)."""
    global _shared
    async with _lock:
        if _shared is None or _shared.nc.is_closed:
            _shared = await open_services()
        return _shared
