"""The compute dtype: float32 where bf16 is emulated, the checkpoint's dtype where it is native;
stored weights and scales keep the checkpoint's dtype either way."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lowbit import api
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.hardware import compute_dtype, cpu_isa, native_dtypes
from tiny import tensors


def _on_isa(capability: str, code: str) -> str:
    """Run `code` in a Python whose ATen kernels are limited to `capability` (as on an AVX2 CPU)."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_avx2_computes_bf16_checkpoints_in_float32():
    out = _on_isa("avx2", "import torch; from lowbit.hardware import compute_dtype, cpu_isa; "
                  "c = compute_dtype(torch.bfloat16); print(cpu_isa(), c.name, c.reason)")
    assert out.startswith("AVX2 float32 bfloat16 is emulated on this CPU (AVX2)"), out


def test_native_bf16_keeps_the_checkpoint_dtype(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert torch.bfloat16 in native_dtypes()
    assert compute_dtype(torch.bfloat16).dtype == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert cpu_isa() == "AVX512"  # AVX-512 without its BF16 extension still emulates bf16
    assert compute_dtype(torch.bfloat16).dtype == torch.float32


def test_never_less_exact_than_the_checkpoint():
    # float32 and wider checkpoints run as they are, whatever the CPU; fp16 is native on no CPU
    # without AMX-FP16, and float32 holds every fp16 value exactly
    assert compute_dtype(torch.float32).dtype == torch.float32
    assert compute_dtype(torch.float64).dtype == torch.float64
    if "AMX-FP16" not in cpu_isa():
        assert compute_dtype(torch.float16).dtype == torch.float32
    assert compute_dtype(torch.bfloat16, device="cuda").dtype == torch.bfloat16


def test_override_and_bad_choice():
    c = compute_dtype(torch.bfloat16, "float32")
    assert c.dtype == torch.float32 and "--compute-dtype float32" in c.reason
    assert compute_dtype(torch.float32, "bfloat16").dtype == torch.bfloat16
    with pytest.raises(LowbitError, match="unknown compute dtype 'fp8'"):
        compute_dtype(torch.bfloat16, "fp8")


def _stored_layout(path) -> dict:
    return {k: (v.dtype, tuple(v.shape)) for k, v in tensors(path).items()}


@pytest.mark.parametrize("scheme", ["FP8", "W4A16", "W8A8_INT8"])
def test_float32_forwards_write_the_same_format(tiny_dir, tmp_path, scheme):
    """Same tensor names, dtypes and shapes (scales in bf16) whichever dtype the forwards ran
    in; the codes differ only through the statistics, and the more exact float32 forwards give
    a model as close to the original as the bf16 ones."""
    src = tiny_dir("llama")
    runs = {c: api.quantize(src, tmp_path / c, scheme, samples=8, seq_len=32, compute=c,
                            dataset=str(_texts(tmp_path)))
            for c in ("float32", "bfloat16")}
    assert _stored_layout(tmp_path / "float32") == _stored_layout(tmp_path / "bfloat16")
    assert any(dt == torch.bfloat16 for k, (dt, _) in _stored_layout(tmp_path / "float32").items()
               if k.endswith("_scale"))
    for c, s in runs.items():
        assert s["compute_dtype"]["dtype"] == c
        report = json.loads((tmp_path / c / "lowbit_report.json").read_text())
        assert report["compute_dtype"]["dtype"] == c
    ids = torch.randint(0, 250, (4, 32), generator=torch.Generator().manual_seed(1))
    ref = api.load(src, torch.float64)(input_ids=ids).logits
    err = {c: ((api.load(tmp_path / c, torch.float64)(input_ids=ids).logits - ref).norm()
               / ref.norm()).item() for c in runs}
    assert 0 < err["float32"] <= 1.25 * err["bfloat16"], err


def test_data_free_scheme_is_byte_identical_across_compute_dtypes(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    for c in ("float32", "bfloat16"):
        api.quantize(src, tmp_path / c, "FP8_DYNAMIC", seq_len=32, compute=c)
    a, b = tensors(tmp_path / "float32"), tensors(tmp_path / "bfloat16")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_smoothed_norms_are_stored_in_the_checkpoint_dtype(tiny_dir, tmp_path):
    """SmoothQuant folds 1/s into the norms; with float32 forwards the folded norm must still be
    rounded to (and stored in) bf16, and the scale it realises is the stored one."""
    src = tiny_dir("llama")
    api.quantize(src, tmp_path / "q", "W8A8_INT8", samples=8, seq_len=32, compute="float32",
                 algorithm="rtn", smoothquant="0.5", dataset=str(_texts(tmp_path)))
    stored, orig = tensors(tmp_path / "q"), tensors(src)
    norm = "model.layers.0.input_layernorm.weight"
    assert stored[norm].dtype == torch.bfloat16
    assert not torch.equal(stored[norm], orig[norm])  # smoothing did move it


def test_cli_prints_the_choice_once(tiny_dir, tmp_path, capsys):
    assert main(["quantize", str(tiny_dir("llama")), str(tmp_path / "q"), "--scheme",
                 "FP8_DYNAMIC", "--compute-dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert out.count("computed in float32: requested (--compute-dtype float32)") == 1
    with pytest.raises(SystemExit) as usage:
        main(["quantize", str(tiny_dir("llama")), str(tmp_path / "r"), "--scheme", "FP8",
              "--compute-dtype", "fp64"])
    assert usage.value.code == 2
    assert "invalid choice: 'fp64'" in capsys.readouterr().err


def _texts(tmp_path):
    path = tmp_path / "calib.txt"
    if not path.exists():
        path.write_text("\n\n".join(f"sample {i} " + "words and more words " * 20 for i in range(40)))
    return path
