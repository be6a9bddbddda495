"""The layer-sequential loop on tiny random models of every supported family."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lowbit.checkpoint import Checkpoint
from lowbit.errors import LowbitError
from lowbit.export import CheckpointWriter
from lowbit.pipeline import quantize_layers
from lowbit.runtime.load import load_model
from lowbit.schemes import PRESETS
from tiny import FAMILIES, tensors


def bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest bfloat16 >= x (x > 0), stepping the bit pattern by hand."""
    b = x.reshape(1).to(torch.bfloat16)
    if b.float() < x:
        b = (b.view(torch.int16) + 1).view(torch.bfloat16)
    return b


def samples(n=6, length=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 256, (length - i,), generator=g) for i in range(n)]


def run(src: Path, out: Path, scheme="FP8", ignore=()):
    s = PRESETS[scheme].with_ignore(tuple(ignore))
    if s.weights.granularity == "group":
        s = s.with_options(group_size=32)  # tiny widths are 64 and 128
    ckpt = Checkpoint(src)
    with CheckpointWriter(out, src, s, overwrite=True) as w:
        report = quantize_layers(ckpt, s, samples(), w)
    return report




@pytest.mark.parametrize("scheme", ["FP8_DYNAMIC", "W8A16_FP8"])
def test_data_free_schemes_run_without_samples_and_report_weight_error(scheme, tiny_dir, tmp_path):
    """Data cannot change a data-free scheme's checkpoint: with no samples (no forward at all)
    the files are the same bytes as with samples, and the report is ||W - Q|| / ||W||."""
    src = tiny_dir("llama")
    s = PRESETS[scheme]
    for name, batch in (("with", samples()), ("without", [])):
        ckpt = Checkpoint(src)
        with CheckpointWriter(tmp_path / name, src, s, overwrite=True) as w:
            report = quantize_layers(ckpt, s, batch, w)
    files = sorted(f.name for f in (tmp_path / "with").iterdir())
    assert files == sorted(f.name for f in (tmp_path / "without").iterdir())
    for f in files:
        assert (tmp_path / "with" / f).read_bytes() == (tmp_path / "without" / f).read_bytes(), f
    # Q as the bf16 model holds it (codes times bf16 scales, rounded once to bf16); a float32 load
    # keeps the exact products, which differ from that in the last bf16 bit
    orig, deq = tensors(src), load_model(tmp_path / "without", torch.bfloat16).state_dict()
    assert len(report) == 2 * 7
    for r in report:
        w = orig[r["name"] + ".weight"].double()
        ref = ((deq[r["name"] + ".weight"].double() - w).norm() / w.norm()).item()
        assert r["rel_error"] == pytest.approx(ref, rel=1e-5)
        assert 0 < r["rel_error"] < 0.05


def test_a_calibrated_scheme_without_samples_is_refused(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    with pytest.raises(LowbitError, match="needs calibration samples"):
        with CheckpointWriter(tmp_path / "q", src, PRESETS["FP8"], overwrite=True) as w:
            quantize_layers(Checkpoint(src), PRESETS["FP8"], [], w)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", ["FP8", "FP8_DYNAMIC", "W8A16_FP8", "W4A16", "W8A8_INT8"])
def test_every_family_quantizes_and_reloads(family, scheme, tiny_dir, tmp_path):
    src = tiny_dir(family)
    report = run(src, tmp_path / "q", scheme)
    assert report and all(0 <= r["rel_error"] < 0.2 for r in report)
    ours = load_model(tmp_path / "q")
    base = load_model(src)
    ids = samples(1, 40, seed=9)[0][None]
    a, b = ours(input_ids=ids).logits, base(input_ids=ids).logits
    assert torch.isfinite(a).all()
    assert 0 < ((a - b).norm() / b.norm()).item() < (0.3 if scheme == "W4A16" else 0.2)
    # transformers reads the same checkpoint and gets our dequantized weights bit for bit
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    hf(input_ids=ids[:, :4])  # compressed-tensors decompresses on the first forward
    ours_bf16 = load_model(tmp_path / "q", torch.bfloat16).state_dict()
    for name, value in hf.state_dict().items():
        if name.endswith(".weight"):
            assert torch.equal(value, ours_bf16[name]), name


def test_qkv_and_gate_up_share_one_weight_scale_and_input_scale(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    run(src, tmp_path / "q", "FP8")
    t, orig = tensors(tmp_path / "q"), tensors(src)
    for i in range(2):
        for fused in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                      ("mlp.gate_proj", "mlp.up_proj")):
            names = [f"model.layers.{i}.{n}" for n in fused]
            # MLPerf: the shared scale is the max of the members' own amax / 448, stored in the
            # model's dtype (bf16), rounded up so the stored scale is the one codes were made with
            amax = max(orig[n + ".weight"].float().abs().max() for n in names)
            for n in names:
                assert t[n + ".weight"].dtype == torch.float8_e4m3fn
                assert t[n + ".weight_scale"].dtype == torch.bfloat16
                assert torch.equal(t[n + ".weight_scale"], bf16_ceil(amax / 448))
                codes = (orig[n + ".weight"].double() / t[n + ".weight_scale"].double()).clamp(-448, 448)
                assert torch.equal(t[n + ".weight"], codes.to(torch.float8_e4m3fn))
                assert torch.equal(t[n + ".input_scale"], t[names[0] + ".input_scale"])
            assert not torch.equal(t[f"model.layers.{i}.self_attn.o_proj.weight_scale"],
                                   t[names[0] + ".weight_scale"])


def test_later_layers_are_calibrated_on_quantized_weights(tiny_dir, tmp_path):
    """Layer 1's input scale is the amax of what layer 0 produces with its *quantized* weights
    (one-pass static FP8: the activations' own rounding is not propagated)."""
    src = tiny_dir("llama")
    run(src, tmp_path / "q", "FP8")
    t = tensors(tmp_path / "q")

    def q_proj_input_amax(model):
        seen = []
        hook = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(
            lambda m, a: seen.append(a[0].abs().max()))
        for ids in samples():
            model(input_ids=ids[None])
        hook.remove()
        return max(seen)

    quant_first = load_model(src)  # original weights, then layer 0's Linears dequantized from OUT
    for name, lin in quant_first.model.layers[0].named_modules():
        if isinstance(lin, torch.nn.Linear):
            key = f"model.layers.0.{name}"
            w = t[key + ".weight"].to(torch.bfloat16) * t[key + ".weight_scale"]
            lin.weight = torch.nn.Parameter(w.to(lin.weight.dtype), requires_grad=False)
    expected = bf16_ceil(q_proj_input_amax(quant_first) / 448)
    assert torch.equal(t["model.layers.1.self_attn.q_proj.input_scale"], expected)
    unquantized = bf16_ceil(q_proj_input_amax(load_model(src)) / 448)
    assert not torch.equal(expected, unquantized)


def test_ignore_patterns_keep_linears_unquantized(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    run(src, tmp_path / "q", "FP8", ignore=["mlp.down_proj"])
    t = tensors(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["ignore"] == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert t["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert "model.layers.0.mlp.down_proj.weight_scale" not in t
    assert t["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn


def test_ignoring_part_of_a_fused_set_is_refused(tiny_dir, tmp_path):
    with pytest.raises(LowbitError, match="fused set"):
        run(tiny_dir("llama"), tmp_path / "q", "FP8", ignore=["k_proj"])
    assert not (tmp_path / "q").exists()


def test_reruns_are_byte_identical(tiny_dir, tmp_path):
    src = tiny_dir("qwen2")
    run(src, tmp_path / "a", "FP8")
    run(src, tmp_path / "b", "FP8")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_unsupported_architecture_names_what_is_missing(tmp_path):
    cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, vocab_size=256, n_positions=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(LowbitError, match="no list of decoder layers"):
        run(tmp_path / "gpt2", tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_checkpoint_without_architectures_is_refused(tiny_dir, tmp_path):
    import shutil
    src = shutil.copytree(tiny_dir("llama"), tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["architectures"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LowbitError, match="architectures"):
        Checkpoint(src)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_safetensors_is_a_clear_error(damage, tiny_dir, tmp_path):
    import shutil
    src = shutil.copytree(tiny_dir("llama"), tmp_path / "m")
    shard = sorted(src.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\x00" * 64)
    with pytest.raises(LowbitError, match="not a valid safetensors file"):
        Checkpoint(src)


def test_samples_of_equal_length_are_batched_without_changing_layer_outputs():
    from lowbit.capture import capture_inputs, plan_batches, stack_batches
    from tiny import tiny_model

    model = tiny_model("gemma2")  # sliding-window masks too
    g = torch.Generator().manual_seed(0)
    lengths = [40, 40, 33, 40, 33, 40, 40]
    ids = [torch.randint(7, 200, (n,), generator=g) for n in lengths]
    hidden, kwargs = capture_inputs(model, model.model.layers, ids)
    plan = plan_batches(lengths, size=3)
    bh, bkw = capture_inputs(model, model.model.layers, stack_batches(ids, plan))
    assert [h.shape[:2] for h in bh] == [(3, 40), (2, 40), (2, 33)]
    layer = model.model.layers[1]
    batched = [row for h, kw in zip(bh, bkw[1]) for row in layer(h, **kw)]
    order = [0, 1, 3, 5, 6, 2, 4]  # the samples in batch order
    for row, i in zip(batched, order):
        assert torch.allclose(row, layer(hidden[i], **kwargs[1][i])[0], atol=1e-5), i
