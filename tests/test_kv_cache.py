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


# ------------------------------------------------------------- the runtime keeps the cache in FP8

@pytest.fixture(scope="module")
def fp8_kv_model(tiny_dir, tmp_path_factory, dataset):
    """Tiny llama, packed INT4 weights and an FP8 KV cache, loaded as lowbit's runtime runs it."""
    out = tmp_path_factory.mktemp("kv-runtime") / "w4-kv"
    lowbit.quantize(tiny_dir("llama"), out, "W4A16", dataset=str(dataset), samples=6, seq_len=48,
                    group_size=32, kv_cache="fp8", algorithm="rtn")
    return load_model(out, torch.float32, packed=True)


def _steps(model, cache, ids: list[int], new: list[int]) -> list[torch.Tensor]:
    """Logits of a prefill of `ids`, then of one decode step per token of `new`."""
    from lowbit.runtime.generate import _cache_kwarg

    kw = {_cache_kwarg(model): cache, "use_cache": True}
    out = [model(input_ids=torch.tensor([ids]), position_ids=torch.arange(len(ids))[None], **kw).logits[:, -1]]
    for n, t in enumerate(new):
        out.append(model(input_ids=torch.tensor([[t]]), position_ids=torch.tensor([[len(ids) + n]]), **kw).logits[:, -1])
    return out


@torch.no_grad()
def test_the_static_cache_stores_fp8_codes_and_attends_to_what_the_simulation_computes(fp8_kv_model):
    """FP8 storage is lossless against the simulation (which rounds K and V to the same grid
    before attention): every prefill and decode logit equals the full-precision cache's, and
    the cache holds one byte a value, as kv_bytes reports."""
    from transformers import StaticCache

    from lowbit.runtime.kv_cache import FP8, kv_bytes, kv_scales, static_cache

    model = fp8_kv_model
    assert kv_scales(model) is not None
    ids, new = list(range(10, 40)), [41, 42, 43, 44]
    fp8, plain = static_cache(model, 48), StaticCache(config=model.config, max_cache_len=48)
    ours, theirs = _steps(model, fp8, ids, new), _steps(model, plain, ids, new)
    assert all(layer.keys.dtype == FP8 and layer.values.dtype == FP8 for layer in fp8.layers)
    assert sum(layer.keys.nbytes + layer.values.nbytes for layer in fp8.layers) == kv_bytes(model, 48, 4)
    assert kv_bytes(model, 48, 4) * 4 == sum(layer.keys.nbytes + layer.values.nbytes for layer in plain.layers)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    # the stored codes decode to the simulation's keys: scaling them wrongly moves the logits
    from lowbit.runtime.generate import _cache_kwarg

    # (the full-precision cache, at the same state, gives the right logits: no crop, which
    # transformers 5.19's StaticLayer lacks)
    step = dict(input_ids=torch.tensor([[45]]), position_ids=torch.tensor([[34]]), use_cache=True)
    fp8.layers[0].k_scale = fp8.layers[0].k_scale * 2
    wrong = model(**step, **{_cache_kwarg(model): fp8}).logits[:, -1]
    right = model(**step, **{_cache_kwarg(model): plain}).logits[:, -1]
    assert not torch.allclose(wrong, right, atol=1e-4)


@torch.no_grad()
def test_the_batch_decoder_stores_fp8_codes_and_decodes_as_with_a_full_precision_cache(fp8_kv_model):
    from lowbit.runtime.batch import BatchDecoder
    from lowbit.runtime.kv_cache import FP8

    model = fp8_kv_model
    ids = list(range(10, 40))
    fp8 = BatchDecoder(model, 2, 48)
    assert fp8.cache.keys[0].dtype == FP8 and fp8.cache.bytes == sum(
        t.nbytes for t in fp8.cache.keys + fp8.cache.values)
    plain = BatchDecoder(model, 2, 48)
    plain.cache.scales = None  # the same model, keys and values kept in float32
    plain.cache.keys = [k.float() for k in plain.cache.keys]
    plain.cache.values = [v.float() for v in plain.cache.values]
    for d in (fp8, plain):
        d.prefill(0, ids)
        d.prefill(1, ids[:12])
    a = fp8.decode([0, 1], [41, 42], [30, 12])
    b = plain.decode([0, 1], [41, 42], [30, 12])
    assert torch.equal(a, b)
