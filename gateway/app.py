"""The gateway's ASGI app and its server: `ollama-autoscaler gateway`, and `up` starts one.

Routes: Ollama's API (/, /api/*), OpenAI's (/v1/*), the seed's task API
(/api/v1/task/{task_id}) and Prometheus metrics (/metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

import nats.errors
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from events.bus import TASKS_BUCKET, TRANSIENT, values_matching
from events.keys import decode_name, encode_name
from stores.tasks import TaskRecord

from . import ollama_api, openai_api
from .core import Gateway
from .http import Guard, api_of, check_listen, error_response, load_keys
from .metrics import FleetMetrics

log = logging.getLogger("gateway")
DEFAULT_LISTEN = "127.0.0.1:11434"  # Ollama's own address: its clients find it there


async def metrics(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    m: FleetMetrics = request.app.state.metrics
    nodes = [rec for rec, _ in await gw.svc.fleet.nodes()]
    waiting: dict[str, int] = {}
    for subject, n in (await gw.svc.waiting.subjects()).items():
        model = decode_name(subject.split(".")[3])
        waiting[model] = waiting.get(model, 0) + n
    m.snapshot(nodes, waiting)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)


async def task(request: Request) -> Response:
    """The seed's task API: a chat's (or a pull's) state and timings, from its record."""
    gw: Gateway = request.app.state.gateway
    task_id = request.path_params["task_id"]
    if not task_id or len(task_id) > 256:
        return error_response("task", 400, "a task id is 1-256 characters")
    chats = [r for r in await gw.svc.tasks.find(task_id) if r.client == gw.client]
    if chats:
        return JSONResponse(_task_view(chats[0]))
    js, kv = gw.svc.js, gw.svc.tasks.kv
    pulls = await values_matching(js, kv, TASKS_BUCKET, f"pull.*.{encode_name(task_id)}")
    if pulls:
        from functions.pull import PullRecord

        rec = PullRecord.model_validate_json(pulls[0])
        return JSONResponse({"kind": "pull", **rec.model_dump()})
    return error_response("task", 404, f"no task {task_id!r} (tasks are kept for 24 h)")


def _task_view(rec: TaskRecord) -> dict[str, Any]:
    return {
        "kind": "chat",
        **rec.model_dump(
            include={
                "task_id",
                "chat_id",
                "model",
                "state",
                "node",
                "created_at",
                "updated_at",
                "runs",
                "timings",
                "error",
                "reason",
                "priority",
            }
        ),
    }


def make_app(gateway: Gateway, keys: frozenset[str] = frozenset()) -> Any:
    m = FleetMetrics()
    gateway.metrics = m
    gateway.listeners.append(m.heard)
    routes = [
        Route("/", ollama_api.root, methods=["GET", "HEAD"]),
        Route("/api/version", ollama_api.version),
        Route("/api/tags", ollama_api.tags),
        Route("/api/ps", ollama_api.ps),
        Route("/api/show", ollama_api.show, methods=["POST"]),
        Route("/api/pull", ollama_api.pull, methods=["POST"]),
        Route("/api/chat", ollama_api.chat, methods=["POST"]),
        Route("/api/generate", ollama_api.generate, methods=["POST"]),
        Route("/api/v1/task/{task_id}", task),
        Route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"]),
        Route("/v1/completions", openai_api.completions, methods=["POST"]),
        Route("/v1/models", openai_api.models),
        Route("/v1/models/{model:path}", openai_api.model),
        Route("/metrics", metrics),
    ]

    async def failed(request: Request, exc: Exception) -> Response:
        """Anything unforeseen (the bus not answering a read): an error in the API's shape."""
        log.warning("%s %s failed: %r", request.method, request.url.path, exc)
        transient = isinstance(exc, (*TRANSIENT, nats.errors.Error, ConnectionError, TimeoutError))
        return error_response(
            api_of(request.url.path),
            503 if transient else 500,
            f"the fleet did not answer: {exc!r}"
            if transient
            else f"internal error ({type(exc).__name__}); see the gateway's log",
            "unavailable" if transient else "internal",
            {"Retry-After": "1"} if transient else None,
        )

    app = Starlette(routes=routes, exception_handlers={Exception: failed})
    app.state.gateway, app.state.metrics = gateway, m

    def count(api: str, route: str, status: int) -> None:
        m.http.labels(api, route, str(status)).inc()

    return Guard(app, keys, count)


class _Server(uvicorn.Server):
    """uvicorn inside a process that owns its signals (`up`, the CLI): it installs none."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:
        return None


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen {listen!r}: use HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host.strip("[]") or "127.0.0.1", int(port)


class Served:
    """A gateway serving HTTP in this event loop."""

    def __init__(self, gateway: Gateway, server: _Server, task: asyncio.Task[None]) -> None:
        self.gateway, self.server, self.task = gateway, server, task

    @property
    def url(self) -> str:
        cfg = self.server.config
        return f"http://{cfg.host}:{cfg.port}"

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.task, 10)
        await self.gateway.close()


async def serve(nats_url: str, listen: str = DEFAULT_LISTEN, ca: str | None = None) -> Served:
    """Connect to the bus and serve the gateway on `listen` (HOST:PORT) until `stop`.
    Raises RefusedToServe for a non-loopback address without API keys, OSError if the port
    is taken."""
    host, port = parse_listen(listen)
    keys = load_keys()
    check_listen(host, keys)
    # Bound here, not by uvicorn (which exits the process when it cannot bind).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"the gateway cannot listen on {host}:{port}: {exc.strerror}") from exc
    gateway = await Gateway.open(nats_url, ca)
    config = uvicorn.Config(
        make_app(gateway, keys),
        host=host,
        port=sock.getsockname()[1],
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=3,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while not server.started:
        if task.done() or loop.time() > deadline:
            server.should_exit = True
            await gateway.close()
            raise TimeoutError("the gateway did not start within 15 s")
        await asyncio.sleep(0.02)
    return Served(gateway, server, task)
