"""The NATS edge: connect, provision streams/consumers/KV idempotently, publish events.

Streams (all subjects start with `ollama.`):
  OLLAMA_EVENTS  ollama.chat.{requested,cancel,completed,failed}.<client>
                 ollama.model.> ollama.fleet.>                  work and outcome events
  OLLAMA_TOKENS  ollama.chat.token.<client>.<chat_id>           short max-age, for replay
  OLLAMA_DLQ     ollama.deadletter.>                            rejected events, with reasons
  OLLAMA_WAITING ollama.waiting.p<rank>.<model>                 parked chat requests (the queue)
KV buckets: fleet (node records), models (catalog), tasks (task records + queue entries).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import SplitResult, quote, unquote, urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    StorageType,
    StreamConfig,
)
from nats.js.errors import (
    BadRequestError,
    BucketNotFoundError,
    KeyDeletedError,
    KeyNotFoundError,
)
from nats.js.kv import KeyValue

from .codec import MAX_EVENT_BYTES, Event, to_binary
from .types import (
    CLIENT_EXTENSION,
    DEAD_LETTER_PREFIX,
    DEFAULT_CLIENT,
    PER_CLIENT,
    subject_filter,
    subject_for,
)

log = logging.getLogger("events.bus")

DEFAULT_NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
# What a bus that does not answer for a moment raises: no server has the stream's leader yet
# (a cluster electing one, a restarting server), a request timed out, the connection is
# reconnecting. Worth waiting out briefly; anything else is not.
TRANSIENT: tuple[type[Exception], ...] = (
    nats.errors.NoRespondersError,
    nats.errors.TimeoutError,
    nats.errors.ConnectionReconnectingError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
)

EVENTS_STREAM = "OLLAMA_EVENTS"
TOKENS_STREAM = "OLLAMA_TOKENS"
DLQ_STREAM = "OLLAMA_DLQ"
WAITING_STREAM = "OLLAMA_WAITING"
WAITING_CONSUMER = "waiting"  # read by no one: its pending count is the queue depth (KEDA)
# Under Knative Eventing: the one consumer the JetStream -> Broker bridge reads (instead of
# one consumer per function), over every client-published event type.
BRIDGE_CONSUMER = "bridge"
BRIDGED_TYPES = ("chat.requested", "chat.cancel", "model.load", "model.evict", "model.pull")
Delivery = Literal["pull", "knative"]
FLEET_BUCKET, MODELS_BUCKET, TASKS_BUCKET = "fleet", "models", "tasks"
CHAT_EVENT_TYPES = ("chat.requested", "chat.cancel", "chat.completed", "chat.failed")


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer: which function reads which event type."""

    name: str
    event_type: str
    ack_wait_s: float = 30.0
    max_ack_pending: int = 256
    also: tuple[str, ...] = ()  # other event types it takes (the bridge takes several)

    def takes(self, event_type: str) -> bool:
        return event_type == self.event_type or event_type in self.also


# One durable consumer per function. Knative's equivalent is one Trigger per function.
CONSUMERS: dict[str, ConsumerSpec] = {
    "chat": ConsumerSpec("chat", "chat.requested", ack_wait_s=30.0),
    "cancel": ConsumerSpec("cancel", "chat.cancel", ack_wait_s=30.0),
    "load": ConsumerSpec("load", "model.load", ack_wait_s=30.0),
    "evict": ConsumerSpec("evict", "model.evict", ack_wait_s=30.0),
    "pull": ConsumerSpec("pull", "model.pull", ack_wait_s=30.0),
    "reconcile": ConsumerSpec("reconcile", "fleet.tick", ack_wait_s=30.0, max_ack_pending=1),
}
BRIDGE_SPEC = ConsumerSpec(BRIDGE_CONSUMER, BRIDGED_TYPES[0], also=BRIDGED_TYPES[1:])

# Disk bounds of every stream and bucket (bytes), chosen so that a client cannot fill the disk
# and the total stays small enough for JetStream to reserve on a laptop (about 1.9 GiB).
MIB = 1 << 20
MAX_MSG_BYTES = MAX_EVENT_BYTES  # the NATS default max_payload, the codec's event limit
MAX_WAITING = 100_000  # parked requests
LIMITS: dict[str, int] = {
    "events": 1024 * MIB,
    "tokens": 256 * MIB,
    "deadletter": 256 * MIB,
    "waiting": 64 * MIB,
    FLEET_BUCKET: 32 * MIB,
    MODELS_BUCKET: 32 * MIB,
    TASKS_BUCKET: 256 * MIB,
}


def inbox_prefix(user: str) -> str:
    """Where an identity's replies arrive: `_INBOX_<user>` (nats-py's `inbox_prefix`), the
    only inbox its permissions let it read."""
    return f"_INBOX_{user}"


def identity_from_env() -> tuple[str | None, str | None]:
    """NATS_USER / NATS_PASSWORD (as the nats CLI reads them); NATS_PASSWORD_FILE for a
    mounted secret."""
    password = os.environ.get("NATS_PASSWORD")
    if password is None and (path := os.environ.get("NATS_PASSWORD_FILE")):
        with open(path) as fh:
            password = fh.read().strip()
    return os.environ.get("NATS_USER") or None, password


async def connect(
    url: str = DEFAULT_NATS_URL,
    name: str = "ollama-autoscaler",
    user: str | None = None,
    password: str | None = None,
    ca: str | None = None,
) -> NATS:
    """Connect, with one clear message when nothing listens at `url`.

    The identity is `user`/`password`, else the URL's `user:password@`, else NATS_USER /
    NATS_PASSWORD. `tls://` URLs, or a CA file (`ca`, else NATS_CA, as the nats CLI reads it),
    connect with TLS, verifying the server. Replies come on the identity's own inbox prefix
    (`_INBOX_<user>`), the only inbox its permissions let it read. Once connected, the client
    reconnects forever (a restarted nats-server is survived); the first connection is checked
    up front so a wrong URL fails fast instead of retrying.
    """
    # A comma-separated list names the servers of a cluster (as the nats CLI takes them); a
    # client connected to one also learns the others from it and fails over.
    servers = [_split(u) for u in url.split(",") if u.strip()]
    if user is None:
        user, password = next(
            ((unquote(p.username), unquote(p.password or "")) for p in servers if p.username),
            (None, None),
        )
    if user is None:
        user, password = identity_from_env()
    plain = [f"{p.scheme}://{p.hostname or '127.0.0.1'}:{p.port or 4222}" for p in servers]
    plain_url = ",".join(plain)
    hint = "is the stack running? start it with `make run`, or pass --nats URL"
    reasons = []
    for p in servers:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(p.hostname or "127.0.0.1", p.port or 4222), 3
            )
            writer.close()
            break
        except (OSError, TimeoutError) as exc:
            reasons.append(str(exc))
    else:
        raise ConnectionError(f"cannot reach NATS at {plain_url} ({'; '.join(reasons)}); {hint}")

    refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()
    untrusted: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

    async def on_error(exc: Exception) -> None:
        text = str(exc).lower()
        if "permissions violation" in text:
            VIOLATIONS.append(f"{user or 'no user'}: {exc}")
        elif "authorization violation" in text and not refused.done():
            refused.set_result(exc)  # wrong or missing credentials: retrying cannot help
        elif _tls_failure(exc) and not untrusted.done() and not connecting.done():
            untrusted.set_result(exc)  # a server it cannot verify (or TLS it lacks)
        log.warning("nats (%s): %s", user or "no user", exc)

    options: dict[str, Any] = {}
    if user:
        options = {"user": user, "password": password or "", "inbox_prefix": inbox_prefix(user)}
    cafile = ca or os.environ.get("NATS_CA") or None
    if cafile or any(p.scheme == "tls" for p in servers):
        # TLS (`up --tls`): the server is checked against NATS_CA (else the system's CAs),
        # and the handshake comes first, so nothing (the password) is ever sent in plain text
        # to whatever answers on the port; the server must say `handshake_first` too.
        options["tls"] = ssl.create_default_context(cafile=cafile)
        options["tls_handshake_first"] = True
    connecting = asyncio.ensure_future(
        nats.connect(
            plain,
            name=name,
            connect_timeout=3,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=on_error,
            allow_reconnect=True,
            **options,
        )
    )
    either: set[asyncio.Future[Any]] = {connecting, refused, untrusted}
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if not connecting.done():  # refused or untrusted: stop its retry loop
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        if untrusted.done():
            raise ConnectionError(
                f"TLS with NATS at {plain_url} failed ({untrusted.result()!r}): a stack started "
                "with --tls wants tls:// and its CA in NATS_CA (<state>/auth/tls/ca.pem; the "
                "env files carry both)"
            )
        who = f"user {user!r}" if user else "a client with no user"
        raise ConnectionError(
            f"NATS at {plain_url} refused {who} ({refused.result()}): set NATS_USER and "
            "NATS_PASSWORD (the local stack writes them to <state>/auth/<user>.env), or pass "
            "nats://USER:PASSWORD@HOST:PORT"
        )
    try:
        nc = connecting.result()
    except Exception as exc:  # nats raises several unrelated types for "no server"
        raise ConnectionError(f"cannot connect to NATS at {plain_url} ({exc!r}); {hint}") from exc
    return nc


# Permission violations the server reported to this process's connections (newest last):
# a refused request only times out, so this is how a CLI says what was refused.
VIOLATIONS: list[str] = []


def _tls_failure(exc: BaseException) -> bool:
    """A first connection that TLS (or its absence) stops: retrying cannot help. A server
    that says nothing is one waiting for a TLS handshake (`handshake_first`)."""
    text = str(exc).lower()
    return (
        isinstance(exc, ssl.SSLError)
        or "tls" in text
        or "certificate" in text
        or "expecting info" in text
    )


def _split(url: str) -> SplitResult:
    url = url.strip()
    return urlsplit(url if "://" in url else f"nats://{url}")


def with_identity(url: str, user: str, password: str) -> str:
    """`url` (each server of a comma-separated list) carrying `user:password@` (what a
    component is given as its NATS URL)."""
    who = f"{quote(user, safe='')}:{quote(password, safe='')}"
    return ",".join(
        f"{p.scheme}://{who}@{p.hostname}:{p.port or 4222}" for p in map(_split, url.split(","))
    )


def redact(url: str) -> str:
    """`url` without its password (for logs and error messages)."""
    out = []
    for part in url.split(","):
        p = _split(part)
        if p.password is None:
            out.append(part)
        else:
            out.append(f"{p.scheme}://{p.username}:***@{p.hostname}:{p.port or 4222}")
    return ",".join(out)


def user_of(nc: NATS) -> str:
    """The user a connection authenticated as ("" with no auth)."""
    return str(nc.options.get("user") or "")


async def _ensure_stream(js: JetStreamContext, cfg: StreamConfig) -> None:
    try:
        await js.add_stream(cfg)
    except BadRequestError:
        await js.update_stream(cfg)


async def provision(
    js: JetStreamContext,
    consumer_ack_wait_s: float | None = None,
    reconfigure: bool = False,
    replicas: int = 1,
    delivery: Delivery = "pull",
) -> None:
    """Create every stream, durable consumer and KV bucket that is missing. Safe to repeat.

    An existing consumer keeps its settings (its ack wait belongs to the deployment, not to
    whoever connects last) unless `reconfigure` is set: only the stack that owns the bus
    (`up`, `provision`) passes it. `replicas` is the JetStream replication of every stream
    and bucket (3 on a 3-server cluster). `delivery` "pull" creates one durable consumer per
    function (workers fetch); "knative" creates the bridge's consumer instead (the Broker
    delivers to the functions over HTTP).
    """
    streams = (
        StreamConfig(
            name=EVENTS_STREAM,
            subjects=[
                *(subject_filter(t) for t in CHAT_EVENT_TYPES),
                "ollama.model.>",
                "ollama.fleet.>",
            ],
            storage=StorageType.FILE,
            max_age=7 * 86400,
            # Requests not yet handled are never thrown away: a full stream refuses new ones
            # (the publisher gets an error: back-pressure), it does not drop old ones.
            max_bytes=LIMITS["events"],
            max_msg_size=MAX_MSG_BYTES,
            discard=DiscardPolicy.NEW,
            duplicate_window=120,
            num_replicas=replicas,
        ),
        StreamConfig(
            name=TOKENS_STREAM,
            subjects=[subject_filter("chat.token")],
            storage=StorageType.FILE,
            max_age=600,
            max_bytes=LIMITS["tokens"],  # tokens are ephemeral: the oldest go first
            max_msg_size=MAX_MSG_BYTES,
            discard=DiscardPolicy.OLD,
            num_replicas=replicas,
        ),
        StreamConfig(
            name=DLQ_STREAM,
            subjects=[f"{DEAD_LETTER_PREFIX}.>"],
            storage=StorageType.FILE,
            max_age=30 * 86400,
            max_bytes=LIMITS["deadletter"],  # the newest records are kept, the oldest go
            discard=DiscardPolicy.OLD,
            num_replicas=replicas,
        ),
        StreamConfig(
            name=WAITING_STREAM,
            subjects=["ollama.waiting.>"],
            storage=StorageType.FILE,
            max_age=7 * 86400,
            allow_direct=True,  # the cheap "is anyone waiting?" probe after every release
            max_bytes=LIMITS["waiting"],  # a full queue refuses to park more (never drops)
            max_msgs=MAX_WAITING,
            discard=DiscardPolicy.NEW,
            num_replicas=replicas,
        ),
    )
    for stream in streams:
        await _ensure_stream(js, stream)
    existing = (
        {c.name for c in await js.consumers_info(EVENTS_STREAM)} if not reconfigure else set()
    )
    for cfg in _consumers(delivery, consumer_ack_wait_s):
        if cfg.durable_name not in existing:
            await js.add_consumer(EVENTS_STREAM, cfg)
    await js.add_consumer(
        WAITING_STREAM,
        ConsumerConfig(
            durable_name=WAITING_CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
        ),
    )
    for bucket, history, ttl in (
        (FLEET_BUCKET, 64, None),
        (MODELS_BUCKET, 5, None),
        (TASKS_BUCKET, 1, 86400.0),
    ):  # KV buckets refuse writes when full (their discard policy is NEW)
        try:
            await js.key_value(bucket)
        except BucketNotFoundError:
            await js.create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    history=history,
                    ttl=ttl,
                    max_bytes=LIMITS[bucket],
                    max_value_size=MAX_MSG_BYTES,
                    storage=StorageType.FILE,
                    replicas=replicas,
                )
            )


def _consumers(delivery: Delivery, ack_wait_s: float | None) -> list[ConsumerConfig]:
    """The durable consumers on OLLAMA_EVENTS for a delivery mode."""
    if delivery == "knative":
        return [
            ConsumerConfig(
                durable_name=BRIDGE_CONSUMER,
                filter_subjects=[subject_filter(t) for t in BRIDGED_TYPES],
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=ack_wait_s or 30.0,
                max_deliver=-1,
                max_ack_pending=256,
            )
        ]
    return [
        ConsumerConfig(
            durable_name=spec.name,
            filter_subject=subject_filter(spec.event_type),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait_s or spec.ack_wait_s,
            max_deliver=-1,
            max_ack_pending=spec.max_ack_pending,
        )
        for spec in CONSUMERS.values()
    ]


async def publish(
    js: JetStreamContext,
    event: Event,
    chat_id: str | None = None,
    msg_id: str | None = None,
    client: str | None = None,
) -> None:
    """Publish in binary mode to the event's subject; the event id dedups re-publishes.
    A chat's event goes under its client's name: `client`, else the event's `oaclient`,
    else the publisher's own (its NATS user; `client` on a bus without auth)."""
    headers, body = to_binary(event)
    headers["Nats-Msg-Id"] = msg_id or event.id
    await js.publish(_subject(js._nc, event, chat_id, client), body, headers=headers)


def _subject(nc: NATS, event: Event, chat_id: str | None, client: str | None) -> str:
    if event.type in PER_CLIENT:
        client = client or event.extensions.get(CLIENT_EXTENSION) or user_of(nc) or DEFAULT_CLIENT
    return subject_for(event.type, chat_id, client)


async def wait_out[T](call: Callable[[], Awaitable[T]], wait_s: float, what: str) -> T:
    """`call()`, made again while the bus does not answer (TRANSIENT), for up to `wait_s`."""
    deadline, pause = time.monotonic() + wait_s, 0.1
    while True:
        try:
            return await call()
        except TRANSIENT as exc:
            if time.monotonic() + pause >= deadline:
                raise
            log.warning("%s waits for the bus: %r", what, exc)
            await asyncio.sleep(pause)
            pause = min(2.0, pause * 2)


@dataclass
class Sent:
    """One message of an AckedStream: what to send again if JetStream did not store it."""

    subject: str
    body: bytes
    headers: dict[str, str]
    key: str = ""
    ack: asyncio.Future[bool] | None = None

    @property
    def stored(self) -> bool:
        return self.ack is not None and self.ack.done() and self.ack.result()


class AckedStream:
    """Messages on the hot path (tokens) that JetStream must store all of: each goes out at
    once, with a reply subject on which the stream acknowledges it in the background, so
    nothing waits per message. `settle` waits for a batch's acknowledgements and sends again,
    under the same Nats-Msg-Id (JetStream keeps one), those it did not get: a stream whose
    leader is being elected, or a server that died holding them, drops messages without a
    word otherwise. A live subscriber may see a re-sent message twice; its id says so."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._inbox = ""
        self._sub: Any = None
        self._next = 0
        self._waiting: dict[str, asyncio.Future[bool]] = {}

    async def _on_ack(self, msg: Any) -> None:
        fut = self._waiting.pop(msg.subject.rsplit(".", 1)[-1], None)
        if fut is None or fut.done():
            return
        ok = not (msg.headers or {}).get("Status")  # 503: nothing stored it
        if ok:
            try:
                ok = "error" not in json.loads(msg.data or b"{}")
            except ValueError:
                ok = False
        fut.set_result(ok)

    async def _send(self, sent: Sent) -> None:
        if self._sub is None:
            self._inbox = self.nc.new_inbox()  # under the identity's own inbox prefix
            self._sub = await self.nc.subscribe(self._inbox + ".*", cb=self._on_ack)
        self._waiting.pop(sent.key, None)
        self._next += 1
        sent.key = str(self._next)
        sent.ack = self._waiting[sent.key] = asyncio.get_running_loop().create_future()
        await self.nc.publish(
            sent.subject, sent.body, reply=f"{self._inbox}.{sent.key}", headers=sent.headers
        )

    async def send(
        self,
        event: Event,
        msg_id: str,
        chat_id: str | None = None,
        client: str | None = None,
    ) -> Sent:
        headers, body = to_binary(event)
        headers["Nats-Msg-Id"] = msg_id
        sent = Sent(_subject(self.nc, event, chat_id, client), body, headers)
        await self._send(sent)
        return sent

    async def settle(self, batch: list[Sent], wait_s: float) -> int:
        """Wait until JetStream stored every message of `batch`, sending again those it did
        not acknowledge, for up to `wait_s`; the number still not stored (0: all are)."""
        deadline = time.monotonic() + wait_s
        todo = [s for s in batch if not s.stored]
        pause = 0.25
        try:
            while todo:
                left = deadline - time.monotonic()
                pending = [s.ack for s in todo if s.ack is not None and not s.ack.done()]
                if pending and left > 0:
                    await asyncio.wait(pending, timeout=min(pause, left))
                todo = [s for s in todo if not s.stored]
                if not todo or time.monotonic() >= deadline:
                    break
                for s in todo:
                    await self._send(s)
                pause = min(2.0, pause * 2)
            return len(todo)
        finally:
            self.forget(batch)

    def forget(self, batch: list[Sent]) -> None:
        """Stop waiting for these messages' acknowledgements (a run that gave up)."""
        for s in batch:
            self._waiting.pop(s.key, None)


def bucket(js: JetStreamContext, name: str) -> KeyValue:
    """A handle on a provisioned KV bucket, made without asking the server (`js.key_value`
    reads the stream's info first, which not every identity may: a client reads only the
    catalog). Reads go through the stream's leader (the buckets are made without direct
    get)."""
    return KeyValue(name=name, stream=f"KV_{name}", pre=f"$KV.{name}.", js=js, direct=False)


async def keys_matching(js: JetStreamContext, bucket: str, pattern: str) -> list[str]:
    """Keys of `bucket` matching `pattern`, from the stream's subject index: one request and
    no consumer (a watch per call creates an ordered consumer each time, which piles up under
    load until the server refuses more). Deleted keys may still be listed."""
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.{pattern}")
    prefix = f"$KV.{bucket}."
    return sorted(s.removeprefix(prefix) for s in (info.state.subjects or {}))


async def values_matching(
    js: JetStreamContext, kv: KeyValue, bucket: str, pattern: str
) -> list[bytes]:
    """The current values of the keys of `kv` (bucket `bucket`) matching `pattern`; deleted
    keys are skipped."""
    out = []
    for key in await keys_matching(js, bucket, pattern):
        try:
            entry = await kv.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            continue
        if entry.value:
            out.append(entry.value)
    return out
