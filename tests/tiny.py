"""Tiny random models of each supported family, and complete tiny checkpoints on disk.

Every family has the same shape (hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads,
head_dim 16, vocab 256) so a test can loop over FAMILIES; the family-specific parts (Gemma's
sliding/full layers and soft-capping, Qwen3's q/k norms, Phi-3's fused qkv_proj and
gate_up_proj) are left as each family defines them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"]

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
UNK, BOS, EOS, PAD = 0, 1, 2, 3
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256,
    bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
)
_FAMILY = {
    "llama": {},
    "mistral": dict(sliding_window=None),
    "qwen2": {},
    "qwen3": {},
    # one sliding and one full layer, window shorter than a test sequence, so both paths run
    "gemma2": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=32,
                   query_pre_attn_scalar=16),
    "gemma3_text": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=32,
                        query_pre_attn_scalar=16),
    "phi3": dict(original_max_position_embeddings=256),
}


def tiny_config(family: str) -> PretrainedConfig:
    """A tiny config of `family` (one of FAMILIES), with the token ids of `tiny_tokenizer`."""
    if family not in _FAMILY:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILIES}")
    return AutoConfig.for_model(family, **_COMMON, **_FAMILY[family])


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A randomly initialised tiny model in eval mode; the same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=dtype)
    return model.eval()


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet of byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    stand_in = {b: chr(b) for b in keep}
    stand_in.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in keep)})
    return stand_in


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, no merges, < 256 ids) with bos/eos/pad and a
    chat template.

    Byte-level, like Llama 3 and Qwen: AutoTokenizer rebuilds a qwen2 checkpoint's tokenizer as
    Qwen2Tokenizer (byte-level BPE) whatever tokenizer_config.json says, and only a byte-level
    vocabulary encodes the same after that rebuild. Bytes 0-8, 11, 12 and 14-31 are left out to
    stay under 256 ids.
    """
    stand_in = _byte_to_unicode()
    byte_list = [9, 10, 13, *range(32, 256)]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + [stand_in[b] for b in byte_list])}
    tok = Tokenizer(models.BPE(vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", chat_template=CHAT_TEMPLATE, model_max_length=256,
    )


def tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor stored in a checkpoint directory's safetensors files, by name."""
    from safetensors import safe_open

    found = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            found.update({k: h.get_tensor(k) for k in h.keys()})
    return found


def save_tiny(family: str, path: str | Path, seed: int = 0,
              dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a complete tiny checkpoint (config, generation config, tokenizer, >= 2 safetensors
    shards with an index) that AutoModelForCausalLM and AutoTokenizer load offline."""
    path = Path(path)
    model = tiny_model(family, seed=seed, dtype=dtype)
    model.save_pretrained(path, max_shard_size="64KB")
    tiny_tokenizer().save_pretrained(path)
    return path
