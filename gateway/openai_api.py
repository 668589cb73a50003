"""OpenAI's API over the fleet: `/v1/chat/completions` (server-sent events or whole, with
`usage`), `/v1/completions`, `/v1/models`."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from events.types import ChatRequested

from .answers import answer, created_s, stats_of
from .core import Chat, Gateway
from .http import BadRequest, error_response, json_body, sse
from .ollama_api import catalog_with_times, chat_request, model_with_time

API = "openai"
ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


def _content(i: int, content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # parts: only text ones are understood here
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRequest(
                    f"messages[{i}].content: {kind} parts are not supported (text only)",
                    param=f"messages[{i}].content",
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise BadRequest(f"messages[{i}].content must be a string or a list of parts")


def options_of(body: dict[str, Any]) -> dict[str, Any]:
    for name in ("tools", "functions", "tool_choice"):
        if body.get(name):
            raise BadRequest(f"{name} is not supported by this gateway", param=name)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise BadRequest(
            "response_format other than text is not supported", param="response_format"
        )
    if body.get("n") not in (None, 1):
        raise BadRequest("n must be 1", param="n")
    out: dict[str, Any] = {}
    for name in ("temperature", "top_p", "seed"):
        if body.get(name) is not None:
            out[name] = body[name]
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        out["max_tokens"] = limit
    stop = body.get("stop")
    if stop is not None:
        out["stop"] = [stop] if isinstance(stop, str) else stop
    return out


def usage_of(chat: Chat) -> dict[str, int]:
    s = stats_of(chat)
    prompt, completion = int(s.get("prompt_tokens") or 0), int(s.get("tokens", 0))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class _OpenAI:
    api, media_type = API, "text/event-stream"

    def __init__(self, model: str, kind: str, include_usage: bool) -> None:
        self.model, self.kind, self.include_usage = model, kind, include_usage

    def _id(self, chat: Chat) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + chat.task_id

    def _chunk(self, chat: Chat, choice: dict[str, Any], **more: Any) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {
            "id": self._id(chat),
            "object": obj,
            "created": created_s(chat),
            "model": self.model,
            "choices": [choice] if choice else [],
            **more,
        }

    def piece(self, chat: Chat, text: str, first: bool) -> bytes:
        if self.kind == "chat":
            delta: dict[str, Any] = {"content": text}
            if first:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        return sse(self._chunk(chat, choice))

    def final(self, chat: Chat) -> bytes:
        reason = stats_of(chat).get("done_reason") or "stop"
        if self.kind == "chat":
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": reason}
        out = sse(self._chunk(chat, choice))
        if self.include_usage:
            out += sse(self._chunk(chat, {}, usage=usage_of(chat)))
        return out + sse("[DONE]")

    def failure(self, message: str, code: str) -> bytes:
        return sse(
            {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
        )

    def whole(self, chat: Chat, text: str) -> dict[str, Any]:
        reason = stats_of(chat).get("done_reason") or "stop"
        if self.kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": reason,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            obj = "text_completion"
        return {
            "id": self._id(chat),
            "object": obj,
            "created": created_s(chat),
            "model": self.model,
            "choices": [choice],
            "usage": usage_of(chat),
        }


def _bad(exc: BadRequest) -> JSONResponse:
    body = {
        "error": {
            "message": str(exc),
            "type": "invalid_request_error",
            "param": exc.param,
            "code": None,
        }
    }
    return JSONResponse(body, exc.status)


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model is required", param="model")
    return model


async def _answer(
    request: Request, gw: Gateway, req: ChatRequested, body: dict[str, Any], kind: str
) -> Response:
    opts = body.get("stream_options") or {}
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    shape = _OpenAI(req.model, kind, include_usage)
    return await answer(request, gw, req, bool(body.get("stream")), shape)


async def chat_completions(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    try:
        body = await json_body(request)
        model = _model(body)
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw:
            raise BadRequest("messages must be a non-empty list", param="messages")
        messages = []
        for i, m in enumerate(raw):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or m["role"] not in ROLES
            ):
                raise BadRequest(
                    f"messages[{i}].role must be one of {sorted(ROLES)}", param=f"messages[{i}]"
                )
            messages.append({"role": ROLES[m["role"]], "content": _content(i, m.get("content"))})
        req = chat_request(model, messages, options_of(body))
    except BadRequest as exc:
        return _bad(exc)
    return await _answer(request, gw, req, body, "chat")


async def completions(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    try:
        body = await json_body(request)
        model = _model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("prompt must be a non-empty string", param="prompt")
        if body.get("suffix") or body.get("echo") or body.get("best_of") not in (None, 1):
            raise BadRequest("suffix, echo and best_of are not supported by this gateway")
        req = chat_request(model, [{"role": "user", "content": prompt}], options_of(body))
    except BadRequest as exc:
        return _bad(exc)
    return await _answer(request, gw, req, body, "text")


async def models(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    data = [
        {
            "id": info.name,
            "object": "model",
            "created": int(at or 0),
            "owned_by": "ollama-autoscaler",
        }
        for info, at in await catalog_with_times(gw)
    ]
    return JSONResponse({"object": "list", "data": data})


async def model(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    name = request.path_params["model"]
    found = await model_with_time(gw, name)
    if found is not None:
        info, at = found
        return JSONResponse(
            {
                "id": info.name,
                "object": "model",
                "created": int(at or 0),
                "owned_by": "ollama-autoscaler",
            }
        )
    return error_response(API, 404, f"The model '{name}' does not exist", "model_not_found")
