"""Mixed precision: a Scheme with overrides writes one compressed-tensors config group per
scheme, whose targets name the right Linears for the library, transformers, vLLM's matcher
and lowbit's loader; each layer is what quantizing it with its own scheme gives."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.quantization import QuantizationConfig
from torch import nn
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.export import layer_targets
from lowbit.runtime.load import _scheme_for, load_model
from lowbit.schemes import PRESETS
from lowbit.serving.vllm import cpu_plan
from test_export import LINEARS, samples
from tiny import tensors

OPTS = dict(samples=4, seq_len=32)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    import random

    from test_cli import sentence

    rng = random.Random(3)
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text("".join(f"{sentence(rng)}\n{sentence(rng)}\n\n" for _ in range(100)))
    return path


@pytest.fixture(scope="module")
def made(tiny_dir, data, tmp_path_factory):
    """Tiny llama as W4A16 (RTN) with layer 0 in W8A8_INT8, and both uniform checkpoints."""
    root, src = tmp_path_factory.mktemp("mixed"), tiny_dir("llama")
    q = lambda name, scheme, **kw: api.quantize(src, root / name, scheme, algorithm=kw.pop("algorithm", None),  # noqa: E731
                                                dataset=str(data), **OPTS, **kw) and root / name
    return {"mixed": q("mixed", "W4A16", algorithm="rtn", overrides={"layers.0.*": "W8A8_INT8"}),
            "W4A16": q("w4", "W4A16", algorithm="rtn"), "W8A8_INT8": q("w8", "W8A8_INT8")}


def qconfig(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


def test_one_config_group_per_scheme_with_targets_naming_its_layers(made):
    cfg = qconfig(made["mixed"])
    parsed = QuantizationConfig.model_validate(cfg)
    assert parsed.model_dump(mode="json") == {k: v for k, v in cfg.items() if k != "version"}
    assert parsed.format == "mixed-precision"
    g0, g1 = parsed.config_groups["group_0"], parsed.config_groups["group_1"]
    assert g0.targets == ["Linear"] and g0.format == "pack-quantized"
    assert (g0.weights.num_bits, g0.weights.strategy, g0.input_activations) == (4, "group", None)
    assert g1.format == "int-quantized"
    assert (g1.weights.num_bits, g1.weights.strategy) == (8, "channel")
    assert (g1.input_activations.num_bits, g1.input_activations.strategy) == (8, "token")
    # the regex names exactly layer 0's Linears (re.match, as compressed-tensors and vLLM match)
    (target,) = g1.targets
    hits = [n for n in LINEARS + ["model.layers.0.self_attn", "model.layers.0", "lm_head"]
            if re.match(target[3:], n)]
    assert hits == [n for n in LINEARS if n.startswith("model.layers.0.")]
    # the way transformers reads config.json on load, then hands it to the compressor
    ct = CompressedTensorsConfig.from_dict(cfg)
    assert ModelCompressor.from_compression_config(ct).quantization_config == parsed
    assert api.REPORT_FILE and json.loads((made["mixed"] / api.REPORT_FILE).read_text())["overrides"] == {
        "layers.0.*": {"scheme": "W8A8_INT8", "algorithm": "rtn"}}
    from lowbit.verify import _scheme_name  # what `lowbit verify` calls it: the mix, not the base alone

    assert _scheme_name(made["mixed"]) == "W4A16 + W8A8_INT8 (1 override pattern(s))"
    assert _scheme_name(made["W4A16"]) == "W4A16"


def test_each_linear_decompresses_with_its_own_group_to_our_weights(made):
    parsed = QuantizationConfig.model_validate(qconfig(made["mixed"]))
    t, ours = tensors(made["mixed"]), load_model(made["mixed"], torch.bfloat16).state_dict()
    for name in LINEARS:
        group = parsed.config_groups["group_1" if ".layers.0." in name else "group_0"]
        state = {k[len(name) + 1:]: v for k, v in t.items() if k.startswith(name + ".weight")}
        theirs = BaseCompressor.get_value_from_registry(group.format).decompress(state, group)["weight"]
        assert torch.equal(theirs, ours[name + ".weight"]), name


def test_each_layer_is_its_own_scheme_quantizing_it_alone(made):
    """Layer 0 sees the model's own inputs, so it is bit for bit the uniform W8A8_INT8 layer 0
    (smoothed norms included); layer 1's RTN weights depend on no data, so it is the uniform
    W4A16 layer 1. Nothing of the other scheme leaks into either."""
    mixed, w8, w4 = tensors(made["mixed"]), tensors(made["W8A8_INT8"]), tensors(made["W4A16"])
    for name, value in mixed.items():
        want = w8 if name.startswith("model.layers.0.") else w4
        assert name in want and torch.equal(value, want[name]), name
    assert set(mixed) == {n for n in w8 if n.startswith("model.layers.0.")} | {
        n for n in w4 if not n.startswith("model.layers.0.")}


def test_transformers_loads_the_mixed_checkpoint_as_lowbit_does(made):
    out = made["mixed"]
    ids = samples(1, 24, seed=5)[0][None]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(input_ids=ids).logits  # compressed-tensors decompresses on the first forward
        ours = load_model(out, torch.float32)
        want = ours(input_ids=ids).logits
        for m in ours.modules():  # lowbit's input quantization is a pre-hook on each Linear
            m._forward_pre_hooks.clear()
        weights_only = ours(input_ids=ids).logits
    theirs, mine = hf.state_dict(), ours.state_dict()
    for name in LINEARS:
        assert torch.equal(theirs[name + ".weight"], mine[name + ".weight"]), name
    assert hf.model.layers[0].self_attn.q_proj.quantization_scheme.weights.num_bits == 8
    assert hf.model.layers[1].self_attn.q_proj.quantization_scheme.weights.num_bits == 4
    # Same weights; the logits differ only by layer 0's dynamic int8 input rounding, which
    # compressed-tensors computes its own way (lowbit's matches a float64 per-token reference,
    # test_linear). Each side is one such rounding away from the weights-only logits, so they
    # can be at most about twice that apart, and never closer than nothing.
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    one_rounding = rel(want, weights_only)
    assert 0 < one_rounding < 0.02
    assert rel(got, weights_only) < 2 * one_rounding and rel(got, want) < 2 * one_rounding


def test_lowbit_matches_a_named_group_before_linear_as_compressed_tensors_does():
    lin = nn.Linear(2, 2)
    groups = {"group_0": {"targets": ["Linear"]}, "group_1": {"targets": [r"re:model\.layers\.3\."]},
              "group_2": {"targets": ["model.layers.3.mlp.up_proj"]}}
    cfg = {"config_groups": groups, "ignore": ["lm_head"]}
    assert _scheme_for("model.layers.3.self_attn.q_proj", lin, cfg) is groups["group_1"]
    assert _scheme_for("model.layers.3.mlp.up_proj", lin, cfg) is groups["group_2"]  # exact first
    assert _scheme_for("model.layers.4.self_attn.q_proj", lin, cfg) is groups["group_0"]
    assert _scheme_for("lm_head", lin, cfg) is None


def test_layer_targets_one_anchored_regex_per_decoder_layer():
    names = ["model.layers.3.mlp.up_proj", "model.layers.3.self_attn.q_proj", "model.layers.12.mlp.down_proj"]
    targets = layer_targets(names)
    assert len(targets) == 2
    assert [n for n in [*names, "model.layers.3.mlp.up_proj_extra", "model.layers.13.mlp.up_proj",
                        "model.layers.1.mlp.down_proj"] if any(re.match(t[3:], n) for t in targets)] == names


def test_an_override_that_splits_a_decoder_layer_is_refused(tiny_dir, data, tmp_path):
    with pytest.raises(LowbitError, match="whole decoder layers"):
        api.quantize(tiny_dir("llama"), tmp_path / "q", "W4A16", algorithm="rtn", dataset=str(data),
                     overrides={"layers.0.mlp.*": "W8A8_INT8"}, **OPTS)
    assert not (tmp_path / "q").exists()
    with pytest.raises(LowbitError, match="mr-gptq"):
        PRESETS["W4A16"].with_options(algorithm="mr-gptq").with_overrides({"layers.0.*": PRESETS["FP8"]})


def test_vllm_cpu_runs_w4a16_with_w8a8_int8_layers_in_bfloat16():
    w4 = {"weights": {"type": "int", "num_bits": 4, "strategy": "group"}, "input_activations": None}
    w8 = {"weights": {"type": "int", "num_bits": 8, "strategy": "channel"},
          "input_activations": {"type": "int", "num_bits": 8, "dynamic": True}}
    fp8 = {"weights": {"type": "float", "num_bits": 8, "strategy": "tensor"},
           "input_activations": {"type": "float", "num_bits": 8, "dynamic": False}}
    assert cpu_plan({"config_groups": {"a": w4, "b": w8}}, "AVX512") == ("bfloat16", None)
    # a static FP8 group is found whichever group comes first
    assert cpu_plan({"config_groups": {"a": w4, "b": fp8}}, "AVX512")[1] is not None
