"""The runtime protocol: the one boundary between the functions and an inference server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import httpx


class RuntimeFailure(RuntimeError):
    """The runtime refused or failed; `code` is the stable error code for chat.failed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


Progress = Callable[[int, int, str], Awaitable[None]]  # completed, total, status


@dataclass(frozen=True)
class PullResult:
    """What a pull left on the node: the file (llama.cpp) and what is known of the model."""

    bytes: int
    path: str | None = None
    family: str | None = None
    params: str | None = None
    quant: str | None = None
    context: int | None = None
    digest: str | None = None


class Runtime(Protocol):
    kind: str
    url: str

    async def available(self) -> list[str]:
        """Models this runtime can load."""
        ...

    async def loaded(self) -> dict[str, str]:
        """Models it has in memory now: name -> 'loaded' | 'loading'."""
        ...

    async def load(self, model: str, timeout: float) -> None:
        """Load and return once the model answers; raises RuntimeFailure on failure."""
        ...

    async def unload(self, model: str, timeout: float) -> None:
        """Unload and return once the memory is given back."""
        ...

    def chat(
        self,
        model: str,
        messages: list[dict[str, str]],
        options: dict[str, Any],
        usage: dict[str, Any] | None = None,
    ) -> AsyncIterator[str]:
        """Stream the reply's text pieces; at the end, fill `usage` (when given) with what
        the runtime says of the answer: `prompt_tokens`, `done_reason` ("stop", "length")."""
        ...

    async def pull(
        self, model: str, url: str | None, sha256: str | None, progress: Progress
    ) -> PullResult:
        """Fetch the model onto the node, reporting progress; RuntimeFailure on failure, and
        then nothing half-written is left behind."""
        ...

    async def aclose(self) -> None: ...


async def poll_until(
    check: Any, timeout: float, interval: float = 0.05, what: str = "condition"
) -> None:
    """Await `check()` until it returns True; TimeoutError naming `what` after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


@contextmanager
def http_errors(url: str, what: str, code: str = "runtime_unreachable") -> Iterator[None]:
    """Turn a transport error talking to a runtime into a RuntimeFailure with `code`."""
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise RuntimeFailure(
            "runtime_unreachable", f"runtime at {url} unreachable: {what}: {exc!r}"
        ) from exc
    except httpx.HTTPError as exc:
        raise RuntimeFailure(code, f"runtime at {url}: {what}: {exc!r}") from exc
