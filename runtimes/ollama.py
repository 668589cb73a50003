"""Ollama's HTTP API as a runtime (API shapes: shared/notes/ollama.md §2, from Ollama's docs).

We own eviction, so every request pins its model with `keep_alive: -1`; unloading is
`keep_alive: 0` followed by polling `/api/ps` until the model is gone (Ollama unloads
asynchronously).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from .base import Progress, PullResult, RuntimeFailure, http_errors, poll_until


class OllamaRuntime:
    kind = "ollama"

    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient | None = None,
        log_path: object = None,
        models_dir: object = None,
        api_key: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        # Ollama has no keys of its own; one behind an authenticating proxy gets it as Bearer.
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.client = client or httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(10.0, read=600.0), headers=headers
        )

    @staticmethod
    def _raise_for(resp: httpx.Response, model: str, what: str) -> None:
        if resp.status_code < 400:
            return
        try:
            message = resp.json().get("error", resp.text)
        except (json.JSONDecodeError, AttributeError):
            message = resp.text
        code = "unknown_model" if resp.status_code == 404 else f"{what}_failed"
        raise RuntimeFailure(code, f"ollama {resp.status_code} on {what} {model}: {message}")

    async def _get(self, path: str) -> dict[str, Any]:
        with http_errors(self.url, f"GET {path}"):
            resp = await self.client.get(path)
            resp.raise_for_status()
            return dict(resp.json())

    async def available(self) -> list[str]:
        return sorted(m["name"] for m in (await self._get("/api/tags")).get("models", []))

    async def loaded(self) -> dict[str, str]:
        return {m["name"]: "loaded" for m in (await self._get("/api/ps")).get("models", [])}

    async def load(self, model: str, timeout: float) -> None:
        # An empty generate returns only once the model is loaded (done_reason "load").
        with http_errors(self.url, f"load {model}"):
            resp = await self.client.post(
                "/api/generate", json={"model": model, "keep_alive": -1}, timeout=timeout
            )
        self._raise_for(resp, model, "load")

    async def unload(self, model: str, timeout: float) -> None:
        with http_errors(self.url, f"unload {model}"):
            resp = await self.client.post("/api/generate", json={"model": model, "keep_alive": 0})
        if resp.status_code != 404:
            self._raise_for(resp, model, "unload")

        async def gone() -> bool:
            return model not in await self.loaded()

        await poll_until(gone, timeout, interval=0.1, what=f"ollama to unload {model}")

    async def chat(
        self,
        model: str,
        messages: list[dict[str, str]],
        options: dict[str, Any],
        usage: dict[str, Any] | None = None,
    ) -> AsyncIterator[str]:
        usage = {} if usage is None else usage
        opts: dict[str, Any] = {}
        for ours, theirs in (
            ("temperature", "temperature"),
            ("max_tokens", "num_predict"),
            ("top_p", "top_p"),
            ("seed", "seed"),
            ("num_ctx", "num_ctx"),
            ("stop", "stop"),
        ):
            if options.get(ours) is not None:
                opts[theirs] = options[ours]
        body = {
            "model": model,
            "messages": messages,
            "stream": True,
            "keep_alive": -1,
            "options": opts,
        }
        finished = False
        with http_errors(self.url, f"chat with {model} (the stream was cut)", "interrupted"):
            async with self.client.stream("POST", "/api/chat", json=body) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    self._raise_for(resp, model, "chat")
                async for line in resp.aiter_lines():
                    if not line.strip():
                        continue
                    chunk = json.loads(line)
                    if "error" in chunk:  # mid-stream errors come as a line under HTTP 200
                        raise RuntimeFailure("runtime_error", f"ollama: {chunk['error']}")
                    text = (chunk.get("message") or {}).get("content")
                    if text:
                        yield text
                    if chunk.get("done"):
                        usage["prompt_tokens"] = chunk.get("prompt_eval_count")
                        usage["done_reason"] = chunk.get("done_reason")
                        finished = True
                        break
        if not finished:
            raise RuntimeFailure(
                "interrupted", f"the stream from {model} on {self.url} ended without `done`"
            )

    async def pull(
        self, model: str, url: str | None, sha256: str | None, progress: Progress
    ) -> PullResult:
        """`/api/pull` from the Ollama library, its streamed progress passed on."""
        if url:
            raise RuntimeFailure("invalid_request", "an Ollama node pulls by name, not from a url")
        ok = False
        with http_errors(self.url, f"pull {model}", "download_failed"):
            async with self.client.stream(
                "POST", "/api/pull", json={"model": model, "stream": True}, timeout=None
            ) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    self._raise_for(resp, model, "pull")
                async for line in resp.aiter_lines():
                    if not line.strip():
                        continue
                    chunk = json.loads(line)
                    if "error" in chunk:
                        raise RuntimeFailure("download_failed", f"ollama: {chunk['error']}")
                    status = str(chunk.get("status", ""))
                    await progress(
                        int(chunk.get("completed") or 0), int(chunk.get("total") or 0), status
                    )
                    ok = ok or status == "success"
        if not ok:
            raise RuntimeFailure("download_failed", f"ollama's pull of {model} did not finish")
        for m in (await self._get("/api/tags")).get("models", []):
            if m.get("name") == model:
                details = m.get("details") or {}
                return PullResult(
                    bytes=int(m.get("size") or 0),
                    family=details.get("family"),
                    params=details.get("parameter_size"),
                    quant=details.get("quantization_level"),
                    digest=m.get("digest"),
                )
        raise RuntimeFailure("download_failed", f"ollama pulled {model} but does not list it")

    async def aclose(self) -> None:
        await self.client.aclose()
