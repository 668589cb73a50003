"""The Panel app: chats, models and a live fleet view, talking to the system through NATS only.

One `UiBus` per server; one `ChatApp` per browser session. Answers are read from the tokens
stream (a JetStream consumer over `ollama.chat.token.ui.<chat_id>`, from the start), and their end
from the task record (where the chat function stores it before publishing it), so a page
reloaded in the middle of an answer replays it and goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import time
import uuid
from typing import Any

import panel as pn
from nats.js.api import ConsumerConfig, DeliverPolicy

from autoscaler.client import ChatSession, client_name
from events import bus
from events.codec import Event, decode
from events.types import ChatCancel, ChatRequested, ChatToken, ModelEvict, ModelLoad
from stores.tasks import TERMINAL, TaskRecord

from .bus import UiBus
from .history import ChatRecord, History, Pending, Turn

MIB, GIB = 1 << 20, 1 << 30
PREFERRED_MODEL = "smollm2-135m"  # the local stack's instruction-tuned chat model
CSS = """
.oa-bar { background:#e5e7eb; border-radius:4px; height:14px; position:relative; width:100%; }
.oa-bar > div { position:absolute; top:0; height:14px; border-radius:4px; }
.oa-card { border:1px solid #d1d5db; border-radius:8px; padding:8px 12px; margin:6px 0; }
.oa-banner { background:#fee2e2; color:#991b1b; padding:6px 10px; border-radius:6px; }
.oa-status { color:#6b7280; font-style:italic; }
table.oa { border-collapse:collapse; } table.oa td, table.oa th { padding:2px 8px;
  border-bottom:1px solid #e5e7eb; text-align:left; }
"""


# Plain-text avatars and no icon buttons: Panel's chat icons are a web font from a CDN, which an
# air-gapped page cannot load (they would show as missing-glyph boxes).
AVATARS = {"You": "Y", "Assistant": "A", "Error": "!"}


_NO_ICON = "<svg xmlns='http://www.w3.org/2000/svg' width='1' height='1'></svg>"


def message(text: str, user: str) -> pn.chat.ChatMessage:
    msg = pn.chat.ChatMessage(
        text,
        user=user,
        avatar=AVATARS.get(user, "?"),
        reaction_icons={},
        show_reaction_icons=False,
        show_copy_icon=False,
        show_edit_icon=False,
    )
    # Hidden, but built anyway: given as inline SVG it never fetches the icon font.
    msg.edit_icon.param.update(icon=_NO_ICON, active_icon=_NO_ICON)
    return msg


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def waiting_text(rec: TaskRecord | None, now: float) -> str:
    """Why an answer has not started yet, for the user."""
    if rec is None:
        return "sending …"
    waited = now - rec.created_at
    if rec.state == "queued":
        if rec.reason.startswith("deferred"):
            return f"queued — {rec.reason} ({waited:.0f} s)"
        return f"queued — waiting for memory ({waited:.0f} s): {rec.reason}"
    if rec.state == "loading":
        return f"loading {rec.model} on {rec.node} ({now - rec.updated_at:.0f} s)"
    if rec.state == "placing":
        return f"placing {rec.model} …"
    return "starting …"


def stats_line(stats: dict[str, Any]) -> str:
    return (
        f"queue {stats.get('queue_ms', 0):.0f} ms · load {stats.get('load_ms', 0):.0f} ms · "
        f"first token {stats.get('ttft_ms', 0):.0f} ms · {stats.get('tokens_per_s', 0):.1f} "
        f"tokens/s · {stats.get('tokens', 0)} tokens · {stats.get('node', '')}"
    )


class ChatApp:
    """One browser session."""

    def __init__(self, ui: UiBus, owner: str) -> None:
        self.ui, self.owner = ui, owner
        self.history: History | None = None
        self.chats: list[ChatRecord] = []
        self.current: ChatRecord | None = None
        self.following: asyncio.Task[None] | None = None
        self.session: ChatSession | None = None

        self.banner = pn.pane.HTML("", sizing_mode="stretch_width", visible=False)
        # -- chat widgets
        self.chat_list = pn.widgets.RadioBoxGroup(name="Chats", options={}, inline=False)
        self.new_btn = pn.widgets.Button(name="New chat", button_type="primary")
        self.title_in = pn.widgets.TextInput(name="Title", placeholder="rename this chat")
        self.delete_btn = pn.widgets.Button(name="Delete chat", button_type="danger")
        self.model = pn.widgets.Select(name="Model", options={})
        self.system = pn.widgets.TextAreaInput(name="System prompt", height=80)
        self.temperature = pn.widgets.FloatSlider(
            name="Temperature", start=0, end=2, step=0.05, value=0.7
        )
        self.max_tokens = pn.widgets.IntInput(name="Max tokens", value=256, start=1, end=4096)
        self.feed = pn.chat.ChatFeed(sizing_mode="stretch_both", min_height=400)
        self.prompt = pn.widgets.TextAreaInput(
            placeholder="Ask something …", sizing_mode="stretch_width", height=70
        )
        self.send_btn = pn.widgets.Button(name="Send", button_type="primary", width=90)
        self.stop_btn = pn.widgets.Button(
            name="Stop", button_type="warning", width=90, disabled=True
        )
        # -- models and fleet
        self.models_html = pn.pane.HTML("", sizing_mode="stretch_width")
        self.manage_model = pn.widgets.Select(name="Model", options=[])
        self.load_btn = pn.widgets.Button(name="Load", button_type="primary")
        self.evict_btn = pn.widgets.Button(name="Evict", button_type="warning")
        self.manage_status = pn.pane.HTML("", sizing_mode="stretch_width")
        self.fleet_html = pn.pane.HTML("", sizing_mode="stretch_width")
        self.pull_name = pn.widgets.TextInput(name="New model name", placeholder="my-model")
        self.pull_url = pn.widgets.TextInput(
            name="GGUF URL (llama.cpp nodes; empty: Ollama library)",
            placeholder="https://…",
            width=420,
        )
        self.pull_sha = pn.widgets.TextInput(name="sha256 (optional)", width=420)
        self.pull_btn = pn.widgets.Button(name="Pull", button_type="primary")
        self.pull_bar = pn.indicators.Progress(
            name="pull", value=0, max=100, visible=False, width=420, bar_color="primary"
        )
        self.pull_status = pn.pane.HTML("", sizing_mode="stretch_width")

        self.new_btn.on_click(self._on_new)
        self.delete_btn.on_click(self._on_delete)
        self.send_btn.on_click(self._on_send)
        self.stop_btn.on_click(self._on_stop)
        self.load_btn.on_click(self._on_load)
        self.evict_btn.on_click(self._on_evict)
        self.pull_btn.on_click(self._on_pull)
        self.chat_list.param.watch(self._on_switch, "value")
        self.title_in.param.watch(self._on_rename, "value")
        for w in (self.model, self.system, self.temperature, self.max_tokens):
            w.param.watch(self._on_settings, "value")

    # -- layout -----------------------------------------------------------------------------------
    def view(self) -> pn.viewable.Viewable:
        sidebar = pn.Column(
            "## Chats",
            self.new_btn,
            self.chat_list,
            self.title_in,
            self.delete_btn,
            pn.layout.Divider(),
            self.model,
            self.system,
            self.temperature,
            self.max_tokens,
            width=300,
        )
        chat = pn.Row(
            sidebar,
            pn.Column(
                self.feed,
                pn.Row(self.prompt, pn.Column(self.send_btn, self.stop_btn)),
                sizing_mode="stretch_both",
            ),
            sizing_mode="stretch_both",
        )
        models = pn.Column(
            self.models_html,
            pn.Row(self.manage_model, self.load_btn, self.evict_btn),
            self.manage_status,
            pn.layout.Divider(),
            "### Pull a model",
            pn.Row(self.pull_name, self.pull_url),
            pn.Row(self.pull_sha, self.pull_btn),
            self.pull_bar,
            self.pull_status,
        )
        tabs = pn.Tabs(
            ("Chat", chat), ("Models", models), ("Fleet", self.fleet_html), dynamic=False
        )
        return pn.Column(
            pn.pane.HTML(f"<style>{CSS}</style><b>Ollama Autoscaler</b>"),
            self.banner,
            tabs,
            sizing_mode="stretch_both",
        )

    # -- start -----------------------------------------------------------------------------------
    async def start(self) -> None:
        self.owner = self.owner or session_owner()
        self.ui.start()
        pn.state.on_session_destroyed(lambda _ctx: self.close())
        pn.state.add_periodic_callback(self.refresh, period=1000)
        await self.refresh()

    def close(self) -> None:
        """The page went away: stop following its answer (the system goes on with it)."""
        if self.following is not None:
            self.following.cancel()

    async def _ensure_history(self) -> bool:
        if self.history is not None:
            return True
        if not self.ui.connected:
            return False
        assert self.ui.svc is not None
        self.history = await History.open(self.ui.svc.js, self.owner)
        self.chats = await self.history.list()
        if not self.chats:
            self.chats = [ChatRecord(title="Chat 1")]
            await self.history.save(self.chats[0])
        self._show_chat_list()
        await self._select(self.chats[0])
        return True

    async def refresh(self) -> None:
        if not self.ui.connected:
            self.banner.object = (
                "<div class='oa-banner'>NATS is unreachable: "
                f"{html.escape(self.ui.error or 'reconnecting …')} — retrying by itself</div>"
            )
            self.banner.visible = True
            return
        self.banner.param.update(object="", visible=False)
        with contextlib.suppress(Exception):
            if await self._ensure_history():
                await self._refresh_models()
                await self._refresh_fleet()

    # -- chats -----------------------------------------------------------------------------------
    def _show_chat_list(self) -> None:
        options = {f"{c.title} · {c.chat_id[:6]}": c.chat_id for c in self.chats}
        self.chat_list.options = options
        if self.current is not None:
            self.chat_list.value = self.current.chat_id

    async def _select(self, chat: ChatRecord) -> None:
        if self.following is not None:
            self.following.cancel()
        self.current = chat
        self.chat_list.value = chat.chat_id
        self.title_in.value = chat.title
        if chat.model:
            self.model.value = chat.model if chat.model in self.model.options.values() else None
        self.system.value, self.temperature.value = chat.system, chat.temperature
        self.max_tokens.value = chat.max_tokens
        self.feed.objects = []
        for turn in chat.turns:
            self._render_turn(turn)
        if chat.pending is not None:
            reply = self.feed.send(message("", "Assistant"), respond=False)
            self.following = asyncio.create_task(self._follow(chat, chat.pending, reply))

    def _render_turn(self, turn: Turn) -> None:
        user = {"user": "You", "assistant": "Assistant"}.get(turn.role, "Error")
        msg = message(turn.content, user)
        if turn.stats:
            msg.footer_objects = [
                pn.pane.HTML(f"<span class='oa-stats'>{html.escape(stats_line(turn.stats))}</span>")
            ]
        self.feed.send(msg, respond=False)

    async def _on_new(self, _: Any) -> None:
        if self.history is None:
            return
        chat = ChatRecord(title=f"Chat {len(self.chats) + 1}", model=self.model.value or "")
        self.chats.insert(0, chat)
        await self.history.save(chat)
        self._show_chat_list()
        await self._select(chat)

    async def _on_delete(self, _: Any) -> None:
        if self.history is None or self.current is None:
            return
        await self.history.delete(self.current.chat_id)
        self.chats = [c for c in self.chats if c.chat_id != self.current.chat_id]
        if not self.chats:
            self.chats = [ChatRecord(title="Chat 1")]
            await self.history.save(self.chats[0])
        self._show_chat_list()
        await self._select(self.chats[0])

    async def _on_switch(self, event: Any) -> None:
        chat = next((c for c in self.chats if c.chat_id == event.new), None)
        if chat is not None and chat is not self.current:
            await self._select(chat)

    async def _on_rename(self, event: Any) -> None:
        chat = self.current
        if chat is not None and self.history and event.new and event.new != chat.title:
            chat.title = event.new
            await self.history.save(chat)
            self._show_chat_list()

    async def _on_settings(self, _: Any) -> None:
        chat = self.current
        if chat is None or self.history is None:
            return
        chat.model = self.model.value or chat.model
        chat.system, chat.temperature = self.system.value, float(self.temperature.value)
        chat.max_tokens = int(self.max_tokens.value)
        await self.history.save(chat)

    # -- sending and following an answer ---------------------------------------------------------
    async def _on_send(self, _: Any) -> None:
        chat, text = self.current, (self.prompt.value or "").strip()
        if chat is None or self.history is None or not text or chat.pending is not None:
            return
        if not self.model.value:
            self.feed.send(
                message("Pick a model first (the catalog is empty? see the Models tab).", "Error"),
                respond=False,
            )
            return
        assert self.ui.svc is not None
        chat.model = self.model.value
        self.prompt.value = ""
        messages = (
            ([{"role": "system", "content": chat.system}] if chat.system else [])
            + [
                {"role": t.role, "content": t.content}
                for t in chat.turns
                if t.role in ("user", "assistant")
            ]
            + [{"role": "user", "content": text}]
        )
        req = ChatRequested(
            chat_id=chat.chat_id,
            model=chat.model,
            messages=messages,
            options={"temperature": chat.temperature, "max_tokens": chat.max_tokens},
        )
        event = Event("chat.requested", req.model_dump(exclude_none=True))
        turn = Turn(role="user", content=text)
        chat.turns.append(turn)
        chat.pending = Pending(task_id=event.id, source=event.source, started=time.time())
        await self.history.save(chat)
        self._render_turn(turn)
        reply = self.feed.send(message("", "Assistant"), respond=False)
        await bus.publish(self.ui.svc.js, event)
        self.following = asyncio.create_task(self._follow(chat, chat.pending, reply))

    async def _on_stop(self, _: Any) -> None:
        chat = self.current
        if chat is None or chat.pending is None or self.ui.svc is None:
            return
        data = ChatCancel(chat_id=chat.chat_id, task_id=chat.pending.task_id)
        await bus.publish(self.ui.svc.js, Event("chat.cancel", data.model_dump()))

    async def _follow(self, chat: ChatRecord, pending: Pending, message: Any) -> None:
        """Show the answer as it streams (from the tokens stream), then its end."""
        assert self.ui.svc is not None and self.history is not None
        svc = self.ui.svc
        tokens: dict[int, dict[int, str]] = {}  # attempt -> seq -> text

        async def on_token(msg: Any) -> None:
            with contextlib.suppress(Exception):
                tok = ChatToken.model_validate(decode(msg.headers, msg.data).data)
                if tok.task_id == pending.task_id:
                    tokens.setdefault(tok.attempt, {})[tok.seq] = tok.text

        # A named consumer is created on a subject that carries its filter, which the UI's
        # permissions limit to its own chats' tokens.
        sub = await svc.js.subscribe(
            bus.subject_for("chat.token", chat.chat_id, client_name(svc.nc)),
            stream=bus.TOKENS_STREAM,
            cb=on_token,
            ordered_consumer=True,
            config=ConsumerConfig(name=uuid.uuid4().hex, deliver_policy=DeliverPolicy.ALL),
        )
        self.stop_btn.disabled = False
        end: dict[str, Any] | None = None
        try:
            while end is None:
                got = await svc.tasks.get(pending.source, pending.task_id)
                rec = got.record if got else None
                if rec is not None and rec.state in TERMINAL and rec.end is not None:
                    end = rec.end
                    break
                if tokens:
                    latest = tokens[max(tokens)]  # a redelivered request restarts cleanly
                    message.object = "".join(latest[i] for i in sorted(latest))
                else:
                    message.object = (
                        f"<span class='oa-status'>{html.escape(waiting_text(rec, time.time()))}"
                        "</span>"
                    )
                await asyncio.sleep(0.15)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            self.stop_btn.disabled = True
        data = end["data"]
        if end["type"] == "chat.completed":
            turn = Turn(
                role="assistant", content=data["text"], task_id=pending.task_id, stats=data["stats"]
            )
            message.object = data["text"]
            message.footer_objects = [
                pn.pane.HTML(
                    f"<span class='oa-stats'>{html.escape(stats_line(data['stats']))}</span>"
                )
            ]
        else:
            err = data["error"]
            partial = data.get("text") or ""
            turn = Turn(
                role="error",
                content=f"{partial}\n\n**{err['code']}**: {err['message']}",
                task_id=pending.task_id,
            )
            message.object = turn.content
            message.user = "Error"
        stored = await self.history.finish(chat.chat_id, pending.task_id, turn)
        if stored is not None:
            chat.turns, chat.pending = stored.turns, stored.pending

    # -- models ----------------------------------------------------------------------------------
    async def _refresh_models(self) -> None:
        assert self.ui.svc is not None
        svc = self.ui.svc
        where: dict[str, list[str]] = {}
        for rec, _ in await svc.fleet.nodes():
            for name, slot in rec.models.items():
                where.setdefault(name, []).append(f"{rec.node_id}:{slot.state}")
        models = await svc.catalog.all()
        options = {
            f"{m.name} · {fmt_bytes(m.bytes)} · {', '.join(where.get(m.name, [])) or 'idle'}": (
                m.name
            )
            for m in models
        }
        if options != self.model.options:
            keep = self.model.value
            self.model.options = options
            if keep in options.values():
                self.model.value = keep
            elif self.current is not None and self.current.model in options.values():
                self.model.value = self.current.model
            elif PREFERRED_MODEL in options.values():
                self.model.value = PREFERRED_MODEL
        names = [m.name for m in models]
        if names != self.manage_model.options:
            self.manage_model.options = names
        if not models:
            self.models_html.object = (
                "<p>The catalog is empty. Start nodes with models (<code>make run</code>), "
                "or front an Ollama server (<code>ollama-autoscaler up --ollama URL</code>).</p>"
            )
            return
        rows = "".join(
            f"<tr><td>{html.escape(m.name)}</td><td>{html.escape(m.family or '')}</td>"
            f"<td>{html.escape(m.params or '')}</td><td>{html.escape(m.quant or '')}</td>"
            f"<td>{fmt_bytes(m.bytes)}</td><td>{m.context or '-'}</td>"
            f"<td>{html.escape(', '.join(where.get(m.name, [])) or 'not loaded')}</td></tr>"
            for m in models
        )
        self.models_html.object = (
            "<table class='oa' id='oa-models'><tr><th>model</th><th>family</th><th>params</th>"
            "<th>quant</th><th>memory</th><th>context</th><th>resident</th></tr>"
            f"{rows}</table>"
        )

    async def _on_load(self, _: Any) -> None:
        await self._manage("model.load")

    async def _on_evict(self, _: Any) -> None:
        await self._manage("model.evict")

    async def _manage(self, kind: str) -> None:
        model = self.manage_model.value
        if not model or self.ui.svc is None:
            return
        data = (
            ModelLoad(model=model, reason="ui")
            if kind == "model.load"
            else ModelEvict(model=model, reason="ui")
        )
        event = Event(kind, data.model_dump())
        await bus.publish(self.ui.svc.js, event)
        verb = "loading" if kind == "model.load" else "evicting"
        self.manage_status.object = f"<p>{verb} {html.escape(model)} …</p>"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            refused = [
                ln for ln in self.ui.lines if ln.kind == "dead-letter" and ln.event_id == event.id
            ]
            if refused:
                self.manage_status.object = (
                    f"<p class='oa-refused'>refused: {html.escape(refused[-1].text)}</p>"
                )
                return
            states = [r.models.get(model) for r, _ in await self.ui.svc.fleet.nodes()]
            errors = [r.errors.get(model) for r, _ in await self.ui.svc.fleet.nodes()]
            if kind == "model.load" and any(s and s.state == "ready" for s in states):
                self.manage_status.object = f"<p>{html.escape(model)} is ready</p>"
                return
            if kind == "model.load" and any(errors) and not any(states):
                err = next(e for e in errors if e)
                self.manage_status.object = f"<p class='oa-refused'>{html.escape(err)}</p>"
                return
            if kind == "model.evict" and not any(states):
                self.manage_status.object = f"<p>{html.escape(model)} evicted</p>"
                return
            await asyncio.sleep(0.3)

    async def _on_pull(self, _: Any) -> None:
        """Publish `model.pull` and show its progress events live, then how it ended."""
        if self.ui.svc is None:
            return
        data = {"model": (self.pull_name.value or "").strip()}
        if (self.pull_url.value or "").strip():
            data["url"] = self.pull_url.value.strip()
        if (self.pull_sha.value or "").strip():
            data["sha256"] = self.pull_sha.value.strip()
        event = Event("model.pull", data)
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        bar, status = self.pull_bar, self.pull_status

        async def heard(msg: Any) -> None:
            with contextlib.suppress(Exception):
                ev = decode(msg.headers, msg.data)
                d = ev.data if isinstance(ev.data, dict) else {}
                if d.get("task_id") != event.id:
                    return
                if ev.type == "model.pull.progress" and d.get("total"):
                    bar.value = min(100, int(100 * d["completed"] / d["total"]))
                    status.object = (
                        f"<p>{html.escape(d.get('status', ''))} {fmt_bytes(d['completed'])} of "
                        f"{fmt_bytes(d['total'])}</p>"
                    )
                elif ev.type == "model.pulled" and not done.done():
                    done.set_result(f"{d['model']} pulled onto {d['node']}")
                elif ev.type == "model.pull.failed" and not done.done():
                    err = d.get("error") or {}
                    done.set_result(f"failed: {err.get('code')}: {err.get('message')}")

        sub = await self.ui.svc.nc.subscribe("ollama.model.pull.>", cb=heard)
        sub2 = await self.ui.svc.nc.subscribe("ollama.model.pulled", cb=heard)
        bar.param.update(value=0, visible=True)
        status.object = f"<p>pulling {html.escape(data['model'])} …</p>"
        await bus.publish(self.ui.svc.js, event)
        deadline = time.monotonic() + 3600
        try:
            while not done.done() and time.monotonic() < deadline:
                refused = [
                    ln
                    for ln in self.ui.lines
                    if ln.kind == "dead-letter" and ln.event_id == event.id
                ]
                if refused:
                    done.set_result(f"refused: {refused[-1].text}")
                await asyncio.sleep(0.2)
        finally:
            for s in (sub, sub2):
                with contextlib.suppress(Exception):
                    await s.unsubscribe()
        result = done.result() if done.done() else "no answer yet; see the Fleet view"
        if not result.startswith(("failed", "refused")):
            bar.value = 100
        css = "oa-refused" if result.startswith(("failed", "refused")) else "oa-pulled"
        status.object = f"<p class='{css}'>{html.escape(result)}</p>"

    # -- fleet -----------------------------------------------------------------------------------
    async def _refresh_fleet(self) -> None:
        assert self.ui.svc is not None
        svc, now = self.ui.svc, time.time()
        cards = []
        for rec, _ in await svc.fleet.nodes():
            cap = max(1, rec.capacity_bytes)
            committed = rec.committed_bytes()
            used = cap - rec.measured_free_bytes if rec.measured_free_bytes is not None else None
            bar = (
                "<div class='oa-bar'>"
                f"<div style='width:{min(100, 100 * committed / cap):.0f}%;"
                "background:#93c5fd'></div>"
                + (
                    f"<div style='width:{min(100, 100 * used / cap):.0f}%;height:6px;top:8px;"
                    "background:#1d4ed8'></div>"
                    if used is not None
                    else ""
                )
                + "</div>"
            )
            rows = (
                "".join(
                    f"<tr><td>{html.escape(name)}</td><td class='oa-state'>{slot.state}</td>"
                    f"<td>{slot.active} active</td><td>{fmt_bytes(slot.bytes)}</td>"
                    f"<td>{_countdown(slot.keep_alive_until, now)}</td>"
                    f"<td>{_ago(slot.last_used, now)}</td></tr>"
                    for name, slot in sorted(rec.models.items())
                )
                or "<tr><td colspan=6>no models loaded</td></tr>"
            )
            cards.append(
                f"<div class='oa-card oa-node' id='node-{html.escape(rec.node_id)}'>"
                f"<b>{html.escape(rec.node_id)}</b> {rec.runtime} · capacity {fmt_bytes(cap)} · "
                f"committed {fmt_bytes(committed)} · measured used {fmt_bytes(used)} · "
                f"heartbeat {now - rec.heartbeat_at:.0f} s ago{bar}"
                "<table class='oa'><tr><th>model</th><th>state</th><th>leases</th>"
                f"<th>memory</th><th>keep-alive</th><th>last use</th></tr>{rows}</table>"
                f"{_sparkline(self.ui.memory.get(rec.node_id), cap)}</div>"
            )
        waiting = await svc.waiting.all(limit=50)
        queue_rows = []
        for w in waiting:
            got = await svc.tasks.get(w.source, w.task_id)
            why = got.record.reason if got else ""
            queue_rows.append(
                f"<li>{html.escape(w.model)} · waiting {now - w.since:.0f} s · "
                f"{html.escape(why)}</li>"
            )
        log_rows = "".join(
            f"<li>{time.strftime('%H:%M:%S', time.localtime(ln.at))} "
            f"<b>{html.escape(ln.kind)}</b> {html.escape(ln.text)}</li>"
            for ln in list(self.ui.lines)[-30:][::-1]
        )
        self.fleet_html.object = (
            "".join(cards)
            + f"<h4 id='oa-queue'>Queue: {len(waiting)} waiting</h4><ul>{''.join(queue_rows)}</ul>"
            + f"<h4>Events</h4><ul id='oa-log'>{log_rows}</ul>"
        )


def _countdown(until: float | None, now: float) -> str:
    return f"{max(0.0, until - now):.0f} s" if until else "-"


def _ago(at: float, now: float) -> str:
    return f"{now - at:.0f} s ago" if at else "-"


def _sparkline(series: Any, cap: int) -> str:
    """Memory committed over the last minutes, as an inline SVG (no script, works offline)."""
    if not series or len(series) < 2:
        return ""
    t0, t1 = series[0][0], series[-1][0]
    span = max(1.0, t1 - t0)
    pts = " ".join(
        f"{300 * (t - t0) / span:.1f},{40 - 40 * committed / max(1, cap):.1f}"
        for t, committed, _ in series
    )
    return (
        "<svg width='300' height='42' class='oa-memory'><polyline fill='none' stroke='#2563eb' "
        f"stroke-width='1.5' points='{pts}'/></svg> <small>committed, last {span / 60:.0f} min"
        "</small>"
    )


def session_owner() -> str:
    """Who this browser session is: the signed-in user, else the browser's own id (kept in
    the URL as `?u=…`, so a reload is the same person and two browsers are two people)."""
    if pn.state.user and pn.state.user != "guest":
        return str(pn.state.user)
    loc = pn.state.location
    owner = (loc.query_params.get("u") if loc is not None else None) or ""
    if not owner:
        owner = uuid.uuid4().hex[:16]
        if loc is not None:
            loc.update_query(u=owner)
    return str(owner)


def make_app(ui: UiBus) -> Any:
    def app() -> pn.viewable.Viewable:
        chat_app = ChatApp(ui, "")  # who it is is known once the page has loaded
        pn.state.onload(chat_app.start)
        return chat_app.view()

    return app
