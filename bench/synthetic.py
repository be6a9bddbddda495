"""Synthetic checkpoints with a real architecture's shapes (random weights), written layer by
layer as sharded safetensors with an index: the memory and I/O behaviour of the real thing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
# Llama-3.2-1B's layer shapes (16 layers of 2048/8192, GQA 32/8 heads); its vocabulary and tied
# embeddings are not copied: write_llama takes the vocabulary of the tokenizer it is given
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)


def layer_tensors(i: int, cfg: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h),
              "mlp.down_proj": (h, f)}
    p = f"model.layers.{i}."
    out = {p + n + ".weight": (torch.randn(s, generator=gen) * s[1] ** -0.5).bfloat16()
           for n, s in shapes.items()}
    out[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    out[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    return out


def write_llama(out: Path, layers: int, tokenizer_dir: Path, shape: dict = LLAMA_7B,
                distinct: bool = True) -> int:
    """Write a Llama checkpoint with `layers` decoder layers; returns its size in bytes.

    distinct=False draws one layer's random weights and stores them under every layer's
    names: the same bytes on disk and in memory per layer, without drawing tens of GB of
    random numbers (which takes longer than quantizing them).
    """
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tok_cfg = json.loads((tokenizer_dir / "config.json").read_text())
    cfg = dict(shape, vocab_size=tok_cfg["vocab_size"], num_hidden_layers=layers,
               architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
               tie_word_embeddings=False, torch_dtype="bfloat16", rope_theta=10000.0,
               bos_token_id=tok_cfg.get("bos_token_id"), eos_token_id=tok_cfg.get("eos_token_id"))
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    shards = [("outer", None)] + [(f"layer{i}", i) for i in range(layers)]
    for k, (tag, i) in enumerate(shards, 1):
        if i is None:
            v, h = cfg["vocab_size"], cfg["hidden_size"]
            tensors = {"model.embed_tokens.weight": (torch.randn(v, h, generator=gen) * 0.02).bfloat16(),
                       "lm_head.weight": (torch.randn(v, h, generator=gen) * 0.02).bfloat16(),
                       "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
        elif distinct or i == 0:
            tensors = layer_tensors(i, cfg, gen)
            first = tensors
        else:
            tensors = {k.replace("model.layers.0.", f"model.layers.{i}.", 1): v for k, v in first.items()}
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        total += (out / name).stat().st_size
        weight_map.update({t: name for t in tensors})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.suffix == ".jinja":
            shutil.copyfile(f, out / f.name)
    return total


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="write a synthetic Llama checkpoint (random weights)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer", type=Path, required=True, help="a checkpoint to take the tokenizer from")
    ap.add_argument("--shape", choices=["1b", "7b"], default="1b")
    ap.add_argument("--layers", type=int, default=16)
    a = ap.parse_args()
    size = write_llama(a.out, a.layers, a.tokenizer, LLAMA_1B if a.shape == "1b" else LLAMA_7B)
    print(f"wrote {a.out}: {size / 2**30:.2f} GiB")
