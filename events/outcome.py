"""One vocabulary for what became of a delivered event, used by every function and transport.

  Done            acknowledge; the event is handled.
  Retry(delay)    redeliver after `delay_s` (NAK with delay). `failure=False` marks a planned
                  wait (the request is queued for memory) that never dead-letters.
  Reject(reason)  the event can never succeed: terminate it and record it, with the reason,
                  on the dead-letter subject.

Over HTTP (functions-framework / Knative) they map to 200, 503 + Retry-After, and 422.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Done:
    note: str = ""


@dataclass(frozen=True, slots=True)
class Retry:
    delay_s: float
    reason: str = ""
    failure: bool = True


@dataclass(frozen=True, slots=True)
class Reject:
    reason: str


Outcome = Done | Retry | Reject

HTTP_DONE, HTTP_REJECT, HTTP_RETRY = 200, 422, 503
HEADER_QUEUED = "x-oa-queued"  # a Retry that is a planned wait, not a failure


def to_http(outcome: Outcome) -> tuple[int, dict[str, str], str]:
    """(status, headers, body) for a functions-framework HTTP response."""
    if isinstance(outcome, Done):
        return HTTP_DONE, {}, outcome.note or "done"
    if isinstance(outcome, Retry):
        headers = {"retry-after": f"{outcome.delay_s:.3f}"}
        if not outcome.failure:
            headers[HEADER_QUEUED] = "1"
        return HTTP_RETRY, headers, outcome.reason
    return HTTP_REJECT, {}, outcome.reason


def from_http(status: int, headers: dict[str, str], body: str) -> Outcome:
    """Read a function's HTTP answer back as an outcome (Knative's status semantics)."""
    if 200 <= status < 300:
        return Done(body[:200])
    if status in (400, 404, 409, 413, 415, 422):
        return Reject(body or f"HTTP {status}")
    try:
        delay = float(headers.get("retry-after", "1"))
    except ValueError:
        delay = 1.0
    return Retry(delay, body or f"HTTP {status}", failure=HEADER_QUEUED not in headers)


MAX_REASON_CHARS = 2000


def invalid(event_type: str, exc: Any) -> str:
    """The reason for refusing an event whose data failed validation: each error's place and
    message, with what was sent cut to a few characters (a 900 KB prompt must not make the
    reason, the task's error or the end event too big to send)."""
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err.get("loc", ())) or "data"
        sent = repr(err.get("input"))
        sent = sent if len(sent) <= 80 else f"{sent[:77]}..."
        parts.append(f"{where}: {err.get('msg')} (got {sent})")
    reason = f"invalid {event_type} data: " + "; ".join(parts)
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."
