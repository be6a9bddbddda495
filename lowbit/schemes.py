"""How tensors are stored (QuantSpec) and what a run does (Scheme). Presets are a plain dict."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass

from .errors import LowbitError


@dataclass(frozen=True)
class QuantSpec:
    """How one kind of tensor is stored.

    format: "int", "fp8", "nvfp4" or "mxfp4" (the number family); bits: code width;
    granularity: "tensor" (one scale), "channel" (one per output row), "group"
    (one per `group_size` input columns of a row) or "token" (one per activation row);
    dynamic: scales computed at run time from the tensor itself (activations only). NVFP4
    inputs are not dynamic: their group scales are computed at run time, but under a global
    scale calibrated offline (compressed-tensors' dynamic "local").
    """

    format: str
    bits: int
    granularity: str
    group_size: int | None = None
    symmetric: bool = True
    dynamic: bool = False

    def __post_init__(self) -> None:
        if self.granularity == "group" and not self.group_size:
            raise ValueError("group granularity needs a group_size")


@dataclass(frozen=True)
class Scheme:
    """Weights, inputs and KV-cache specs plus the algorithm knobs and the ignore list.

    `ignore` holds module-name patterns (fnmatch-style globs, or `re:` regular expressions)
    of Linears left in their original precision; lm_head and embeddings are never quantized
    unless a later scheme says so. `overrides` maps patterns of the same kind to another
    scheme for the Linears they match (mixed precision: `scheme_for`, `with_overrides`).
    """

    name: str
    weights: QuantSpec
    inputs: QuantSpec | None = None
    kv_cache: QuantSpec | None = None
    kv_scale: str = "calibrated"  # "calibrated" (K and V share amax/448) | "unit" (1.0)
    algorithm: str = "rtn"  # "rtn" | "gptq" | "mr-gptq" (GPTQ after block-wise Hadamard rotation)
    act_order: bool = True  # GPTQ: visit columns by decreasing Hessian diagonal
    damp: float = 0.01  # GPTQ: dampening, a fraction of the Hessian's mean diagonal
    smoothing: float | str | None = None  # SmoothQuant strength alpha, "auto" (per layer), None
    sparsity: float | None = None  # SparseGPT: fraction of each Linear's weights pruned, or None
    sparsity_structure: str = "unstructured"  # "unstructured" | "2:4" (2 of every 4 inputs kept)
    ignore: tuple[str, ...] = ("lm_head",)
    description: str = ""
    overrides: tuple[tuple[str, "Scheme"], ...] = ()  # (pattern, scheme), first match wins

    @property
    def schemes(self) -> tuple["Scheme", ...]:
        """This scheme and every override's, each once."""
        out = [self]
        for _, s in self.overrides:
            if s not in out:
                out.append(s)
        return tuple(out)

    def scheme_for(self, name: str) -> "Scheme":
        """The scheme of the module `name`: the first override whose pattern matches it, else this."""
        return next((s for p, s in self.overrides if name_matches(name, (p,))), self)

    def with_overrides(self, overrides: dict[str, "Scheme"] | list[tuple[str, "Scheme"]]) -> "Scheme":
        """This scheme with `overrides` (pattern -> scheme) quantizing the Linears they match.

        An override shares this scheme's ignore list and KV cache (compressed-tensors has one
        of each per checkpoint); rotations and pruning stay uniform (one transform_config, one
        sparsity_config), so neither may differ between the schemes."""
        items = tuple(overrides.items() if isinstance(overrides, dict) else overrides)
        out = []
        for pattern, s in items:
            if self.rotation_block or s.rotation_block:
                raise LowbitError(f"override {pattern}={s.name}: mixed precision does not take mr-gptq")
            if self.sparsity is not None or s.sparsity is not None:
                raise LowbitError(f"override {pattern}={s.name}: mixed precision does not take --sparsity")
            if s.overrides:
                raise LowbitError(f"override {pattern}={s.name} has overrides of its own")
            out.append((pattern, dataclasses.replace(s, ignore=self.ignore, kv_cache=self.kv_cache,
                                                     kv_scale=self.kv_scale)))
        return dataclasses.replace(self, overrides=self.overrides + tuple(out))

    @property
    def uses_gptq(self) -> bool:
        """Whether weights are solved by GPTQ (and so need input Hessians)."""
        return self.algorithm in ("gptq", "mr-gptq")

    @property
    def rotation_block(self) -> int | None:
        """MR-GPTQ: the Hadamard block, which equals the weight group size; None without rotation."""
        return self.weights.group_size if self.algorithm == "mr-gptq" else None

    @property
    def static_inputs(self) -> bool:
        """Inputs quantized with a calibrated per-tensor scale (not computed at run time)."""
        return self.inputs is not None and not self.inputs.dynamic

    def with_ignore(self, patterns: tuple[str, ...] | list[str]) -> "Scheme":
        extra = tuple(p for p in patterns if p not in self.ignore)
        return dataclasses.replace(self, ignore=self.ignore + extra, overrides=tuple(
            (p, dataclasses.replace(s, ignore=self.ignore + extra)) for p, s in self.overrides))

    def with_options(self, *, group_size: int | None = None, algorithm: str | None = None,
                     kv_cache: str | None = None, kv_scale: str | None = None,
                     smoothing: str | None = None, sparsity: float | None = None,
                     sparsity_structure: str | None = None) -> "Scheme":
        """This scheme with another weight group size, algorithm, KV cache or sparsity, validated."""
        scheme = self
        if sparsity is not None or sparsity_structure is not None:
            structure = sparsity_structure or ("2:4" if sparsity is None else "unstructured")
            if sparsity is None and structure == "2:4":
                sparsity = 0.5  # 2:4 says the fraction itself
            if sparsity is None:
                raise LowbitError(f"--sparsity-structure {structure} needs --sparsity (e.g. 0.5)")
            check_sparsity(sparsity, structure)
            scheme = dataclasses.replace(scheme, sparsity=sparsity, sparsity_structure=structure)
        if kv_cache is not None:
            if kv_cache not in KV_CACHES:
                raise LowbitError(f"unknown KV cache format {kv_cache!r}; valid: {', '.join(KV_CACHES)}")
            scheme = dataclasses.replace(scheme, kv_cache=KV_CACHES[kv_cache])
        if smoothing is not None:
            scheme = dataclasses.replace(scheme, smoothing=_parse_smoothing(smoothing))
        if kv_scale is not None:
            if kv_scale not in ("calibrated", "unit"):
                raise LowbitError(f"unknown KV scale {kv_scale!r}; valid: calibrated, unit")
            if scheme.kv_cache is None:
                raise LowbitError("--kv-scale needs a quantized KV cache (--kv-cache fp8)")
            scheme = dataclasses.replace(scheme, kv_scale=kv_scale)
        if algorithm is not None:
            if algorithm not in ALGORITHMS:
                raise LowbitError(f"unknown algorithm {algorithm!r}; valid: {', '.join(ALGORITHMS)}")
            scheme = dataclasses.replace(scheme, algorithm=algorithm)
        if group_size is not None:
            if scheme.weights.format != "int":
                raise LowbitError(f"--group-size applies to INT weight schemes, not {self.name}")
            if group_size < 1:
                raise LowbitError(f"--group-size must be positive, got {group_size}")
            weights = dataclasses.replace(scheme.weights, granularity="group", group_size=group_size)
            scheme = dataclasses.replace(scheme, weights=weights)
        g = scheme.weights.group_size
        if scheme.algorithm == "mr-gptq" and (scheme.weights.granularity != "group" or g & (g - 1)):
            raise LowbitError(f"--algorithm mr-gptq rotates blocks of the weight group size, so it needs "
                              f"group-wise weights with a power-of-two group size; {self.name} has "
                              f"{scheme.weights.granularity} weights" + (f" in groups of {g}" if g else ""))
        if scheme.algorithm == "mr-gptq" and scheme.smoothing is not None:
            raise LowbitError("--algorithm mr-gptq rotates the inputs SmoothQuant would scale; "
                              "use one of them (--smoothquant off)")
        return scheme


def name_matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Globs match the full module name or a dotted suffix of it ("down_proj", "mlp.*",
    "model.layers.0.*"); `re:` patterns use re.fullmatch on the full name."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p):
            return True
    return False


ALGORITHMS = ("rtn", "gptq", "mr-gptq")
SPARSITY_STRUCTURES = ("unstructured", "2:4")


def check_sparsity(sparsity: float, structure: str) -> None:
    """A pruned fraction strictly inside (0, 1), and exactly half for 2:4."""
    if structure not in SPARSITY_STRUCTURES:
        raise LowbitError(f"unknown sparsity structure {structure!r}; valid: {', '.join(SPARSITY_STRUCTURES)}")
    if not 0 < sparsity < 1:
        raise LowbitError(f"--sparsity must be strictly between 0 and 1, got {sparsity}")
    if structure == "2:4" and sparsity != 0.5:
        raise LowbitError(f"2:4 sparsity prunes exactly half of the weights; --sparsity {sparsity} "
                          "asks for another fraction (use 0.5, or --sparsity-structure unstructured)")


def _parse_smoothing(text: str) -> float | str | None:
    """'off' -> None, 'auto' -> 'auto', a number in [0, 1] -> alpha."""
    if text in ("off", "auto"):
        return None if text == "off" else text
    try:
        alpha = float(text)
    except ValueError:
        alpha = -1.0
    if not 0 <= alpha <= 1:
        raise LowbitError(f"--smoothquant takes auto, off or a strength in [0, 1], not {text!r}")
    return alpha


FP8_TENSOR = QuantSpec("fp8", 8, "tensor")
INT4_G128 = QuantSpec("int", 4, "group", group_size=128)
# vLLM accepts only FP8, per-tensor, symmetric, static KV-cache schemes
KV_CACHES = {"fp8": FP8_TENSOR}
FP8_CHANNEL = QuantSpec("fp8", 8, "channel")
NVFP4_G16 = QuantSpec("nvfp4", 4, "group", group_size=16)
MXFP4_G32 = QuantSpec("mxfp4", 4, "group", group_size=32)

PRESETS: dict[str, Scheme] = {
    "FP8": Scheme(
        "FP8",
        weights=FP8_TENSOR,
        inputs=FP8_TENSOR,
        description="W8A8 FP8 E4M3, static per-tensor weight and input scales from calibration "
        "(MLPerf recipe: fused q/k/v and gate/up share one scale)",
    ),
    "FP8_DYNAMIC": Scheme(
        "FP8_DYNAMIC",
        weights=FP8_CHANNEL,
        inputs=QuantSpec("fp8", 8, "token", dynamic=True),
        description="W8A8 FP8 E4M3, per-channel weight scales, per-token input scales at run time",
    ),
    "W8A16_FP8": Scheme(
        "W8A16_FP8",
        weights=FP8_CHANNEL,
        description="FP8 E4M3 per-channel weights only; activations stay 16-bit (Marlin FP8 kernel)",
    ),
    "W4A16": Scheme(
        "W4A16",
        weights=INT4_G128,
        algorithm="gptq",
        description="INT4 symmetric weights, group 128, GPTQ; activations stay 16-bit (Marlin/Machete)",
    ),
    "W4A16_ASYM": Scheme(
        "W4A16_ASYM",
        weights=dataclasses.replace(INT4_G128, symmetric=False),
        algorithm="gptq",
        description="INT4 asymmetric weights (scale + zero point), group 128, GPTQ",
    ),
    "W8A16": Scheme(
        "W8A16",
        weights=QuantSpec("int", 8, "channel"),
        algorithm="gptq",
        description="INT8 symmetric per-channel weights, GPTQ; activations stay 16-bit",
    ),
    "W8A8_INT8": Scheme(
        "W8A8_INT8",
        weights=QuantSpec("int", 8, "channel"),
        inputs=QuantSpec("int", 8, "token", dynamic=True),
        smoothing="auto",
        description="INT8 per-channel weights, INT8 per-token inputs at run time, AutoSmoothQuant",
    ),
    "NVFP4": Scheme(
        "NVFP4",
        weights=NVFP4_G16,
        inputs=NVFP4_G16,
        algorithm="gptq",
        description="W4A4 NVFP4: E2M1 weights and inputs in groups of 16 with FP8 E4M3 group scales "
        "under an FP32 global scale (inputs: calibrated global, group scales at run time), GPTQ",
    ),
    "NVFP4A16": Scheme(
        "NVFP4A16",
        weights=NVFP4_G16,
        algorithm="gptq",
        description="NVFP4 weights only (E2M1, group 16, E4M3 scales, FP32 global scale), GPTQ",
    ),
    "MXFP4": Scheme(
        "MXFP4",
        weights=MXFP4_G32,
        inputs=dataclasses.replace(MXFP4_G32, dynamic=True),
        algorithm="gptq",
        description="W4A4 MXFP4: E2M1 weights and inputs in groups of 32 with power-of-two E8M0 "
        "scales (inputs' at run time), GPTQ; --algorithm mr-gptq adds Hadamard rotations",
    ),
    "MXFP4A16": Scheme(
        "MXFP4A16",
        weights=MXFP4_G32,
        algorithm="gptq",
        description="MXFP4 weights only (E2M1, group 32, E8M0 scales), GPTQ",
    ),
}


def get_scheme(name: str) -> Scheme:
    """The preset called `name` (case-insensitive), or a LowbitError listing the valid ones."""
    scheme = PRESETS.get(name.upper())
    if scheme is None:
        raise LowbitError(f"unknown scheme {name!r}; valid schemes: {', '.join(PRESETS)}")
    return scheme
