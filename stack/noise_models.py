"""GGUFs of realistic sizes with RANDOM weights ("noise models"), for benchmarks on a GPU.

Their answers are noise, but their memory, load time and KV cache are real: each file has the
tensor layout of a llama-architecture model (token embedding, per block attention q/k/v/o and
a gated feed-forward in F16, F32 norms, an output head) and a real tokenizer, whose metadata is
copied from a vocab-only GGUF (`models/ggml-vocab-llama-spm.gguf` in the llama.cpp sources).
Every file is named `noise-…` and its `general.name` says "random weights", so nothing that
lists it can mistake it for a trained model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GB = 10**9
# How many random values the weights are drawn from: slices of one pool at random offsets
# (drawing 30 GB of independent normals would take longer than the benchmark it serves).
POOL_VALUES = 1 << 26


@dataclass(frozen=True)
class Shape:
    """A llama block shape: width, feed-forward width, attention heads, KV heads."""

    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_layer: int
    n_vocab: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_embd_kv(self) -> int:
        return self.head_dim * self.n_head_kv

    def layer_params(self) -> int:
        e, kv, ff = self.n_embd, self.n_embd_kv, self.n_ff
        return 2 * e * e + 2 * e * kv + 3 * e * ff  # q, o; k, v; gate, up, down

    def weight_bytes(self) -> int:
        """F16 matrices + F32 norms: what the file holds besides its header."""
        matrices = 2 * self.n_vocab * self.n_embd + self.n_layer * self.layer_params()
        norms = (2 * self.n_layer + 1) * self.n_embd
        return 2 * matrices + 4 * norms

    def kv_cache_bytes(self, n_ctx: int, bytes_per_value: int = 2) -> int:
        """K and V for every layer and position (F16 cache: 2 bytes a value)."""
        return 2 * self.n_layer * n_ctx * self.n_embd_kv * bytes_per_value


# Widths of well-known llama shapes (1B-class, 7B-class, 13B-class), by target size.
_WIDTHS = (
    (0.3 * GB, (512, 1408, 8, 4)),  # tiny: CPU dry runs and tests only
    (2.5 * GB, (2048, 5632, 16, 4)),
    (9 * GB, (4096, 11008, 32, 8)),
)
_WIDEST = (5120, 13824, 40, 8)


def shape_for(target_bytes: int, n_vocab: int) -> Shape:
    """The llama shape whose F16 weights come closest to `target_bytes` (at least 1 block)."""
    if target_bytes <= 0:
        raise ValueError(f"target size must be positive, got {target_bytes}")
    dims = next((d for limit, d in _WIDTHS if target_bytes <= limit), _WIDEST)
    base = Shape(*dims, n_layer=0, n_vocab=n_vocab)
    per_layer = 2 * base.layer_params() + 8 * base.n_embd
    n_layer = max(1, round((target_bytes - base.weight_bytes()) / per_layer))
    return Shape(*dims, n_layer=n_layer, n_vocab=n_vocab)


_POOL: list[np.ndarray[Any, Any]] = []


def _pool() -> np.ndarray[Any, Any]:
    """POOL_VALUES normal(0, 0.02) F16 values, twice over (so any window is a view)."""
    if not _POOL:
        rng = np.random.default_rng(12345)
        half = (rng.standard_normal(POOL_VALUES, dtype=np.float32) * 0.02).astype(np.float16)
        _POOL.append(np.concatenate([half, half]))
    return _POOL[0]


def _tokenizer_fields(vocab_gguf: Path) -> list[tuple[str, Any, Any, Any]]:
    """(key, value, type, sub_type) of every `tokenizer.*` field of a vocab-only GGUF."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(vocab_gguf))
    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        out.append((key, field.contents(), vtype, sub))
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in out):
        raise ValueError(f"{vocab_gguf} has no tokenizer.ggml.tokens: not a vocab GGUF")
    return out


def write_noise_model(
    path: Path,
    target_bytes: int,
    vocab_gguf: Path,
    n_ctx_train: int = 8192,
    seed: int = 0,
) -> Shape:
    """Write a llama GGUF of about `target_bytes` with random F16 weights to `path` (via a
    `.partial` file, renamed when complete). Returns its shape."""
    from gguf import GGUFValueType, GGUFWriter, LlamaFileType

    fields = _tokenizer_fields(vocab_gguf)
    n_vocab = len(next(v for k, v, *_ in fields if k == "tokenizer.ggml.tokens"))
    shape = shape_for(target_bytes, n_vocab)
    rng = np.random.default_rng(seed)
    pool = _pool()

    def noise(*dims: int) -> np.ndarray[Any, Any]:
        n = math.prod(dims)
        if n <= POOL_VALUES:  # a view at a random offset: no copy
            start = int(rng.integers(0, POOL_VALUES))
            return pool[start : start + n].reshape(dims)
        return np.tile(pool[:POOL_VALUES], -(-n // POOL_VALUES))[:n].reshape(dims)

    e, kv, ff, v = shape.n_embd, shape.n_embd_kv, shape.n_ff, n_vocab
    tensors: list[tuple[str, tuple[int, ...], type]] = [("token_embd.weight", (v, e), np.float16)]
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        tensors += [
            (b + "attn_norm.weight", (e,), np.float32),
            (b + "attn_q.weight", (e, e), np.float16),
            (b + "attn_k.weight", (kv, e), np.float16),
            (b + "attn_v.weight", (kv, e), np.float16),
            (b + "attn_output.weight", (e, e), np.float16),
            (b + "ffn_norm.weight", (e,), np.float32),
            (b + "ffn_gate.weight", (ff, e), np.float16),
            (b + "ffn_up.weight", (ff, e), np.float16),
            (b + "ffn_down.weight", (e, ff), np.float16),
        ]
    tensors += [("output_norm.weight", (e,), np.float32), ("output.weight", (v, e), np.float16)]

    partial = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(str(partial), "llama")
    w.add_name(f"{path.stem} (random weights: output is noise)")
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(e)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(LlamaFileType.MOSTLY_F16)
    for key, value, vtype, sub in fields:
        if vtype == GGUFValueType.ARRAY:
            w.add_key_value(key, list(value), vtype, sub)
        else:
            w.add_key_value(key, value, vtype)
    for name, dims, dtype in tensors:
        nbytes = math.prod(dims) * np.dtype(dtype).itemsize
        w.add_tensor_info(name, dims, np.dtype(dtype), nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _name, dims, dtype in tensors:
        if dtype is np.float32:
            w.write_tensor_data(np.ones(dims, dtype=np.float32))  # RMS norm weights
        else:
            w.write_tensor_data(noise(*dims))
    w.close()
    partial.rename(path)
    return shape


def read_shape(path: Path) -> Shape:
    """The llama shape a GGUF's header declares (for footprint estimates)."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))

    def get(key: str) -> Any:
        f = r.fields.get(key)
        if f is None:
            raise ValueError(f"{path.name} has no {key}")
        return f.contents()

    arch = get("general.architecture")
    tokens = r.fields.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens.contents()) if tokens is not None else int(get(f"{arch}.vocab_size"))
    return Shape(
        n_embd=int(get(f"{arch}.embedding_length")),
        n_ff=int(get(f"{arch}.feed_forward_length")),
        n_head=int(get(f"{arch}.attention.head_count")),
        n_head_kv=int(get(f"{arch}.attention.head_count_kv")),
        n_layer=int(get(f"{arch}.block_count")),
        n_vocab=n_vocab,
    )
