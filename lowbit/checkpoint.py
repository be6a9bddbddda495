"""The input checkpoint: config, tokenizer, and tensors read one at a time from memory-mapped
safetensors, so a model is never held whole in RAM."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from .errors import LowbitError

log = logging.getLogger(__name__)


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                      "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2}


def _read_header(path: Path) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """name -> (dtype, shape, start, end) of a safetensors file, with its layout checked.

    The format: 8-byte little-endian header length, a JSON header, then the tensor bytes.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if n <= 0 or 8 + n > size:
                raise ValueError("header length is out of range")
            header = json.loads(f.read(n))
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            count = math.prod(info["shape"])
            if end - start != count * dtype.itemsize or 8 + n + end > size:
                raise ValueError(f"tensor {name} does not fit the file (truncated?)")
            out[name] = (dtype, info["shape"], 8 + n + start, 8 + n + end)
        return out
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise LowbitError(f"cannot read {path}: not a valid safetensors file ({e})") from None


def load_tokenizer(path: str | Path):
    """The tokenizer (with its chat template) saved beside a checkpoint."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise LowbitError(f"cannot load the tokenizer of {path}: {str(e).splitlines()[0]}") from None


FINITE_CHUNK = 1 << 24  # elements summed at a time: a bf16 sum to float32 widens its input first


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value is finite. NaN and Inf propagate into a sum, so a finite float32
    sum proves it in one pass without a boolean copy; only a non-finite sum (a bad value, or
    huge finite ones overflowing) needs the elementwise scan to decide. Summed a chunk at a
    time: over a whole 13B lm_head the widened copy was 1 GB."""
    return all(bool(torch.isfinite(c.sum(dtype=torch.float32))) or bool(torch.isfinite(c).all())
               for c in t.reshape(-1).split(FINITE_CHUNK))


class Checkpoint:
    """A Hugging Face checkpoint directory (config.json + safetensors, sharded or not)."""

    def __init__(self, path: str | Path, allow_quantized: bool = False):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            what = "does not exist" if not self.path.exists() else "has no config.json"
            raise LowbitError(f"model {self.path} {what}; pass a Hugging Face checkpoint directory "
                              "(lowbit import-gguf converts a GGUF file into one)")
        try:
            self.config_dict = json.loads((self.path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise LowbitError(f"{self.path / 'config.json'} is not valid JSON: {e}") from None
        if not self.config_dict.get("architectures"):
            raise LowbitError(f"{self.path / 'config.json'} has no 'architectures' entry; "
                              "lowbit needs it to know which model class to build")
        if "quantization_config" in self.config_dict and not allow_quantized:
            method = self.config_dict["quantization_config"].get("quant_method", "?")
            raise LowbitError(f"{self.path} is already quantized ({method}); start from the "
                              "unquantized checkpoint")
        self.headers: dict[str, dict] = {}
        self.files = self._tensor_files()

    def _tensor_files(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise LowbitError(f"{index} is not a valid safetensors index: {e}") from None
        elif (self.path / "model.safetensors").is_file():
            weight_map = None
            files = ["model.safetensors"]
        else:
            raise LowbitError(f"no safetensors weights in {self.path} (expected model.safetensors "
                              "or model.safetensors.index.json)")
        if weight_map is not None:
            files = sorted(set(weight_map.values()))
        names: dict[str, str] = {}
        for file in files:
            self.headers[file] = _read_header(self.path / file)
            names.update({key: file for key in self.headers[file]})
        return names

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype as the config declares it (what consumers hold scales in)."""
        name = self.config_dict.get("torch_dtype") or self.config_dict.get("dtype") or "float32"
        return getattr(torch, name) if isinstance(getattr(torch, name, None), torch.dtype) else torch.float32

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path)

    def tokenizer(self):
        return load_tokenizer(self.path)

    def names(self) -> list[str]:
        return list(self.files)

    def tensor_info(self) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
        """name -> (dtype, shape, start, end) for every tensor, from the headers alone."""
        return {name: self.headers[file][name] for name, file in self.files.items()}

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read with a positional read into fresh memory.

        Not memory-mapped on purpose: pages of a mapping stay resident (and count in RSS) for
        as long as the file is open, which would make peak memory grow with the model.
        """
        file = self.files.get(name)
        if file is None:
            raise KeyError(name)
        dtype, shape, start, end = self.headers[file][name]
        with open(self.path / file, "rb") as f:
            buf = bytearray(end - start)
            f.seek(start)
            if f.readinto(buf) != len(buf):
                raise LowbitError(f"{self.path / file} is truncated (tensor {name} runs past its end)")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def skeleton(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The model with every parameter on the meta device (buffers real), no weights read."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        config = self.config()
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the skeleton is plain; loaders fill in real weights
        try:
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except (ValueError, KeyError) as e:
            raise LowbitError(f"transformers cannot build {config.model_type!r} as a causal LM: "
                              f"{str(e).splitlines()[0]}") from None
        return model.eval()

    def materialize(self, module: nn.Module, prefix: str, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> None:
        """Read `module`'s parameters (names under `prefix`) into real tensors of `dtype` on `device`."""
        for name, _ in list(module.named_parameters(recurse=True)):
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            self.materialize_param(owner, leaf, prefix + name, dtype, device)

    def load_outer(self, model: nn.Module, layers_path: str, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> None:
        """Materialize everything outside the decoder layers (embeddings, final norm, lm_head)."""
        prefix = layers_path + "."
        for name, module in model.named_modules():
            if name.startswith(prefix) or name == layers_path:
                continue
            own = dict(module.named_parameters(recurse=False))
            for pname in own:
                full = f"{name}.{pname}" if name else pname
                if full not in self.files and full == "lm_head.weight" and getattr(
                        model.config, "tie_word_embeddings", False):
                    continue  # tied to the embeddings below
                self.materialize_param(module, pname, full, dtype, device)
            for bname, buf in list(module.named_buffers(recurse=False)):  # rotary inv_freq and the like
                if buf is not None and buf.device.type != "meta":
                    module._buffers[bname] = buf.to(device)
        if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" not in self.files:
            model.get_output_embeddings().weight = model.get_input_embeddings().weight

    def materialize_param(self, module: nn.Module, pname: str, full: str, dtype: torch.dtype,
                          device: torch.device | str = "cpu") -> None:
        """Replace module.<pname> by checkpoint tensor `full`, checked for shape and finiteness."""
        if full not in self.files:
            raise LowbitError(f"{self.path} has no tensor {full}")
        value = self.tensor(full)
        expected = tuple(getattr(module, pname).shape)
        if tuple(value.shape) != expected:
            raise LowbitError(f"tensor {full} has shape {tuple(value.shape)}, the config implies {expected}")
        if value.is_floating_point() and not _all_finite(value):
            raise LowbitError(f"tensor {full} contains NaN or Inf; the checkpoint is corrupt")
        setattr(module, pname, nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False))
