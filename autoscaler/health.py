"""Health endpoints for the long-running commands (worker, agent, bridge): what Kubernetes
probes. Served by uvicorn on the command's own event loop, so a stuck loop fails liveness.

    GET /healthz  200 while the process's own work runs (its `alive` check passes)
    GET /readyz   200 when it can do its work now (NATS connected; the runtime answers)
    GET /demand   (bridge only) the fleet's demand as JSON, for a KEDA metrics-api trigger

The function servers (`serve`, functions-framework) answer `GET /healthz` themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

log = logging.getLogger("autoscaler.health")

HEALTHZ, READYZ, DEMAND = "/healthz", "/readyz", "/demand"
PATHS = (HEALTHZ, READYZ, DEMAND)
# What a check returns: None when healthy, else the reason it is not.
Check = Callable[[], Awaitable[str | None]]


async def _answer(check: Check | None) -> Response:
    try:
        problem = await asyncio.wait_for(check(), 5) if check else None
    except Exception as exc:  # a check that raises is a failed check, with its reason
        problem = f"{exc.__class__.__name__}: {exc}"
    if problem:
        return PlainTextResponse(problem + "\n", status_code=503)
    return PlainTextResponse("ok\n")


class HealthServer:
    """`/healthz` and `/readyz` (and optional JSON routes) on `host:port`."""

    def __init__(
        self,
        port: int,
        host: str = "0.0.0.0",
        alive: Check | None = None,
        ready: Check | None = None,
        json_routes: dict[str, Callable[[], Awaitable[dict[str, Any]]]] | None = None,
    ) -> None:
        async def healthz(_: Request) -> Response:
            return await _answer(alive)

        async def readyz(_: Request) -> Response:
            return await _answer(ready)

        routes = [Route(HEALTHZ, healthz), Route(READYZ, readyz)]
        for path, fn in (json_routes or {}).items():

            async def route(_: Request, fn: Any = fn) -> Response:
                try:
                    return JSONResponse(await asyncio.wait_for(fn(), 5))
                except Exception as exc:
                    return JSONResponse({"error": str(exc)}, status_code=503)

            routes.append(Route(path, route))
        config = uvicorn.Config(
            Starlette(routes=routes), host=host, port=port, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        # The command owns SIGTERM/SIGINT (its drain); uvicorn must not take them over.
        self.server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():  # the port was taken: say so instead of hanging
                self._task.result()
                raise OSError(f"health server on {self.server.config.port} did not start")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)


def nats_ready(nc: Any) -> Check:
    """Ready while the NATS connection is up."""

    async def check() -> str | None:
        return None if nc.is_connected else "NATS is not connected"

    return check
