"""NVML readings RECORDED on a real NVIDIA H200 by `make bench-gpu` (tests/fixtures/
nvml_h200_recorded.json), and a replaying stand-in for pynvml built from them. CI has no GPU:
these readings are what the GPU code paths are tested against."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIXTURE = Path(__file__).parent / "fixtures" / "nvml_h200_recorded.json"


def readings() -> list[dict[str, Any]]:
    data = json.loads(FIXTURE.read_text())
    assert "RECORDED" in data["recorded"]
    return list(data["readings"])


def reading(label_start: str) -> dict[str, Any]:
    return next(r for r in readings() if r["label"].startswith(label_start))


@dataclass
class _Mem:
    total: int
    free: int
    used: int


@dataclass
class _Proc:
    pid: int
    usedGpuMemory: int | None


class ReplayNvml:
    """Answers pynvml's calls with one recorded reading (REPLAY of real readings, not a GPU).
    `pids` renames recorded pids (to processes that exist here); `hidden` pids report None,
    as NVML does where per-process figures are not available."""

    def __init__(
        self,
        entry: dict[str, Any],
        pids: dict[int, int] | None = None,
        hidden: frozenset[int] = frozenset(),
    ) -> None:
        self.entry, self.pids, self.hidden = entry, pids or {}, hidden
        self.initialised = False

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        if index != 0:
            raise RuntimeError(f"NVMLError_InvalidArgument: no GPU {index}")
        return "gpu0"

    def nvmlDeviceGetName(self, handle: str) -> bytes:
        return b"NVIDIA H200"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> _Mem:
        e = self.entry
        return _Mem(e["total"], e["free"], e["used"])

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[_Proc]:
        out = []
        for pid_s, used in self.entry["processes"].items():
            pid = self.pids.get(int(pid_s), int(pid_s))
            out.append(_Proc(pid, None if pid in self.hidden else used))
        return out
