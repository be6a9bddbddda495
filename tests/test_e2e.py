"""End to end on the real SmolLM2-135M: quantize, load in the real consumers, generate, evaluate."""

import json

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

import lowbit
from lowbit.runtime.load import load_model

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["FP8", "FP8_DYNAMIC"])
def quantized(request, smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "out"
    summary = lowbit.quantize(smollm2_dir, out, request.param, samples=16, seq_len=256)
    return request.param, out, summary


def test_report_names_every_linear_worst_first(quantized):
    _, out, summary = quantized
    saved = json.loads((out / "lowbit_report.json").read_text())
    errors = [r["rel_error"] for r in saved["layers"]]
    assert len(errors) == 30 * 7  # every Linear of every decoder layer
    assert errors == sorted(errors, reverse=True)
    assert 0 < errors[-1] <= errors[0] < 0.2
    assert summary["size_bytes"] < 0.7 * summary["source_size_bytes"]


def test_config_parses_with_the_compressed_tensors_library(quantized):
    scheme, out, _ = quantized
    block = json.loads((out / "config.json").read_text())["quantization_config"]
    cfg = QuantizationConfig.model_validate({k: v for k, v in block.items() if k != "version"})
    assert cfg.format == "float-quantized" and cfg.quantization_status == "compressed"
    group = cfg.config_groups["group_0"]
    assert group.weights.type == "float" and group.weights.num_bits == 8
    assert group.input_activations.dynamic is (scheme == "FP8_DYNAMIC")


def test_transformers_loads_it_and_greedy_generation_still_answers(quantized, smollm2_dir):
    _, out, _ = quantized
    tok = AutoTokenizer.from_pretrained(out)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    text = tok.decode(hf.generate(ids, max_new_tokens=8, do_sample=False)[0][ids.shape[1]:])
    assert "Paris" in text
    ours = load_model(out, torch.bfloat16).state_dict()
    for name, value in hf.state_dict().items():
        if name.endswith("proj.weight"):
            assert torch.equal(value, ours[name]), name


def test_eval_against_the_original_shows_a_small_loss(quantized, smollm2_dir):
    _, out, _ = quantized
    r = lowbit.evaluate(out, baseline=smollm2_dir, windows=4, seq_len=256)
    assert 0 < r["kl"] < 0.1
    assert 0.85 < r["top1"] < 1
    assert r["ppl"] > 1 and abs(r["ppl"] / r["baseline_ppl"] - 1) < 0.1
