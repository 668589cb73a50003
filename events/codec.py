"""CloudEvents 1.0 <-> NATS messages, as the CloudEvents NATS protocol binding describes.

Pure functions on (headers, body); no I/O. Binary mode carries every attribute in a
`ce-<attr>` header (percent-encoded) and the data in the body; structured mode is one JSON
document with `Content-Type: application/cloudevents+json` (or no headers at all, as
`nats pub` and Knative's NATS channel send it). We read both and write binary.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

from .types import EVENT_SOURCE

SPECVERSION = "1.0"
REQUIRED = ("id", "source", "type", "specversion")
CORE_ATTRS = {
    "id",
    "source",
    "type",
    "specversion",
    "time",
    "subject",
    "datacontenttype",
    "dataschema",
}
STRUCTURED_CT = "application/cloudevents+json"
MAX_EVENT_BYTES = 1_048_576  # the NATS default max_payload
MAX_ID_CHARS = 256  # ids become KV keys and message ids: keep them well inside a header line

# The binding: percent-encode space, '"', '%' and everything outside printable ASCII.
_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')
_PLAIN = re.compile("[" + re.escape(_SAFE) + "]*")  # what `quote(..., safe=_SAFE)` leaves as is


class CodecError(ValueError):
    """The message is not a CloudEvent we can read; the text says why."""


@dataclass(frozen=True, slots=True)
class Event:
    """A CloudEvent: required attributes, optional ones, extensions and JSON data."""

    type: str
    data: Any = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    source: str = EVENT_SOURCE
    specversion: str = SPECVERSION
    time: str | None = field(default_factory=lambda: datetime.now(UTC).isoformat())
    subject: str | None = None
    datacontenttype: str | None = "application/json"
    extensions: dict[str, str] = field(default_factory=dict)

    def attributes(self) -> dict[str, str]:
        attrs = {
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "specversion": self.specversion,
        }
        for name in ("time", "subject", "datacontenttype"):
            value = getattr(self, name)
            if value is not None:
                attrs[name] = value
        attrs.update(self.extensions)
        return attrs


def _encode_data(event: Event) -> bytes:
    if event.data is None:
        return b""
    if isinstance(event.data, bytes):
        return event.data
    return json.dumps(event.data, separators=(",", ":"), ensure_ascii=False).encode()


def _quote(value: str) -> str:
    # A value of safe characters only is its own encoding (the common case: ids, types,
    # times); the check costs a third of `quote`.
    return value if _PLAIN.fullmatch(value) else quote(value, safe=_SAFE)


def to_binary(event: Event) -> tuple[dict[str, str], bytes]:
    """Binary mode: `ce-*` headers (percent-encoded) and the data as the body."""
    headers = {f"ce-{k}": _quote(str(v)) for k, v in event.attributes().items()}
    return headers, _encode_data(event)


def to_structured(event: Event) -> tuple[dict[str, str], bytes]:
    """Structured mode: one JSON document (used by tests and for `nats pub` examples)."""
    doc: dict[str, Any] = dict(event.attributes())
    if event.data is not None:
        doc["data"] = event.data
    return {"Content-Type": STRUCTURED_CT}, json.dumps(doc).encode()


def _unquote_header(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return unquote(value)


def _decode_body(body: bytes, content_type: str | None) -> Any:
    if not body:
        return None
    if content_type is None or "json" in content_type.lower():
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, or nesting too deep
            raise CodecError(f"event data is not valid JSON ({exc})") from exc
    return bytes(body)


def _build(attrs: dict[str, Any], data: Any) -> Event:
    missing = [a for a in REQUIRED if not attrs.get(a)]
    if missing:
        raise CodecError(f"not a CloudEvent: missing required attribute(s) {', '.join(missing)}")
    if attrs["specversion"] != SPECVERSION:
        raise CodecError(f"unsupported specversion {attrs['specversion']!r}; expected '1.0'")
    for name in CORE_ATTRS:
        if name in attrs and attrs[name] is not None and not isinstance(attrs[name], str):
            kind = type(attrs[name]).__name__
            raise CodecError(f"attribute {name!r} must be a string, got {kind}")
    for name in ("id", "source"):
        if len(attrs[name]) > MAX_ID_CHARS:
            raise CodecError(
                f"attribute {name!r} is {len(attrs[name])} characters; the limit is {MAX_ID_CHARS}"
            )
    ext = {k: str(v) for k, v in attrs.items() if k not in CORE_ATTRS}
    return Event(
        type=attrs["type"],
        data=data,
        id=attrs["id"],
        source=attrs["source"],
        specversion=attrs["specversion"],
        time=attrs.get("time"),
        subject=attrs.get("subject"),
        datacontenttype=attrs.get("datacontenttype"),
        extensions=ext,
    )


def decode(headers: Mapping[str, str] | None, body: bytes) -> Event:
    """Read a CloudEvent in either mode from a NATS message or an HTTP request (the bindings
    differ only in the header names' case, which is ignored). Raises CodecError saying what
    is wrong; never anything else."""
    if len(body) > MAX_EVENT_BYTES:
        raise CodecError(f"event is {len(body)} bytes; the limit is {MAX_EVENT_BYTES}")
    h = {k.lower(): v for k, v in (headers or {}).items()}
    content_type = h.get("content-type")
    binary = "ce-specversion" in h and not (
        content_type and content_type.lower().startswith("application/cloudevents")
    )
    if binary:
        attrs = {k[3:]: _unquote_header(v) for k, v in h.items() if k.startswith("ce-")}
        attrs.setdefault("datacontenttype", content_type or "application/json")
        return _build(attrs, _decode_body(body, attrs.get("datacontenttype")))
    if content_type and not content_type.lower().startswith("application/cloudevents") and h:
        raise CodecError(
            f"binary-mode event without ce-specversion header (Content-Type {content_type!r})"
        )
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, or nesting too deep
        raise CodecError(f"structured CloudEvent is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise CodecError(f"structured CloudEvent must be a JSON object, got {type(doc).__name__}")
    data = doc.pop("data", None)
    if "data_base64" in doc:
        raise CodecError("data_base64 is not supported: send JSON data")
    return _build(doc, data)


def to_http_binary(event: Event) -> tuple[dict[str, str], bytes]:
    """Binary-mode HTTP request parts, exactly as Knative delivers to a function."""
    headers = {
        f"ce-{k}": quote(str(v), safe=_SAFE)
        for k, v in event.attributes().items()
        if k != "datacontenttype"
    }
    headers["content-type"] = event.datacontenttype or "application/json"
    return headers, _encode_data(event)
