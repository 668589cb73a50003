"""llama.cpp `llama-server` in router mode: one child process per loaded model.

Started with `--models-preset`, `--models-max 0` and `--no-models-autoload`, so the router never
loads or evicts on its own: the planner decides, this adapter executes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from .base import RuntimeFailure, poll_until


class LlamaCppRuntime:
    kind = "llamacpp"

    def __init__(self, url: str, client: httpx.AsyncClient | None = None) -> None:
        self.url = url.rstrip("/")
        self.client = client or httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(10.0, read=600.0)
        )

    async def _models(self) -> list[dict[str, Any]]:
        resp = await self.client.get("/models")
        resp.raise_for_status()
        return list(resp.json().get("data", []))

    async def available(self) -> list[str]:
        return sorted(m["id"] for m in await self._models())

    async def loaded(self) -> dict[str, str]:
        out = {}
        for m in await self._models():
            status = m.get("status", {}).get("value")
            if status in ("loaded", "loading", "sleeping"):
                out[m["id"]] = "loading" if status == "loading" else "loaded"
        return out

    async def _status(self, model: str) -> dict[str, Any]:
        for m in await self._models():
            if m["id"] == model:
                return dict(m.get("status", {}))
        raise RuntimeFailure("unknown_model", f"llama-server at {self.url} has no model {model!r}")

    async def load(self, model: str, timeout: float) -> None:
        status = await self._status(model)
        if status.get("value") != "loaded":
            resp = await self.client.post("/models/load", json={"model": model})
            if resp.status_code >= 400 and "already" not in resp.text:
                raise RuntimeFailure(
                    "load_failed", f"llama-server refused to load {model}: {resp.text}"
                )

        async def ready() -> bool:
            st = await self._status(model)
            if st.get("failed"):
                raise RuntimeFailure(
                    "load_failed",
                    f"{model} failed to start on {self.url} (exit code {st.get('exit_code')})",
                )
            return st.get("value") == "loaded"

        await poll_until(ready, timeout, what=f"{model} to load on {self.url}")

    async def unload(self, model: str, timeout: float) -> None:
        if (await self._status(model)).get("value") == "unloaded":
            return
        resp = await self.client.post("/models/unload", json={"model": model})
        if resp.status_code >= 400 and (await self._status(model)).get("value") != "unloaded":
            raise RuntimeFailure(
                "unload_failed", f"llama-server refused to unload {model}: {resp.text}"
            )

        async def gone() -> bool:
            return (await self._status(model)).get("value") == "unloaded"

        await poll_until(gone, timeout, what=f"{model} to unload on {self.url}")

    async def chat(
        self, model: str, messages: list[dict[str, str]], options: dict[str, Any]
    ) -> AsyncIterator[str]:
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
        for ours, theirs in (
            ("temperature", "temperature"),
            ("max_tokens", "max_tokens"),
            ("top_p", "top_p"),
            ("seed", "seed"),
            ("stop", "stop"),
        ):
            if options.get(ours) is not None:
                body[theirs] = options[ours]
        async with self.client.stream(
            "POST", "/v1/chat/completions", json=body, params={"autoload": "false"}
        ) as resp:
            if resp.status_code >= 400:
                text = (await resp.aread()).decode(errors="replace")
                code = "model_not_loaded" if resp.status_code in (400, 404, 503) else "runtime"
                raise RuntimeFailure(code, f"llama-server {resp.status_code}: {text[:300]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise RuntimeFailure("runtime", f"llama-server: {chunk['error']}")
                for choice in chunk.get("choices", []):
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text

    async def aclose(self) -> None:
        await self.client.aclose()
