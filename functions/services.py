"""What a function needs to run, declared once and read from the environment.

`Services` is a connection pool, not state: a NATS connection, KV handles and HTTP clients
to runtimes. Everything a request needs is re-read from KV on every event.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from domain.planner import Policy
from domain.ratelimit import TokenBucket
from domain.state import NodeRecord, Registration
from events import bus
from events.codec import CodecError, decode
from events.types import client_of, subject_filter
from runtimes import Runtime, load_plugins, make_runtime
from stores.catalog import Catalog
from stores.fleet import Fleet
from stores.tasks import Tasks
from stores.waiting import Waiting

log = logging.getLogger("functions")


class Unregistered(RuntimeError):
    """A node record whose node never registered itself: its runtime is not called."""


class Settings(BaseSettings):
    """The functions' settings, from the environment (`OA_<NAME>`, and `NATS_URL`)."""

    model_config = SettingsConfigDict(env_prefix="OA_", frozen=True, extra="ignore")

    nats_url: str = Field(
        default=bus.DEFAULT_NATS_URL, validation_alias=AliasChoices("NATS_URL", "nats_url")
    )
    policy: Policy = "cost"
    keep_alive_s: float = Field(default=300.0, ge=0)
    # Bounds on what a client may ask (each over-limit request ends with `invalid_request`).
    max_keep_alive_s: float = Field(default=86_400.0, ge=0)  # options.keep_alive_s
    default_max_tokens: int = Field(default=2048, ge=1)  # options.max_tokens when unset
    max_tokens: int = Field(default=16_384, ge=1)  # an answer must fit one NATS message
    load_timeout_s: float = Field(default=300.0, gt=0)
    unload_timeout_s: float = Field(default=60.0, gt=0)
    chars_per_token: float = Field(default=4.0, gt=0)  # prompt-size check before any load
    # Each client's share: new chats a second (per chat process) with a burst, and requests
    # waiting at once (fleet-wide). Over either, a request ends with `rate_limited` or
    # `queue_full` and a dead letter.
    client_rate: float = Field(default=50.0, ge=0)  # 0: no limit
    client_burst: float = Field(default=500.0, ge=1)
    client_max_waiting: int = Field(default=1000, ge=1)
    prefetch: bool = True  # warm a model's file into the page cache while its load waits
    # The key the node's llama-server was started with (--api-key); never printed.
    runtime_api_key: str | None = Field(default=None, repr=False)
    # Modules imported at start that add runtime kinds (`runtimes.register`), comma-separated:
    # a runtime adapter of your own, or the benchmark's stub (`bench.stub`).
    runtime_plugins: str = ""

    def but(self, **changes: Any) -> Settings:
        """A copy with `changes`, validated like the environment is."""
        return Settings.model_validate({**self.model_dump(), **changes})


@dataclass
class Services:
    settings: Settings
    nc: NATS
    js: JetStreamContext
    fleet: Fleet
    tasks: Tasks
    catalog: Catalog
    waiting: Waiting
    runtimes: dict[tuple[str, str], Runtime] = field(default_factory=dict)
    registrations: dict[str, Registration] = field(default_factory=dict)  # by node id
    # Runs in this process, by (client, task id): set when that client's chat.cancel is heard.
    cancels: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)
    _cancel_sub: Any = None
    _tokens_out: bus.AckedStream | None = None
    rates: dict[str, TokenBucket] = field(default_factory=dict)  # by client
    background: set[asyncio.Task[Any]] = field(default_factory=set)  # kept until done

    def over_rate(self, client: str, now: float) -> float:
        """Take one new request of `client`: 0.0 if within its rate, else seconds to wait."""
        if not self.settings.client_rate:
            return 0.0
        bucket = self.rates.get(client)
        if bucket is None:
            bucket = self.rates[client] = TokenBucket(
                self.settings.client_rate, self.settings.client_burst
            )
        return bucket.take(now)

    @property
    def tokens_out(self) -> bus.AckedStream:
        """Where this process's runs send their tokens (each stored by JetStream, acked)."""
        if self._tokens_out is None:
            self._tokens_out = bus.AckedStream(self.nc)
        return self._tokens_out

    async def listen_for_cancels(self) -> None:
        """Hear every chat.cancel as it is published (core NATS, no consumer), so a run in
        this process stops within a second, wherever the durable cancel function runs."""
        if self._cancel_sub is not None:
            return

        async def heard(msg: Any) -> None:
            client = client_of(msg.subject)
            try:
                data = decode(msg.headers, msg.data).data
                task_id = data.get("task_id") if isinstance(data, dict) else None
            except CodecError:
                return
            if client and isinstance(task_id, str) and (client, task_id) in self.cancels:
                self.cancels[(client, task_id)].set()

        self._cancel_sub = await self.nc.subscribe(subject_filter("chat.cancel"), cb=heard)

    def runtime(
        self, kind: str, url: str, log_path: str | None = None, models_dir: str | None = None
    ) -> Runtime:
        key = (kind, url)
        if key not in self.runtimes:
            self.runtimes[key] = make_runtime(
                kind, url, log_path, models_dir, self.settings.runtime_api_key
            )
        return self.runtimes[key]

    async def runtime_of(self, record: NodeRecord) -> Runtime:
        """The adapter for a node's runtime, at the URL of the node's own registration: a
        node record is written by several identities, a registration only by the node's, so
        a URL (or log path, or models folder) that only the record names is never used.
        Registrations are kept per node while the record agrees with them (no extra read
        on the chat path); a record that disagrees makes us read the registration again."""
        reg = self.registrations.get(record.node_id)
        if reg is None or (reg.url, reg.runtime) != (record.url, record.runtime):
            reg = await self.fleet.registration(record.node_id)
            if reg is None:
                raise Unregistered(f"node {record.node_id} has no registration of its own")
            self.registrations[record.node_id] = reg
            if (reg.url, reg.runtime) != (record.url, record.runtime):
                log.warning(
                    "node %s: record says %s %s, its registration %s %s; using the registration",
                    record.node_id,
                    record.runtime,
                    record.url,
                    reg.runtime,
                    reg.url,
                )
        return self.runtime(reg.runtime, reg.url, reg.runtime_log, reg.models_dir)

    async def close(self) -> None:
        await self.fleet.close()
        for rt in self.runtimes.values():
            await rt.aclose()
        try:
            await asyncio.wait_for(self.nc.drain(), 5)
        except Exception:  # closing anyway: nothing is lost, JetStream redelivers
            await self.nc.close()


async def open_services(
    settings: Settings | None = None,
    provision: bool = False,
    ack_wait_s: float | None = None,
    reconfigure: bool = False,
    nc: NATS | None = None,
    replicas: int = 1,
) -> Services:
    """Connect (or use `nc`) and bind the KV buckets; `provision` creates streams/consumers/
    buckets first, with `replicas` (the stack and the CLI do; a function expects them)."""
    settings = settings or Settings()
    load_plugins(settings.runtime_plugins)
    nc = nc or await bus.connect(settings.nats_url, name="ollama-autoscaler-functions")
    js = nc.jetstream()
    if provision:
        await bus.provision(
            js, consumer_ack_wait_s=ack_wait_s, reconfigure=reconfigure, replicas=replicas
        )
    return Services(
        settings,
        nc,
        js,
        Fleet(bus.bucket(js, bus.FLEET_BUCKET), js),
        Tasks(bus.bucket(js, bus.TASKS_BUCKET), js),
        Catalog(bus.bucket(js, bus.MODELS_BUCKET), js),
        Waiting(js),
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
