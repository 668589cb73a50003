"""bench-gpu's measuring parts, the CUDA build profile and prefetch — the pieces that run the
same with or without a GPU."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from bench import gpu
from runtimes import prefetch
from runtimes.llamacpp import LlamaCppRuntime
from stack import assets

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "azure_llm_2023_code.csv"


def test_the_observer_counts_loads_and_when_each_request_had_its_model():
    obs = gpu.Observer("http://unused")
    obs.update({"a": {"value": "unloaded"}}, 0.0)
    obs.update({"a": {"value": "loading"}}, 1.0)
    obs.update({"a": {"value": "loaded"}}, 3.5)
    obs.update({"a": {"value": "unloaded"}}, 10.0)
    obs.update({"a": {"value": "loading"}}, 12.0)
    obs.update({"a": {"value": "unloaded", "failed": True}}, 13.0)
    assert [(e.start, e.end, e.ok) for e in obs.loads] == [(1.0, 3.5, True), (12.0, 13.0, False)]
    assert obs.ready_after("a", 0.5) == 3.5  # arrived before the load: waited for it
    assert obs.ready_after("a", 5.0) == 5.0  # resident on arrival: no wait
    assert obs.ready_after("a", 11.0) is None  # never resident again


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (gpu.q(values, 0.5), gpu.q(values, 0.95), gpu.q(values, 0.99)) == (50, 95, 99)
    assert gpu.q([], 0.5) is None


@pytest.mark.skipif(not TRACE.is_file(), reason="needs ../shared/traces")
def test_the_trace_is_the_azure_slice_stretched_with_zipf_popularity(tmp_path):
    cfg = gpu.Config(tmp_path, tmp_path, Path(), Path(), TRACE, trace_requests=160)
    cfg.trace_seconds = 120.0
    models = [f"m{i}" for i in range(12)]
    trace = gpu.build_trace(cfg, models)
    assert len(trace) == 160 and trace[0].at == 0.0
    assert trace[-1].at == pytest.approx(120.0)
    counts = sorted((sum(r.model == m for r in trace) for m in models), reverse=True)
    assert counts[0] > 4 * counts[-1]  # Zipf(1): the head is many times the tail
    assert trace == gpu.build_trace(cfg, models)  # the same trace for both sides
    assert all(1 <= r.max_tokens <= 32 and r.prompt_tokens <= 512 for r in trace)


def test_the_cuda_build_is_its_own_cache_entry_with_flash_attention():
    cuda = assets.cuda_profile("90")
    assert "-DGGML_CUDA=ON" in cuda.flags and "-DCMAKE_CUDA_ARCHITECTURES=90" in cuda.flags
    assert "-DGGML_CUDA_FA=ON" in cuda.flags
    assert cuda.key != assets.X86_PROFILES[0].key != assets.cuda_profile("89").key
    assert assets.llama_server_path(cuda).parent.parent.name.startswith("build-cuda-sm90-")
    with pytest.raises(ValueError, match="expected digits"):
        assets.cuda_profile("sm_90; rm -rf /")


def test_a_cuda_build_without_a_gpu_or_an_architecture_says_what_to_do(monkeypatch):
    monkeypatch.setattr(assets, "cuda_arch", lambda: None)
    with pytest.raises(RuntimeError, match="--cuda-arch 90"):
        assets.ensure_llama_server_cuda()


def _cached_or_skip(path: Path) -> None:
    gpu.drop_file_cache(path)
    frac = gpu.cached_fraction(path)
    if frac is None or frac > 0.5:
        pytest.skip("this filesystem keeps the file cached (tmpfs?): cannot make it cold")


def test_prefetch_warms_a_cold_file_into_the_page_cache(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"\x01" * (24 << 20))
    _cached_or_skip(path)
    thread = prefetch.prefetch(path)
    assert thread is not None
    thread.join(30)
    assert gpu.cached_fraction(path) == 1.0
    assert prefetch.prefetch(tmp_path / "missing.gguf") is None


async def test_the_llamacpp_adapter_prefetches_the_file_its_router_would_load(tmp_path):
    path = tmp_path / "noise-8gb.gguf"
    path.write_bytes(b"\x02" * (8 << 20))
    _cached_or_skip(path)
    models = {
        "data": [
            {
                "id": "noise-8gb",
                "status": {
                    "value": "unloaded",
                    "args": ["llama-server", "--alias", "noise-8gb", "--model", str(path)],
                },
            },
            {"id": "remote", "status": {"value": "unloaded", "args": ["llama-server"]}},
        ]
    }
    transport = httpx.MockTransport(lambda req: httpx.Response(200, json=models))
    rt = LlamaCppRuntime(
        "http://router", client=httpx.AsyncClient(base_url="http://router", transport=transport)
    )
    assert await rt.model_path("noise-8gb") == path
    assert await rt.model_path("remote") is None
    assert await rt.prefetch("noise-8gb") is True
    assert await rt.prefetch("remote") is False
    assert await rt.prefetch("unknown") is False
    for t in list(prefetch._running.values()):
        t.join(30)
    assert gpu.cached_fraction(path) == 1.0


async def test_a_parked_request_warms_its_models_file_on_nodes_that_could_load_it(
    fresh_nats_url, tmp_path
):
    from domain.state import NodeRecord, Registration, Slot
    from functions.chat import warm_for_parked
    from functions.services import Settings, open_services

    path = tmp_path / "noise-4gb.gguf"
    path.write_bytes(b"\x03" * (8 << 20))
    _cached_or_skip(path)
    listing = {
        "data": [
            {"id": "m", "status": {"value": "unloaded", "args": ["--model", str(path)]}},
        ]
    }
    svc = await open_services(Settings(nats_url=fresh_nats_url), provision=True, reconfigure=True)
    try:
        asked: list[str] = []

        def answer(req: httpx.Request) -> httpx.Response:
            asked.append(str(req.url.host))
            return httpx.Response(200, json=listing)

        for host in ("a", "b", "c"):
            url = f"http://{host}"
            svc.runtimes[("llamacpp", url)] = LlamaCppRuntime(
                url, client=httpx.AsyncClient(base_url=url, transport=httpx.MockTransport(answer))
            )
        nodes = [
            NodeRecord(
                node_id="a", runtime="llamacpp", url="http://a", capacity_bytes=1, available=["m"]
            ),
            NodeRecord(
                node_id="b",
                runtime="llamacpp",
                url="http://b",
                capacity_bytes=1,
                available=["m"],
                models={"m": Slot(state="ready", bytes=1)},
            ),
            NodeRecord(
                node_id="c",
                runtime="llamacpp",
                url="http://c",
                capacity_bytes=1,
                available=["other"],
            ),
        ]
        for n in nodes:
            await svc.fleet.upsert(n, lambda r: r)
            await svc.fleet.register(Registration(node_id=n.node_id, runtime=n.runtime, url=n.url))
        assert await warm_for_parked(svc, "m") == 1
        assert asked == ["a"]  # b holds it, c cannot load it
        for t in list(prefetch._running.values()):
            t.join(30)
        assert gpu.cached_fraction(path) == 1.0
        svc.settings = svc.settings.but(prefetch=False)
        assert await warm_for_parked(svc, "m") == 0
    finally:
        await svc.close()
