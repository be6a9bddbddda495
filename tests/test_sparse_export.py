"""Pruned checkpoints as consumers read them: the sparsity_config parses with the library's
models and is one vLLM loads, the library's decompressors and transformers reproduce our
pruned weights bit for bit, and the 2:4 pattern survives in every group of 4."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.config import SparsityCompressionConfig
from compressed_tensors.quantization import QuantizationConfig
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from lowbit.checkpoint import Checkpoint
from lowbit.errors import LowbitError
from lowbit.export import CheckpointWriter
from lowbit.pipeline import needs_calibration, quantize_layers
from lowbit.runtime.load import load_model
from lowbit.schemes import PRESETS
from test_export import LINEARS, _decompressed_equals_ours, samples

# (preset, sparsity, structure): joint GPTQ sweep, asymmetric INT4 (zero points), prune-then-RTN
# on a per-tensor FP8 grid, unstructured on per-channel FP8, INT8 after SmoothQuant
CASES = {
    "W4A16-2:4": ("W4A16", 0.5, "2:4"),
    "W4A16_ASYM-2:4": ("W4A16_ASYM", 0.5, "2:4"),
    "FP8-2:4": ("FP8", 0.5, "2:4"),
    "W8A16_FP8-0.6": ("W8A16_FP8", 0.6, "unstructured"),
    "W8A8_INT8-2:4": ("W8A8_INT8", 0.5, "2:4"),  # AutoSmoothQuant first, on the smoothed Hessian
}


@pytest.fixture(scope="module")
def pruned(tiny_dir, tmp_path_factory):
    """pruned(case): the tiny llama quantized and pruned as CASES[case] says, made once."""
    made: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in made:
            preset, sparsity, structure = CASES[case]
            scheme = PRESETS[preset].with_options(sparsity=sparsity, sparsity_structure=structure)
            if scheme.weights.granularity == "group":
                scheme = scheme.with_options(group_size=32)  # tiny widths are 64 and 128
            src, out = tiny_dir("llama"), tmp_path_factory.mktemp("sparse") / case
            ckpt = Checkpoint(src)
            with CheckpointWriter(out, src, scheme) as writer:
                quantize_layers(ckpt, scheme, samples(n=8, length=64), writer)
            made[case] = out
        return made[case]

    return get


def qconfig(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


def zero_fraction(w: torch.Tensor) -> float:
    return (w == 0).float().mean().item()


@pytest.mark.parametrize("case", CASES)
def test_sparsity_config_parses_with_the_library_model(case, pruned):
    _, sparsity, structure = CASES[case]
    cfg = qconfig(pruned(case))
    sparse = SparsityCompressionConfig.model_validate(cfg["sparsity_config"])
    assert sparse.format == "dense"  # zeros stored like any other code: see export.sparsity_config
    assert sparse.sparsity_structure == structure
    assert sparse.ignore == ["lm_head"]
    assert abs(sparse.global_sparsity - sparsity) < 1e-3
    # vLLM builds its sparse scheme map from `targets` and refuses a non-empty one
    # ("Sparsity support has been removed from compressed-tensors"): ours stays empty
    assert not (sparse.targets or [])
    # transformers hands the block to compressed-tensors, whose config ignores sparsity_config
    ct = CompressedTensorsConfig.from_dict(cfg)
    assert ct.quantization_config == QuantizationConfig.model_validate(cfg)


def test_dense_schemes_write_no_sparsity_config(tiny_dir, tmp_path):
    scheme = PRESETS["FP8_DYNAMIC"]
    ckpt = Checkpoint(tiny_dir("llama"))
    with CheckpointWriter(tmp_path / "out", tiny_dir("llama"), scheme) as writer:
        quantize_layers(ckpt, scheme, samples(), writer)
    assert "sparsity_config" not in qconfig(tmp_path / "out")


@pytest.mark.parametrize("case", CASES)
def test_library_decompressor_reproduces_our_pruned_weights(case, pruned):
    _decompressed_equals_ours(pruned(case))


@pytest.mark.parametrize("case", CASES)
def test_pattern_and_fraction_hold_in_what_we_load(case, pruned):
    _, sparsity, structure = CASES[case]
    ours = load_model(pruned(case), torch.bfloat16).state_dict()
    for name in LINEARS:
        w = ours[name + ".weight"]
        if structure == "2:4":
            quads = w.reshape(w.shape[0], -1, 4)
            assert ((quads == 0).sum(-1) >= 2).all(), name
    # unstructured masks are chosen over a fused set's stacked rows: the fraction holds per set
    for i in range(2):
        for members in (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)):
            part = "self_attn" if "proj" in members[0] and members[0][0] in "qkvo" else "mlp"
            w = torch.cat([ours[f"model.layers.{i}.{part}.{m}.weight"] for m in members])
            assert zero_fraction(w) >= sparsity - 1e-3, members


@torch.no_grad()
@pytest.mark.parametrize("case", ["W4A16-2:4", "FP8-2:4", "W8A16_FP8-0.6", "W8A8_INT8-2:4"])
def test_transformers_loads_our_pruned_weights_exactly(case, pruned):
    """(W4A16_ASYM is left out: transformers 5.24 cannot load asymmetric pack-quantized, see README.)"""
    out = pruned(case)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    hf(input_ids=torch.tensor([[5, 6, 7, 8]]))  # compressed-tensors decompresses on the first forward
    ours = load_model(out, torch.bfloat16).state_dict()
    theirs = hf.state_dict()
    for name in LINEARS:
        assert torch.equal(theirs[name + ".weight"], ours[name + ".weight"]), name
        if CASES[case][2] == "2:4":
            quads = theirs[name + ".weight"].reshape(-1, 4)
            assert ((quads == 0).sum(-1) >= 2).all(), name


def test_sparsity_needs_calibration_even_for_data_free_schemes():
    dynamic = PRESETS["FP8_DYNAMIC"]
    assert not needs_calibration(dynamic)
    assert needs_calibration(dynamic.with_options(sparsity=0.5))


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=0.6, sparsity_structure="2:4"), "exactly half"),
    (dict(sparsity=1.0), "strictly between 0 and 1"),
    (dict(sparsity=-0.1), "strictly between 0 and 1"),
    (dict(sparsity_structure="unstructured"), "needs --sparsity"),
    (dict(sparsity=0.5, sparsity_structure="1:2"), "unknown sparsity structure"),
])
def test_invalid_sparsity_options_are_lowbit_errors(kwargs, match):
    with pytest.raises(LowbitError, match=match):
        PRESETS["FP8"].with_options(**kwargs)


def test_2_4_alone_means_half_and_a_fraction_alone_means_unstructured():
    assert PRESETS["FP8"].with_options(sparsity_structure="2:4").sparsity == 0.5
    s = PRESETS["FP8"].with_options(sparsity=0.7)
    assert (s.sparsity, s.sparsity_structure) == (0.7, "unstructured")


# ------------------------------------------------------------------------------ command line

def test_cli_prunes_with_any_scheme_and_reports_it(tiny_dir, tmp_path):
    from test_cli import ARGS, run_cli

    out = tmp_path / "out"
    data = tmp_path / "calib.txt"
    data.write_text("".join(f"record {i} " + "words and more words " * 8 + "\n\n" for i in range(20)))
    code, stdout, stderr = run_cli("quantize", tiny_dir("llama"), out, "--scheme", "FP8_DYNAMIC",
                                   "--dataset", data, *ARGS, "--sparsity-structure", "2:4", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert (summary["sparsity"], summary["sparsity_structure"]) == (0.5, "2:4")
    assert summary["samples"] == 4  # a data-free scheme still calibrates: pruning needs the Hessian
    assert qconfig(out)["sparsity_config"]["sparsity_structure"] == "2:4"


@pytest.mark.parametrize("flags,fragment", [
    (["--sparsity", "0.6", "--sparsity-structure", "2:4"], "exactly half"),
    (["--sparsity", "1"], "strictly between 0 and 1"),
    (["--sparsity-structure", "unstructured"], "needs --sparsity"),
])
def test_cli_sparsity_mistakes_are_one_line_errors(flags, fragment, tiny_dir, tmp_path):
    from test_cli import run_cli

    out = tmp_path / "out"
    code, stdout, stderr = run_cli("quantize", tiny_dir("llama"), out, "--scheme", "FP8", *flags)
    assert code == 2 and stdout == ""
    assert stderr.splitlines() == [stderr.strip()] and fragment in stderr and "Traceback" not in stderr
    assert not out.exists()


def test_quantize_help_describes_the_sparsity_flags():
    from test_cli import run_cli

    code, stdout, _ = run_cli("quantize", "--help")
    assert code == 0 and "--sparsity F" in stdout and "--sparsity-structure {unstructured,2:4}" in stdout
