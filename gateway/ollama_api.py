"""Ollama's API over the fleet (shapes: ../shared/notes/ollama.md §2): chat, generate, tags,
ps, show, pull, version, and `/`. Durations are nanoseconds; streams are NDJSON."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Any

from nats.js.errors import NotFoundError
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from events.bus import MODELS_BUCKET, keys_matching
from events.keys import decode_name, model_key
from events.outcome import invalid
from events.types import ChatRequested, ModelPull
from stores.catalog import ModelInfo

from .answers import answer, stats_of
from .core import Chat, Gateway, new_chat_id
from .http import BadRequest, Streamed, error_response, iso_time, json_body, ndjson, unless_gone

API = "ollama"
API_VERSION = "0.12.0"  # the Ollama API these routes follow (clients compare versions)
MS_NS = 1_000_000
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_s(value: Any, longest: float) -> float | None:
    """Ollama's `keep_alive`: seconds as a number, or a Go duration ("5m", "1h30m", "0");
    negative keeps the model as long as the deployment allows (`longest`)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise BadRequest(f"keep_alive: not a duration: {value!r}")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            raise BadRequest(f"keep_alive: {value} is out of range") from None
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            parts = _DURATION.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise BadRequest(f'keep_alive: not a duration: {value!r} (e.g. "5m", "1h", 300)')  # noqa: B904
            seconds = sign * sum(float(n) * _UNIT_S[u] for n, u in parts)
    else:
        raise BadRequest(f"keep_alive: not a duration: {value!r}")
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # nan, inf
        raise BadRequest(f"keep_alive: not a duration: {value!r}")
    return longest if seconds < 0 else seconds


def model_of(body: dict[str, Any]) -> str:
    model = body.get("model") or body.get("name")  # `name` is the API's older spelling
    if not isinstance(model, str) or not model:
        raise BadRequest("model is required")
    return model


def options_of(body: dict[str, Any], longest_keep_alive: float) -> dict[str, Any]:
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise BadRequest("options must be an object")
    out: dict[str, Any] = {}
    for name in ("num_ctx", "temperature", "top_p", "seed"):
        if opts.get(name) is not None:
            out[name] = opts[name]
    stop = opts.get("stop")
    if stop is not None:
        out["stop"] = [stop] if isinstance(stop, str) else stop
    n = opts.get("num_predict")
    if n is not None and not (isinstance(n, int) and n < 0):  # -1, -2: as long as it takes
        out["max_tokens"] = n
    ka = keep_alive_s(body.get("keep_alive"), longest_keep_alive)
    if ka is not None:
        out["keep_alive_s"] = ka
    return out


def _refuse_unsupported(body: dict[str, Any]) -> None:
    if body.get("tools"):
        raise BadRequest("tools are not supported by this gateway")
    if body.get("format"):
        raise BadRequest("format (structured output) is not supported by this gateway")
    if body.get("images"):
        raise BadRequest("images are not supported by this gateway")


def messages_of(body: dict[str, Any]) -> list[dict[str, str]]:
    raw = body.get("messages")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BadRequest("messages must be a list")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object")
        if m.get("images"):
            raise BadRequest(f"messages[{i}]: images are not supported by this gateway")
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string")
        out.append({"role": m.get("role"), "content": content})
    return out


def chat_request(
    model: str, messages: list[dict[str, str]], options: dict[str, Any]
) -> ChatRequested:
    try:
        return ChatRequested(chat_id=new_chat_id(), model=model, messages=messages, options=options)
    except ValidationError as exc:
        raise BadRequest(invalid("chat request", exc)) from None


def metrics_of(chat: Chat) -> dict[str, Any]:
    """The final object's figures, from the chat's stats (ms -> ns)."""
    s = stats_of(chat)
    total, ttft = float(s.get("total_ms", 0)), float(s.get("ttft_ms", 0))
    queue, load = float(s.get("queue_ms", 0)), float(s.get("load_ms", 0))
    out = {
        "done_reason": s.get("done_reason") or "stop",
        "total_duration": int(total * MS_NS),
        "load_duration": int((queue + load) * MS_NS),  # waiting for memory, then the load
        "prompt_eval_duration": int(max(0.0, ttft - queue - load) * MS_NS),
        "eval_count": int(s.get("tokens", 0)),
        "eval_duration": int(max(0.0, total - ttft) * MS_NS),
    }
    if s.get("prompt_tokens") is not None:
        out["prompt_eval_count"] = int(s["prompt_tokens"])
    return out


class _Ollama:
    api, media_type = API, "application/x-ndjson"

    def __init__(self, model: str, key: str) -> None:
        self.model, self.key = model, key  # key: "message" (chat) or "response" (generate)

    def _text(self, text: str) -> dict[str, Any]:
        if self.key == "message":
            return {"message": {"role": "assistant", "content": text}}
        return {"response": text}

    def piece(self, chat: Chat, text: str, first: bool) -> bytes:
        return ndjson(
            {"model": self.model, "created_at": iso_time(), **self._text(text), "done": False}
        )

    def final(self, chat: Chat) -> bytes:
        return ndjson(
            {
                "model": self.model,
                "created_at": iso_time(),
                **self._text(""),
                "done": True,
                **metrics_of(chat),
            }
        )

    def failure(self, message: str, code: str) -> bytes:
        return ndjson({"error": message})

    def whole(self, chat: Chat, text: str) -> dict[str, Any]:
        return {
            "model": self.model,
            "created_at": iso_time(),
            **self._text(text),
            "done": True,
            **metrics_of(chat),
        }


def _bad(exc: BadRequest) -> JSONResponse:
    return error_response(API, exc.status, str(exc))


async def chat(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    try:
        body = await json_body(request)
        model = model_of(body)
        _refuse_unsupported(body)
        messages = messages_of(body)
        options = options_of(body, gw.svc.settings.max_keep_alive_s)
        if not messages:
            return await _load_or_unload(request, gw, model, options, "message")
        req = chat_request(model, messages, options)
    except BadRequest as exc:
        return _bad(exc)
    return await answer(
        request, gw, req, body.get("stream", True) is not False, _Ollama(model, "message")
    )


async def generate(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    try:
        body = await json_body(request)
        model = model_of(body)
        _refuse_unsupported(body)
        if body.get("suffix"):
            raise BadRequest("suffix (fill-in-the-middle) is not supported by this gateway")
        prompt = body.get("prompt") or ""
        system = body.get("system") or ""
        if not isinstance(prompt, str) or not isinstance(system, str):
            raise BadRequest("prompt and system must be strings")
        options = options_of(body, gw.svc.settings.max_keep_alive_s)
        if not prompt:
            return await _load_or_unload(request, gw, model, options, "response")
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        req = chat_request(model, messages, options)
    except BadRequest as exc:
        return _bad(exc)
    return await answer(
        request, gw, req, body.get("stream", True) is not False, _Ollama(model, "response")
    )


async def _load_or_unload(
    request: Request, gw: Gateway, model: str, options: dict[str, Any], key: str
) -> Response:
    """An empty prompt loads the model (returns once it is ready); with keep_alive 0 it
    unloads it (asynchronously, after its requests, as Ollama does)."""
    if await gw.svc.catalog.get(model) is None:
        return error_response(API, 404, f"model '{model}' not found")
    reply = {"model": model, "created_at": iso_time(), **_Ollama(model, key)._text("")}
    if options.get("keep_alive_s") == 0:
        await gw.unload(model)
        return JSONResponse({**reply, "done": True, "done_reason": "unload"})
    ok, got = await unless_gone(request, gw.load(model, gw.svc.settings.load_timeout_s))
    if not ok:
        return Response(status_code=499)
    assert got is not None
    _, seconds = got
    return JSONResponse(
        {**reply, "done": True, "done_reason": "load", "load_duration": int(seconds * 1e9)}
    )


# -- models -----------------------------------------------------------------------------------
def details(info: ModelInfo) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": info.family or "",
        "families": [info.family] if info.family else None,
        "parameter_size": info.params or "",
        "quantization_level": info.quant or "",
    }


async def catalog_entry(gw: Gateway, key: str) -> tuple[ModelInfo, float | None] | None:
    """One catalog entry (`model.<encoded name>`) with the time it was written (its
    `modified_at`); None if there is none."""
    js = gw.svc.js
    try:
        msg = await js.get_msg(f"KV_{MODELS_BUCKET}", subject=f"$KV.{MODELS_BUCKET}.{key}")
    except NotFoundError:
        return None
    if not msg.data:
        return None  # deleted
    info = ModelInfo.model_validate_json(msg.data)
    if info.name != decode_name(key.removeprefix("model.")):
        return None
    return info, msg.time.timestamp() if msg.time else None


async def catalog_with_times(gw: Gateway) -> list[tuple[ModelInfo, float | None]]:
    """The catalog, each model with the time its entry was written."""
    out = []
    for key in await keys_matching(gw.svc.js, MODELS_BUCKET, "model.*"):
        if (entry := await catalog_entry(gw, key)) is not None:
            out.append(entry)
    return sorted(out, key=lambda it: it[0].name)


async def model_with_time(gw: Gateway, name: str) -> tuple[ModelInfo, float | None] | None:
    try:
        key = model_key(name)
    except ValueError:  # an empty name
        return None
    return await catalog_entry(gw, key)


async def tags(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    models = [
        {
            "name": info.name,
            "model": info.name,
            "modified_at": iso_time(at),
            "size": info.file_bytes or info.bytes,
            "digest": info.digest or "",
            "details": details(info),
        }
        for info, at in await catalog_with_times(gw)
    ]
    return JSONResponse({"models": models})


async def ps(request: Request) -> Response:
    """Every resident model copy, fleet-wide (one entry per node that holds it; `node` says
    which), the longest time to expiry first. A copy in use shows now + its keep-alive."""
    gw: Gateway = request.app.state.gateway
    now, default_ka = time.time(), gw.svc.settings.keep_alive_s
    rows = []
    for rec, _ in await gw.svc.fleet.nodes():
        for name, slot in rec.models.items():
            if slot.state != "ready":
                continue  # loading or evicting: not resident (Ollama shows loaded ones only)
            info = await gw.svc.catalog.get(name)
            expires = (
                slot.keep_alive_until
                if slot.active == 0 and slot.keep_alive_until
                else (now + default_ka)
            )
            rows.append(
                {
                    "name": name,
                    "model": name,
                    "size": slot.bytes,
                    "digest": (info.digest if info else None) or "",
                    "details": details(info) if info else {},
                    "expires_at": iso_time(expires),
                    # The memory the node's budget counts (its accelerator's, on a GPU node).
                    "size_vram": slot.bytes,
                    "context_length": (info.context if info else None) or 0,
                    "node": rec.node_id,
                    "active_requests": slot.active,
                    "_expires": expires,
                }
            )
    rows.sort(key=lambda r: (-r["_expires"], r["name"], r["node"]))
    for r in rows:
        del r["_expires"]
    return JSONResponse({"models": rows})


def _parameter_count(params: str | None) -> int | None:
    m = re.fullmatch(r"([0-9.]+)\s*([KMBT]?)", (params or "").strip().upper())
    if not m:
        return None
    scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[m.group(2)]
    return int(float(m.group(1)) * scale)


async def show(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    try:
        model = model_of(await json_body(request))
    except BadRequest as exc:
        return _bad(exc)
    found = await model_with_time(gw, model)
    if found is None:
        return error_response(API, 404, f"model '{model}' not found")
    info, at = found
    arch = info.family or "unknown"
    model_info: dict[str, Any] = {"general.architecture": arch}
    if (count := _parameter_count(info.params)) is not None:
        model_info["general.parameter_count"] = count
    if info.context:
        model_info[f"{arch}.context_length"] = info.context
    return JSONResponse(
        {
            "modelfile": f"# served by ollama-autoscaler\nFROM {info.name}\n",
            "parameters": "",
            "template": "",
            "details": details(info),
            "model_info": model_info,
            "capabilities": ["completion"],
            "modified_at": iso_time(at),
            "size": info.file_bytes or info.bytes,
            "loaded_bytes": info.bytes,  # what the fleet books for it when loaded
        }
    )


async def pull(request: Request) -> Response:
    """`model.pull`: by name from the Ollama library (an Ollama node), or, with this gateway's
    extension `url` (and `sha256`), a GGUF onto a llama.cpp node. Progress streams as Ollama's
    does; the end is `{"status": "success"}` or an `{"error": ...}` line."""
    gw: Gateway = request.app.state.gateway
    try:
        body = await json_body(request)
        model = model_of(body)
        try:
            req = ModelPull(
                model=model, node=body.get("node"), url=body.get("url"), sha256=body.get("sha256")
            )
        except ValidationError as exc:
            raise BadRequest(invalid("pull request", exc)) from None
    except BadRequest as exc:
        return _bad(exc)
    pulled = await gw.start_pull(req)
    headers = {"X-OA-Task-Id": pulled.event.id}

    async def lines() -> AsyncIterator[dict[str, Any]]:
        yield {"status": "pulling manifest"}
        while True:
            ev = await pulled.queue.get()
            d = ev.data if isinstance(ev.data, dict) else {}
            if ev.type == "model.pull.progress":
                yield {
                    "status": d.get("status") or f"pulling {model}",
                    "total": d.get("total"),
                    "completed": d.get("completed"),
                }
            elif ev.type == "model.pulled":
                yield {"status": "success"}
                return
            else:  # model.pull.failed, or the pull refused (dead letter)
                err = d.get("error")
                message = err.get("message") if isinstance(err, dict) else d.get("reason")
                yield {"error": str(message or "the pull failed")}
                return

    def done() -> None:
        gw.pulls.pop(pulled.event.id, None)

    if body.get("stream", True) is False:

        async def last() -> dict[str, Any]:
            out: dict[str, Any] = {}
            async for line in lines():
                out = line
            return out

        try:
            ok, final = await unless_gone(request, last())
        finally:
            done()
        if not ok or final is None:
            return Response(status_code=499)
        if "error" in final:
            return error_response(API, 500, str(final["error"]))
        return JSONResponse(final, headers=headers)

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for line in lines():
                yield ndjson(line)
        finally:
            done()

    async def gone() -> None:
        done()  # a pull goes on without its client (Ollama's resume the next time)

    return Streamed(chunks(), "application/x-ndjson", gone, headers)


async def version(request: Request) -> Response:
    from importlib.metadata import version as dist_version

    return JSONResponse(
        {"version": API_VERSION, "ollama_autoscaler": dist_version("ollama-autoscaler")}
    )


async def root(request: Request) -> Response:
    return PlainTextResponse("Ollama is running")
