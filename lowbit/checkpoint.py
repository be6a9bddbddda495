"""The input checkpoint: config, tokenizer, and tensors read one at a time from memory-mapped
safetensors, so a model is never held whole in RAM."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .errors import LowbitError

log = logging.getLogger(__name__)


def load_tokenizer(path: str | Path):
    """The tokenizer (with its chat template) saved beside a checkpoint."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise LowbitError(f"cannot load the tokenizer of {path}: {str(e).splitlines()[0]}") from None


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
        self.files = self._tensor_files()
        self._handles: dict[str, object] = {}
        self._stack = contextlib.ExitStack()

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
            try:
                with safe_open(self.path / file, framework="pt") as f:
                    for key in f.keys():
                        names[key] = file
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise LowbitError(f"cannot read {self.path / file}: {e}") from None
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

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read from its memory-mapped file."""
        file = self.files.get(name)
        if file is None:
            raise KeyError(name)
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(
                safe_open(self.path / file, framework="pt"))
        try:
            return self._handles[file].get_tensor(name)
        except Exception as e:
            raise LowbitError(f"cannot read tensor {name} from {self.path / file}: {e}") from None

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

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

    def materialize(self, module: nn.Module, prefix: str, dtype: torch.dtype = torch.float32) -> None:
        """Read `module`'s parameters (names under `prefix`) into real CPU tensors of `dtype`."""
        for name, _ in list(module.named_parameters(recurse=True)):
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            self.materialize_param(owner, leaf, prefix + name, dtype)

    def load_outer(self, model: nn.Module, layers_path: str, dtype: torch.dtype = torch.float32) -> None:
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
                self.materialize_param(module, pname, full, dtype)
        if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" not in self.files:
            model.get_output_embeddings().weight = model.get_input_embeddings().weight

    def materialize_param(self, module: nn.Module, pname: str, full: str, dtype: torch.dtype) -> None:
        """Replace module.<pname> by checkpoint tensor `full`, checked for shape and finiteness."""
        if full not in self.files:
            raise LowbitError(f"{self.path} has no tensor {full}")
        value = self.tensor(full)
        expected = tuple(getattr(module, pname).shape)
        if tuple(value.shape) != expected:
            raise LowbitError(f"tensor {full} has shape {tuple(value.shape)}, the config implies {expected}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise LowbitError(f"tensor {full} contains NaN or Inf; the checkpoint is corrupt")
        setattr(module, pname, nn.Parameter(value.to(dtype), requires_grad=False))
