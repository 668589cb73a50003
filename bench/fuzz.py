"""Fuzzing the bus (`make fuzz`): generated events on every subject the functions consume,
through the real local stack — nats-server with auth, llama-server, the function processes
fed over HTTP by the dispatchers, as `make run` runs them.

The events come from hypothesis strategies built from the event schemas (`events/types.py`):
valid events of each consumed type, and mutations of them — truncated and random bytes, wrong
types, huge fields, unicode and NATS wildcard characters in names and ids, CloudEvents with a
missing or oversized attribute, an event of one type on another's subject, absurd options,
client segments that are not names — plus re-publishes of earlier events (duplicate ids).
Each is marked `bad` when it must end as a dead letter.

Figures: events published (and refused by the server at the edge, over its max payload),
crashed or restarted processes, tracebacks in any log, bad events dead-lettered with a reason
(each matched by subject and body SHA-256), bad chat requests that name a chat whose client
heard `chat.failed`, RSS of every process before and after, and whether a normal chat is
served right after. `python -m bench.fuzz --events 10000`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import hashlib
import json
import logging
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from autoscaler.client import chat as client_chat
from events import bus
from events.codec import Event, to_binary, to_structured
from events.types import CHAT_ID_RE, CLIENT_RE, ChatRequested
from functions.services import Settings
from stack.local import CHAT_MODEL, LocalStack, StackConfig

OUT = Path("docs/bench")
CLIENT = "client"
CTX = 2048  # the local stack's context size (the chat model's, in the catalog)
MIB = 1 << 20
log = logging.getLogger("bench.fuzz")

HOSTILE = [
    "a*b", "x.>", "a b", "..", "a.b*c", "\x00", "ünïcødé-名前", "$KV.fleet.node.x", "",
    "*", ">", "\n", "a" * 300, "../../etc/passwd", "😀", "%00", "\u202e",
]  # fmt: skip


@dataclass
class Case:
    kind: str
    subject: str
    headers: dict[str, str] | None
    body: bytes
    bad: bool  # must end as a dead letter
    names_chat: str | None = None  # a bad chat request naming this chat: its client is told

    @property
    def key(self) -> tuple[str, str]:
        return self.subject, hashlib.sha256(self.body).hexdigest()


# -- strategies -----------------------------------------------------------------------------------
chat_ids = st.from_regex(CHAT_ID_RE, fullmatch=True)
texts = st.text(max_size=40)


def options(absurd: bool) -> st.SearchStrategy[dict[str, Any]]:
    if not absurd:
        return st.fixed_dictionaries(
            {"max_tokens": st.integers(1, 3)},
            optional={"temperature": st.floats(0, 1.5), "seed": st.integers(0, 2**31)},
        )
    wild = st.one_of(
        st.integers(-(2**63), 2**63),
        st.floats(allow_nan=False),
        st.just(10**30),
        st.text(max_size=5),
        st.none(),
        st.lists(st.integers(), max_size=3),
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "num_ctx": wild,
            "max_tokens": wild,
            "keep_alive_s": wild,
            "temperature": wild,
            "top_p": wild,
            "stop": st.lists(st.text(max_size=80), max_size=12),
            "evil": st.integers(),
        },
    ).filter(bool)


def chat_data(model: st.SearchStrategy[str], absurd: bool = False) -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {
            "chat_id": chat_ids,
            "model": model,
            "messages": st.lists(
                st.fixed_dictionaries({"role": st.just("user"), "content": texts}),
                min_size=1,
                max_size=3,
            ),
            "options": options(absurd),
        },
        optional={"priority": st.integers(-100, 100)},
    )


known_models = st.sampled_from([CHAT_MODEL])
unknown_models = st.from_regex(r"[a-z][a-z0-9]{2,10}:[0-9]b", fullmatch=True)


def valid_data(event_type: str) -> st.SearchStrategy[Any]:
    if event_type == "chat.requested":  # mostly unknown models: they fail fast
        return chat_data(st.one_of(unknown_models, unknown_models, unknown_models, known_models))
    if event_type == "chat.cancel":
        return st.fixed_dictionaries({"chat_id": chat_ids, "task_id": st.uuids().map(str)})
    if event_type in ("model.load", "model.evict"):
        return st.fixed_dictionaries({"model": unknown_models}, optional={"reason": texts})
    if event_type == "model.pull":  # nothing answers on port 9: a download that fails
        return st.fixed_dictionaries(
            {"model": unknown_models, "url": st.just("http://127.0.0.1:9/x.gguf")}
        )
    return st.just({})  # fleet.tick


SUBJECTS = {
    "chat.requested": f"ollama.chat.requested.{CLIENT}",
    "chat.cancel": f"ollama.chat.cancel.{CLIENT}",
    "model.load": "ollama.model.load",
    "model.evict": "ollama.model.evict",
    "model.pull": "ollama.model.pull",
    "fleet.tick": "ollama.fleet.tick",
}
CONSUMED = tuple(SUBJECTS)


def _encode(event: Event, structured: bool) -> tuple[dict[str, str] | None, bytes]:
    if structured:
        return None, to_structured(event)[1]
    return to_binary(event)


def _acceptable(data: dict[str, Any]) -> bool:
    """Would the chat function take this request for the chat model (schema and bounds)?"""
    try:
        req = ChatRequested.model_validate(data)
    except ValueError:
        return False
    o, limits = req.options, Settings()
    return not (
        (o.num_ctx is not None and o.num_ctx > CTX)
        or (o.max_tokens is not None and o.max_tokens > limits.max_tokens)
        or (o.keep_alive_s is not None and o.keep_alive_s > limits.max_keep_alive_s)
        or req.prompt_chars() / limits.chars_per_token > (o.num_ctx or CTX)
    )


@st.composite
def cases(draw: st.DrawFn) -> Case:
    event_type = draw(st.sampled_from(CONSUMED))
    subject = SUBJECTS[event_type]
    data = draw(valid_data(event_type))
    ev = Event(event_type, data, source=draw(st.sampled_from(["fuzz", "cli", "ui"])))
    structured = draw(st.booleans())
    kind = draw(
        st.sampled_from(
            ["valid"] * 6
            + ["truncated", "random-bytes", "wrong-type", "huge-field", "hostile-name",
               "bad-attribute", "wrong-subject", "absurd-options", "bad-client", "not-object"]
        )
    )  # fmt: skip
    names = data.get("chat_id") if event_type == "chat.requested" else None
    if kind == "valid":
        headers, body = _encode(ev, structured)
        return Case(kind, subject, headers, body, bad=False)
    if kind == "truncated":
        headers, body = _encode(ev, structured)
        cut = draw(st.integers(1, max(1, len(body) - 1)))
        return Case(kind, subject, headers, body[:cut], bad=True)
    if kind == "random-bytes":
        body = draw(st.binary(min_size=1, max_size=300))
        headers = draw(st.sampled_from([None, {"ce-specversion": "1.0"}]))
        return Case(kind, subject, headers, body, bad=True)
    if kind == "not-object":
        body = json.dumps(draw(st.one_of(st.lists(st.integers()), st.text(), st.integers())))
        return Case(kind, subject, None, body.encode(), bad=True)
    if kind == "wrong-type":
        if not data:  # fleet.tick takes anything: give its data a wrong shape instead
            return Case(kind, subject, None, b'{"specversion":1}', bad=True)
        key = draw(st.sampled_from(sorted(data)))
        bad_value = draw(st.one_of(st.integers(), st.lists(st.text(max_size=3)), st.none(),
                                   st.dictionaries(st.text(max_size=3), st.integers(),
                                                   min_size=1)))  # fmt: skip
        if (isinstance(data[key], list) and isinstance(bad_value, list)) or key == "reason":
            bad_value = {"not": "this"}
        mutated = Event(event_type, {**data, key: bad_value}, id=ev.id, source=ev.source)
        headers, body = _encode(mutated, structured)
        named = names if key != "chat_id" else None
        return Case(kind, subject, headers, body, bad=True, names_chat=named)
    if kind == "huge-field":
        size = draw(st.sampled_from([300_000, 900_000, 2 * MIB]))
        field_ = "content" if event_type == "chat.requested" else "model"
        if event_type == "chat.requested":
            data = {**data, "messages": [{"role": "user", "content": "x" * size}]}
        elif event_type == "fleet.tick":
            return Case(kind, subject, None, b'{"id":"' + b"x" * size + b'"}', bad=True)
        else:
            data = {**data, field_: "m" * size}
        headers, body = _encode(Event(event_type, data, id=ev.id, source=ev.source), structured)
        return Case(kind, subject, headers, body, bad=True, names_chat=names)
    if kind == "hostile-name":
        hostile = draw(st.sampled_from(HOSTILE))
        if event_type == "fleet.tick":  # takes any data: a hostile id instead
            doc = json.loads(to_structured(ev)[1]) | {"id": hostile or "x" * 300}
            return Case(kind, subject, None, json.dumps(doc).encode(), bad=not hostile)
        if event_type == "chat.requested":
            where = draw(st.sampled_from(["model", "chat_id"]))
        elif event_type == "chat.cancel":
            where = draw(st.sampled_from(["chat_id", "task_id"]))
        else:
            where = "model"
        mutated = Event(event_type, {**data, where: hostile}, id=ev.id, source=ev.source)
        headers, body = _encode(mutated, structured)
        if event_type == "chat.cancel":  # any chat id, a task id of 1-256: a cancel of nothing
            bad = where == "task_id" and not 1 <= len(hostile) <= 256
            return Case(kind, subject, headers, body, bad=bad)
        named = names if where == "model" else None
        return Case(kind, subject, headers, body, bad=True, names_chat=named)
    if kind == "bad-attribute":
        attr = draw(st.sampled_from(["id", "source", "type", "specversion"]))
        doc = json.loads(to_structured(ev)[1])
        value = draw(st.sampled_from([None, "", "x" * 1400, "other"]))
        if value is None:
            doc.pop(attr, None)
        elif value == "other":  # another version, or another type than the subject's
            doc[attr] = {"specversion": "2.0", "type": "chat.completed"}.get(attr, "x" * 257)
        else:
            doc[attr] = value
        return Case(kind, subject, None, json.dumps(doc).encode(), bad=True)
    if kind == "wrong-subject":
        other = draw(st.sampled_from([t for t in CONSUMED if t != event_type]))
        headers, body = _encode(ev, structured)
        return Case(kind, SUBJECTS[other], headers, body, bad=True)
    if kind == "absurd-options":
        if event_type != "chat.requested":  # fields the schema does not have
            extra = draw(
                st.dictionaries(st.text(min_size=1, max_size=8), st.integers(), min_size=1)
            )
            mutated = Event(event_type, {**data, **{f"x{k}": v for k, v in extra.items()}},
                            id=ev.id, source=ev.source)  # fmt: skip
            headers, body = _encode(mutated, structured)
            return Case(kind, subject, headers, body, bad=event_type != "fleet.tick")
        data = {**data, "options": draw(options(absurd=True)), "model": CHAT_MODEL}
        bad = not _acceptable(data)
        if not bad:  # within every bound after all: keep its answer short
            data["options"] = {**data["options"], "max_tokens": 3}
        headers, body = _encode(Event(event_type, data, id=ev.id, source=ev.source), structured)
        return Case(kind, subject, headers, body, bad=bad, names_chat=names if bad else None)
    # bad-client: a chat subject whose last token is not a client's name
    if event_type not in ("chat.requested", "chat.cancel"):
        return Case(kind, subject, None, b"", bad=True)
    segment = draw(st.sampled_from(["Bad", "ünï", "a$b", "x" * 80, "-lead"]))
    assert not CLIENT_RE.match(segment)
    headers, body = _encode(ev, structured)
    return Case(kind, f"{subject.rsplit('.', 1)[0]}.{segment}", headers, body, bad=True)


def draw_cases(n: int, seed_: int) -> list[Case]:
    """`n` cases from the strategies (hypothesis with a fixed seed, only generating: the first
    cases repeat, but hypothesis adapts as it goes, so the mix of a long run varies a little
    from run to run), with about one in twenty a re-publish of an earlier one."""
    out: list[Case] = []

    @seed(seed_)
    @settings(
        max_examples=n,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        deadline=None,
    )
    @given(cases())
    def collect(case: Case) -> None:
        out.append(case)

    collect()
    rng = random.Random(seed_)
    for i in range(len(out)):
        if i > 10 and rng.random() < 0.05:  # duplicate ids: an earlier event again
            earlier = out[rng.randrange(i)]
            out[i] = Case("duplicate", earlier.subject, earlier.headers, earlier.body, earlier.bad,
                          earlier.names_chat)  # fmt: skip
    return out[:n]


# -- the run --------------------------------------------------------------------------------------
class Tracebacks(logging.Handler):
    """Counts log records that carry a traceback, in this process."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(self.format(record)[:2000])


@dataclass
class Figures:
    events: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    refused_at_edge: int = 0  # over the server's max payload: the client library refused it
    published: int = 0
    bad: int = 0
    bad_dead_lettered: int = 0
    bad_missed: list[str] = field(default_factory=list)
    dead_letters: int = 0
    dead_letters_without_reason: int = 0
    named: int = 0
    named_told: int = 0
    named_missed: list[str] = field(default_factory=list)
    tracebacks: int = 0
    traceback_samples: list[str] = field(default_factory=list)
    restarts: int = 0
    dead_processes: list[str] = field(default_factory=list)
    rss_before_mib: dict[str, float] = field(default_factory=dict)
    rss_after_mib: dict[str, float] = field(default_factory=dict)
    normal_chat: str = ""
    seconds: float = 0.0


def _rss(stack: LocalStack) -> dict[str, float]:
    out = {"dispatchers (this process)": psutil.Process().memory_info().rss / MIB}
    for p in stack.procs:
        try:
            out[p.name] = psutil.Process(p.popen.pid).memory_info().rss / MIB
        except psutil.NoSuchProcess:
            out[p.name] = -1.0
    return out


async def _quiet(admin: Any, timeout: float) -> None:
    """Until every consumer has nothing pending or in flight, twice in a row."""
    js, calm, deadline = admin.jetstream(), 0, time.monotonic() + timeout
    while calm < 2:
        if time.monotonic() > deadline:
            raise TimeoutError("the consumers did not drain")
        busy = 0
        for name in bus.CONSUMERS:
            info = await js.consumer_info(bus.EVENTS_STREAM, name)
            busy += (info.num_pending or 0) + (info.num_ack_pending or 0)
        calm = calm + 1 if busy == 0 else 0
        await asyncio.sleep(0.5)


async def run(n: int, seed: int = 1, state_dir: Path | None = None) -> Figures:
    figs = Figures(events=n)
    cases_ = draw_cases(n, seed)
    figs.kinds = dict(collections.Counter(c.kind for c in cases_))
    tb = Tracebacks()
    logging.getLogger().addHandler(tb)
    state = state_dir or Path(tempfile.mkdtemp(prefix="oa-fuzz-"))
    stack = LocalStack(
        StackConfig(
            state_dir=state,
            nodes=1,
            models=("gemma3-270m",),
            nats_port=0,
            runtime_port=0,
            function_port=0,
            transport="http",
            tick_s=2.0,
            settings=Settings(),
        )
    )
    await stack.start(progress=False)
    t0 = time.monotonic()
    try:
        admin = await bus.connect(stack.admin_url, name="fuzz-admin")
        dead: list[dict[str, Any]] = []
        failed: list[Any] = []

        async def on_dead(msg: Any) -> None:
            dead.append(json.loads(msg.data))

        async def on_failed(msg: Any) -> None:
            from events.codec import decode

            failed.append(decode(msg.headers, msg.data).data)

        await admin.subscribe("ollama.deadletter.>", cb=on_dead)
        await admin.subscribe(f"ollama.chat.failed.{CLIENT}", cb=on_failed)
        await admin.flush()
        client = await bus.connect(stack.url_for(CLIENT), name="fuzz-client")
        warm = await client_chat(client, CHAT_MODEL, "Hi", timeout=120, max_tokens=2)
        assert warm.end is not None and warm.end.type == "chat.completed", warm.end
        figs.rss_before_mib = _rss(stack)
        js = admin.jetstream()
        for i, case in enumerate(cases_):
            try:
                await js.publish(case.subject, case.body, headers=case.headers, timeout=10)
                figs.published += 1
            except Exception as exc:  # over max payload: refused by the client library/server
                figs.refused_at_edge += 1
                case.bad = False  # it never entered: nothing to dead-letter
                log.debug("refused at the edge: %s %r", case.kind, exc)
            if i % 1000 == 999:
                print(f"  published {i + 1}/{n}", flush=True)
        await _quiet(admin, timeout=max(120.0, n * 0.1))
        await asyncio.sleep(1.0)  # the last dead letters and ends in flight
        figs.dead_letters = len(dead)
        figs.dead_letters_without_reason = sum(not d.get("reason") for d in dead)
        dead_keys = collections.Counter((d["subject"], d["body_sha256"]) for d in dead)
        expected = collections.Counter(c.key for c in cases_ if c.bad)
        figs.bad = sum(expected.values())
        for key, want in expected.items():
            got = min(want, dead_keys.get(key, 0))
            figs.bad_dead_lettered += got
            if got < want:
                kind = next(c.kind for c in cases_ if c.key == key)
                figs.bad_missed.append(f"{kind} on {key[0]} ({want - got} of {want})")
        told = {f.get("chat_id") for f in failed if isinstance(f, dict)}
        named = {c.names_chat for c in cases_ if c.bad and c.names_chat}
        figs.named, figs.named_told = len(named), len(named & told)
        figs.named_missed = sorted(named - told)[:10]
        figs.rss_after_mib = _rss(stack)
        normal = await client_chat(client, CHAT_MODEL, "Say hello.", timeout=120, max_tokens=8)
        assert normal.end is not None
        figs.normal_chat = (
            f"{normal.end.type} ({normal.end.data.get('stats', {}).get('tokens', 0)} tokens)"
            if normal.end.type == "chat.completed"
            else f"{normal.end.type}: {normal.end.data.get('error')}"
        )
        await client.close()
        await admin.close()
    finally:
        figs.seconds = time.monotonic() - t0
        figs.restarts = sum(p.restarts for p in stack.procs)
        figs.dead_processes = [p.name for p in stack.procs if p.popen.poll() is not None]
        await stack.stop()
        logging.getLogger().removeHandler(tb)
    logs = sorted((state / "logs").glob("*.log"))
    in_logs = [
        f"{p.name}: {line[:200]}"
        for p in logs
        for line in p.read_text(errors="replace").splitlines()
        if "Traceback" in line
    ]
    figs.tracebacks = len(tb.records) + len(in_logs)
    figs.traceback_samples = (tb.records + in_logs)[:5]
    return figs


def report(f: Figures) -> str:
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(f.kinds.items()))
    rss = "; ".join(
        f"{k} {f.rss_before_mib.get(k, 0):.0f}->{v:.0f}" for k, v in f.rss_after_mib.items()
    )
    rows = [
        ("events generated", f"{f.events} ({kinds})"),
        ("published / refused at the edge (max payload)", f"{f.published} / {f.refused_at_edge}"),
        ("crashed / restarted processes", f"{len(f.dead_processes)} / {f.restarts}"),
        ("tracebacks in any log", str(f.tracebacks)),
        ("bad events dead-lettered", f"{f.bad_dead_lettered} of {f.bad}"),
        (
            "dead letters, all / without a reason",
            f"{f.dead_letters} / {f.dead_letters_without_reason}",
        ),
        ("bad chat requests naming a chat: client told", f"{f.named_told} of {f.named}"),
        ("RSS before -> after (MiB)", rss),
        ("a normal chat right after", f.normal_chat),
        ("run time", f"{f.seconds:.0f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    if f.bad_missed:
        lines.append("missed: " + "; ".join(f.bad_missed[:10]))
    if f.named_missed:
        lines.append("not told: " + ", ".join(f.named_missed))
    if f.traceback_samples:
        lines.append("tracebacks: " + " | ".join(f.traceback_samples))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    figs = asyncio.run(run(args.events, args.seed))
    print(report(figs))
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / "fuzz.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["figure", "value"])
        for name, value in vars(figs).items():
            w.writerow([name, json.dumps(value)])
    print(f"\n(written to {OUT / 'fuzz.csv'})")


if __name__ == "__main__":
    main()
