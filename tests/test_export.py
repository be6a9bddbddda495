"""The checkpoint we write, checked against the compressed-tensors library itself: its config
models parse our quantization_config, its decompressors reproduce our weights bit for bit; and
the writer's promises: fused sets are consistent, OUT appears whole or not at all."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.quantization import QuantizationConfig
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CompressedTensorsConfig

import compressed_tensors
from lowbit.algorithms.rtn import rtn
from lowbit.checkpoint import Checkpoint
from lowbit.errors import LowbitError
from lowbit.export import CheckpointWriter, check_fused
from lowbit.formats.grid import grid_for
from lowbit.pipeline import quantize_layers
from lowbit.runtime.load import load_model, stored_linear
from tiny import tensors
from lowbit.schemes import FP8_CHANNEL, FP8_TENSOR, PRESETS

SCHEMES = ["FP8", "FP8_DYNAMIC", "W8A16_FP8"]
FORMAT = {"FP8": "float-quantized", "FP8_DYNAMIC": "float-quantized", "W8A16_FP8": "naive-quantized"}
LINEARS = [f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
SHAPES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
          "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}


def samples(n=4, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 256, (length,), generator=g) for _ in range(n)]


def write_quantized(src: Path, out: Path, scheme: str, shard_bytes: int = 512 * 2**20,
                    algorithm: str | None = None) -> Path:
    s = PRESETS[scheme].with_options(algorithm=algorithm)
    if s.weights.format == "int" and s.weights.granularity == "group":
        s = s.with_options(group_size=32)  # tiny widths are 64 and 128
    ckpt = Checkpoint(src)
    with CheckpointWriter(out, src, s, shard_bytes=shard_bytes) as writer:
        quantize_layers(ckpt, s, samples(), writer)
    return out


@pytest.fixture(scope="module")
def written(tiny_dir, tmp_path_factory):
    """written(scheme): tiny llama quantized with that scheme (one shard per layer), made once."""
    made: dict[str, Path] = {}

    def get(scheme: str) -> Path:
        if scheme not in made:
            out = tmp_path_factory.mktemp("export") / scheme
            made[scheme] = write_quantized(tiny_dir("llama"), out, scheme, shard_bytes=1)
        return made[scheme]

    return get




def qconfig(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


def hidden_siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------ quantization_config


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantization_config_parses_with_the_library_models(scheme, written):
    cfg = qconfig(written(scheme))
    assert cfg["version"] == compressed_tensors.__version__
    parsed = QuantizationConfig.model_validate(cfg)
    # nothing we wrote is dropped or defaulted differently: dumping it back gives our block
    assert parsed.model_dump(mode="json") == {k: v for k, v in cfg.items() if k != "version"}
    assert parsed.format == FORMAT[scheme]
    assert parsed.quantization_status == "compressed"
    assert parsed.ignore == ["lm_head"]
    # the way transformers reads config.json on load, then hands it to the compressor
    ct = CompressedTensorsConfig.from_dict(cfg)
    assert ct.quantization_config == parsed
    assert ModelCompressor.from_compression_config(ct).quantization_config.format == FORMAT[scheme]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_config_groups_describe_the_scheme(scheme, written):
    (group,) = QuantizationConfig.model_validate(qconfig(written(scheme))).config_groups.values()
    assert group.targets == ["Linear"]
    w, a = group.weights, group.input_activations
    assert (w.type, w.num_bits, w.symmetric, w.dynamic) == ("float", 8, True, False)
    assert w.strategy == ("tensor" if scheme == "FP8" else "channel")
    if scheme == "FP8":
        assert (a.type, a.num_bits, a.strategy, a.dynamic) == ("float", 8, "tensor", False)
    elif scheme == "FP8_DYNAMIC":
        assert (a.type, a.num_bits, a.strategy, a.dynamic) == ("float", 8, "token", True)
    else:
        assert a is None


@pytest.mark.parametrize("scheme", SCHEMES)
def test_tensor_dtypes_and_shapes(scheme, written, tiny_dir):
    t, source = tensors(written(scheme)), tensors(tiny_dir("llama"))
    for name in LINEARS:
        out_features, in_features = SHAPES[name.rsplit(".", 1)[1]]
        assert t[name + ".weight"].dtype == torch.float8_e4m3fn
        assert t[name + ".weight"].shape == (out_features, in_features)
        assert t[name + ".weight_scale"].dtype == torch.bfloat16  # the model's dtype
        expected = (1,) if scheme == "FP8" else (out_features, 1)
        assert t[name + ".weight_scale"].shape == expected, name
        if scheme == "FP8":
            assert t[name + ".input_scale"].shape == (1,)
            assert t[name + ".input_scale"].dtype == torch.bfloat16
        else:
            assert name + ".input_scale" not in t
    # everything else keeps its name, dtype and value
    quantized = {n + s for n in LINEARS for s in (".weight", ".weight_scale", ".input_scale")}
    assert set(t) - quantized == set(source) - {n + ".weight" for n in LINEARS}
    for name in set(t) - quantized:
        assert torch.equal(t[name], source[name]), name


@pytest.mark.parametrize("scheme", SCHEMES)
def test_library_decompressor_reproduces_our_weights_bit_for_bit(scheme, written):
    _decompressed_equals_ours(written(scheme))


@pytest.mark.parametrize("scheme", ["W4A16", "W4A16_ASYM", "W8A16", "W8A8_INT8"])
def test_int_schemes_decompress_to_our_weights_bit_for_bit(scheme, written):
    out = written(scheme)
    fmt = qconfig(out)["format"]
    assert fmt == ("int-quantized" if scheme == "W8A8_INT8" else "pack-quantized")
    t = tensors(out)
    name = "model.layers.0.self_attn.q_proj"
    if fmt == "pack-quantized":
        bits = 4 if scheme.startswith("W4") else 8
        assert t[name + ".weight_packed"].dtype == torch.int32
        assert t[name + ".weight_packed"].shape == (64, 64 * bits // 32)
        assert t[name + ".weight_shape"].tolist() == [64, 64]
        assert (name + ".weight_zero_point" in t) == (scheme == "W4A16_ASYM")
    # act-order with static groups is "weight" ordering: same layout, so no g_idx anywhere
    (group,) = QuantizationConfig.model_validate(qconfig(out)).config_groups.values()
    grouped_gptq = PRESETS[scheme].algorithm == "gptq" and group.weights.strategy == "group"
    assert group.weights.actorder == ("weight" if grouped_gptq else None)
    assert not any(k.endswith("g_idx") for k in t)
    _decompressed_equals_ours(out)


def test_group_act_order_checkpoints_are_refused_by_the_runtime(written, tmp_path):
    out = tmp_path / "g"
    shutil.copytree(written("W4A16"), out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(LowbitError, match="group activation ordering"):
        load_model(out)


def _decompressed_equals_ours(out):
    parsed = QuantizationConfig.model_validate(qconfig(out))
    compressor = BaseCompressor.get_value_from_registry(parsed.format)
    (group,) = parsed.config_groups.values()
    t = tensors(out)
    ours = load_model(out, torch.bfloat16).state_dict()
    for name in LINEARS:
        state = {k[len(name) + 1:]: v for k, v in t.items() if k.startswith(name + ".weight")}
        theirs = compressor.decompress(state, group)["weight"]
        assert theirs.dtype == ours[name + ".weight"].dtype == torch.bfloat16
        assert torch.equal(theirs, ours[name + ".weight"]), name


# -------------------------------------------------------------------------- fused sets

QKV = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(rows, 64, generator=g) * (k + 1)
            for k, (n, rows) in enumerate(zip(QKV[0], (64, 32, 32)))}


def shared_qkv(spec=FP8_TENSOR):
    """q/k/v quantized the way vLLM needs them: one grid bound on their concatenation."""
    w = weights()
    grid = grid_for(spec, torch.bfloat16).bind(torch.cat(list(w.values())))
    return {n: rtn(x, grid) for n, x in w.items()}


def input_scales(values=(0.5, 0.5, 0.5)):
    return {n: torch.tensor([v], dtype=torch.bfloat16) for n, v in zip(QKV[0], values)}


def test_consistent_fused_sets_pass():
    check_fused("model.layers.0.", QKV, shared_qkv(), input_scales())
    check_fused("model.layers.0.", QKV, shared_qkv(), {})  # dynamic inputs: no input scales
    check_fused("model.layers.0.", QKV, {}, {})  # an ignored set
    # per-channel scales differ between members by nature
    check_fused("model.layers.0.", QKV, shared_qkv(FP8_CHANNEL), {})


def test_partly_quantized_fused_set_is_refused():
    quantized = shared_qkv()
    del quantized["self_attn.v_proj"]
    with pytest.raises(LowbitError, match="only partly quantized"):
        check_fused("model.layers.0.", QKV, quantized, input_scales())


def test_unequal_per_tensor_weight_scales_are_refused():
    grid = grid_for(FP8_TENSOR, torch.bfloat16)
    separate = {n: rtn(w, grid.bind(w)) for n, w in weights().items()}  # each its own amax
    assert not torch.equal(separate["self_attn.q_proj"].scale, separate["self_attn.v_proj"].scale)
    with pytest.raises(LowbitError, match="different per-tensor weight scales"):
        check_fused("model.layers.0.", QKV, separate, input_scales())


def test_unequal_input_scales_are_refused():
    with pytest.raises(LowbitError, match="different input scales"):
        check_fused("model.layers.0.", QKV, shared_qkv(), input_scales((0.5, 0.5, 0.25)))
    missing = input_scales()
    del missing["self_attn.k_proj"]
    with pytest.raises(LowbitError, match="different input scales"):
        check_fused("model.layers.0.", QKV, shared_qkv(), missing)


def test_mixed_schemes_in_a_fused_set_are_refused():
    mixed = shared_qkv()
    mixed["self_attn.k_proj"] = rtn(weights()["self_attn.k_proj"], grid_for(FP8_CHANNEL, torch.bfloat16))
    with pytest.raises(LowbitError, match="mixes schemes"):
        check_fused("model.layers.0.", QKV, mixed, {})


# ----------------------------------------------------------------------------- atomicity


def test_a_failure_while_writing_leaves_no_out_and_no_temporary(tiny_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        with CheckpointWriter(out, tiny_dir("llama"), PRESETS["FP8"], shard_bytes=1) as w:
            w.add("model.embed_tokens.weight", torch.zeros(256, 64, dtype=torch.bfloat16))
            w.end_layer(0)
            w.add("model.norm.weight", torch.ones(64, dtype=torch.bfloat16))
            w.end_layer(1)
            assert len(list(w.tmp.glob("*.safetensors"))) == 2  # shards really were on disk
            raise RuntimeError("disk on fire")
    assert not out.exists()
    assert hidden_siblings(out) == []


def test_a_failure_while_finishing_leaves_no_out_and_no_temporary(tmp_path):
    src = tmp_path / "src"  # no config.json: the writer fails in its final step
    src.mkdir()
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError):
        with CheckpointWriter(out, src, PRESETS["FP8"]) as w:
            w.add("model.norm.weight", torch.ones(64, dtype=torch.bfloat16))
    assert not out.exists()
    assert hidden_siblings(out) == []


def test_a_failed_overwrite_leaves_the_old_out_intact(tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"old": true}\n')
    save_file({"x": torch.arange(4.0)}, str(out / "model.safetensors"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out, tiny_dir("llama"), PRESETS["FP8"], overwrite=True, shard_bytes=1) as w:
            w.add("model.norm.weight", torch.ones(64, dtype=torch.bfloat16))
            w.end_layer(0)
            raise RuntimeError("interrupted")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert hidden_siblings(out) == []


def test_a_successful_overwrite_replaces_out_whole(tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.safetensors").write_bytes(b"old")
    with CheckpointWriter(out, tiny_dir("llama"), PRESETS["FP8"], overwrite=True) as w:
        w.add("model.norm.weight", torch.ones(64, dtype=torch.bfloat16))
    assert not (out / "stale.safetensors").exists()
    assert set(tensors(out)) == {"model.norm.weight"}
    assert hidden_siblings(out) == []


def test_existing_out_without_overwrite_is_refused_before_writing(tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LowbitError, match="already exists"):
        with CheckpointWriter(out, tiny_dir("llama"), PRESETS["FP8"]):
            pass
    assert list(out.iterdir()) == [] and hidden_siblings(out) == []


# ------------------------------------------------------------------------- files on disk


def test_index_maps_every_tensor_to_its_shard_exactly_once(written):
    out = written("FP8")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) == 2  # one per decoder layer; the outer tensors go with layer 0
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    seen: list[str] = []
    for shard in shards:
        with safe_open(out / shard, "pt") as h:
            for key in h.keys():
                seen.append(key)
                assert weight_map.get(key) == shard, key
    assert len(seen) == len(set(seen)), "a tensor is stored in two shards"
    assert sorted(seen) == sorted(weight_map)
    assert set(weight_map.values()) == set(shards)


def test_shards_are_as_readable_as_config_json(written):
    out = written("FP8")
    config_mode = stat.S_IMODE((out / "config.json").stat().st_mode)
    assert config_mode & 0o044  # the test's umask lets group/others read
    for shard in out.glob("*.safetensors"):
        assert stat.S_IMODE(shard.stat().st_mode) == config_mode, shard.name


def test_group_size_that_does_not_divide_in_features_is_refused():
    from lowbit.export import check_shape
    from lowbit.schemes import QuantSpec

    g128 = QuantSpec("int", 4, "group", group_size=128)
    check_shape("ok", 64, 1536, g128)  # 12 whole groups
    with pytest.raises(LowbitError, match="not a multiple of group size 128"):
        check_shape("model.layers.0.self_attn.q_proj", 576, 576, g128)
    check_shape("channel", 576, 576, QuantSpec("fp8", 8, "channel"))



@pytest.mark.parametrize("scheme", ["FP8", "FP8_DYNAMIC", "W4A16_ASYM", "W8A8_INT8"])
def test_float32_runtime_weights_are_the_exact_products_of_codes_and_scales(scheme, written):
    # vLLM holds these scales in float32 and computes the products exactly; a runtime that
    # multiplied in the scales' bf16 rounded most weights (found by `lowbit verify` on FP8_DYNAMIC)
    out = written(scheme)
    t = tensors(out)
    name = "model.layers.0.mlp.down_proj"  # [64, 128]
    assert t[name + ".weight_scale"].dtype == torch.bfloat16
    q = stored_linear(t, name, PRESETS[scheme].weights)  # unpacked codes (the unpacking has its own tests)
    scale = t[name + ".weight_scale"].double().reshape(-1 if q.scale.dim() == 2 else 1, q.scale.shape[-1])
    zero = q.zero.double() if q.zero is not None else torch.zeros_like(scale)
    cols = 128 // scale.shape[1]  # 128 for one scale per row, the group size for groups
    exact = ((q.codes.double().reshape(64, -1, cols) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(64, 128)
    ours = load_model(out, torch.float32).state_dict()[name + ".weight"]
    assert torch.equal(ours.double(), exact)
