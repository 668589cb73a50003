"""Who may do what on the bus: one NATS identity per component, least privilege.

Each identity is a NATS user with publish and subscribe permissions that allow exactly the
subjects it needs, JetStream API calls included (a KV read is a request to
`$JS.API.STREAM.MSG.GET.KV_<bucket>`, a KV write is a publish on `$KV.<bucket>.<key>`, a
consumer fetch a request to `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`, an ack a publish
on `$JS.ACK.<stream>.<consumer>...`). Replies come on the identity's own inbox prefix
(`_INBOX_<name>`), so no identity can read another's replies.

Identities:
  admin            everything (provisioning, the operator's CLI, the nats CLI)
  chat cancel load evict pull reconcile
                   one per function (the function, and the dispatcher that feeds it)
  worker           all six functions in one process (`ollama-autoscaler worker`)
  agent-<node id>  one per node agent: may write only its own node's record and registration
  ui               the Panel app: a client under its own name, plus the fleet view
  gateway          the HTTP front door: a client under its own name (every HTTP caller's
                   chats go under it), the fleet view, model load/evict/pull, and, for its
                   metrics, every client's ends (chat.completed/failed) and the model events
  bridge, tick     the Knative bridge; the fleet.tick timer
  <client>         a client (`client` by default): may publish its own chat requests and
                   cancels and read only its own tokens and ends (and the model catalog)

The server's permissions are the enforcement; `nats_config` writes them for nats-server.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .bus import (
    BRIDGE_CONSUMER,
    EVENTS_STREAM,
    FLEET_BUCKET,
    MODELS_BUCKET,
    TASKS_BUCKET,
    TOKENS_STREAM,
    WAITING_STREAM,
    inbox_prefix,
)
from .keys import check_node_id
from .types import (
    DEAD_LETTER_PREFIX,
    DEFAULT_CLIENT,
    SUBJECT_PREFIX,
    check_client,
    subject_filter,
)

API = "$JS.API"
ADMIN = "admin"
FUNCTIONS = ("chat", "cancel", "load", "evict", "pull", "reconcile")
GATEWAY = "gateway"
COMPONENTS = (ADMIN, *FUNCTIONS, "worker", "ui", GATEWAY, "bridge", "tick")
CHATS_BUCKET = "chats"  # the UI's history (ui/history.py)
# Not a NATS user: the runtime API key (llama-server --api-key) kept beside the passwords.
RUNTIME_KEY = "runtime-api-key"


AGENT_PREFIX = "agent-"


def agent_user(node_id: str) -> str:
    """The identity of a node's agent."""
    return AGENT_PREFIX + check_node_id(node_id)


def check_new_client(name: str) -> str:
    """A client's name must not be a component's (nor look like a node agent's)."""
    check_client(name)
    if name in COMPONENTS or name.startswith(AGENT_PREFIX):
        raise ValueError(f"{name!r} is a component's identity; choose another client name")
    return name


@dataclass
class Permissions:
    publish: set[str] = field(default_factory=set)
    subscribe: set[str] = field(default_factory=set)

    def __or__(self, other: Permissions) -> Permissions:
        return Permissions(self.publish | other.publish, self.subscribe | other.subscribe)

    def as_nats(self) -> dict[str, dict[str, list[str]]]:
        return {
            "publish": {"allow": sorted(self.publish)},
            "subscribe": {"allow": sorted(self.subscribe)},
        }


def _pub(*subjects: str) -> Permissions:
    return Permissions(publish=set(subjects))


def _sub(*subjects: str) -> Permissions:
    return Permissions(subscribe=set(subjects))


def _stream_read(stream: str) -> Permissions:
    """Stream info and single-message reads (direct and through the leader)."""
    return _pub(
        f"{API}.STREAM.INFO.{stream}",
        f"{API}.DIRECT.GET.{stream}",
        f"{API}.DIRECT.GET.{stream}.>",
        f"{API}.STREAM.MSG.GET.{stream}",
    )


def kv_read(bucket: str, watch: bool = False) -> Permissions:
    perms = _stream_read(f"KV_{bucket}")
    if watch:  # a KV watch is an ordered push consumer, with flow control
        stream = f"KV_{bucket}"
        perms |= _pub(
            f"{API}.CONSUMER.CREATE.{stream}",
            f"{API}.CONSUMER.CREATE.{stream}.>",
            f"{API}.CONSUMER.INFO.{stream}.*",
            f"{API}.CONSUMER.DELETE.{stream}.>",
            f"$JS.FC.{stream}.>",
        )
    return perms


def kv_write(bucket: str, *keys: str) -> Permissions:
    """Put / create / compare-and-set / delete of these keys (patterns allowed)."""
    return _pub(*(f"$KV.{bucket}.{k}" for k in keys))


def consume(stream: str, consumer: str) -> Permissions:
    """Fetch from one durable pull consumer and ack what it fetched."""
    return _pub(
        f"{API}.CONSUMER.INFO.{stream}.{consumer}",
        f"{API}.CONSUMER.MSG.NEXT.{stream}.{consumer}",
        f"$JS.ACK.{stream}.{consumer}.>",
    )


def waiting_queue() -> Permissions:
    """Park, read, remove and wake parked requests (wake = re-publish the request)."""
    return _stream_read(WAITING_STREAM) | _pub(
        f"{SUBJECT_PREFIX}.waiting.>",
        f"{API}.STREAM.MSG.DELETE.{WAITING_STREAM}",
        subject_filter("chat.requested"),
    )


def _function(name: str) -> Permissions:
    """What each function does on the bus (handlers in functions/)."""
    base = (
        consume(EVENTS_STREAM, name) | _pub(f"{DEAD_LETTER_PREFIX}.{name}") | kv_read(FLEET_BUCKET)
    )
    ends = _pub(subject_filter("chat.completed"), subject_filter("chat.failed"))
    node_rw = kv_write(FLEET_BUCKET, "node.*")
    tasks_rw = kv_read(TASKS_BUCKET) | kv_write(TASKS_BUCKET, "task.>")
    if name == "chat":
        return (
            base
            | kv_read(FLEET_BUCKET, watch=True)
            | kv_read(MODELS_BUCKET)
            | tasks_rw
            | node_rw
            | waiting_queue()
            | ends
            | _pub(
                subject_filter("chat.token"),
                "ollama.model.load",
                "ollama.model.evict",
                "ollama.planner.decided",  # core NATS, for the gateway's metrics
            )
            | _sub(subject_filter("chat.cancel"))
        )
    if name == "cancel":
        return (
            base | kv_read(TASKS_BUCKET) | kv_write(TASKS_BUCKET, "task.>") | waiting_queue() | ends
        )
    if name == "load":
        return (
            base
            | kv_read(FLEET_BUCKET, watch=True)  # waits for its evictions to finish
            | kv_read(MODELS_BUCKET)
            | kv_write(MODELS_BUCKET, "model.*")  # the measured size of what it loaded
            | node_rw
            | waiting_queue()
            | _pub("ollama.model.loaded", "ollama.model.load.failed", "ollama.model.evict")
        )
    if name == "evict":
        return (
            base
            | kv_read(MODELS_BUCKET)
            | node_rw
            | waiting_queue()
            | _pub("ollama.model.evict", "ollama.model.evicted")
        )
    if name == "pull":
        return (
            base
            | kv_read(MODELS_BUCKET)
            | kv_write(MODELS_BUCKET, "model.*")
            | kv_read(TASKS_BUCKET)
            | kv_write(TASKS_BUCKET, "pull.>")  # its record of each pull
            | node_rw
            | _pub("ollama.model.pull.progress", "ollama.model.pulled", "ollama.model.pull.failed")
        )
    if name == "reconcile":
        return (
            base
            | kv_read(MODELS_BUCKET)
            | tasks_rw
            | node_rw
            | waiting_queue()
            | ends
            | _pub("ollama.model.load", "ollama.model.evict", "ollama.model.evicted")
        )
    raise ValueError(f"unknown function {name!r}")


def client_permissions(client: str) -> Permissions:
    """A client: its own requests and cancels, its own tokens and ends, the catalog."""
    check_client(client)
    return (
        _pub(f"{SUBJECT_PREFIX}.chat.requested.{client}", f"{SUBJECT_PREFIX}.chat.cancel.{client}")
        | _sub(
            f"{SUBJECT_PREFIX}.chat.token.{client}.*",
            f"{SUBJECT_PREFIX}.chat.completed.{client}",
            f"{SUBJECT_PREFIX}.chat.failed.{client}",
        )
        | kv_read(MODELS_BUCKET)
    )


def node_permissions(node_id: str) -> Permissions:
    """A node agent: its own node's record and registration, the catalog (the measured
    footprints of its models, on a GPU), and a `fleet.tick` when it joins or leaves (the
    reconcile function then wakes the parked requests: the agent never touches the queue)."""
    check_node_id(node_id)
    return (
        kv_read(FLEET_BUCKET)
        | kv_write(FLEET_BUCKET, f"node.{node_id}", f"reg.{node_id}")
        | kv_read(MODELS_BUCKET)
        | kv_write(MODELS_BUCKET, "model.*")
        | _pub("ollama.fleet.tick")
    )


def permissions(user: str) -> Permissions:
    """The permissions of a user: a component, a node agent (`agent-<node id>`), or a
    client."""
    if user == ADMIN:
        return Permissions({">"}, {">"})
    if user in FUNCTIONS:
        perms = _function(user)
    elif user == "worker":
        perms = Permissions()
        for name in FUNCTIONS:
            perms |= _function(name)
    elif user == "ui":
        perms = (
            client_permissions("ui")
            | kv_read(FLEET_BUCKET)
            | kv_read(TASKS_BUCKET)
            | _stream_read(WAITING_STREAM)
            | _pub(  # replay of its own chats' tokens: an ordered consumer filtered to them
                f"{API}.CONSUMER.CREATE.{TOKENS_STREAM}.*.{SUBJECT_PREFIX}.chat.token.ui.*",
                f"{API}.CONSUMER.INFO.{TOKENS_STREAM}.*",
                f"{API}.CONSUMER.DELETE.{TOKENS_STREAM}.*",
                f"$JS.FC.{TOKENS_STREAM}.>",
                "ollama.model.load",
                "ollama.model.evict",
                "ollama.model.pull",
                f"{API}.STREAM.INFO.KV_{CHATS_BUCKET}",
                f"{API}.STREAM.CREATE.KV_{CHATS_BUCKET}",
            )
            | kv_read(CHATS_BUCKET)
            | kv_write(CHATS_BUCKET, "chat.>")
            | _sub("ollama.model.>", subject_filter("chat.failed"), f"{DEAD_LETTER_PREFIX}.>")
        )
    elif user == GATEWAY:
        perms = (
            client_permissions(GATEWAY)
            | kv_read(FLEET_BUCKET)
            | kv_read(TASKS_BUCKET)
            | _stream_read(WAITING_STREAM)
            | _pub("ollama.model.load", "ollama.model.evict", "ollama.model.pull")
            | _sub(
                "ollama.model.>",
                "ollama.planner.decided",
                subject_filter("chat.completed"),
                subject_filter("chat.failed"),
                f"{DEAD_LETTER_PREFIX}.>",
            )
        )
    elif user == "bridge":  # and KEDA's /demand: the queue's depth, the fleet's activity
        perms = (
            consume(EVENTS_STREAM, BRIDGE_CONSUMER)
            | _pub(f"{DEAD_LETTER_PREFIX}.bridge")
            | _stream_read(WAITING_STREAM)
            | kv_read(FLEET_BUCKET)
        )
    elif user == "tick":
        perms = _pub("ollama.fleet.tick")
    elif user.startswith(AGENT_PREFIX):
        perms = node_permissions(user.removeprefix(AGENT_PREFIX))
    else:
        perms = client_permissions(user)
    # Every identity hears the replies to its own requests (and JetStream's publish acks).
    return perms | _sub(f"{inbox_prefix(user)}.>")


# -- credentials on disk ------------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    """The users of one deployment and their passwords (kept in a 0600 file)."""

    path: Path
    passwords: dict[str, str]

    def env(self, user: str, nats_url: str, ca: Path | None = None) -> dict[str, str]:
        """The environment a process of `user` connects with (the nats CLI reads it too);
        with TLS, the CA it checks the server against."""
        env = {"NATS_URL": nats_url, "NATS_USER": user, "NATS_PASSWORD": self.passwords[user]}
        if ca is not None:
            env["NATS_CA"] = str(ca)
        return env


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (created 0600: never readable in between)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def ensure_credentials(auth_dir: Path, users: Iterable[str]) -> Credentials:
    """Load `auth_dir/credentials.json`, adding a random password for every user it lacks;
    existing passwords are kept (a restarted stack's clients keep working)."""
    auth_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(auth_dir, 0o700)
    path = auth_dir / "credentials.json"
    try:
        passwords: dict[str, str] = json.loads(path.read_text())
    except (OSError, ValueError):
        passwords = {}
    changed = False
    for user in users:
        if user not in passwords:
            passwords[user] = secrets.token_urlsafe(24)
            changed = True
    if changed or not path.exists():
        write_private(path, json.dumps(passwords, indent=2, sort_keys=True))
    return Credentials(path, passwords)


def nats_config(creds: Credentials) -> str:
    """The `authorization` block of a nats-server config for every user in `creds`."""
    users = [
        {"user": user, "password": password, "permissions": permissions(user).as_nats()}
        for user, password in sorted(creds.passwords.items())
        if user != RUNTIME_KEY
    ]
    # JSON is a subset of the NATS config syntax; `$` is quoted so it is never a variable.
    return "authorization {\n  users = " + json.dumps(users, indent=2) + "\n}\n"


def write_server_config(auth_dir: Path, creds: Credentials, extra: str = "") -> Path:
    """`auth_dir/nats.conf` (0600), and one `<user>.env` (0600) per user, to source for the
    nats CLI or our CLI: `set -a; . <user>.env; set +a`."""
    conf = auth_dir / "nats.conf"
    write_private(conf, extra + nats_config(creds))
    return conf


def write_env_files(
    auth_dir: Path, creds: Credentials, nats_url: str, ca: Path | None = None
) -> None:
    for user in creds.passwords:
        if user == RUNTIME_KEY:
            continue
        lines = [f"{k}={v}" for k, v in creds.env(user, nats_url, ca).items()]
        write_private(auth_dir / f"{user}.env", "\n".join(lines) + "\n")


def write_identities(
    auth_dir: Path, users: Iterable[str], nats_url: str, ca: Path | None = None
) -> Credentials:
    """Every user's password (kept if already made), the server's `nats.conf` and one
    `<user>.env` each (with NATS_CA under TLS), all in `auth_dir`: what `up`, `add-client`
    and `auth-config` write."""
    creds = ensure_credentials(auth_dir, users)
    write_server_config(auth_dir, creds)
    write_env_files(auth_dir, creds, nats_url, ca)
    return creds


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def stack_users(nodes: Iterable[str], clients: Iterable[str] = (DEFAULT_CLIENT,)) -> list[str]:
    """Every identity the local stack runs with, plus its clients."""
    return [*COMPONENTS, *(agent_user(n) for n in nodes), *clients]
