"""The GPU as NVML sees it: total, free, used, and the memory of each process on the card.

`GpuProbe` is what a node agent on a GPU uses: free memory minus what is booked but not yet
taken (see `domain.footprint.true_free`), and each resident model's memory read from its own
llama-server process (the router starts one child per model, with `--alias <model>`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

from domain import footprint


class NoGpu(RuntimeError):
    pass


@dataclass
class Reading:
    """One NVML reading of one device."""

    at: float
    total: int
    free: int
    used: int
    processes: dict[int, int] = field(default_factory=dict)  # pid -> bytes used on the card

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["processes"] = {str(k): v for k, v in self.processes.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Reading:
        return cls(
            at=float(d["at"]),
            total=int(d["total"]),
            free=int(d["free"]),
            used=int(d["used"]),
            processes={int(k): int(v) for k, v in d.get("processes", {}).items()},
        )


class Nvml:
    """A thin reader over pynvml (nvidia-ml-py). `nvml` can be any object with pynvml's
    functions (tests pass one that replays readings recorded on a real card)."""

    def __init__(self, index: int = 0, nvml: Any = None) -> None:
        if nvml is None:
            import pynvml as nvml
        self.nvml = nvml
        try:
            nvml.nvmlInit()
            self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:  # pynvml raises NVMLError subclasses, or the library is absent
            raise NoGpu(f"no NVIDIA GPU {index} through NVML: {exc}") from exc
        self.index = index

    def name(self) -> str:
        n = self.nvml.nvmlDeviceGetName(self.handle)
        return n.decode() if isinstance(n, bytes) else str(n)

    def read(self) -> Reading:
        mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
        procs: dict[int, int] = {}
        for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
            used = getattr(p, "usedGpuMemory", None)
            if used is not None:  # None: not available (some containers hide it)
                procs[int(p.pid)] = procs.get(int(p.pid), 0) + int(used)
        return Reading(time.time(), int(mem.total), int(mem.free), int(mem.used), procs)


def model_pids(router_pid: int) -> dict[str, int]:
    """model -> pid of the llama-server child serving it (the router's children carry
    `--alias <model>`)."""
    out: dict[str, int] = {}
    try:
        children = psutil.Process(router_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for child in children:
        try:
            argv = child.cmdline()
        except psutil.Error:
            continue
        if "--alias" in argv[:-1]:
            out[argv[argv.index("--alias") + 1]] = child.pid
    return out


def model_usage(reading: Reading, pids: dict[str, int]) -> dict[str, int]:
    """model -> bytes its process costs the card (models whose process NVML lists): the
    process's own figure plus what the driver keeps per process outside it."""
    extra = footprint.UNATTRIBUTED_PER_PROCESS_BYTES
    return {
        m: reading.processes[pid] + extra for m, pid in pids.items() if pid in reading.processes
    }


class GpuProbe:
    """NVML memory for a node agent whose runtime is a llama-server router on this GPU."""

    def __init__(self, nvml: Nvml, router_pid: Callable[[], int] | None = None) -> None:
        self.nvml, self.router_pid = nvml, router_pid
        self.last: Reading | None = None

    def read(self) -> tuple[Reading, dict[str, int]]:
        """A reading and each resident model's bytes on the card."""
        reading = self.nvml.read()
        self.last = reading
        pids = model_pids(self.router_pid()) if self.router_pid else {}
        return reading, model_usage(reading, pids)
