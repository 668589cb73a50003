"""BENCHMARK-ONLY STUB RUNTIME: answers instantly with fixed tokens, in-process, so that a
throughput run measures the control plane alone. Importing this module adds the runtime
kind `stub` (`OA_RUNTIME_PLUGINS=bench.stub` makes a worker process import it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from runtimes import register

STUB_MODEL = "stub-model"
STUB_URL = "stub://bench"


class StubRuntime:
    """BENCHMARK-ONLY STUB RUNTIME: three fixed tokens per chat, no model, no I/O."""

    kind = "stub"

    def __init__(self, url: str = STUB_URL, **_: Any) -> None:
        self.url = url

    async def available(self) -> list[str]:
        return [STUB_MODEL]

    async def loaded(self) -> dict[str, str]:
        return {STUB_MODEL: "loaded"}

    async def load(self, model: str, timeout: float) -> None:
        return None

    async def unload(self, model: str, timeout: float) -> None:
        return None

    async def chat(
        self,
        model: str,
        messages: list[dict[str, str]],
        options: dict[str, Any],
        usage: dict[str, Any] | None = None,
    ) -> AsyncIterator[str]:
        for word in ("stub ", "tokens ", "only"):
            yield word
        if usage is not None:
            usage.update(prompt_tokens=len(messages), done_reason="stop")

    async def aclose(self) -> None:
        return None


register(StubRuntime.kind, StubRuntime)
