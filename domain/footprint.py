"""What a loaded model costs on a GPU, estimated before the load and corrected by measurement.

Before a model was ever loaded, its footprint is estimated from its GGUF geometry: the weights,
the KV cache for its context, llama.cpp's compute buffers, and a per-process runtime overhead
(the CUDA context, cuBLAS workspace and memory pools of one llama-server process). The
overhead is the term no formula gets right, so it is learned: after a load the node agent reads
the process's memory from NVML; that reading becomes the model's booked bytes, and the residual
(measured - estimate) of the models measured so far corrects the overhead of the models not
measured yet. Nothing here does I/O.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

MIB = 1 << 20
# A prior for the per-process overhead before anything was measured: the trial run on an H200
# (issue 13) saw 1.1-1.7 GiB above the file size, of which the KV cache and compute buffers
# are a part; 512 MiB for the CUDA context and pools is the conservative rest.
PRIOR_OVERHEAD_BYTES = 512 * MIB
# What the driver holds for each process beyond the process's own NVML figure: on the H200 the
# device's used memory grew 4.6 MiB per llama-server process more than the processes' sum
# (readings recorded in tests/fixtures/nvml_h200_recorded.json). Booked with each model so
# that the books never show more free memory than the card.
UNATTRIBUTED_PER_PROCESS_BYTES = 8 * MIB
# Readings within this fraction of what is booked leave the books alone (no churn on noise).
TOLERANCE = 0.005


@dataclass(frozen=True, slots=True)
class Geometry:
    """What the footprint depends on: the GGUF's tensor bytes and shape, and the context."""

    weight_bytes: int
    n_layer: int
    n_embd: int
    n_embd_kv: int
    n_vocab: int
    n_ctx: int
    n_ubatch: int = 512
    kv_bytes_per_value: int = 2  # F16 cache


def kv_cache_bytes(g: Geometry) -> int:
    return 2 * g.n_layer * g.n_ctx * g.n_embd_kv * g.kv_bytes_per_value


def compute_buffer_bytes(g: Geometry) -> int:
    """llama.cpp's compute buffer, roughly: F32 logits for one micro-batch plus the widest
    activations of one micro-batch (a few rows of the model width)."""
    return 4 * g.n_ubatch * (g.n_vocab + 8 * g.n_embd)


def estimate_bytes(g: Geometry, overhead_bytes: int = PRIOR_OVERHEAD_BYTES) -> int:
    """The a-priori footprint: weights + KV cache + compute buffers + runtime overhead."""
    return g.weight_bytes + kv_cache_bytes(g) + compute_buffer_bytes(g) + overhead_bytes


def learned_overhead(residuals: Iterable[int], prior: int = PRIOR_OVERHEAD_BYTES) -> int:
    """The overhead to use for unmeasured models: the prior corrected by the median residual
    (measured - estimate) of the models measured so far. The median: one odd reading (a
    process still growing its pools) does not move it."""
    values = list(residuals)
    if not values:
        return prior
    return max(0, prior + int(statistics.median(values)))


@dataclass(frozen=True, slots=True)
class Books:
    """What the planner books for each model: the measurement where there is one, else the
    estimate with the learned overhead."""

    estimates: Mapping[str, int]  # a-priori estimates, with the prior overhead
    measured: Mapping[str, int]
    prior: int = PRIOR_OVERHEAD_BYTES

    def overhead(self) -> int:
        return learned_overhead(
            (self.measured[m] - self.estimates[m] for m in self.measured if m in self.estimates),
            self.prior,
        )

    def booked(self, model: str) -> int:
        if model in self.measured:
            return self.measured[model]
        return self.estimates[model] - self.prior + self.overhead()


def corrected(booked: int, measured: int | None, tolerance: float = TOLERANCE) -> int:
    """The bytes to book for a resident model given a new reading of its process: the reading,
    unless it is within `tolerance` of what is booked already (or there is none)."""
    if measured is None or measured <= 0:
        return booked
    if booked > 0 and abs(measured - booked) <= tolerance * booked:
        return booked
    return measured


def pending_bytes(booked: Mapping[str, int], used: Mapping[str, int]) -> int:
    """Memory booked for resident or loading models that their processes have not taken yet.

    NVML's free memory does not yet show a model that is still loading; without this a second
    process's memory could hide in that gap and the card be over-committed."""
    return sum(max(0, b - used.get(m, 0)) for m, b in booked.items())


def true_free(nvml_free: int, booked: Mapping[str, int], used: Mapping[str, int]) -> int:
    """Free memory the planner may commit: NVML's free minus what is booked but not taken."""
    return max(0, nvml_free - pending_bytes(booked, used))


def error_pct(estimate: int, measured: int) -> float:
    return 100.0 * (estimate - measured) / measured if measured else float("nan")
