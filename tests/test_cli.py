"""The command line as a user meets it: `lowbit quantize` and `lowbit eval` on tiny checkpoints,
one-line errors with exit code 2, and the Python API that the CLI mirrors."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit import api
from lowbit.cli import main
from lowbit.schemes import PRESETS
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tiny import tensors, tiny_config, tiny_model, tiny_tokenizer

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex jumbo plums "
         "and every model learns to predict the next byte of text").split()
ARGS = ["--samples", "4", "--seq-len", "32"]  # small enough for a tiny model to run in a second
EVAL_ARGS = ["--windows", "2", "--seq-len", "32"]


def sentence(rng: random.Random, n: int = 24) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """A .jsonl of 40 text/messages records (calibration) and a .txt of 200 records (evaluation)."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    lines = []
    for i in range(40):
        if i % 4 == 0:  # some conversations, rendered through the tiny chat template
            lines.append({"messages": [{"role": "user", "content": sentence(rng, 8)},
                                       {"role": "assistant", "content": sentence(rng, 16)}]})
        else:
            lines.append({"text": f"{sentence(rng)} {sentence(rng)}"})
    (root / "calib.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (root / "eval.txt").write_text("".join(f"{sentence(rng)}\n{sentence(rng)}\n\n" for _ in range(200)))
    return {"jsonl": root / "calib.jsonl", "txt": root / "eval.txt"}


def run_cli(*argv) -> tuple[int, str, str]:
    """lowbit.cli.main(argv) with its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse: --help, usage errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def quantize_args(src, out, data, *extra):
    return ["quantize", src, out, "--scheme", "FP8", "--dataset", data, *ARGS, *extra]




def hidden_siblings(path: Path) -> list[str]:
    """Temporary or backup directories an interrupted write could leave next to OUT."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def quantized(tiny_dir, datasets, tmp_path_factory):
    """`lowbit quantize tiny-llama OUT --scheme FP8 --json`, run once: (code, stdout, stderr, OUT)."""
    out = tmp_path_factory.mktemp("cli") / "llama-fp8"
    code, stdout, stderr = run_cli(*quantize_args(tiny_dir("llama"), out, datasets["jsonl"], "--json"))
    return code, stdout, stderr, out


# ---------------------------------------------------------------------------------- quantize


def test_quantize_writes_a_compressed_tensors_checkpoint_and_a_report(quantized):
    code, stdout, stderr, out = quantized
    assert code == 0, stderr
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["quantization_config"]["format"] == "float-quantized"
    report = json.loads((out / "lowbit_report.json").read_text())
    errors = [row["rel_error"] for row in report["layers"]]
    assert errors == sorted(errors, reverse=True), "layers must be listed worst first"
    assert all(0 < e < 0.2 for e in errors)


def test_report_names_every_quantized_linear(quantized):
    out = quantized[3]
    report = json.loads((out / "lowbit_report.json").read_text())
    named = [row["name"] for row in report["layers"]]
    model = tiny_model("llama")
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert len(linears) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert sorted(named) == sorted(linears)
    stored = {k[: -len(".weight_scale")] for k in tensors(out) if k.endswith(".weight_scale")}
    assert stored == linears


def test_quantize_json_output_is_the_report_plus_run_facts(quantized):
    code, stdout, _, out = quantized
    summary = json.loads(stdout)
    report = json.loads((out / "lowbit_report.json").read_text())
    assert set(report) <= set(summary)
    assert {"scheme", "layers", "samples", "calibration_tokens", "size_bytes", "seconds"} <= set(summary)
    assert summary["layers"] == report["layers"]
    assert summary["scheme"] == "FP8"
    assert summary["samples"] == 4 and 0 < summary["calibration_tokens"] <= 4 * 32
    assert summary["size_bytes"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert summary["size_bytes"] < summary["source_size_bytes"]


def test_quantize_without_json_prints_a_human_summary(tiny_dir, datasets, tmp_path):
    code, stdout, stderr = run_cli(*quantize_args(tiny_dir("llama"), tmp_path / "q", datasets["jsonl"]))
    assert code == 0, stderr
    assert stdout.startswith("quantized ")
    assert "calibration: 4 samples" in stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(stdout)


# ------------------------------------------------------------------------------------ errors


def _missing_model(src, out, data, tmp):
    return quantize_args(tmp / "no-such-model", out, data["jsonl"]), "does not exist"


def _unknown_scheme(src, out, data, tmp):
    argv = ["quantize", src, out, "--scheme", "INT3", "--dataset", data["jsonl"], *ARGS]
    return argv, "valid schemes: " + ", ".join(PRESETS)


def _existing_out(src, out, data, tmp):
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    return quantize_args(src, out, data["jsonl"]), "--overwrite"


def _seq_len_too_long(src, out, data, tmp):
    argv = ["quantize", src, out, "--scheme", "FP8", "--dataset", data["jsonl"],
            "--samples", "4", "--seq-len", "257"]
    return argv, "maximum of 256 positions"


def _nothing_usable(src, out, data, tmp):
    bad = tmp / "bad.jsonl"
    bad.write_text('{"prompt": "no text key"}\nnot json at all\n{"text": "   "}\n[1, 2]\n')
    return quantize_args(src, out, bad), "no usable records"


def _unknown_extension(src, out, data, tmp):
    csv = tmp / "data.csv"
    csv.write_text("text\nhello world\n")
    return quantize_args(src, out, csv), "unknown extension '.csv'"


def _unknown_device(src, out, data, tmp):
    return quantize_args(src, out, data["jsonl"], "--device", "tpu"), "unknown device 'tpu'"


def _gpu_missing(src, out, data, tmp):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    return quantize_args(src, out, data["jsonl"], "--device", "cuda"), "torch sees no CUDA GPU"


def _mr_gptq_without_groups(src, out, data, tmp):
    argv = ["quantize", src, out, "--scheme", "FP8", "--algorithm", "mr-gptq", "--dataset", data["jsonl"], *ARGS]
    return argv, "power-of-two group size"


def _override_unknown_scheme(src, out, data, tmp):
    return quantize_args(src, out, data["jsonl"], "--override", "layers.0.*=INT3"), "unknown scheme 'INT3'"


def _override_matching_nothing(src, out, data, tmp):  # "layer" for "layers": a typo
    return quantize_args(src, out, data["jsonl"], "--override", "layer.0.*=W8A8_INT8"), "matches no Linear"


def _copy_model(src, tmp) -> Path:
    return shutil.copytree(src, tmp / "model")


def _truncated_safetensors(src, out, data, tmp):
    model = _copy_model(src, tmp)
    shard = sorted(model.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return quantize_args(model, out, data["jsonl"]), "not a valid safetensors file"


def _corrupted_safetensors_header(src, out, data, tmp):
    model = _copy_model(src, tmp)
    shard = sorted(model.glob("*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[8:16] = b"\xff\xfe{[}]\x00\x01"  # the JSON header no longer parses
    shard.write_bytes(bytes(raw))
    return quantize_args(model, out, data["jsonl"]), "not a valid safetensors file"


def _no_architectures(src, out, data, tmp):
    model = _copy_model(src, tmp)
    config = json.loads((model / "config.json").read_text())
    del config["architectures"]
    (model / "config.json").write_text(json.dumps(config))
    return quantize_args(model, out, data["jsonl"]), "no 'architectures' entry"


def _poisoned(value):
    def case(src, out, data, tmp):
        # the last layer's down_proj: the run has written earlier layers when it finds it
        model = _copy_model(src, tmp)
        name = "model.layers.1.mlp.down_proj.weight"
        index = json.loads((model / "model.safetensors.index.json").read_text())
        shard = model / index["weight_map"][name]
        weights = load_file(shard)
        weights[name][3, 5] = value
        save_file(weights, shard, metadata={"format": "pt"})
        return quantize_args(model, out, data["jsonl"]), f"{name} contains NaN or Inf"
    case.__name__ = f"_{value}_weight"
    return case


def _empty_dataset(src, out, data, tmp):
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    return quantize_args(src, out, empty), "no usable records"


def _too_short_dataset(src, out, data, tmp):
    short = tmp / "short.jsonl"  # records, but none long enough to calibrate on
    short.write_text("".join(json.dumps({"text": w}) + "\n" for w in ("hi", "ok", "no", "yes") * 10))
    return quantize_args(src, out, short, "--seq-len", "64"), "no usable calibration samples"


def _scheme_the_architecture_cannot_take(src, out, data, tmp):
    # widths 72 and 144: no group size vLLM's INT4 kernels take (128, 64, 32) divides them
    config = tiny_config("llama")
    config.update(dict(hidden_size=72, intermediate_size=144, head_dim=18))
    model = tmp / "wide"
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    argv = ["quantize", model, out, "--scheme", "W4A16", "--dataset", data["jsonl"], *ARGS]
    return argv, "no vLLM group size"


@pytest.mark.parametrize("case", [
    _missing_model, _unknown_scheme, _existing_out, _seq_len_too_long, _nothing_usable,
    _unknown_extension, _truncated_safetensors, _corrupted_safetensors_header, _no_architectures,
    _poisoned(float("nan")), _poisoned(float("inf")), _empty_dataset, _too_short_dataset,
    _scheme_the_architecture_cannot_take, _unknown_device, _gpu_missing, _mr_gptq_without_groups,
    _override_unknown_scheme, _override_matching_nothing],
    ids=lambda c: c.__name__[1:])
def test_user_errors_are_one_line_with_exit_code_2_and_leave_nothing(case, tiny_dir, datasets, tmp_path):
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    argv, fragment = case(tiny_dir("llama"), out, datasets, tmp_path)
    existed = out.exists()
    before = {p.name: p.read_bytes() for p in out.iterdir()} if existed else None
    code, stdout, stderr = run_cli(*argv)
    assert code == 2
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("lowbit: error: ")
    assert fragment in lines[0]
    assert "Traceback" not in stderr
    if existed:  # OUT is left exactly as it was
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert not out.exists()
    assert hidden_siblings(out) == []


def test_a_failed_run_creates_no_directories(tiny_dir, datasets, tmp_path):
    out = tmp_path / "new-parent" / "out"
    code, _, _ = run_cli(*quantize_args(tmp_path / "no-such-model", out, datasets["jsonl"]))
    assert code == 2
    assert not out.exists()
    assert not out.parent.exists(), "a run that failed on its input left OUT's parent directory behind"


def test_python_m_lowbit_reports_errors_without_a_traceback(tiny_dir, datasets, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "lowbit", "quantize", str(tiny_dir("llama")), str(out),
         "--scheme", "nope", "--dataset", str(datasets["jsonl"])],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "lowbit: error: unknown scheme 'nope'; valid schemes: " + ", ".join(PRESETS)]
    assert not out.exists() and hidden_siblings(out) == []


def test_quantize_help_lists_schemes_and_flags():
    code, stdout, _ = run_cli("quantize", "--help")
    assert code == 0
    for scheme in PRESETS:
        assert f"\n  {scheme} " in stdout, scheme  # a row of the schemes table, not just a mention
    for flag in ("--scheme", "--dataset", "--samples", "--seq-len", "--ignore", "--seed",
                 "--overwrite", "--json"):
        assert flag in stdout, flag


# -------------------------------------------------------------------------------------- eval


def test_eval_against_the_source_scores_kl_and_agreement(quantized, tiny_dir, datasets):
    out = quantized[3]
    code, stdout, stderr = run_cli("eval", out, "--baseline", tiny_dir("llama"), "--dataset",
                                   datasets["txt"], *EVAL_ARGS, "--json")
    assert code == 0, stderr
    r = json.loads(stdout)
    assert {"ppl", "baseline_ppl", "kl", "top1", "size_bytes"} <= set(r)
    assert r["kl"] > 0
    assert 0 < r["top1"] <= 1
    assert r["ppl"] > 1 and r["baseline_ppl"] > 1
    assert r["ppl"] != r["baseline_ppl"]
    assert r["tokens"] == 2 * 31
    assert r["size_bytes"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))


def test_eval_of_a_model_against_itself_is_perfect(quantized, datasets):
    out = quantized[3]
    code, stdout, stderr = run_cli("eval", out, "--baseline", out, "--dataset", datasets["txt"],
                                   *EVAL_ARGS, "--json")
    assert code == 0, stderr
    r = json.loads(stdout)
    assert abs(r["kl"]) <= 1e-9
    assert r["top1"] == 1
    assert r["ppl"] == r["baseline_ppl"]


def test_eval_without_json_prints_a_table(quantized, tiny_dir, datasets):
    code, stdout, stderr = run_cli("eval", quantized[3], "--baseline", tiny_dir("llama"),
                                   "--dataset", datasets["txt"], *EVAL_ARGS)
    assert code == 0, stderr
    rows = dict(line.split(None, 1) for line in stdout.splitlines() if line.startswith(("ppl", "model")))
    assert set(rows) == {"model", "ppl"}
    assert "KL (nats/token)" in stdout and "top-1 agreement" in stdout


def test_eval_of_a_missing_model_is_a_one_line_error(tmp_path, datasets):
    code, stdout, stderr = run_cli("eval", tmp_path / "nothing", "--dataset", datasets["txt"], *EVAL_ARGS)
    assert code == 2
    assert len(stderr.splitlines()) == 1 and stderr.startswith("lowbit: error: ")


# ------------------------------------------------------------------------------- determinism


def test_same_arguments_give_byte_identical_checkpoints(tiny_dir, datasets, tmp_path):
    out = tmp_path / "out"
    argv = quantize_args(tiny_dir("llama"), out, datasets["jsonl"], "--seed", "3", "--overwrite")
    assert run_cli(*argv)[0] == 0
    first = shutil.copytree(out, tmp_path / "first")
    assert run_cli(*argv)[0] == 0
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (out / name).read_bytes(), name


def test_a_different_seed_calibrates_on_different_samples(tiny_dir, datasets, tmp_path):
    src, data = tiny_dir("llama"), datasets["jsonl"]
    assert run_cli(*quantize_args(src, tmp_path / "a", data, "--seed", "0"))[0] == 0
    assert run_cli(*quantize_args(src, tmp_path / "b", data, "--seed", "1"))[0] == 0
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    scales = [k for k in a if k.endswith(".input_scale")]
    assert len(scales) == 14
    assert any(not torch.equal(a[k], b[k]) for k in scales)


# ------------------------------------------------------------------------------- Python API


def test_api_quantize_returns_what_quantize_json_prints(quantized, tiny_dir, datasets, tmp_path):
    printed = json.loads(quantized[1])
    summary = api.quantize(tiny_dir("llama"), tmp_path / "q", "FP8", dataset=str(datasets["jsonl"]),
                           samples=4, seq_len=32)
    assert set(summary) == set(printed)
    assert summary["layers"] == printed["layers"]  # same arguments, same calibration, same errors
    assert json.loads(json.dumps(summary)) == summary  # what --json prints is the dict itself


def test_api_evaluate_returns_what_eval_json_prints(quantized, tiny_dir, datasets):
    out, src = quantized[3], tiny_dir("llama")
    code, stdout, _ = run_cli("eval", out, "--baseline", src, "--dataset", datasets["txt"],
                              *EVAL_ARGS, "--json")
    printed = json.loads(stdout)
    result = api.evaluate(out, src, dataset=str(datasets["txt"]), windows=2, seq_len=32)
    assert set(result) == set(printed)
    for key in ("ppl", "baseline_ppl", "kl", "top1", "tokens", "size_bytes"):
        assert result[key] == printed[key], key


def test_eval_packed_scores_through_the_packed_kernels(quantized, tiny_dir, datasets):
    out, src = quantized[3], tiny_dir("llama")  # FP8 W8A8: its Linears run lowbit's FP8 kernel
    code, stdout, _ = run_cli("eval", out, "--baseline", src, "--dataset", datasets["txt"],
                              *EVAL_ARGS, "--json", "--packed", "--compute-dtype", "float32")
    fast = json.loads(stdout)
    reference = api.evaluate(out, src, dataset=str(datasets["txt"]), windows=2, seq_len=32,
                             compute="float32")
    assert fast["packed"] is True and reference["packed"] is False
    # in float32 the same input quantization and exact weights on both paths, sums in another
    # order: the 1 % (in bf16 the reference rounds its weights and the packed path does
    # not; SmolLM2's KL for every scheme in both dtypes: docs/benchmarks.md)
    assert fast["kl"] > 0 and abs(fast["kl"] - reference["kl"]) < 0.01 * reference["kl"]


# ------------------------------------------------------------------- disks and permissions


def assert_nothing_looks_valid(out: Path) -> None:
    """No OUT, and nowhere beside it a config.json or model weights a loader would pick up."""
    assert not out.exists()
    found = [p.name for p in out.parent.rglob("*") if p.name == "config.json" or p.name.startswith("model")]
    assert found == [], found


@pytest.mark.parametrize("target", ["lowbit.export.save_file", "shutil.copyfile"])
def test_a_full_disk_is_a_one_line_error_and_leaves_nothing(target, tiny_dir, datasets, tmp_path,
                                                             monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(target, no_space)
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    code, stdout, stderr = run_cli(*quantize_args(tiny_dir("llama"), out, datasets["jsonl"]))
    assert code == 2, stderr
    assert stdout == "" and len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("lowbit: error: ") and "No space left on device" in stderr
    assert "free" in stderr  # says what to do
    assert_nothing_looks_valid(out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_read_only_output_directory_is_a_one_line_error(tiny_dir, datasets, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, stdout, stderr = run_cli(*quantize_args(tiny_dir("llama"), parent / "out", datasets["jsonl"]))
        assert code == 2 and stdout == ""
        assert stderr.splitlines() == [f"lowbit: error: cannot write to {parent}: permission denied "
                                       "or not a directory"]
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_a_read_only_file_system_is_a_one_line_error(tiny_dir, datasets, tmp_path, monkeypatch):
    # root (as in CI containers) may write anywhere, so simulate the mount: every directory
    # made under tmp_path fails as on a read-only file system
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(*quantize_args(tiny_dir("llama"), out, datasets["jsonl"]))
    assert code == 2 and stdout == ""
    assert stderr.splitlines() == [f"lowbit: error: cannot write {out}: Read-only file system; "
                                   "write OUT to a writable file system"]
    assert_nothing_looks_valid(out)
    assert hidden_siblings(out) == []


def test_override_writes_one_config_group_per_scheme(tiny_dir, datasets, tmp_path):
    """--override PAT=SCHEME: layer 0 in W8A8_INT8, the rest in the base scheme (FP8)."""
    out = tmp_path / "mixed"
    code, _, stderr = run_cli(*quantize_args(tiny_dir("llama"), out, datasets["jsonl"],
                                             "--override", "layers.0.*=W8A8_INT8", "--json"))
    assert code == 0, stderr
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    kinds = sorted((g["weights"]["type"], g["weights"]["strategy"]) for g in groups.values())
    assert kinds == [("float", "tensor"), ("int", "channel")]
    report = json.loads((out / api.REPORT_FILE).read_text())
    assert report["overrides"] == {"layers.0.*": {"scheme": "W8A8_INT8", "algorithm": "rtn"}}


@pytest.mark.parametrize("bad", ["layers.0.*", "=W8A8_INT8", "layers.0.*="])
def test_override_without_pattern_and_scheme_is_a_usage_error(bad, tiny_dir, datasets, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(*quantize_args(tiny_dir("llama"), out, datasets["jsonl"], "--override", bad))
    assert code == 2 and stdout == "" and "PATTERN=SCHEME" in stderr and "Traceback" not in stderr
    assert not out.exists()
