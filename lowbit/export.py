"""CheckpointWriter: the only code that knows compressed-tensors names.

Tensors arrive layer by layer and are flushed to numbered shards as they fill, inside a
temporary sibling directory renamed over OUT at the end, so memory holds at most one shard
and a failed run leaves nothing that looks like a checkpoint. Codes are packed as the
algorithm produced them; nothing is rounded here.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import struct
from pathlib import Path

from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from .checkpoint import SAFETENSORS_DTYPES
from .errors import LowbitError
from .formats.grid import Quantized
from .formats.pack import pack_fp4, pack_int32
from .outdir import atomic_dir, writing
from .partial import MANIFEST, fsync_path, partial_dir
from .schemes import QuantSpec, Scheme

if TYPE_CHECKING:  # the library is imported where a config is built: it takes ~2 s to import
    from compressed_tensors.quantization import QuantizationArgs

# Files of the source directory that describe weights; everything else (tokenizer, chat
# template, generation config) is copied through.
_WEIGHT_FILES = ("config.json", "model.safetensors.index.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def quant_args(spec: QuantSpec, inputs: bool = False, actorder: str | None = None) -> QuantizationArgs:
    """Our QuantSpec (of weights, or of `inputs`) as the library's QuantizationArgs (what vLLM parses)."""
    from compressed_tensors.quantization import QuantizationArgs

    if spec.format in ("nvfp4", "mxfp4"):
        # as the library's NVFP4/MXFP4 presets: NVFP4 is "tensor_group" (group scales under a
        # global scale; inputs: calibrated global, group scales at run time = dynamic "local")
        nv = spec.format == "nvfp4"
        scale_dtype = torch.float8_e4m3fn if nv else torch.uint8
        return QuantizationArgs(
            num_bits=4, type="float", symmetric=True, group_size=spec.group_size,
            strategy="tensor_group" if nv else "group",
            dynamic="local" if nv and inputs else spec.dynamic,
            scale_dtype=scale_dtype, zp_dtype=scale_dtype,
        )
    return QuantizationArgs(
        num_bits=spec.bits,
        type="float" if spec.format == "fp8" else "int",
        symmetric=spec.symmetric,
        strategy=spec.granularity,
        group_size=spec.group_size,
        dynamic=spec.dynamic,
        actorder=actorder,
    )


def weight_actorder(scheme: Scheme) -> str | None:
    """GPTQ's activation ordering as the config records it.

    lowbit's act-order keeps groups in storage order ("static groups"), which the library
    calls "weight" ordering: it changes how GPTQ visits columns, not the stored layout, so no
    weight_g_idx is written and vLLM runs its fast kernels. ("group" ordering needs g_idx, is
    slower to serve and is rejected by recent vLLM.)
    """
    if scheme.algorithm == "gptq" and scheme.act_order and scheme.weights.granularity == "group":
        return "weight"
    return None


def compression_format(scheme: Scheme) -> str:
    """The compressed-tensors format vLLM expects for this combination."""
    w = scheme.weights
    if w.format == "fp8":
        # FP8 weight-only (W8A16, Marlin) is read as naive-quantized, W8A8 as float-quantized
        return "float-quantized" if scheme.inputs is not None else "naive-quantized"
    if w.format == "int" and w.bits == 8 and scheme.inputs is not None:
        return "int-quantized"
    if w.format == "int" and scheme.inputs is None:
        return "pack-quantized"  # vLLM's WNA16 kernels read only this format
    if w.format in ("nvfp4", "mxfp4"):
        return f"{w.format}-pack-quantized"
    raise LowbitError(f"no compressed-tensors export for scheme {scheme.name}")


def _group(scheme: Scheme, targets: list[str], own_format: bool):
    from compressed_tensors.quantization import QuantizationScheme

    return QuantizationScheme(
        targets=targets,
        weights=quant_args(scheme.weights, actorder=weight_actorder(scheme)),
        input_activations=quant_args(scheme.inputs, inputs=True) if scheme.inputs else None,
        format=compression_format(scheme) if own_format else None,
    )


def layer_targets(names: list[str]) -> list[str]:
    r"""`re:` targets naming exactly the Linears `names`, one per decoder layer
    ("re:model\.layers\.3\.(self_attn\.q_proj|...)$"). compressed-tensors and vLLM try a
    module's name against name and regex targets before class names ("Linear"), so these beat
    the base group's "Linear"; vLLM matches a fused qkv_proj when all its shards match."""
    layers: dict[str, list[str]] = {}
    for n in sorted(names):
        m = re.match(r"(.*\.layers\.\d+\.)(.*)$", n)
        head, tail = (m.group(1), m.group(2)) if m else (n, "")
        layers.setdefault(head, []).append(tail)
    return [f"re:{re.escape(head)}" + (f"({'|'.join(map(re.escape, tails))})$" if tails != [""] else "$")
            for head, tails in layers.items()]


def quantization_config(scheme: Scheme, ignore: list[str], linears: list[str] = ()) -> dict:
    """The config.json `quantization_config` block, built with the library's own models.

    With overrides (mixed precision) `linears` are the quantized Linears' names: the base
    scheme targets "Linear" and each override scheme that quantized some of them gets a
    config group of its own whose targets name them; each group records its format (the
    global one is "mixed-precision" when they differ)."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    groups, formats = {"group_0": (scheme, ["Linear"])}, {compression_format(scheme)}
    for n, override in enumerate(scheme.schemes[1:], 1):
        mine = [x for x in linears if scheme.scheme_for(x) == override]
        if mine:
            groups[f"group_{n}"] = (override, layer_targets(mine))
            formats.add(compression_format(override))
    mixed = len(groups) > 1
    config = QuantizationConfig(
        config_groups={k: _group(s, t, mixed) for k, (s, t) in groups.items()},
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=ignore,
        kv_cache_scheme=quant_args(scheme.kv_cache) if scheme.kv_cache else None,
    )
    out = {"version": compressed_tensors.__version__, **config.model_dump(mode="json")}
    if scheme.rotation_block:
        out["transform_config"] = transform_config(scheme.rotation_block, ignore)
    return out


def transform_config(block: int, ignore: list[str]) -> dict:
    """MR-GPTQ's rotation as the library's TransformConfig: a block-diagonal Hadamard (head_dim =
    block) that runtimes apply online to every quantized Linear's input, and its inverse on the
    weight's input side, fused offline (W -> W R): x R (W R)ᵀ = x Wᵀ."""
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    scheme = TransformScheme(type="hadamard", head_dim=block, apply=[
        TransformArgs(targets=["Linear"], location="input", ignore=ignore),
        TransformArgs(targets=["Linear"], location="weight_input", inverse=True, ignore=ignore),
    ])
    return TransformConfig(config_groups={"micro_rotation": scheme}).model_dump(mode="json")


def sparsity_config(scheme: Scheme, ignore: list[str], global_sparsity: float) -> dict:
    """The `sparsity_config` block of a pruned checkpoint, built with the library's model.

    Always the `dense` format: the pruned zeros are stored like any other code. No consumer
    can read a sparse-compressed layout any more: compressed-tensors 0.20 has no sparse
    compressors (transformers could not load one), vLLM dropped Marlin-24 (W4A16 2:4) in 0.15
    and the CUTLASS 2:4 path (FP8/INT8 2:4) in 0.19. `targets` stays unset (in the library's
    terms: every layer the quantization targets, less `ignore`) because current vLLM refuses
    any sparsity_config with targets ("Sparsity support has been removed"), and older vLLM
    would route FP8/INT8 2:4 to its removed kernel; unset, every version loads the checkpoint
    as the dense quantized model it is. global_sparsity: the fraction of zeros among the
    weights of the pruned Linears.
    """
    from compressed_tensors.config import DenseSparsityConfig

    config = DenseSparsityConfig(sparsity_structure=scheme.sparsity_structure,
                                 global_sparsity=round(global_sparsity, 6), ignore=ignore)
    return config.model_dump(mode="json")


def check_shape(name: str, out_features: int, in_features: int, spec: QuantSpec) -> None:
    """Refuse shapes vLLM's kernels cannot take. Group scales need in_features to split into
    whole groups (vLLM's Marlin and Machete kernels reject a partial group; they pad tile
    misalignment themselves). Tensor and channel scales fit any shape."""
    if spec.granularity == "group" and in_features % spec.group_size:
        raise LowbitError(f"{name}: in_features {in_features} is not a multiple of group size "
                          f"{spec.group_size}; vLLM cannot serve it (pick a group size that divides it)")


def check_fused(prefix: str, sets: list[tuple[str, ...]], quantized: dict[str, Quantized],
                input_scales: dict[str, torch.Tensor]) -> None:
    """Refuse what vLLM would reject or silently requantize: it runs q/k/v (and gate/up) as one
    matmul, so a fused set is quantized whole or not at all, with one scheme and, for per-tensor
    scales, one weight scale and one input scale."""
    for s in sets:
        names = ", ".join(prefix + n for n in s)
        done = [n for n in s if n in quantized]
        if done and len(done) < len(s):
            raise LowbitError(f"the fused set {names} is only partly quantized; vLLM runs it as one "
                              "matmul, so quantize (or --ignore) all of them")
        if not done:
            continue
        first = quantized[s[0]]
        for n in s[1:]:
            q = quantized[n]
            if q.grid.spec != first.grid.spec:
                raise LowbitError(f"the fused set {names} mixes schemes")
            if first.grid.spec.granularity == "tensor" and not torch.equal(q.scale, first.scale):
                raise LowbitError(f"the fused set {names} has different per-tensor weight scales")
            a, b = input_scales.get(s[0]), input_scales.get(n)
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                raise LowbitError(f"the fused set {names} has different input scales")


_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}  # the reader's table, inverted


def save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file a tensor at a time: an 8-byte little-endian header length, the
    JSON header (padded to 8 bytes), then each tensor's raw bytes in header order.

    safetensors' own save_file serializes the whole file in memory before writing: for the
    shard holding layer 0 with the embeddings and lm_head of a 13B model that was 1.2 GB on
    top of the peak. Tensors go largest element first, as the library orders them for alignment.
    """
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict = {"__metadata__": metadata}
    offset = 0
    for n in names:
        t = tensors[n]
        size = t.numel() * t.element_size()
        header[n] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:  # mode 0o666 & ~umask, as every other file we write
        f.write(struct.pack("<Q", len(raw)) + raw)
        for n in names:
            f.write(tensors[n].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


class CheckpointWriter:
    """Streams a compressed-tensors checkpoint into OUT. Use as a context manager.

    With a `fingerprint` (what identifies the run: arguments, input, software) the writer is
    resumable: every end_layer() writes that layer's shard, fsyncs it and commits the layer in
    the work directory's manifest, and a writer opened later with the same fingerprint starts
    with those layers done (`layers_done`, `resumed_report`, `stored()`).
    """

    def __init__(self, out: str | Path, source: str | Path, scheme: Scheme, *,
                 overwrite: bool = False, shard_bytes: int = 128 * 2**20,
                 fingerprint: dict | None = None):
        self.out, self.source, self.scheme = Path(out), Path(source), scheme
        self.shard_bytes = shard_bytes
        self.format = compression_format(scheme)
        self.fingerprint = fingerprint
        self._dir_ctx = (atomic_dir(self.out, overwrite) if fingerprint is None else
                         partial_dir(self.out, fingerprint, overwrite, keep=self._resumable))
        self._partial = None
        self._write_failed = False
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._shards: list[list[str]] = []
        self._ignored: list[str] = []
        self._files: dict[str, str] = {}
        self._report: list = []
        self.tensor_bytes = 0
        self._pruned = [0, 0]  # pruned weights, weights of pruned Linears
        self.layers_done = 0
        self.resumed_report: list = []

    def __enter__(self) -> "CheckpointWriter":
        opened = self._dir_ctx.__enter__()
        if self.fingerprint is None:
            self.tmp = opened
        else:
            self._partial, self.tmp = opened, opened.path
            try:
                self._resume(opened.state)
            except BaseException as e:
                self._dir_ctx.__exit__(type(e), e, e.__traceback__)
                raise
        return self

    def _resume(self, state: dict) -> None:
        """Take over the committed layers of an earlier run; remove whatever it left past them."""
        self.layers_done = state["layers_done"]
        self._shards = state.get("shards", [])
        self._ignored = state.get("ignored", [])
        self.tensor_bytes = state.get("tensor_bytes", 0)
        self._report = state.get("report", [])
        self.resumed_report = list(self._report)
        self._tidy()

    def _tidy(self) -> None:
        """Leave only the manifest and the committed shards, under their working names (a run
        stopped while finishing has renamed some and written index and config)."""
        keep = {MANIFEST}
        for k in range(1, len(self._shards) + 1):
            shard = self.tmp / f"shard-{k:05d}.safetensors"
            for final in [] if shard.exists() else self.tmp.glob(f"model-{k:05d}-of-*.safetensors"):
                final.rename(shard)  # renamed by a run killed while finishing
            if not shard.exists():
                raise LowbitError(f"{self.tmp} has lost {shard.name}; pass --overwrite to start over")
            keep.add(shard.name)
        for f in self.tmp.iterdir():
            if f.name not in keep:
                f.unlink()

    def _resumable(self, exc: BaseException, state: dict) -> bool:
        """Whether to keep the work directory after `exc`: a rerun can continue it when the run
        was interrupted or the disk failed, and something was committed."""
        return state["layers_done"] > 0 and (isinstance(exc, KeyboardInterrupt) or self._write_failed)

    @contextlib.contextmanager
    def _writing(self):
        try:
            with writing(self.out):
                yield
        except LowbitError as e:
            self._write_failed = True
            if self._partial is not None and self.layers_done:
                raise LowbitError(f"{e} (layers 0-{self.layers_done - 1} are kept: rerun the same "
                                  "command to resume)") from None
            raise

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self._finish()
            except BaseException as e:
                if self._partial is not None and self._resumable(e, self._partial.state):
                    with contextlib.suppress(OSError, LowbitError):
                        self._tidy()  # kept for a rerun: nothing in it may look like a checkpoint
                self._dir_ctx.__exit__(type(e), e, e.__traceback__)
                raise
        return self._dir_ctx.__exit__(exc_type, exc, tb)

    def stored(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every committed tensor whose name starts with `prefix`, read back from its shard."""
        found = {}
        for k, names in enumerate(self._shards, 1):
            mine = [n for n in names if n.startswith(prefix)]
            if mine:
                with safe_open(self.tmp / f"shard-{k:05d}.safetensors", "pt") as f:
                    found.update({n: f.get_tensor(n) for n in mine})
        return found

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """An unquantized tensor, stored as is."""
        if name in self._buffer or any(name in s for s in self._shards):
            raise ValueError(f"tensor {name} written twice")
        tensor = tensor.detach().cpu().contiguous()
        self._buffer[name] = tensor
        self._buffered += tensor.numel() * tensor.element_size()

    def add_linear(self, prefix: str, q: Quantized, input_scale: torch.Tensor | None = None) -> None:
        """One quantized Linear: its codes (packed as the format wants) plus their scales."""
        if q.mask is not None:
            self._pruned[0] += int(q.mask.sum())
            self._pruned[1] += q.mask.numel()
        fmt = compression_format(self.scheme.scheme_for(prefix))  # mixed precision: per Linear
        if fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
            self.add(f"{prefix}.weight_packed", pack_fp4(q.codes))
            if q.grid.tensor_scale is not None:  # NVFP4: reciprocal global scale, float32 [1]
                self.add(f"{prefix}.weight_global_scale", q.grid.tensor_scale.float().reshape(1).clone())
        elif fmt == "pack-quantized":
            bits = q.grid.spec.bits
            self.add(f"{prefix}.weight_packed", pack_int32(q.codes, bits))
            self.add(f"{prefix}.weight_shape", torch.tensor(q.codes.shape, dtype=torch.int64))
            if q.zero is not None:  # zero points are packed along the output dimension
                self.add(f"{prefix}.weight_zero_point", pack_int32(q.zero, bits, dim=0))
        else:
            self.add(f"{prefix}.weight", q.codes)
        # fused Linears share one scale tensor; each gets its own copy on disk
        self.add(f"{prefix}.weight_scale", q.scale.clone())
        if input_scale is not None:
            # an NVFP4 input's calibrated scale is its global scale; group scales come at run time
            name = "input_global_scale" if fmt == "nvfp4-pack-quantized" else "input_scale"
            self.add(f"{prefix}.{name}", input_scale.clone())

    def skip_linear(self, name: str) -> None:
        """A Linear left unquantized: listed in the config's ignore list."""
        self._ignored.append(name)

    def add_file(self, name: str, text: str) -> None:
        self._files[name] = text

    def end_layer(self, index: int, report: list | tuple = ()) -> None:
        """Layer `index` is complete; `report` (JSON-able rows) is kept with it for a resume.
        Every layer gets its own shard (so a resumable run and any other, a torchrun one
        included, write the same files); a resumable writer also commits it."""
        self._report.extend(report)
        if self._partial is None:
            with writing(self.out):
                self._flush()
            return
        with self._writing():
            self._flush()
            self._partial.commit({**self._partial.state, "layers_done": index + 1,
                                  "shards": self._shards, "ignored": self._ignored,
                                  "tensor_bytes": self.tensor_bytes, "report": self._report})
        self.layers_done = index + 1

    def _flush(self) -> None:
        if not self._buffer:
            return
        path = self.tmp / f"shard-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._buffer, path, metadata={"format": "pt"})
        if self._partial is not None:
            fsync_path(path)  # on disk before the manifest says so
        self.tensor_bytes += sum(t.numel() * t.element_size() for t in self._buffer.values())
        self._shards.append(sorted(self._buffer))
        self._buffer, self._buffered = {}, 0

    def _finish(self) -> None:
        config = json.loads((self.source / "config.json").read_text())
        ignore = sorted(set(self._ignored) | {"lm_head"})
        # the quantized Linears, from the committed shards (so a resumed run counts them all)
        linears = sorted(n[: -len(".weight_scale")] for names in [*self._shards, self._buffer]
                         for n in names if n.endswith(".weight_scale"))
        config["quantization_config"] = quantization_config(self.scheme, ignore, linears)
        if self.scheme.sparsity is not None:
            pruned, total = self._pruned
            config["quantization_config"]["sparsity_config"] = sparsity_config(
                self.scheme, ignore, pruned / total if total else 0.0)
        copied = [f for f in sorted(self.source.iterdir())
                  if f.is_file() and f.name not in _WEIGHT_FILES and not f.name.endswith(_WEIGHT_SUFFIXES)]
        with self._writing():
            self._flush()
            n = len(self._shards)
            weight_map = {}
            for k, names in enumerate(self._shards, 1):
                final = f"model-{k:05d}-of-{n:05d}.safetensors"
                (self.tmp / f"shard-{k:05d}.safetensors").rename(self.tmp / final)
                weight_map.update({name: final for name in names})
            index = {"metadata": {"total_size": self.tensor_bytes},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            for f in copied:
                shutil.copyfile(f, self.tmp / f.name)
            for name, text in self._files.items():
                (self.tmp / name).write_text(text)
