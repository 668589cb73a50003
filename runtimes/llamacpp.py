"""llama.cpp `llama-server` in router mode: one child process per loaded model.

Started with `--models-preset`, `--models-max 0` and `--no-models-autoload`, so the router never
loads or evicts on its own: the planner decides, this adapter executes.

Failures come back as `RuntimeFailure` with a stable code, never as an HTTP library error. The
router reports a model process that died only as "exit code 1" (a signal too); when the
adapter can read the router's log (`log_path`, local nodes), the failure carries the last lines
that process printed, which say why.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from . import gguf_info, prefetch
from .base import Progress, PullResult, RuntimeFailure, http_errors, poll_until

TAIL_LINES = 8
SAFE_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def child_log_tail(log_path: Path, model: str, lines: int = TAIL_LINES) -> list[str]:
    """The last lines the router forwarded from `model`'s latest process (prefix `[port]`)."""
    try:
        with log_path.open("rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 512 * 1024))
            text = fh.read().decode(errors="replace")
    except OSError:
        return []
    spawned = list(
        re.finditer(rf"spawning server instance with name={re.escape(model)} on port (\d+)", text)
    )
    if not spawned:
        return []
    port = spawned[-1].group(1)
    prefix = re.compile(rf"^\[\s*{port}\] ?")
    out = [
        prefix.sub("", line)
        for line in text[spawned[-1].end() :].splitlines()
        if prefix.match(line)
    ]
    return out[-lines:]


class LlamaCppRuntime:
    kind = "llamacpp"

    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient | None = None,
        log_path: str | Path | None = None,
        models_dir: str | Path | None = None,
        api_key: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.models_dir = Path(models_dir) if models_dir else None
        # llama-server's --api-key: every call but /health carries it.
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.client = client or httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(10.0, read=600.0), headers=headers
        )
        self.log_path = Path(log_path) if log_path else None

    async def _models(self) -> list[dict[str, Any]]:
        with http_errors(self.url, "GET /models"):
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

    def death_report(self, model: str, exit_code: Any) -> str:
        """Why a model process died, as far as can be told from here."""
        head = (
            f"{model}'s process on {self.url} exited (the router reports status {exit_code}; "
            "it reports a process killed by a signal as 1 too)"
        )
        tail = child_log_tail(self.log_path, model) if self.log_path else []
        if not tail:
            where = f"; see {self.log_path}" if self.log_path else ""
            return head + where
        quiet = not any(re.search(r"error|fail|abort|assert", t, re.I) for t in tail)
        hint = (
            "; it printed no error before dying, so it was most likely killed by a signal "
            "(SIGILL: an instruction this CPU traps, a build that does not fit it — see dmesg; "
            "SIGKILL: out of memory)"
            if quiet
            else ""
        )
        return head + hint + "; its last output:\n    " + "\n    ".join(tail)

    async def load(self, model: str, timeout: float) -> None:
        status = await self._status(model)
        if status.get("value") != "loaded":
            with http_errors(self.url, f"load {model}"):
                resp = await self.client.post("/models/load", json={"model": model})
            if resp.status_code >= 400 and "already" not in resp.text:
                raise RuntimeFailure(
                    "load_failed", f"llama-server refused to load {model}: {resp.text}"
                )

        async def ready() -> bool:
            st = await self._status(model)
            if st.get("failed"):
                raise RuntimeFailure("load_failed", self.death_report(model, st.get("exit_code")))
            return st.get("value") == "loaded"

        await poll_until(ready, timeout, what=f"{model} to load on {self.url}")

    async def model_path(self, model: str) -> Path | None:
        """The GGUF the router would load for `model` (its `--model` argument), if local."""
        args = (await self._status(model)).get("args") or []
        if "--model" in args[:-1]:
            return Path(args[args.index("--model") + 1])
        return None

    async def prefetch(self, model: str) -> bool:
        """Start warming `model`'s file into the page cache (a local router only). True if a
        read was started."""
        try:
            path = await self.model_path(model)
        except RuntimeFailure:
            return False
        return path is not None and prefetch.prefetch(path) is not None

    async def unload(self, model: str, timeout: float) -> None:
        if (await self._status(model)).get("value") == "unloaded":
            return
        with http_errors(self.url, f"unload {model}"):
            resp = await self.client.post("/models/unload", json={"model": model})
        if resp.status_code >= 400 and (await self._status(model)).get("value") != "unloaded":
            raise RuntimeFailure(
                "unload_failed", f"llama-server refused to unload {model}: {resp.text}"
            )

        async def gone() -> bool:
            return (await self._status(model)).get("value") == "unloaded"

        await poll_until(gone, timeout, what=f"{model} to unload on {self.url}")

    @staticmethod
    def _refusal(status: int, text: str) -> RuntimeFailure:
        if status == 400 and re.search(r"context|exceed", text, re.I):
            return RuntimeFailure("prompt_too_long", f"llama-server {status}: {text[:300]}")
        # The router answers 500 "proxy error" when the model's process is gone under it.
        gone = status >= 500 and "proxy error" in text.lower()
        if status in (404, 503) or gone or (status == 400 and "not loaded" in text.lower()):
            return RuntimeFailure("model_not_loaded", f"llama-server {status}: {text[:300]}")
        return RuntimeFailure("runtime_error", f"llama-server {status}: {text[:300]}")

    async def chat(
        self,
        model: str,
        messages: list[dict[str, str]],
        options: dict[str, Any],
        usage: dict[str, Any] | None = None,
    ) -> AsyncIterator[str]:
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},  # the prompt's token count, at the end
        }
        usage = {} if usage is None else usage
        for ours, theirs in (
            ("temperature", "temperature"),
            ("max_tokens", "max_tokens"),
            ("top_p", "top_p"),
            ("seed", "seed"),
            ("stop", "stop"),
        ):
            if options.get(ours) is not None:
                body[theirs] = options[ours]
        finished = False
        with http_errors(self.url, f"chat with {model} (the stream was cut)", "interrupted"):
            async with self.client.stream(
                "POST", "/v1/chat/completions", json=body, params={"autoload": "false"}
            ) as resp:
                if resp.status_code >= 400:
                    text = (await resp.aread()).decode(errors="replace")
                    raise self._refusal(resp.status_code, text)
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        finished = True
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        raise RuntimeFailure("runtime_error", f"llama-server: {chunk['error']}")
                    if chunk.get("usage"):
                        usage["prompt_tokens"] = chunk["usage"].get("prompt_tokens")
                    for choice in chunk.get("choices", []):
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield text
                        if choice.get("finish_reason"):
                            usage["done_reason"] = choice["finish_reason"]
                            finished = True
        if not finished:
            raise RuntimeFailure(
                "interrupted",
                f"the stream from {model} on {self.url} ended without finishing "
                "(its process died or was unloaded)",
            )

    async def pull(
        self, model: str, url: str | None, sha256: str | None, progress: Progress
    ) -> PullResult:
        """Download a GGUF from `url` into the node's models directory: a temporary file,
        checked (sha256, GGUF header), then renamed; then the router re-reads its models."""
        if self.models_dir is None:
            raise RuntimeFailure(
                "pull_unsupported", f"llama-server at {self.url} has no models directory we manage"
            )
        if not url:
            raise RuntimeFailure("invalid_request", "a llama.cpp node pulls from a GGUF url")
        if not SAFE_FILE_NAME.match(model):
            raise RuntimeFailure(
                "invalid_request",
                f"{model!r} cannot name a file: use letters, digits, '.', '_' and '-'",
            )
        self.models_dir.mkdir(parents=True, exist_ok=True)
        target = self.models_dir / f"{model}.gguf"
        if target.exists() or model in await self.available():
            raise RuntimeFailure("already_exists", f"{model} already exists on {self.url}")
        partial = self.models_dir / f".{model}.gguf.partial"
        digest = hashlib.sha256()
        try:
            await self._download(url, partial, digest, progress)
            if sha256 and digest.hexdigest() != sha256.lower():
                raise RuntimeFailure(
                    "checksum_mismatch",
                    f"{url} has sha256 {digest.hexdigest()}, expected {sha256.lower()}",
                )
            try:
                info = gguf_info.read(partial)
            except ValueError as exc:
                raise RuntimeFailure("not_gguf", f"{url}: {exc}") from exc
            partial.rename(target)
        finally:
            partial.unlink(missing_ok=True)  # a failed or cut download leaves nothing behind
        with http_errors(self.url, "reload its models"):
            (await self.client.get("/models", params={"reload": "1"})).raise_for_status()
        return PullResult(
            bytes=info.file_bytes,
            path=str(target),
            family=info.architecture,
            params=info.params,
            quant=info.quant,
            context=info.context,
            digest=f"sha256:{digest.hexdigest()}",
        )

    async def _download(self, url: str, partial: Path, digest: Any, progress: Progress) -> None:
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(30.0), follow_redirects=True) as c:
                async with c.stream("GET", url) as resp:
                    if resp.status_code >= 400:
                        raise RuntimeFailure(
                            "download_failed", f"GET {url}: HTTP {resp.status_code}"
                        )
                    total = int(resp.headers.get("content-length") or 0)
                    done = 0
                    with partial.open("wb") as out:
                        async for chunk in resp.aiter_bytes(1 << 20):
                            out.write(chunk)
                            digest.update(chunk)
                            done += len(chunk)
                            await progress(done, total, "downloading")
                    if total and done != total:
                        raise RuntimeFailure(
                            "download_failed", f"GET {url}: got {done} of {total} bytes"
                        )
        except httpx.HTTPError as exc:
            raise RuntimeFailure("download_failed", f"GET {url}: {exc!r}") from exc

    async def aclose(self) -> None:
        await self.client.aclose()
