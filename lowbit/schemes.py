"""How tensors are stored (QuantSpec) and what a run does (Scheme). Presets are a plain dict."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import LowbitError


@dataclass(frozen=True)
class QuantSpec:
    """How one kind of tensor is stored.

    format: "int" or "fp8" (the number family); bits: code width;
    granularity: "tensor" (one scale), "channel" (one per output row), "group"
    (one per `group_size` input columns of a row) or "token" (one per activation row);
    dynamic: scales computed at run time from the tensor itself (activations only).
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
    unless a later scheme says so.
    """

    name: str
    weights: QuantSpec
    inputs: QuantSpec | None = None
    kv_cache: QuantSpec | None = None
    algorithm: str = "rtn"
    ignore: tuple[str, ...] = ("lm_head",)
    description: str = ""

    def with_ignore(self, patterns: tuple[str, ...] | list[str]) -> "Scheme":
        extra = tuple(p for p in patterns if p not in self.ignore)
        return dataclasses.replace(self, ignore=self.ignore + extra)


FP8_TENSOR = QuantSpec("fp8", 8, "tensor")
FP8_CHANNEL = QuantSpec("fp8", 8, "channel")

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
}


def get_scheme(name: str) -> Scheme:
    """The preset called `name` (case-insensitive), or a LowbitError listing the valid ones."""
    scheme = PRESETS.get(name.upper())
    if scheme is None:
        raise LowbitError(f"unknown scheme {name!r}; valid schemes: {', '.join(PRESETS)}")
    return scheme
