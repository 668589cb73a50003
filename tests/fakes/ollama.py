"""FAKE Ollama server — a wire-level fake, NOT Ollama.

Ollama cannot be installed here, so the Ollama adapter is tested against this ASGI app,
written from Ollama's published API (docs/api.md; see shared/notes/ollama.md §2): the same
paths, bodies, NDJSON streaming, error shapes and the asynchronous unload. It holds a fixed
library of models and "generates" deterministic words. Run it with
`python -m tests.fakes.ollama --port 11434`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

WORDS = "the sky looks blue because air scatters short blue light more than red light".split()


def _now() -> str:
    return datetime.now(UTC).isoformat()


class FakeOllama:
    """State of the fake: the local library and what is 'loaded'."""

    def __init__(
        self,
        library: dict[str, int] | None = None,
        load_s: float = 0.05,
        unload_s: float = 0.1,
        token_s: float = 0.002,
    ) -> None:
        self.library = library or {"gemma3:270m": 300_000_000, "llama3.2:1b": 1_321_098_329}
        self.loaded: dict[str, float] = {}  # name -> expires_at (epoch s; inf = forever)
        self.load_s, self.unload_s, self.token_s = load_s, unload_s, token_s
        self.requests: list[tuple[str, dict[str, Any]]] = []
        # Fault injection: end a chat stream after this many tokens without its `done` line
        # (as when the model's process dies), and hold loads until `load_gate` is set.
        self.cut_after: int | None = None
        self.pullable: dict[str, int] = {"qwen2.5:0.5b": 397_821_319}  # what /api/pull finds
        self.load_gate: asyncio.Event | None = None

    def _details(self, name: str) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": name.split(":")[0],
            "families": [name.split(":")[0]],
            "parameter_size": "270M",
            "quantization_level": "Q4_K_M",
        }

    async def _ensure_loaded(self, name: str, keep_alive: Any) -> None:
        if name not in self.loaded:
            await asyncio.sleep(self.load_s)
            if self.load_gate is not None:
                await self.load_gate.wait()
        ka = float("inf") if keep_alive in (-1, "-1") else time.time() + 300
        self.loaded[name] = ka

    async def _unload_later(self, name: str) -> None:
        await asyncio.sleep(self.unload_s)  # Ollama unloads asynchronously
        self.loaded.pop(name, None)

    def app(self) -> Starlette:
        async def root(_: Request) -> Response:
            return PlainTextResponse("Ollama is running")

        async def version(_: Request) -> Response:
            return JSONResponse({"version": "0.0.0-fake"})

        async def tags(_: Request) -> Response:
            return JSONResponse(
                {
                    "models": [
                        {
                            "name": n,
                            "model": n,
                            "modified_at": _now(),
                            "size": size,
                            "digest": f"{abs(hash(n)):064x}"[:64],
                            "details": self._details(n),
                        }
                        for n, size in sorted(self.library.items())
                    ]
                }
            )

        async def ps(_: Request) -> Response:
            return JSONResponse(
                {
                    "models": [
                        {
                            "name": n,
                            "model": n,
                            "size": self.library[n],
                            "digest": f"{abs(hash(n)):064x}"[:64],
                            "details": self._details(n),
                            "expires_at": "2318-01-01T00:00:00Z" if exp == float("inf") else _now(),
                            "size_vram": self.library[n],
                            "context_length": 4096,
                        }
                        for n, exp in self.loaded.items()
                    ]
                }
            )

        async def body_of(request: Request) -> dict[str, Any] | Response:
            try:
                body = await request.json()
            except json.JSONDecodeError:
                return JSONResponse({"error": "invalid JSON"}, status_code=400)
            if not isinstance(body, dict) or not body.get("model"):
                return JSONResponse({"error": "model is required"}, status_code=400)
            self.requests.append((request.url.path, body))
            if body["model"] not in self.library:
                return JSONResponse(
                    {"error": f"model '{body['model']}' not found"}, status_code=404
                )
            return body

        async def generate(request: Request) -> Response:
            body = await body_of(request)
            if isinstance(body, Response):
                return body
            name = body["model"]
            if body.get("keep_alive") in (0, "0", "0s"):
                asyncio.get_running_loop().create_task(self._unload_later(name))
                return JSONResponse(
                    {
                        "model": name,
                        "created_at": _now(),
                        "response": "",
                        "done": True,
                        "done_reason": "unload",
                    }
                )
            await self._ensure_loaded(name, body.get("keep_alive"))
            if not body.get("prompt"):
                return JSONResponse(
                    {
                        "model": name,
                        "created_at": _now(),
                        "response": "",
                        "done": True,
                        "done_reason": "load",
                    }
                )
            return JSONResponse({"error": "fake: only load/unload via generate"}, status_code=400)

        async def chat(request: Request) -> Response:
            body = await body_of(request)
            if isinstance(body, Response):
                return body
            name = body["model"]
            t0 = time.perf_counter()
            was_loaded = name in self.loaded
            await self._ensure_loaded(name, body.get("keep_alive"))
            load_ns = 0 if was_loaded else int((time.perf_counter() - t0) * 1e9)
            if not body.get("messages"):
                return JSONResponse(
                    {
                        "model": name,
                        "created_at": _now(),
                        "message": {"role": "assistant", "content": ""},
                        "done_reason": "load",
                        "done": True,
                    }
                )
            n = int((body.get("options") or {}).get("num_predict") or 12)
            cut = self.cut_after

            async def stream() -> AsyncIterator[bytes]:
                for i in range(n):
                    if cut is not None and i == cut:
                        return  # the "process" died: no done line
                    await asyncio.sleep(self.token_s)
                    word = WORDS[i % len(WORDS)] + " "
                    yield (
                        json.dumps(
                            {
                                "model": name,
                                "created_at": _now(),
                                "message": {"role": "assistant", "content": word},
                                "done": False,
                            }
                        )
                        + "\n"
                    ).encode()
                yield (
                    json.dumps(
                        {
                            "model": name,
                            "created_at": _now(),
                            "message": {"role": "assistant", "content": ""},
                            "done": True,
                            "done_reason": "stop",
                            "total_duration": int((time.perf_counter() - t0) * 1e9),
                            "load_duration": load_ns,
                            "eval_count": n,
                        }
                    )
                    + "\n"
                ).encode()

            return StreamingResponse(stream(), media_type="application/x-ndjson")

        async def pull(request: Request) -> Response:
            try:
                body = await request.json()
            except json.JSONDecodeError:
                return JSONResponse({"error": "invalid JSON"}, status_code=400)
            name = str(body.get("model") or "")
            self.requests.append((request.url.path, body))
            size = self.pullable.get(name)

            async def stream() -> AsyncIterator[bytes]:
                yield (json.dumps({"status": "pulling manifest"}) + "\n").encode()
                if size is None:  # Ollama reports an unknown model as an error line
                    yield (
                        json.dumps({"error": "pull model manifest: file does not exist"}) + "\n"
                    ).encode()
                    return
                for done in range(0, size + 1, max(1, size // 8)):
                    await asyncio.sleep(self.token_s)
                    line = {
                        "status": f"pulling {name}",
                        "digest": "sha256:fake",
                        "total": size,
                        "completed": done,
                    }
                    yield (json.dumps(line) + "\n").encode()
                self.library[name] = size
                for status in ("verifying sha256 digest", "writing manifest", "success"):
                    yield (json.dumps({"status": status}) + "\n").encode()

            return StreamingResponse(stream(), media_type="application/x-ndjson")

        async def show(request: Request) -> Response:
            body = await body_of(request)
            if isinstance(body, Response):
                return body
            return JSONResponse(
                {
                    "details": self._details(body["model"]),
                    "model_info": {
                        "general.architecture": "gemma3",
                        "gemma3.context_length": 32768,
                    },
                    "capabilities": ["completion"],
                    "modified_at": _now(),
                }
            )

        return Starlette(
            routes=[
                Route("/", root, methods=["GET", "HEAD"]),
                Route("/api/version", version),
                Route("/api/tags", tags),
                Route("/api/ps", ps),
                Route("/api/generate", generate, methods=["POST"]),
                Route("/api/chat", chat, methods=["POST"]),
                Route("/api/show", show, methods=["POST"]),
                Route("/api/pull", pull, methods=["POST"]),
            ]
        )


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description="FAKE Ollama API server (for tests; not Ollama)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=11434)
    args = ap.parse_args()
    uvicorn.run(FakeOllama().app(), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
