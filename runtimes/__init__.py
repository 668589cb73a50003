"""Runtime adapters behind one protocol (`runtimes.base.Runtime`), chosen by kind.

`make_runtime(kind, url)` is the registry: the functions and the node agent name a runtime by
the `runtime` field of a node record, never by importing an adapter.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from .base import Runtime, RuntimeFailure
from .llamacpp import LlamaCppRuntime
from .ollama import OllamaRuntime

RuntimeFactory = Callable[..., Runtime]
RUNTIMES: dict[str, RuntimeFactory] = {
    LlamaCppRuntime.kind: LlamaCppRuntime,
    OllamaRuntime.kind: OllamaRuntime,
}


def register(kind: str, factory: RuntimeFactory) -> None:
    """Add a runtime kind (the benchmark's stub registers itself this way)."""
    RUNTIMES[kind] = factory


def load_plugins(modules: str) -> None:
    """Import each module of the comma-separated `modules` (`OA_RUNTIME_PLUGINS`); each adds
    its runtime kinds with `register` when imported. ValueError names one that fails."""
    for name in (m.strip() for m in modules.split(",")):
        if not name:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise ValueError(f"runtime plugin {name!r} (OA_RUNTIME_PLUGINS) failed: {exc}") from exc


def make_runtime(
    kind: str,
    url: str,
    log_path: str | Path | None = None,
    models_dir: str | Path | None = None,
    api_key: str | None = None,
) -> Runtime:
    """A runtime adapter; `log_path` and `models_dir` are known where the runtime runs beside
    its node agent (the local stack): its log (to explain a dead model process) and where
    pulled models go. `api_key` is sent as a Bearer token (llama-server's --api-key)."""
    try:
        factory = RUNTIMES[kind]
    except KeyError:
        raise ValueError(f"unknown runtime kind {kind!r}; known: {sorted(RUNTIMES)}") from None
    pairs = (("log_path", log_path), ("models_dir", models_dir), ("api_key", api_key))
    extra = {k: v for k, v in pairs if v}
    return factory(url, **extra)


__all__ = ["RUNTIMES", "Runtime", "RuntimeFailure", "load_plugins", "make_runtime", "register"]
