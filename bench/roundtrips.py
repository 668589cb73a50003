"""Counting a chat's NATS round trips (bench-only instrumentation).

`Tracer.install()` wraps nats-py's `Client.request` (every JetStream publish, KV read and
write, API call) and `Client.publish` (core publishes, and pull requests, which are
publishes with a reply subject) and the HTTP client's `send`, recording when each began and
on what. A round trip is a request awaiting its reply, or a pull request. The bench then cuts
the record at a chat's publish, its first token and its end, and says what each stretch cost.
"""

from __future__ import annotations

import contextvars
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
from nats.aio.client import Client


@dataclass(frozen=True)
class Op:
    at: float  # time.perf_counter() when it began
    kind: str  # "rt" (awaits a reply), "pull", "publish" (none awaited), "http"
    what: str  # a readable name: "KV write tasks", "JS publish chat.requested", ...
    where: str = ""  # the call site in this project's code that led to it


_IN_REQUEST: contextvars.ContextVar[bool] = contextvars.ContextVar("in_request", default=False)
OURS = ("/functions/", "/events/", "/stores/", "/agent/", "/autoscaler/", "/gateway/")


def call_site() -> str:
    """The innermost frame of this project's code (not the bench) on the stack."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if any(part in name for part in OURS) and "site-packages" not in name:
            return f"{name.rsplit('/', 2)[-2]}/{name.rsplit('/', 1)[-1]}:{frame.f_code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    return "?"


def label(subject: str, has_reply: bool) -> tuple[str, str]:
    """(kind, what) of a NATS operation on `subject`."""
    if subject.startswith("$JS.API.CONSUMER.MSG.NEXT."):
        return "pull", f"pull {subject.rsplit('.', 1)[-1]}"
    if subject.startswith("$JS.API.DIRECT.GET.KV_"):
        return "rt", f"KV read {subject.split('.')[4].removeprefix('KV_')}"
    if subject.startswith("$JS.API."):
        return "rt", "JS API " + ".".join(subject.split(".")[2:4])
    if subject.startswith("$KV."):
        return "rt", f"KV write {subject.split('.')[1]}"
    name = ".".join(subject.split(".")[1:3]) if subject.startswith("ollama.") else subject
    if has_reply:
        return "rt", f"JS publish {name}"
    return "publish", f"publish {name}"


@dataclass
class Tracer:
    ops: list[Op] = field(default_factory=list)
    on: bool = False
    _saved: dict[str, Any] = field(default_factory=dict)

    def install(self) -> Tracer:
        tracer = self
        request, publish, send = Client.request, Client.publish, httpx.AsyncClient.send

        async def traced_request(self: Client, subject: str, *a: Any, **kw: Any) -> Any:
            if tracer.on:
                tracer.ops.append(Op(time.perf_counter(), *label(subject, True), call_site()))
            token = _IN_REQUEST.set(True)  # its own publish is not counted again
            try:
                return await request(self, subject, *a, **kw)
            finally:
                _IN_REQUEST.reset(token)

        async def traced_publish(self: Client, subject: str, *a: Any, **kw: Any) -> Any:
            if tracer.on and not _IN_REQUEST.get():
                reply = kw.get("reply") or (a[1] if len(a) > 1 else "")
                kind, what = label(subject, bool(reply))
                if kind == "rt":  # an acknowledged publish awaited elsewhere (tokens)
                    kind, what = "publish", what.replace("JS publish", "JS publish (ack later)")
                tracer.ops.append(Op(time.perf_counter(), kind, what, call_site()))
            return await publish(self, subject, *a, **kw)

        async def traced_send(self: httpx.AsyncClient, *a: Any, **kw: Any) -> Any:
            if tracer.on:
                req = a[0] if a else kw["request"]
                tracer.ops.append(
                    Op(time.perf_counter(), "http", f"HTTP {req.url.path}", call_site())
                )
            return await send(self, *a, **kw)

        self._saved = {"request": request, "publish": publish, "send": send}
        Client.request = traced_request  # type: ignore[method-assign]
        Client.publish = traced_publish  # type: ignore[method-assign]
        httpx.AsyncClient.send = traced_send  # type: ignore[method-assign]
        return self

    def uninstall(self) -> None:
        if self._saved:
            Client.request = self._saved["request"]  # type: ignore[method-assign]
            Client.publish = self._saved["publish"]  # type: ignore[method-assign]
            httpx.AsyncClient.send = self._saved["send"]  # type: ignore[method-assign]
            self._saved = {}

    def between(self, t0: float, t1: float) -> list[Op]:
        return [op for op in self.ops if t0 <= op.at < t1]


def round_trips(ops: list[Op]) -> int:
    return sum(op.kind in ("rt", "pull") for op in ops)


def typical(stretches: list[list[Op]]) -> tuple[int, Counter[str]]:
    """The median round-trip count of the stretches, and what the median stretch was made of."""
    ranked = sorted(stretches, key=round_trips)
    mid = ranked[len(ranked) // 2] if ranked else []
    return round_trips(mid), Counter(f"{op.what} ({op.where})" for op in mid)
