"""CloudEvent types of the system: the contract between functions, clients and the UI.

Every type name maps to one pydantic model for its `data` and to one NATS subject,
`ollama.<type>`. A chat's events also carry the bus identity of the client that asked (its
*client* segment), so that NATS permissions can give each client its own chats and nothing
else: `ollama.chat.requested.<client>`, `ollama.chat.cancel.<client>`,
`ollama.chat.token.<client>.<chat_id>`, `ollama.chat.completed.<client>`,
`ollama.chat.failed.<client>`. The segment is set by the server's permissions (a client may
publish only under its own name), never by what an event says of itself.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

SUBJECT_PREFIX = "ollama"
DEAD_LETTER_PREFIX = f"{SUBJECT_PREFIX}.deadletter"
EVENT_SOURCE = "ollama-autoscaler"

# Model names as Ollama writes them: `llama3.1:8b`, `hf.co/org/repo:Q4_K_M`, `user/model:tag`.
# Anything else (spaces, control characters, `..`, NATS wildcards) is refused at the edge.
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/:]{0,199}$")
CHAT_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
# A client's name: its NATS user and its subject segment (no dots, no wildcards).
CLIENT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
DEFAULT_CLIENT = "client"  # the local stack's client identity (and the name with no auth)
CLIENT_EXTENSION = "oaclient"  # set by the dispatcher from the subject, never by the client
PER_CLIENT = frozenset(
    {"chat.requested", "chat.cancel", "chat.token", "chat.completed", "chat.failed"}
)
MAX_MESSAGES = 512
MAX_PROMPT_CHARS = 200_000


def _check_model(name: str) -> str:
    if not MODEL_NAME_RE.match(name) or ".." in name:
        raise ValueError(
            f"invalid model name {name!r}: use letters, digits and . _ - / : (at most 200 chars)"
        )
    return name


ModelName = Annotated[str, AfterValidator(_check_model)]


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Data):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatOptions(_Data):
    num_ctx: int | None = Field(default=None, ge=16, le=1_048_576)
    temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    max_tokens: int | None = Field(default=None, ge=1, le=131_072)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = None
    keep_alive_s: float | None = Field(default=None, ge=0)
    stop: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None, max_length=8
    )


class ChatRequested(_Data):
    chat_id: str
    model: ModelName
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    options: ChatOptions = Field(default_factory=ChatOptions)
    priority: int = Field(default=0, ge=-100, le=100)

    @field_validator("chat_id")
    @classmethod
    def _chat_id(cls, v: str) -> str:
        if not CHAT_ID_RE.match(v):
            raise ValueError(f"invalid chat_id {v!r}: use 1-128 of A-Z a-z 0-9 _ -")
        return v

    def prompt_chars(self) -> int:
        return sum(len(m.content) for m in self.messages)


class ChatToken(_Data):
    chat_id: str
    task_id: str
    seq: int
    text: str
    attempt: int = 1  # a redelivered request restarts its stream with a higher attempt


class ChatStats(_Data):
    queue_ms: float
    load_ms: float
    ttft_ms: float
    total_ms: float
    tokens: int
    tokens_per_s: float
    node: str
    model: str
    attempt: int = 1
    prompt_tokens: int | None = None  # as the runtime counted them, when it says
    done_reason: str | None = None  # "stop" (the model ended) or "length" (max_tokens)


class ChatCompleted(_Data):
    chat_id: str
    task_id: str
    text: str
    stats: ChatStats


class ErrorInfo(_Data):
    code: str
    message: str


class ChatFailed(_Data):
    chat_id: str
    task_id: str
    error: ErrorInfo
    text: str = ""  # what was generated before it failed, if anything
    model: str = ""  # the model asked for ("?" when the request named none readable)


class ChatCancel(_Data):
    """Stop a chat: generation stops, the lease is released, the chat ends once with
    `chat.failed` code `cancelled` (carrying the text so far); a parked one leaves the queue."""

    chat_id: str
    task_id: str = Field(min_length=1, max_length=256)


class ModelLoad(_Data):
    model: ModelName
    node: str | None = None
    reason: str = "manual"
    task_id: str | None = None
    gen: int | None = None  # the slot a placement committed (absent: a manual load)


class ModelLoaded(_Data):
    model: str
    node: str
    bytes: int
    load_ms: float
    reason: str = ""  # the load's: chat, manual, ui, api, adopted, ...


class ModelLoadFailed(_Data):
    model: str
    node: str
    error: str
    reason: str = ""


class ModelEvict(_Data):
    model: ModelName
    node: str | None = None
    reason: str = "manual"
    gen: int | None = None  # only this copy: a late evict never unloads a newer one


class ModelEvicted(_Data):
    model: str
    node: str
    bytes_freed: int
    reason: str = ""
    evict_ms: float = 0.0


class ModelPull(_Data):
    """Fetch a model onto a node: from the Ollama library (Ollama nodes), or a GGUF from an
    http(s) `url` (llama.cpp nodes), checked against `sha256` when given."""

    model: ModelName
    node: str | None = None
    url: str | None = Field(default=None, pattern=r"^https?://", max_length=2048)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")


class ModelPullProgress(_Data):
    model: str
    node: str | None = None
    task_id: str = ""
    status: str = ""
    completed: int
    total: int


class ModelPulled(_Data):
    model: str
    node: str | None = None
    task_id: str = ""
    bytes: int = 0


class ModelPullFailed(_Data):
    model: str
    node: str | None = None
    task_id: str = ""
    error: ErrorInfo


class PlannerDecided(_Data):
    """What a chat's placement decided, and how long the decision took (the fleet reads, the
    plan and its compare-and-set). Sent on core NATS only (no stream keeps it): for metrics."""

    task_id: str
    model: str
    decision: Literal["resident", "load", "evict_and_load", "queue", "reject"]
    node: str | None = None
    evicted: list[str] = Field(default_factory=list)
    decision_ms: float


class FleetTick(_Data):
    model_config = ConfigDict(extra="allow")


class DeadLetter(_Data):
    """What the dead-letter subject records: the reason and the original event, untouched."""

    reason: str
    consumer: str
    event_type: str | None = None
    event_id: str | None = None
    subject: str
    headers: dict[str, str]
    body: str  # original bytes, decoded as UTF-8 with replacement (cut if very large)
    body_bytes: int = 0  # the original body's size
    body_sha256: str = ""  # of the original body, whole (the kept body may be cut)
    body_truncated: bool = False
    num_delivered: int = 1


EVENT_DATA: dict[str, type[BaseModel]] = {
    "chat.requested": ChatRequested,
    "chat.token": ChatToken,
    "chat.completed": ChatCompleted,
    "chat.failed": ChatFailed,
    "chat.cancel": ChatCancel,
    "model.load": ModelLoad,
    "model.loaded": ModelLoaded,
    "model.load.failed": ModelLoadFailed,
    "model.evict": ModelEvict,
    "model.evicted": ModelEvicted,
    "model.pull": ModelPull,
    "model.pull.progress": ModelPullProgress,
    "model.pulled": ModelPulled,
    "model.pull.failed": ModelPullFailed,
    "fleet.tick": FleetTick,
    "planner.decided": PlannerDecided,
}


def check_client(client: str) -> str:
    if not CLIENT_RE.match(client):
        raise ValueError(
            f"invalid client name {client!r}: use 1-64 of a-z 0-9 _ - (start with a-z or 0-9)"
        )
    return client


def subject_for(event_type: str, chat_id: str | None = None, client: str | None = None) -> str:
    """The NATS subject an event of this type is published on. A chat's events need the
    client's name (and tokens the chat id)."""
    if event_type not in EVENT_DATA:
        raise ValueError(f"unknown event type {event_type!r}; known: {sorted(EVENT_DATA)}")
    if event_type not in PER_CLIENT:
        return f"{SUBJECT_PREFIX}.{event_type}"
    if client is None:
        raise ValueError(f"{event_type} events need the client's name for their subject")
    check_client(client)
    if event_type == "chat.token":
        if chat_id is None:
            raise ValueError("chat.token events need a chat_id for their subject")
        return f"{SUBJECT_PREFIX}.chat.token.{client}.{chat_id}"
    return f"{SUBJECT_PREFIX}.{event_type}.{client}"


def subject_filter(event_type: str) -> str:
    """The subjects of every event of this type, whoever's: a consumer's filter."""
    if event_type == "chat.token":
        return f"{SUBJECT_PREFIX}.chat.token.*.*"
    if event_type in PER_CLIENT:
        return f"{SUBJECT_PREFIX}.{event_type}.*"
    return subject_for(event_type)


def subject_fits(event_type: str, subject: str) -> bool:
    """Is `subject` where events of this type are published (any client's, for a chat's)?"""
    if event_type not in PER_CLIENT:
        return event_type in EVENT_DATA and subject == subject_for(event_type)
    prefix = f"{SUBJECT_PREFIX}.{event_type}."
    rest = subject[len(prefix) :] if subject.startswith(prefix) else ""
    return bool(rest) and rest.count(".") == (1 if event_type == "chat.token" else 0)


def client_of(subject: str) -> str | None:
    """The client segment of a chat event's subject (None for other subjects)."""
    parts = subject.split(".")
    if len(parts) >= 4 and parts[0] == SUBJECT_PREFIX and parts[1] == "chat":
        if f"chat.{parts[2]}" in PER_CLIENT and CLIENT_RE.match(parts[3]):
            return parts[3]
    return None
