"""bench-gpu: the serving layer on a real GPU (run on an H200; see README "On a GPU").

The models are NOISE MODELS: llama-architecture GGUFs of real sizes with random weights
(stack/noise_models.py). Their output is noise; their memory, load time and KV cache are real.

Phases (each fits in one 10-minute call on the GPU machine; state carries on its disk in --work):
  setup       noise models, pinned host->GPU bandwidth, NVML readings recorded as test fixtures
  accounting  1. estimated vs NVML-measured footprint per model, the books' free vs NVML free
                 over a sequence of loads and evictions;
              3. swap time cold vs warm against bytes / bandwidth, and prefetch;
              2. foreign memory: a PyTorch process takes GPU memory mid-run
  trace       4. the same request trace through (a) llama-server's router alone (autoload,
                 --models-max K) and (b) our stack in front of the same router (--models-max 0)
  report      tables and plots from the CSVs (runs anywhere)
`--dry-run` runs every phase on the CPU with tiny models and a stand-in for NVML (the RSS of
the llama-server processes), to check the script before spending GPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from agent.gpu import GpuProbe, Nvml, Reading
from domain import footprint
from domain.footprint import Geometry
from stack.noise_models import GB, Shape, read_shape, write_noise_model

MIB = 1 << 20
GIB = 1 << 30
DOCS = Path("docs/bench")
CTX = 4096


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- configuration ------------------------------------------------------------------------------
@dataclass
class Config:
    work: Path
    out: Path
    binary: Path
    vocab: Path
    trace: Path
    dry_run: bool = False
    sizes: tuple[float, ...] = (1, 2, 4, 8, 16)  # GB (10^9) of weights
    unit: int = GB
    ctx: int = CTX
    foreign_bytes: int = 32 * GIB
    headroom: int = 1 * GIB  # never booked: the planner's margin on the card
    trace_requests: int = 160
    trace_seconds: float = 150.0
    trace_alpha: float = 1.0
    trace_budget: int = 0  # bytes the stack may use in phase 4 (0: 4 x largest trace model)
    trace_sizes: tuple[float, ...] = (1, 2, 4, 8)
    trace_aliases: int = 3
    router_k: int = 4

    @property
    def models_dir(self) -> Path:
        return self.work / "models"

    def model_name(self, size: float) -> str:
        unit = "MB" if self.dry_run else "GB"
        return f"noise-{size:g}{unit}".lower()

    def model_path(self, size: float) -> Path:
        return self.models_dir / f"{self.model_name(size)}.gguf"


def state_path(cfg: Config) -> Path:
    return cfg.work / "state.json"


def load_state(cfg: Config) -> dict[str, Any]:
    p = state_path(cfg)
    return json.loads(p.read_text()) if p.is_file() else {}


def save_state(cfg: Config, **changes: Any) -> None:
    st = load_state(cfg)
    st.update(changes)
    state_path(cfg).write_text(json.dumps(st, indent=1))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        path.write_text("")
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, keys)
        w.writeheader()
        w.writerows(rows)


# -- memory readings: NVML, or a CPU stand-in for --dry-run --------------------------------------
class RssStandIn:
    """DRY RUN ONLY: a 'card' of `total` bytes whose used memory is the RSS of the processes
    registered (llama-server children, the foreign process). Same interface as `Nvml`."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.roots: list[int] = []

    def name(self) -> str:
        return "CPU stand-in (dry run: RSS, not a GPU)"

    def read(self) -> Reading:
        procs: dict[int, int] = {}
        for root in self.roots:
            try:
                p = psutil.Process(root)
                for c in [p, *p.children(recursive=True)]:
                    if c.pid == root and "llama-server" in c.name():
                        continue  # the router itself holds no model
                    procs[c.pid] = c.memory_info().rss
            except psutil.Error:
                continue
        used = sum(procs.values())
        return Reading(time.time(), self.total, self.total - used, used, procs)


def drop_file_cache(path: Path) -> None:
    """Evict one file's pages from the page cache (a cold read next time). No root needed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_fraction(path: Path) -> float | None:
    """How much of a file is in the page cache (mincore through mmap), or None if unknown."""
    try:
        import ctypes
        import mmap

        size = path.stat().st_size
        libc = ctypes.CDLL(None, use_errno=True)
        with path.open("rb") as fh:
            mm = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY)
            try:
                page = mmap.PAGESIZE
                pages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * pages)()
                anchor = ctypes.c_char.from_buffer(mm)
                addr = ctypes.addressof(anchor)
                del anchor
                if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                    return None
                return sum(v & 1 for v in vec) / pages
            finally:
                mm.close()
    except Exception:  # best effort: a diagnostic column only
        return None


# -- the router --------------------------------------------------------------------------------
def write_preset(path: Path, models: dict[str, Path], ctx: int, dry_run: bool) -> Path:
    lines = ["version = 1", "", "[*]", f"c = {ctx}", "np = 1", "fit = off"]
    if not dry_run:
        lines += ["n-gpu-layers = 999", "flash-attn = on"]
    lines.append("")
    for name, gguf in models.items():
        lines += [f"[{name}]", f"model = {gguf}", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


class Router:
    """A llama-server in router mode, started and stopped by the benchmark."""

    def __init__(
        self, cfg: Config, preset: Path, models_max: int, autoload: bool, log_name: str
    ) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            str(cfg.binary),
            "--models-preset",
            str(preset),
            "--models-max",
            str(models_max),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        if not autoload:
            argv.append("--no-models-autoload")
        self.log_path = cfg.work / "logs" / log_name
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            argv, stdout=self.fh, stderr=subprocess.STDOUT, start_new_session=True
        )

    async def ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2.0) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"router exited {self.proc.returncode}; see {self.log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await c.get(self.url + "/models")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise TimeoutError(f"router did not answer within {timeout}s; see {self.log_path}")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # children the router started are in its session; make sure none survives
        for p in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.Error):
                cmd = p.info["cmdline"] or []
                if cmd and cmd[0] == str(self.proc.args[0]) and os.getsid(p.pid) == self.proc.pid:
                    p.kill()
        self.fh.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LoadEvent:
    model: str
    start: float
    end: float | None = None
    ok: bool = True


@dataclass
class Observer:
    """Polls the router's /models (every 50 ms) and records each model's loads: when it went
    loading, when loaded, and when it was unloaded. The same observer watches both sides of
    the side-by-side, so load-seconds and bytes loaded are counted the same way."""

    url: str
    loads: list[LoadEvent] = field(default_factory=list)
    state: dict[str, str] = field(default_factory=dict)
    ready_at: dict[str, list[tuple[float, float | None]]] = field(default_factory=dict)
    _open: dict[str, LoadEvent] = field(default_factory=dict)

    async def run(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=5.0) as c:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    data = (await c.get("/models")).json().get("data", [])
                    self.update({m["id"]: m.get("status", {}) for m in data}, time.time())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.05)

    def update(self, statuses: dict[str, dict[str, Any]], now: float) -> None:
        for model, st in statuses.items():
            value = "failed" if st.get("failed") else str(st.get("value"))
            old = self.state.get(model, "unloaded")
            if value == old:
                continue
            self.state[model] = value
            if value == "loading":
                ev = LoadEvent(model, now)
                self._open[model] = ev
                self.loads.append(ev)
            elif value == "loaded":
                ev = self._open.pop(model, None) or LoadEvent(model, now)
                if ev not in self.loads:
                    self.loads.append(ev)
                ev.end = now
                self.ready_at.setdefault(model, []).append((now, None))
            elif value in ("unloaded", "failed"):
                ev = self._open.pop(model, None)
                if ev is not None:
                    ev.end, ev.ok = now, False
                spans = self.ready_at.get(model)
                if spans and spans[-1][1] is None:
                    spans[-1] = (spans[-1][0], now)

    def resident_at(self, model: str, t: float) -> bool:
        return any(a <= t and (b is None or t < b) for a, b in self.ready_at.get(model, []))

    def ready_after(self, model: str, t: float) -> float | None:
        """When `model` was next loaded (resident) at or after `t`."""
        if self.resident_at(model, t):
            return t
        later = [a for a, _ in self.ready_at.get(model, []) if a >= t]
        return min(later) if later else None


# -- phase: setup ------------------------------------------------------------------------------
def measure_bandwidth(dry_run: bool) -> dict[str, float]:
    """Host->GPU copy rate from pinned and from pageable memory (1 GiB buffers, median of 10)."""
    if dry_run:
        return {"pinned_gbps": 10.0, "pageable_gbps": 5.0, "dry_run": 1.0}
    import torch

    n = GIB
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    out = {}
    for name, pinned in (("pinned_gbps", True), ("pageable_gbps", False)):
        host = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
        host.fill_(7)
        times = []
        for _ in range(12):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dev.copy_(host, non_blocking=pinned)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        out[name] = n / statistics.median(times[2:]) / 1e9
    del dev
    torch.cuda.empty_cache()
    return out


def measure_disk(path: Path) -> float:
    """Cold sequential read rate of one file (its pages dropped first), GB/s."""
    from runtimes.prefetch import read_through

    drop_file_cache(path)
    t0 = time.perf_counter()
    n = read_through(path)
    return n / (time.perf_counter() - t0) / 1e9


def phase_setup(cfg: Config, nvml: Any) -> None:
    cfg.models_dir.mkdir(parents=True, exist_ok=True)
    shapes = {}
    for size in sorted({*cfg.sizes, *cfg.trace_sizes}):
        path = cfg.model_path(size)
        t0 = time.perf_counter()
        if not path.is_file():
            shape = write_noise_model(path, int(size * cfg.unit), cfg.vocab, seed=int(size * 10))
            say(
                f"wrote {path.name}: {path.stat().st_size / GB:.2f} GB in "
                f"{time.perf_counter() - t0:.0f}s ({shape})"
            )
        shapes[cfg.model_name(size)] = read_shape(path).__dict__
    bw = measure_bandwidth(cfg.dry_run)
    bw["disk_cold_gbps"] = measure_disk(cfg.model_path(max(cfg.sizes)))
    say(f"bandwidth: {bw}")
    save_state(cfg, bandwidth=bw, shapes=shapes, gpu=nvml.name())
    (cfg.out / "gpu_bandwidth.json").write_text(json.dumps({**bw, "gpu": nvml.name()}, indent=1))
    record_fixture(cfg, nvml, "idle card (nothing of ours loaded)")
    if not cfg.dry_run:
        # a process of known size: NVML's per-process figure against what it allocated
        import torch

        x = torch.empty(4 * GIB, dtype=torch.uint8, device="cuda")
        x.fill_(1)
        torch.cuda.synchronize()
        record_fixture(cfg, nvml, "this python process holds a 4 GiB torch tensor", pid=os.getpid())
        del x
        torch.cuda.empty_cache()


def record_fixture(cfg: Config, nvml: Any, label: str, **extra: Any) -> None:
    path = cfg.out / "nvml_readings.json"
    entries = json.loads(path.read_text()) if path.is_file() else []
    entries.append({"label": label, "recorded": not cfg.dry_run, **nvml.read().to_json(), **extra})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=1))


# -- phase: accounting, swap time, prefetch, foreign memory --------------------------------------
def geometry(cfg: Config, name: str, path: Path) -> Geometry:
    shape = Shape(**load_state(cfg)["shapes"][name])
    return Geometry(
        weight_bytes=shape.weight_bytes(),
        n_layer=shape.n_layer,
        n_embd=shape.n_embd,
        n_embd_kv=shape.n_embd_kv,
        n_vocab=shape.n_vocab,
        n_ctx=cfg.ctx,
    )


async def generate(url: str, model: str, tokens: int = 8) -> float:
    """One short chat through the router; returns the time to its first token (s)."""
    body = {
        "model": model,
        "stream": True,
        "max_tokens": tokens,
        "messages": [{"role": "user", "content": "Say something."}],
    }
    t0 = time.perf_counter()
    first = None
    async with httpx.AsyncClient(timeout=300) as c:
        async with c.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if first is None and line.startswith("data:") and '"content"' in line:
                    first = time.perf_counter()
    return (first or time.perf_counter()) - t0


async def phase_accounting(cfg: Config, nvml: Any) -> None:
    from runtimes.llamacpp import LlamaCppRuntime
    from runtimes.prefetch import prefetch

    st = load_state(cfg)
    bw = st["bandwidth"]["pinned_gbps"] * 1e9
    names = {cfg.model_name(s): cfg.model_path(s) for s in cfg.sizes}
    big = cfg.model_name(max(cfg.sizes))
    aliases = {f"{big}-{c}": names[big] for c in "bcdefghijk"}
    preset = write_preset(cfg.work / "accounting.ini", {**names, **aliases}, cfg.ctx, cfg.dry_run)
    router = Router(cfg, preset, 0, False, "router-accounting.log")
    if isinstance(nvml, RssStandIn):
        nvml.roots = [router.proc.pid]
    rt = LlamaCppRuntime(router.url, log_path=router.log_path)
    probe = GpuProbe(nvml, lambda: router.proc.pid)
    base = nvml.read()
    say(f"card: total {base.total / GIB:.1f} GiB, free {base.free / GIB:.1f} GiB at start")
    # The books: capacity = what was free at the start (others' memory excluded) - headroom.
    capacity = base.free - cfg.headroom
    estimates = {m: footprint.estimate_bytes(geometry(cfg, m, p)) for m, p in names.items()}
    measured: dict[str, int] = {}
    booked: dict[str, int] = {}
    acc_rows: list[dict[str, Any]] = []
    books_rows: list[dict[str, Any]] = []
    swap_rows: list[dict[str, Any]] = []

    def books_vs_card(step: str) -> None:
        reading, _ = probe.read()
        books_free = capacity - sum(booked.values())
        card_free = reading.free - cfg.headroom
        books_rows.append(
            {
                "step": step,
                "resident": " ".join(sorted(booked)),
                "booked_gib": round(sum(booked.values()) / GIB, 3),
                "books_free_gib": round(books_free / GIB, 3),
                "nvml_free_gib": round(card_free / GIB, 3),
                "error_pct_of_card": round(100 * (books_free - card_free) / reading.total, 3),
                "books_above_card": books_free > card_free,
            }
        )
        say(f"books: {books_rows[-1]}")

    async def load(model: str, path: Path, cold: bool) -> float:
        if cold:
            drop_file_cache(path)
        cached = cached_fraction(path)
        t0 = time.perf_counter()
        await rt.load(model, 600)
        secs = time.perf_counter() - t0
        swap_rows.append(
            {
                "model": model,
                "file_gb": round(path.stat().st_size / GB, 3),
                "cache": "cold" if cold else "warm",
                "cached_before": None if cached is None else round(cached, 3),
                "load_s": round(secs, 3),
                "bound_s": round(path.stat().st_size / bw, 3),
                "ratio": round(secs / (path.stat().st_size / bw), 2),
            }
        )
        say(f"load {model} ({'cold' if cold else 'warm'}): {secs:.2f}s")
        return secs

    try:
        await router.ready()
        books_vs_card("start")
        # 1. accounting: cold loads, one after another; each measured after one generation
        for model, path in names.items():
            books = footprint.Books(estimates, measured)
            predicted = books.booked(model)
            booked[model] = predicted
            used_before = nvml.read().used
            await load(model, path, cold=True)
            after_load = probe.read()[1].get(model)
            await generate(router.url, model)
            reading, used = probe.read()
            m = used.get(model)
            if m is None:  # NVML shows no per-process figure here: the device's used delta
                say(f"NVML lists no process for {model} ({reading.processes}); using the delta")
                m = reading.used - used_before
            measured[model] = m
            booked[model] = m
            record_fixture(cfg, nvml, f"{model} resident (after one generation)", models=used)
            acc_rows.append(
                {
                    "model": model,
                    "file_gb": round(path.stat().st_size / GB, 3),
                    "estimate_prior_mib": estimates[model] // MIB,
                    "estimate_learned_mib": predicted // MIB,
                    "nvml_after_load_mib": (after_load or 0) // MIB,
                    "nvml_mib": m // MIB,
                    "error_prior_pct": round(footprint.error_pct(estimates[model], m), 2),
                    "error_learned_pct": round(footprint.error_pct(predicted, m), 2),
                    "over_file_mib": (m - path.stat().st_size) // MIB,
                }
            )
            say(f"footprint: {acc_rows[-1]}")
            books_vs_card(f"loaded {model}")
        # evictions, then warm reloads (the file is in the page cache from the cold load)
        for model in list(names)[-2:]:
            await rt.unload(model, 120)
            booked.pop(model)
            books_vs_card(f"evicted {model}")
        for model in list(names)[-2:]:
            booked[model] = measured[model]
            await load(model, names[model], cold=False)
            await generate(router.url, model)
            books_vs_card(f"reloaded {model} (warm)")
            # a reload measured again: how stable the learned footprint is
            again = probe.read()[1][model]
            acc_rows.append(
                {
                    "model": model + " (reload)",
                    "file_gb": round(names[model].stat().st_size / GB, 3),
                    "estimate_learned_mib": measured[model] // MIB,
                    "nvml_mib": again // MIB,
                    "error_learned_pct": round(footprint.error_pct(measured[model], again), 2),
                }
            )
        for model in names:
            await rt.unload(model, 120)
            booked.pop(model)
        books_vs_card("all evicted")
        # warm loads of the smaller models too (page cache holds all files now)
        for model in list(names)[:-2]:
            await load(model, names[model], cold=False)
            await rt.unload(model, 120)
        # 3b. prefetch: a request for B is queued while A loads (A and B cold). Without
        # prefetch B's load starts cold after A; with it B's file is read during A's load.
        pref_rows = []
        mids = list(names)
        a_model, b_model = mids[-2], mids[-3]
        for with_prefetch in (False, True, False, True):
            for m in (a_model, b_model):
                drop_file_cache(names[m])
            t0 = time.perf_counter()
            thread = prefetch(names[b_model]) if with_prefetch else None
            await rt.load(a_model, 600)
            t_a = time.perf_counter() - t0
            cached = cached_fraction(names[b_model])
            t1 = time.perf_counter()
            await rt.load(b_model, 600)
            t_b = time.perf_counter() - t1
            total = time.perf_counter() - t0
            if thread is not None:
                thread.join(60)
            pref_rows.append(
                {
                    "queued_behind": a_model,
                    "model": b_model,
                    "prefetch": with_prefetch,
                    "a_load_s": round(t_a, 3),
                    "b_cached_at_load": None if cached is None else round(cached, 3),
                    "b_load_s": round(t_b, 3),
                    "b_ready_after_s": round(total, 3),
                    "b_bound_s": round(names[b_model].stat().st_size / bw, 3),
                }
            )
            say(f"prefetch: {pref_rows[-1]}")
            await rt.unload(a_model, 120)
            await rt.unload(b_model, 120)
        write_csv(cfg.out / "gpu_accounting.csv", acc_rows)
        write_csv(cfg.out / "gpu_books.csv", books_rows)
        write_csv(cfg.out / "gpu_swap.csv", swap_rows)
        write_csv(cfg.out / "gpu_prefetch.csv", pref_rows)
        save_state(cfg, measured=measured, estimates=estimates)
        # 2. foreign memory
        await foreign_memory(cfg, nvml, rt, router, probe, names, aliases, measured)
    finally:
        await rt.aclose()
        router.stop()


async def foreign_memory(
    cfg: Config,
    nvml: Any,
    rt: Any,
    router: Router,
    probe: GpuProbe,
    names: dict[str, Path],
    aliases: dict[str, Path],
    measured: dict[str, int],
) -> None:
    """Fill the card with aliases of the biggest model as the planner allows, let a PyTorch
    process take `foreign_bytes`, then ask for another model: the plan must shrink to what
    NVML says is free (evict first), and the load must not fail."""
    from domain import planner
    from domain.state import NodeRecord, Slot

    rows: list[dict[str, Any]] = []
    big = cfg.model_name(max(cfg.sizes))
    per_big = measured[big]
    base = nvml.read()
    capacity = base.free - cfg.headroom
    node = NodeRecord(node_id="gpu0", runtime="llamacpp", url=router.url, capacity_bytes=capacity)

    def refresh() -> tuple[Reading, dict[str, int]]:
        reading, used = probe.read()
        booked = {m: s.bytes for m, s in node.models.items()}
        node.measured_free_bytes = footprint.true_free(reading.free, booked, used)
        node.heartbeat_at = time.time()
        return reading, used

    def row(step: str, decision: str = "", ok: bool | None = None) -> None:
        reading, _ = refresh()
        rows.append(
            {
                "step": step,
                "resident": len(node.models),
                "books_free_gib": round((capacity - node.committed_bytes()) / GIB, 2),
                "nvml_free_gib": round((reading.free - cfg.headroom) / GIB, 2),
                "planner_free_gib": round(node.free_bytes() / GIB, 2),
                "decision": decision,
                "load_ok": ok,
            }
        )
        say(f"foreign: {rows[-1]}")

    target = cfg.model_name(sorted(cfg.sizes)[-2])
    need = measured[target]
    lo, hi = cfg.foreign_bytes * 5 // 8, cfg.foreign_bytes * 5 // 4  # 20-40 GiB by default
    now = time.time()
    for alias in [big, *aliases]:
        refresh()
        # leave room for the foreign process (it must take 20-40 GiB and still leave the
        # target short of memory)
        if node.free_bytes() - per_big < lo + need // 2:
            break
        p = planner.plan(planner.PlanRequest(alias, per_big), [node], now, "lru")
        if not isinstance(p, planner.Placement) or p.evict:
            break
        await rt.load(alias, 600)
        node.models[alias] = Slot(state="ready", bytes=per_big, last_used=time.time())
    row("card filled by the planner")
    take = max(lo, min(hi, node.free_bytes() - need // 2))
    foreign = start_foreign(cfg, nvml, take)
    try:
        await asyncio.sleep(1.0)
        row(f"foreign process took {take / GIB:.1f} GiB")
        # what books alone (no NVML) decide, and what happens when that is executed
        blind = node.model_copy(update={"measured_free_bytes": None})
        naive = planner.plan(planner.PlanRequest(target, need), [blind], time.time(), "lru")
        if isinstance(naive, planner.Placement) and not naive.evict:
            ok = True
            try:
                await rt.load(target, 600)
                await generate(router.url, target)
            except Exception as exc:
                ok = False
                say(f"books-only load of {target} failed (expected: no room): {exc}")
            row(f"COUNTERFACTUAL books only: load {target} without evicting", "evict none", ok)
            with contextlib.suppress(Exception):
                await rt.unload(target, 120)
        naive_evict = naive.evict if isinstance(naive, planner.Placement) else None
        p = planner.plan(planner.PlanRequest(target, need), [node], time.time(), "lru")
        if not isinstance(p, planner.Placement):
            row(f"plan for {target}: {p}", str(p), None)
        else:
            for victim in p.evict:
                await rt.unload(victim, 120)
                node.models.pop(victim)
            ok = True
            try:
                await rt.load(target, 600)
                await generate(router.url, target)
                node.models[target] = Slot(state="ready", bytes=need, last_used=time.time())
            except Exception as exc:
                ok = False
                say(f"load of {target} failed: {exc}")
            row(
                f"load {target} ({need / GIB:.1f} GiB) with NVML-true free",
                f"evict {len(p.evict)} first (books alone would evict "
                f"{'none' if naive_evict == () else naive_evict})",
                ok,
            )
        record_fixture(cfg, nvml, "foreign torch process + our models", foreign_pid=foreign.pid)
    finally:
        foreign.terminate()
        foreign.wait(30)
    await asyncio.sleep(1.0)
    row("foreign process gone")
    for m in list(node.models):
        await rt.unload(m, 120)
    write_csv(cfg.out / "gpu_foreign.csv", rows)


def start_foreign(cfg: Config, nvml: Any, nbytes: int) -> subprocess.Popen[bytes]:
    """A second process that takes GPU memory (PyTorch) and holds it until terminated."""
    if cfg.dry_run:
        code = (
            "import sys,time; b=bytearray(int(sys.argv[1])); "
            "b[::4096]=b'x'*len(b[::4096]); print('ready',flush=True); time.sleep(600)"
        )
    else:
        code = (
            "import sys,time,torch; x=torch.empty(int(sys.argv[1]),dtype=torch.uint8,"
            "device='cuda'); x.fill_(1); torch.cuda.synchronize(); print('ready',flush=True); "
            "time.sleep(600)"
        )
    proc = subprocess.Popen([sys.executable, "-c", code, str(nbytes)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if b"ready" not in line:
        raise RuntimeError("the foreign-memory process did not start")
    if isinstance(nvml, RssStandIn):
        nvml.roots.append(proc.pid)
    return proc


# -- phase: trace (side by side) ---------------------------------------------------------------
@dataclass
class Req:
    i: int
    at: float
    model: str
    prompt_tokens: int
    max_tokens: int


WORDS = "the of and to in is was for on that with as by at from his her it be are an".split()


def prompt_of(tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(tokens))


def build_trace(cfg: Config, models: list[str]) -> list[Req]:
    from bench.workloads import azure_code

    rows = azure_code(cfg.trace)[: cfg.trace_requests]
    span = rows[-1][0] - rows[0][0] or 1.0
    scale = cfg.trace_seconds / span
    rng = random.Random(13)
    names = list(models)
    rng.shuffle(names)
    weights = [1.0 / (r + 1) ** cfg.trace_alpha for r in range(len(names))]
    picks = rng.choices(names, weights, k=len(rows))
    return [
        Req(i, t * scale, m, min(p, 512 if not cfg.dry_run else 32), min(max(g, 1), 32))
        for i, ((t, p, g), m) in enumerate(zip(rows, picks, strict=True))
    ]


def trace_models(cfg: Config) -> dict[str, Path]:
    out = {}
    for size in cfg.trace_sizes:
        for a in range(cfg.trace_aliases):
            out[f"{cfg.model_name(size)}-t{a}"] = cfg.model_path(size)
    return out


async def run_router_alone(cfg: Config, trace: list[Req], models: dict[str, Path]) -> list[dict]:
    preset = write_preset(cfg.work / "trace-router.ini", models, cfg.ctx, cfg.dry_run)
    router = Router(cfg, preset, cfg.router_k, True, "router-alone.log")
    await router.ready()
    obs = Observer(router.url)
    stop = asyncio.Event()
    watcher = asyncio.create_task(obs.run(stop))
    rows: list[dict[str, Any]] = []
    t0 = time.time()

    async def one(r: Req) -> None:
        await asyncio.sleep(max(0.0, t0 + r.at - time.time()))
        arrival = time.time()
        body = {
            "model": r.model,
            "stream": True,
            "max_tokens": r.max_tokens,
            "messages": [{"role": "user", "content": prompt_of(r.prompt_tokens, r.i)}],
        }
        first = None
        error = ""
        try:
            async with httpx.AsyncClient(timeout=600) as c:
                async with c.stream("POST", router.url + "/v1/chat/completions", json=body) as s:
                    if s.status_code >= 400:
                        error = f"HTTP {s.status_code}: {(await s.aread())[:200]!r}"
                    async for line in s.aiter_lines():
                        if first is None and line.startswith("data:") and '"content"' in line:
                            first = time.time()
        except httpx.HTTPError as exc:
            error = repr(exc)
        end = time.time()
        rows.append(
            {
                "side": "router",
                "i": r.i,
                "model": r.model,
                "arrival": arrival - t0,
                "ttft_s": (first - arrival) if first else None,
                "total_s": end - arrival,
                "ok": first is not None and not error,
                "error": error,
                "_arrival_abs": arrival,
            }
        )

    try:
        await asyncio.gather(*(one(r) for r in trace))
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await watcher
        router.stop()
    return finish_side(rows, obs, models)


def finish_side(rows: list[dict], obs: Observer, models: dict[str, Path]) -> list[dict]:
    for row in rows:
        ready = obs.ready_after(row["model"], row["_arrival_abs"])
        row["wait_s"] = None if ready is None else max(0.0, ready - row["_arrival_abs"])
        del row["_arrival_abs"]
    loads = [ev for ev in obs.loads if ev.end is not None and ev.ok]
    summary = {
        "loads": len(loads),
        "failed_loads": sum(1 for ev in obs.loads if not ev.ok),
        "load_s": round(sum(ev.end - ev.start for ev in loads if ev.end), 2),
        "gb_loaded": round(sum(models[ev.model].stat().st_size for ev in loads) / GB, 2),
    }
    return [*rows, {"summary": summary}]


async def run_our_stack(
    cfg: Config, trace: list[Req], models: dict[str, Path], nvml: Any, budget: int
) -> list[dict]:
    from autoscaler.client import ChatSession
    from events.types import ChatRequested
    from functions.services import Settings
    from stack.local import LocalStack, Proc, StackConfig
    from stores.catalog import ModelInfo

    measured = load_state(cfg).get("measured", {})
    preset = write_preset(cfg.work / "trace-stack.ini", models, cfg.ctx, cfg.dry_run)
    router = Router(cfg, preset, 0, False, "router-stack.log")
    stack = LocalStack(
        StackConfig(
            state_dir=cfg.work / "stack-state",
            nodes=0,
            node_memory=budget,
            chat_model=None,
            models=(),
            nats_port=0,
            function_port=0,
            transport="inprocess",
            fresh=True,
            settings=Settings().but(keep_alive_s=3600.0, load_timeout_s=600.0),
            gpu_reader=nvml,
        )
    )
    obs = Observer(router.url)
    stop = asyncio.Event()
    rows: list[dict[str, Any]] = []
    try:
        await router.ready()
        if isinstance(nvml, RssStandIn):
            nvml.roots = [router.proc.pid]
        await stack.start_nats()
        # the router is the stack's node "gpu0": its agent reads NVML for it
        stack.procs.append(
            Proc("llama-server-gpu0", router.proc, router.log_path, router.url, [str(cfg.binary)])
        )
        stack.runtime_urls["gpu0"] = router.url
        await stack.start_control_plane(None)
        svc = stack.svc
        assert svc is not None
        for name, path in models.items():
            base = name.rsplit("-t", 1)[0]
            nbytes = measured.get(base) or footprint.estimate_bytes(geometry(cfg, base, path))
            await svc.catalog.put(
                ModelInfo(
                    name=name,
                    bytes=int(nbytes),
                    file_bytes=path.stat().st_size,
                    family="llama (noise: random weights)",
                    quant="F16",
                    context=cfg.ctx,
                )
            )
        await stack.agents["gpu0"].register()
        watcher = asyncio.create_task(obs.run(stop))
        t0 = time.time()

        async def one(r: Req) -> None:
            await asyncio.sleep(max(0.0, t0 + r.at - time.time()))
            arrival = time.time()
            req = ChatRequested(
                chat_id=uuid.uuid4().hex[:12],
                model=r.model,
                messages=[{"role": "user", "content": prompt_of(r.prompt_tokens, r.i)}],
                options={"max_tokens": r.max_tokens},
            )
            first: list[float] = []
            session = ChatSession(
                svc.nc, req, lambda tok: first.append(time.time()) if not first else None
            )
            await session.start()
            result = await session.wait(900)
            end = time.time()
            ok = result.end is not None and result.end.type == "chat.completed"
            stats = (result.end.data or {}).get("stats", {}) if result.end else {}
            rows.append(
                {
                    "side": "stack",
                    "i": r.i,
                    "model": r.model,
                    "arrival": arrival - t0,
                    "ttft_s": (first[0] - arrival) if first else None,
                    "total_s": end - arrival,
                    "ok": ok,
                    "error": "" if ok else str(result.end.data if result.end else "timeout")[:200],
                    "queue_ms": stats.get("queue_ms"),
                    "load_ms": stats.get("load_ms"),
                    "_arrival_abs": arrival,
                }
            )

        await asyncio.gather(*(one(r) for r in trace))
        await asyncio.sleep(0.5)
        stop.set()
        await watcher
        record_fixture(cfg, nvml, "end of the side-by-side (our stack)")
    finally:
        stop.set()
        await stack.stop()
        router.stop()
    return finish_side(rows, obs, models)


async def phase_trace(cfg: Config, nvml: Any) -> None:
    models = trace_models(cfg)
    trace = build_trace(cfg, list(models))
    st = load_state(cfg)
    measured = st.get("measured", {})
    largest = cfg.model_name(max(cfg.trace_sizes))
    per = measured.get(largest) or footprint.estimate_bytes(
        geometry(cfg, largest, cfg.model_path(max(cfg.trace_sizes)))
    )
    budget = cfg.trace_budget or cfg.router_k * per
    say(
        f"trace: {len(trace)} requests over {cfg.trace_seconds:.0f}s, {len(models)} models "
        f"(Zipf {cfg.trace_alpha}), budget {budget / GIB:.1f} GiB, router K={cfg.router_k}"
    )
    results = {}
    for side, fn in (
        ("router", lambda: run_router_alone(cfg, trace, models)),
        ("stack", lambda: run_our_stack(cfg, trace, models, nvml, budget)),
    ):
        for p in set(models.values()):
            drop_file_cache(p)
        t0 = time.perf_counter()
        rows = await fn()
        say(f"{side}: done in {time.perf_counter() - t0:.0f}s; {rows[-1]}")
        results[side] = rows
    rows = [r for side in results.values() for r in side if "summary" not in r]
    write_csv(cfg.out / "gpu_trace_requests.csv", rows)
    summary = []
    for side, side_rows in results.items():
        s = side_rows[-1]["summary"]
        reqs = [r for r in side_rows if "summary" not in r]
        waits = [r["wait_s"] for r in reqs if r["wait_s"] is not None]
        ttfts = [r["ttft_s"] for r in reqs if r["ttft_s"] is not None]
        summary.append(
            {
                "side": side,
                "requests": len(reqs),
                "ok": sum(1 for r in reqs if r["ok"]),
                **s,
                "wait_p50_s": q(waits, 0.5),
                "wait_p95_s": q(waits, 0.95),
                "wait_p99_s": q(waits, 0.99),
                "ttft_p50_s": q(ttfts, 0.5),
                "ttft_p95_s": q(ttfts, 0.95),
                "ttft_p99_s": q(ttfts, 0.99),
                "budget_gib": round(budget / GIB, 1),
                "router_k": cfg.router_k if side == "router" else 0,
            }
        )
    write_csv(cfg.out / "gpu_trace.csv", summary)
    for s in summary:
        say(f"summary: {s}")


def q(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, math.ceil(p * len(v)) - 1)], 3)


# -- phase: report -----------------------------------------------------------------------------
def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def phase_report(out: Path, bandwidth: dict[str, float]) -> Path:
    """One figure from the phases' CSVs: footprints, swap times, the side-by-side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [r for r in read_csv(out / "gpu_accounting.csv") if "reload" not in r["model"]]
    swap = read_csv(out / "gpu_swap.csv")
    reqs = read_csv(out / "gpu_trace_requests.csv")
    summary = {r["side"]: r for r in read_csv(out / "gpu_trace.csv")}
    fig, ax = plt.subplots(2, 2, figsize=(12, 9))
    fig.suptitle("bench-gpu on one NVIDIA H200 — noise models (llama layout, random weights)")

    a = ax[0][0]
    xs = range(len(acc))
    a.bar(
        [x - 0.2 for x in xs],
        [int(r["estimate_prior_mib"]) / 1024 for r in acc],
        0.4,
        label="estimate (before any load)",
    )
    a.bar(
        [x + 0.2 for x in xs],
        [int(r["nvml_mib"]) / 1024 for r in acc],
        0.4,
        label="NVML, the model's process",
    )
    for x, r in zip(xs, acc, strict=True):
        a.annotate(
            f"{float(r['error_prior_pct']):+.1f}%",
            (x, int(r["nvml_mib"]) / 1024),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    a.set_xticks(list(xs), [r["model"] for r in acc])
    a.set_ylabel("GiB on the card")
    a.set_title("1. footprint: estimate vs NVML (ctx 4096)")
    a.legend()

    a = ax[0][1]
    for cache, marker in (("cold", "o"), ("warm", "s")):
        pts = sorted((float(r["file_gb"]), float(r["load_s"])) for r in swap if r["cache"] == cache)
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"load, {cache}")
    sizes = sorted({float(r["file_gb"]) for r in swap})
    for key, style, what in (
        ("pinned_gbps", ":", "pinned host->GPU"),
        ("pageable_gbps", "--", "pageable host->GPU"),
        ("disk_cold_gbps", "-.", "disk read"),
    ):
        if key in bandwidth:
            a.plot(
                sizes,
                [g / bandwidth[key] for g in sizes],
                style,
                label=f"bytes / {what} ({bandwidth[key]:.1f} GB/s)",
            )
    a.set_xlabel("file GB")
    a.set_ylabel("seconds until the model answers")
    a.set_title("3. swap time vs bytes / bandwidth")
    a.legend(fontsize=8)

    a = ax[1][0]
    for side, label in (("router", "llama-server router alone"), ("stack", "our stack + router")):
        waits = sorted(float(r["wait_s"]) for r in reqs if r["side"] == side and r["wait_s"])
        if waits:
            a.plot(waits, [(i + 1) / len(waits) for i in range(len(waits))], label=label)
    a.set_xlabel("wait for the model (s)")
    a.set_ylabel("fraction of requests")
    a.set_title("4. wait, same trace (Azure code slice, Zipf over 12 models)")
    a.legend()

    a = ax[1][1]
    metrics = [("loads", "loads"), ("gb_loaded", "GB loaded"), ("load_s", "load-seconds")]
    for i, side in enumerate(("router", "stack")):
        if side in summary:
            vals = [float(summary[side][k]) for k, _ in metrics]
            a.bar(
                [j + (i - 0.5) * 0.4 for j in range(len(metrics))],
                vals,
                0.4,
                label="router alone (--models-max K)" if side == "router" else "our stack",
            )
    a.set_xticks(range(len(metrics)), [m for _, m in metrics])
    a.set_title("4. loading work, same trace")
    a.legend()
    fig.tight_layout()
    path = out / "gpu_bench.png"
    fig.savefig(path, dpi=110)
    return path


# -- main --------------------------------------------------------------------------------------
def make_config(args: argparse.Namespace) -> Config:
    work = Path(args.work).resolve()
    out = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    cfg = Config(
        work=work,
        out=out,
        binary=Path(args.binary) if args.binary else Path(),
        vocab=Path(args.vocab or "."),
        trace=Path(args.trace),
        dry_run=args.dry_run,
    )
    if args.dry_run:
        cfg.sizes = (30, 60, 120, 240)
        cfg.trace_sizes = (30, 60, 120)
        cfg.unit = 10**6
        cfg.ctx = 512
        cfg.foreign_bytes = 300 * MIB
        cfg.headroom = 64 * MIB
        cfg.trace_requests = 24
        cfg.trace_seconds = 20.0
        cfg.trace_aliases = 2
        cfg.router_k = 3
    if args.trace_seconds:
        cfg.trace_seconds = args.trace_seconds
    if args.trace_requests:
        cfg.trace_requests = args.trace_requests
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--phase", required=True, choices=["setup", "accounting", "trace", "report"])
    ap.add_argument("--work", default=str(Path.home() / ".cache/ollama-autoscaler/bench-gpu"))
    ap.add_argument("--out", default=str(DOCS))
    ap.add_argument("--binary", help="llama-server (default: the CUDA build from prepare --cuda)")
    ap.add_argument("--vocab", help="models/ggml-vocab-llama-spm.gguf (default: the sources')")
    ap.add_argument(
        "--trace",
        default=str(Path(__file__).resolve().parents[2] / "shared/traces/azure_llm_2023_code.csv"),
        help="azure_llm_2023_code.csv (or a slice of it)",
    )
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models, RSS stand-in")
    ap.add_argument("--trace-seconds", type=float)
    ap.add_argument("--trace-requests", type=int)
    args = ap.parse_args(argv)
    if args.phase == "report":
        bw = load_state(make_config(args)).get("bandwidth") or json.loads(
            (Path(args.out) / "gpu_bandwidth.json").read_text()
        )
        say(f"plot: {phase_report(Path(args.out), bw)}")
        return 0
    if args.vocab is None:
        from stack.assets import CACHE_DIR, LLAMA_CPP_PYTHON_VERSION

        src = CACHE_DIR / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}" / "src"
        args.vocab = str(src / "models" / "ggml-vocab-llama-spm.gguf")
    cfg = make_config(args)
    if args.dry_run:
        nvml: Any = RssStandIn(2 * GIB)
    else:
        nvml = Nvml()
    if cfg.binary == Path() and args.phase != "setup":
        from stack.assets import cuda_arch, cuda_profile, llama_server_path

        cfg.binary = llama_server_path(cuda_profile(cuda_arch() or "90"))
    t0 = time.perf_counter()
    if args.phase == "setup":
        phase_setup(cfg, nvml)
    elif args.phase == "accounting":
        asyncio.run(phase_accounting(cfg, nvml))
    else:
        asyncio.run(phase_trace(cfg, nvml))
    say(f"phase {args.phase} took {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
