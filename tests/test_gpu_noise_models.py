"""Noise models: llama GGUFs of chosen sizes with random weights and a real tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

from stack.assets import CACHE_DIR, LLAMA_CPP_PYTHON_VERSION
from stack.noise_models import GB, read_shape, shape_for, write_noise_model

VOCAB = (
    CACHE_DIR
    / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
    / "src"
    / "models"
    / "ggml-vocab-llama-spm.gguf"
)
needs_vocab = pytest.mark.skipif(
    not VOCAB.is_file(), reason=f"{VOCAB} comes with the llama.cpp sources (make prepare)"
)


@pytest.mark.parametrize("gb", [1, 2, 4, 8, 16, 32])
def test_the_shape_for_a_size_comes_within_5_percent_of_it(gb):
    s = shape_for(gb * GB, 32000)
    assert abs(s.weight_bytes() - gb * GB) / (gb * GB) < 0.05
    assert s.n_embd % s.n_head == 0 and s.n_head % s.n_head_kv == 0


def test_bigger_targets_get_wider_or_deeper_models():
    shapes = [shape_for(gb * GB, 32000) for gb in (1, 2, 4, 8, 16)]
    assert [s.weight_bytes() for s in shapes] == sorted(s.weight_bytes() for s in shapes)
    with pytest.raises(ValueError, match="must be positive"):
        shape_for(0, 32000)


@needs_vocab
def test_a_noise_model_has_the_llama_layout_a_real_tokenizer_and_says_it_is_noise(tmp_path):
    path = tmp_path / "noise-tiny.gguf"
    shape = write_noise_model(path, 100_000_000, VOCAB)
    assert not (tmp_path / "noise-tiny.gguf.partial").exists()
    r = GGUFReader(str(path))
    name = r.fields["general.name"].contents()
    assert "random weights" in name and "noise" in name
    assert r.fields["general.architecture"].contents() == "llama"
    assert len(r.fields["tokenizer.ggml.tokens"].contents()) == shape.n_vocab == 32000
    assert r.fields["tokenizer.ggml.model"].contents() == "llama"
    tensors = {t.name: t for t in r.tensors}
    per_block = {
        "attn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_norm",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    }
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{t}.weight" for i in range(shape.n_layer) for t in per_block
    }
    assert set(tensors) == expected
    for t in r.tensors:
        want = GGMLQuantizationType.F32 if "norm" in t.name else GGMLQuantizationType.F16
        assert t.tensor_type == want, t.name
    q = tensors["blk.0.attn_k.weight"]
    assert list(q.shape) == [shape.n_embd, shape.n_embd_kv]  # ggml order: columns first
    w = np.asarray(tensors["blk.0.ffn_up.weight"].data, dtype=np.float32)
    assert np.isfinite(w).all() and 0.01 < float(w.std()) < 0.03  # noise ~ N(0, 0.02)
    header = path.stat().st_size - shape.weight_bytes()
    assert 0 < header < 2_000_000  # the tokenizer's metadata and tensor infos
    assert read_shape(path) == shape


def test_a_file_that_is_not_a_vocab_gguf_is_refused(tmp_path):
    from gguf import GGUFWriter

    bogus = tmp_path / "empty.gguf"
    w = GGUFWriter(str(bogus), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with pytest.raises(ValueError, match="not a vocab GGUF"):
        write_noise_model(tmp_path / "x.gguf", 10**8, Path(bogus))
