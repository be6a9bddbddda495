"""FP8 KV cache: calibrated on the cached (post-RoPE) keys and values, K and V share one scale."""

import json

import pytest
import torch
import transformers.models.llama.modeling_llama as llama
from compressed_tensors.quantization import QuantizationArgs

import lowbit
from lowbit.errors import LowbitError
from tiny import tensors
from lowbit.runtime.load import load_model


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text("\n\n".join(f"record {i}: " + "the quick brown fox jumps " * (i % 5 + 2) for i in range(80)))
    return path


def quantize(src, out, dataset, **kw):
    return lowbit.quantize(src, out, "FP8", dataset=str(dataset), samples=6, seq_len=48, overwrite=True, **kw)




def test_k_and_v_share_the_max_of_their_calibrated_ranges(tiny_dir, tmp_path, dataset, monkeypatch):
    src = tiny_dir("llama")
    quantize(src, tmp_path / "plain", dataset)
    quantize(src, tmp_path / "kv", dataset, kv_cache="fp8")
    t = tensors(tmp_path / "kv")

    # Independent reference: run the quantized model (weights and activations as served) and
    # record keys after RoPE (what the cache holds) and values, through transformers' own hooks.
    rope = llama.apply_rotary_pos_emb
    model = load_model(tmp_path / "plain", torch.bfloat16)
    k_amax, v_amax = [torch.tensor(0.0)] * 2, [torch.tensor(0.0)] * 2
    current = {"layer": 0}

    def spy(q, k, cos, sin, *a, **kw):
        qe, ke = rope(q, k, cos, sin, *a, **kw)
        i = current["layer"]
        k_amax[i] = torch.maximum(k_amax[i], ke.float().abs().max())
        return qe, ke

    monkeypatch.setattr(llama, "apply_rotary_pos_emb", spy)
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: current.update(layer=i))
        layer.self_attn.v_proj.register_forward_hook(
            lambda m, a, y, i=i: v_amax.__setitem__(i, torch.maximum(v_amax[i], y.float().abs().max())))
    from lowbit import data
    from lowbit.checkpoint import load_tokenizer

    for ids in data.calibration_samples(load_tokenizer(src), str(dataset), samples=6, seq_len=48, seed=0):
        model(input_ids=ids[None])
    for i in range(2):
        expected = torch.maximum(k_amax[i], v_amax[i]) / 448
        k, v = t[f"model.layers.{i}.self_attn.k_scale"], t[f"model.layers.{i}.self_attn.v_scale"]
        assert k.shape == (1,) and k.dtype == torch.float32
        assert torch.equal(k, v)
        assert k.item() == pytest.approx(expected.item(), rel=2e-2)


def test_unit_scale_and_config(tiny_dir, tmp_path, dataset):
    quantize(tiny_dir("qwen3"), tmp_path / "kv", dataset, kv_cache="fp8", kv_scale="unit")
    t = tensors(tmp_path / "kv")
    assert t["model.layers.0.self_attn.k_scale"].item() == 1.0
    block = json.loads((tmp_path / "kv" / "config.json").read_text())["quantization_config"]
    kv = QuantizationArgs.model_validate(block["kv_cache_scheme"])
    # the only KV scheme vLLM accepts: FP8, per tensor, symmetric, static
    assert (kv.type, kv.num_bits, kv.strategy, kv.symmetric, kv.dynamic) == ("float", 8, "tensor", True, False)


def test_eval_simulates_the_quantized_cache(tiny_dir, tmp_path, dataset):
    src = tiny_dir("gemma2")
    quantize(src, tmp_path / "plain", dataset)
    quantize(src, tmp_path / "kv", dataset, kv_cache="fp8")
    ids = torch.randint(7, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    a = load_model(tmp_path / "plain")(input_ids=ids).logits
    b = load_model(tmp_path / "kv")(input_ids=ids).logits
    assert not torch.equal(a, b)
    assert ((a - b).norm() / a.norm()).item() < 0.15  # FP8 K/V: a visible but modest change


def test_kv_scale_without_a_kv_cache_is_refused(tiny_dir, tmp_path, dataset):
    with pytest.raises(LowbitError, match="--kv-cache fp8"):
        quantize(tiny_dir("llama"), tmp_path / "x", dataset, kv_scale="unit")
