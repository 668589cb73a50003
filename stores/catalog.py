"""The model catalog (bucket `models`, key `model.<encoded name>`): what each model costs."""

from __future__ import annotations

import time

from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel

from events.bus import MODELS_BUCKET, keys_matching
from events.keys import decode_name, model_key


# Memory of a loaded model = file size + KV cache and compute buffers. Without per-model GGUF
# metadata we estimate the overhead as 20 % of the file plus 256 MiB (a 2-4k context on a
# 1-8B model; shared/notes/ollama.md §1.6 has Ollama's own, finer estimate).
def estimate_loaded_bytes(file_bytes: int) -> int:
    return int(file_bytes * 1.2) + 256 * (1 << 20)


class ModelInfo(BaseModel):
    name: str
    bytes: int  # memory when loaded (weights + KV cache for `context`)
    file_bytes: int | None = None
    digest: str | None = None
    family: str | None = None
    params: str | None = None
    quant: str | None = None
    context: int | None = None


class Catalog:
    def __init__(self, kv: KeyValue, js: JetStreamContext, cache_s: float = 5.0) -> None:
        self.kv, self.js = kv, js
        # Found entries are kept for cache_s (the catalog changes when a model is pulled or
        # measured, rarely): one KV read less per chat. Misses are never kept, so a model
        # just pulled is seen at once.
        self.cache_s = cache_s
        self._found: dict[str, tuple[float, ModelInfo]] = {}

    async def get(self, name: str) -> ModelInfo | None:
        hit = self._found.get(name)
        if hit is not None and time.monotonic() - hit[0] < self.cache_s:
            return hit[1]
        try:
            entry = await self.kv.get(model_key(name))
        except (KeyNotFoundError, KeyDeletedError):
            self._found.pop(name, None)
            return None
        if not entry.value:
            return None
        info = ModelInfo.model_validate_json(entry.value)
        self._found[name] = (time.monotonic(), info)
        return info

    async def fresh(self, name: str) -> ModelInfo | None:
        self._found.pop(name, None)
        return await self.get(name)

    async def put(self, info: ModelInfo) -> None:
        await self.kv.put(model_key(info.name), info.model_dump_json().encode())
        self._found[info.name] = (time.monotonic(), info)

    async def all(self) -> list[ModelInfo]:
        out = []
        for key in await keys_matching(self.js, MODELS_BUCKET, "model.*"):
            info = await self.fresh(decode_name(key.removeprefix("model.")))
            if info is not None:
                out.append(info)
        return sorted(out, key=lambda m: m.name)
