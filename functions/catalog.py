"""The model catalog (bucket `models`, key `model.<encoded name>`): what each model costs."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel

from events.bus import MODELS_BUCKET, keys_matching
from events.keys import decode_name, model_key


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
    def __init__(self, kv: KeyValue, js: JetStreamContext) -> None:
        self.kv, self.js = kv, js

    async def get(self, name: str) -> ModelInfo | None:
        try:
            entry = await self.kv.get(model_key(name))
        except (KeyNotFoundError, KeyDeletedError):
            return None
        return ModelInfo.model_validate_json(entry.value) if entry.value else None

    async def put(self, info: ModelInfo) -> None:
        await self.kv.put(model_key(info.name), info.model_dump_json().encode())

    async def all(self) -> list[ModelInfo]:
        out = []
        for key in await keys_matching(self.js, MODELS_BUCKET, "model.*"):
            info = await self.get(decode_name(key.removeprefix("model.")))
            if info is not None:
                out.append(info)
        return sorted(out, key=lambda m: m.name)
