"""lowbit: calibrate, quantize and evaluate LLMs; writes checkpoints vLLM serves as they are.

    import lowbit
    summary = lowbit.quantize("model_dir", "out_dir", "FP8")
    metrics = lowbit.evaluate("out_dir", baseline="model_dir")
"""

from .errors import LowbitError
from .schemes import PRESETS, QuantSpec, Scheme

__all__ = ["quantize", "evaluate", "load", "Scheme", "QuantSpec", "PRESETS", "LowbitError"]
__all__ += ["generate", "stream"]


def __getattr__(name: str):
    # The API pulls in transformers and compressed-tensors; load it on first use so that
    # `lowbit --help` and error paths stay fast.
    if name in ("quantize", "evaluate", "load"):
        from . import api

        return getattr(api, name)
    if name in ("generate", "stream"):
        from .runtime import generate

        return getattr(generate, name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
