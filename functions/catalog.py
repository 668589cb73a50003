"""The model catalog (bucket `models`, key `model.<encoded name>`): what each model costs."""

from __future__ import annotations

from nats.js.errors import KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel

from events.bus import snapshot
from events.keys import model_key


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
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, name: str) -> ModelInfo | None:
        try:
            entry = await self.kv.get(model_key(name))
        except (KeyNotFoundError, KeyDeletedError):
            return None
        return ModelInfo.model_validate_json(entry.value) if entry.value else None

    async def put(self, info: ModelInfo) -> None:
        await self.kv.put(model_key(info.name), info.model_dump_json().encode())

    async def all(self) -> list[ModelInfo]:
        entries = await snapshot(self.kv, "model.*")
        return sorted(
            (ModelInfo.model_validate_json(e.value) for e in entries if e.value),
            key=lambda m: m.name,
        )
