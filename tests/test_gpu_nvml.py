"""The NVML path of the node agent, replaying readings RECORDED on an H200 (CI has no GPU):
the reader, which process serves which model, and what the agent books from them. The
processes whose pids the readings name are real processes started here; the fleet is a real
nats-server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from agent.gpu import GpuProbe, NoGpu, Nvml, model_pids
from agent.node import NodeAgent
from domain import footprint
from domain.state import NodeRecord, Slot
from functions.services import Settings, open_services
from runtimes.llamacpp import LlamaCppRuntime
from stores.catalog import ModelInfo

from .gpu_recorded import ReplayNvml, reading

MIB = 1 << 20


def test_a_reading_is_the_devices_memory_and_each_processs_share():
    entry = reading("noise-16gb resident")
    r = Nvml(nvml=ReplayNvml(entry)).read()
    assert (r.total, r.free, r.used) == (entry["total"], entry["free"], entry["used"])
    assert r.processes == {int(p): b for p, b in entry["processes"].items()}
    assert len(r.processes) == 5 and sum(r.processes.values()) < r.used


def test_processes_without_a_figure_are_left_out_not_counted_as_zero():
    entry = reading("noise-2gb resident")
    hidden = int(next(iter(entry["processes"])))
    r = Nvml(nvml=ReplayNvml(entry, hidden=frozenset({hidden}))).read()
    assert hidden not in r.processes and len(r.processes) == len(entry["processes"]) - 1


def test_no_gpu_is_a_clear_error():
    class Broken(ReplayNvml):
        def nvmlInit(self) -> None:
            raise RuntimeError("NVMLError_LibraryNotFound")

    with pytest.raises(NoGpu, match="no NVIDIA GPU 0 through NVML: NVMLError_LibraryNotFound"):
        Nvml(nvml=Broken(reading("idle")))


@pytest.fixture
def model_processes() -> Iterator[dict[str, int]]:
    """Two child processes of this one, started the way llama-server's router starts a
    model's process (with --alias <model>), plus one without an alias."""
    procs = {
        m: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--alias", m])
        for m in ("noise-8gb", "noise-16gb")
    }
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield {m: p.pid for m, p in procs.items()}
    for p in [*procs.values(), other]:
        p.kill()
        p.wait()


def test_the_router_children_are_mapped_to_models_by_their_alias(model_processes):
    assert model_pids(os.getpid()) == model_processes


def replay_with(entry: dict, model_processes: dict[str, int]) -> ReplayNvml:
    """The recorded reading, its model processes renamed to the live processes here."""
    pids = {
        int(pid): model_processes[m]
        for m, used in entry["models"].items()
        for pid, b in entry["processes"].items()
        if b == used and m in model_processes
    }
    return ReplayNvml(entry, pids=pids)


def test_a_models_usage_is_its_processs_figure_plus_the_drivers_share(model_processes):
    entry = reading("noise-16gb resident")
    probe = GpuProbe(Nvml(nvml=replay_with(entry, model_processes)), os.getpid)
    _, used = probe.read()
    extra = footprint.UNATTRIBUTED_PER_PROCESS_BYTES
    assert used == {m: entry["models"][m] + extra for m in model_processes}


async def test_the_agent_books_measured_footprints_and_nvml_true_free(
    fresh_nats_url, model_processes
):
    """A node whose 16 GB model is ready (booked at the estimate) and whose 8 GB model is
    still loading: after one heartbeat on the recorded reading, the ready model is booked at
    what NVML measured (and the catalog learns it), while the loading one keeps its booking
    and the free memory excludes what it has yet to take."""
    svc = await open_services(Settings(nats_url=fresh_nats_url), provision=True, reconfigure=True)
    try:
        entry = reading("noise-16gb resident")
        estimate_16, estimate_8 = 17_226_649_600, 8_989_622_272  # a-priori estimates
        await svc.catalog.put(ModelInfo(name="noise-16gb", bytes=estimate_16, context=4096))
        await svc.catalog.put(ModelInfo(name="noise-8gb", bytes=estimate_8, context=4096))
        record = NodeRecord(
            node_id="gpu0",
            runtime="llamacpp",
            url="http://127.0.0.1:9",
            capacity_bytes=entry["total"],
            models={
                "noise-16gb": Slot(state="ready", bytes=estimate_16),
                "noise-8gb": Slot(state="loading", bytes=estimate_8),
            },
        )
        await svc.fleet.upsert(record, lambda r: r)
        gpu = GpuProbe(Nvml(nvml=replay_with(entry, model_processes)), os.getpid)
        agent = NodeAgent(
            svc.fleet,
            "gpu0",
            LlamaCppRuntime("http://127.0.0.1:9"),  # never called by a heartbeat
            entry["total"],
            gpu=gpu,
            catalog=svc.catalog,
        )
        after = await agent.beat()
        extra = footprint.UNATTRIBUTED_PER_PROCESS_BYTES
        measured_16 = entry["models"]["noise-16gb"] + extra
        measured_8 = entry["models"]["noise-8gb"] + extra
        assert after.models["noise-16gb"].bytes == measured_16
        assert after.models["noise-8gb"].bytes == estimate_8  # loading: not corrected yet
        assert after.measured_free_bytes == entry["free"] - max(0, estimate_8 - measured_8)
        assert (await svc.catalog.fresh("noise-16gb")).bytes == measured_16
        assert (await svc.catalog.fresh("noise-8gb")).bytes == estimate_8
    finally:
        await svc.close()
