"""Resume: a `lowbit quantize` killed at any moment (SIGKILL, in a real subprocess) and rerun
with the same arguments continues from its last finished layer and writes exactly the bytes of
an uninterrupted run; a rerun with anything different refuses to mix the two."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowbit.partial import software_fingerprint
from test_cli import hidden_siblings, run_cli
from tiny import tiny_config, tiny_tokenizer

ROOT = Path(__file__).parents[1]
LAYERS = 3
SCHEMES = {  # each exercises another part of what a resumed run recomputes
    "FP8": ["--scheme", "FP8"],  # static input scales
    "W4A16": ["--scheme", "W4A16", "--group-size", "32"],  # GPTQ, packed INT4 codes
    "W8A8_INT8": ["--scheme", "W8A8_INT8", "--kv-cache", "fp8"],  # smoothed norms, dynamic inputs, KV hooks
}

# Runs lowbit's CLI in this process and SIGKILLs it at the point named by argv[1].
DRIVER = textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path
    from lowbit import capture, cli, export, partial, pipeline

    point, argv = sys.argv[1], sys.argv[2:]
    calls = {"n": 0}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def nth(n):
        calls["n"] += 1
        return calls["n"] == n

    def wrap(owner, name, before=None, after=None):
        real = getattr(owner, name)
        def wrapper(*a, **k):
            if before and before(*a, **k):
                die()
            out = real(*a, **k)
            if after and after(*a, **k):
                die()
            return out
        setattr(owner, name, wrapper)

    kind, _, n = point.partition(":")
    n = int(n or 1)
    if kind == "capture":  # while layer 0's inputs are being recorded
        wrap(capture._Catcher, "forward", before=lambda *a, **k: nth(n))
    elif kind == "solve":  # in the middle of a layer: its n-th fused set is being quantized
        wrap(pipeline, "_solve", before=lambda *a, **k: nth(n))
    elif kind == "between":  # layer n-1 committed, layer n not started
        wrap(export.CheckpointWriter, "end_layer", after=lambda self, i, *a: i == n - 1)
    elif kind == "shard":  # the n-th shard half written
        real_save = export.save_file
        def save_file(tensors, path, metadata=None):
            real_save(tensors, path, metadata=metadata)
            if nth(n):
                os.truncate(path, os.path.getsize(path) // 2)
                die()
        export.save_file = save_file
    elif kind == "finishing":  # some shards already renamed to their final names
        real_rename = Path.rename
        def rename(self, target):
            out = real_rename(self, target)
            if Path(target).name.startswith("model-") and nth(n):
                die()
            return out
        Path.rename = rename
    elif kind == "final-rename":  # everything written, manifest gone, not yet renamed to OUT
        wrap(partial, "replace_dir", before=lambda *a: True)
    elif kind == "after-rename":  # OUT in place
        wrap(partial, "replace_dir", after=lambda *a: True)
    sys.exit(cli.main(argv))
''')


@pytest.fixture(scope="module")
def setup(tmp_path_factory, request):
    """A 3-layer tiny llama checkpoint and a small calibration file."""
    root = tmp_path_factory.mktemp("resume")
    config = tiny_config("llama")
    config.num_hidden_layers = LAYERS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(root / "model", max_shard_size="64KB")
    tiny_tokenizer().save_pretrained(root / "model")
    words = "the quick brown fox jumps over a lazy dog while seven wizards hex jumbo plums".split()
    lines = [json.dumps({"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(40))})
             for i in range(40)]
    (root / "calib.jsonl").write_text("\n".join(lines) + "\n")
    (root / "driver.py").write_text(DRIVER)
    return root


def argv(setup: Path, out: Path, scheme: str = "FP8", *extra) -> list[str]:
    return ["quantize", str(setup / "model"), str(out), *SCHEMES[scheme], "--dataset",
            str(setup / "calib.jsonl"), "--samples", "4", "--seq-len", "32", *extra]


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """reference(scheme): the uninterrupted run's output directory, made once."""
    made = {}

    def get(scheme: str) -> Path:
        if scheme not in made:
            out = tmp_path_factory.mktemp("ref") / scheme
            code, _, err = run_cli(*argv(setup, out, scheme))
            assert code == 0, err
            made[scheme] = out
        return made[scheme]

    return get


def kill_at(setup: Path, point: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.run([sys.executable, str(setup / "driver.py"), point, *args],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -9, (point, proc.returncode, proc.stderr[-2000:])
    return proc


def assert_same_bytes(out: Path, ref: Path) -> None:
    names = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


@pytest.mark.parametrize("scheme, point, message", [
    ("FP8", "capture:3", None),
    ("FP8", "solve:6", "resuming from layer 1 of 3"),  # layer 1's third fused set
    ("FP8", "shard:2", "resuming from layer 1 of 3"),
    ("FP8", "finishing:2", "all 3 layers were written"),
    ("FP8", "final-rename", None),
    ("W4A16", "between:1", "resuming from layer 1 of 3"),
    ("W8A8_INT8", "between:2", "resuming from layer 2 of 3"),
])
def test_a_killed_run_resumes_to_the_same_bytes(scheme, point, message, setup, reference, tmp_path,
                                                caplog):
    out = tmp_path / "out"
    kill_at(setup, point, argv(setup, out, scheme))
    assert not out.exists()
    if not point.startswith(("finishing", "final")):  # nothing a loader would take for a checkpoint
        assert not (out.parent / f".{out.name}.partial" / "config.json").exists()
    code, _, err = run_cli(*argv(setup, out, scheme))
    assert code == 0, err
    if message:
        assert message in caplog.text
    else:
        assert "resuming" not in caplog.text
    assert_same_bytes(out, reference(scheme))
    assert hidden_siblings(out) == []


def test_the_resumed_run_says_so_on_stderr(setup, reference, tmp_path):
    out = tmp_path / "out"
    kill_at(setup, "between:2", argv(setup, out))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}"}
    proc = subprocess.run([sys.executable, "-m", "lowbit", *argv(setup, out)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "lowbit: resuming from layer 2 of 3 (layers 0-1 were written by an earlier run)\n" in proc.stderr
    assert_same_bytes(out, reference("FP8"))


def test_a_run_killed_after_the_final_rename_is_complete(setup, reference, tmp_path):
    out = tmp_path / "out"
    kill_at(setup, "after-rename", argv(setup, out))
    assert_same_bytes(out, reference("FP8"))
    assert hidden_siblings(out) == []


@pytest.fixture(scope="module")
def killed_after_layer_0(setup, tmp_path_factory) -> Path:
    """The work directory an FP8 run killed right after committing layer 0 left behind."""
    out = tmp_path_factory.mktemp("killed") / "out"
    kill_at(setup, "between:1", argv(setup, out))
    work = out.parent / f".{out.name}.partial"
    assert json.loads((work / "lowbit-partial.json").read_text())["layers_done"] == 1
    return work


def _killed_between_layers(killed: Path, out: Path) -> Path:
    """`killed` copied beside `out`, as if the run writing `out` had been killed."""
    return shutil.copytree(killed, out.parent / f".{out.name}.partial")


@pytest.mark.parametrize("change, what", [
    (lambda setup, out: argv(setup, out, "FP8", "--seed", "1"), "different calibration data"),
    (lambda setup, out: argv(setup, out, "FP8", "--kv-cache", "fp8"), "different scheme and options"),
])
def test_a_rerun_with_other_arguments_refuses_to_mix(change, what, setup, killed_after_layer_0, tmp_path):
    out = tmp_path / "out"
    work = _killed_between_layers(killed_after_layer_0, out)
    before = {p.name: p.read_bytes() for p in work.iterdir()}
    code, stdout, err = run_cli(*change(setup, out))
    assert code == 2 and stdout == ""
    assert len(err.splitlines()) == 1 and err.startswith("lowbit: error: ")
    assert what in err and "--overwrite to discard it and start over" in err
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before  # left exactly as it was
    assert not out.exists()


def test_overwrite_discards_another_runs_partial_and_starts_over(setup, killed_after_layer_0, tmp_path,
                                                                 caplog):
    out = tmp_path / "out"
    _killed_between_layers(killed_after_layer_0, out)
    other = tmp_path / "other"
    code, _, err = run_cli(*argv(setup, other, "FP8", "--seed", "1"))
    assert code == 0, err
    code, _, err = run_cli(*argv(setup, out, "FP8", "--seed", "1", "--overwrite"))
    assert code == 0, err
    assert "resuming" not in caplog.text and "discarding" in caplog.text
    assert_same_bytes(out, other)
    assert hidden_siblings(out) == []


def test_a_changed_input_checkpoint_or_lowbit_refuses_to_mix(setup, killed_after_layer_0, tmp_path,
                                                             reference, caplog):
    out = tmp_path / "out"
    work = _killed_between_layers(killed_after_layer_0, out)
    model = tmp_path / "model"
    shutil.copytree(setup / "model", model)  # the same bytes, but another checkpoint
    args = argv(setup, out)
    args[1] = str(model)
    code, _, err = run_cli(*args)
    assert code == 2 and "different input checkpoint" in err and len(err.splitlines()) == 1
    manifest = work / "lowbit-partial.json"
    state = json.loads(manifest.read_text())
    state["fingerprint"]["software"] = "lowbit-src 0000000000000000 torch 2.0"
    manifest.write_text(json.dumps(state))
    code, _, err = run_cli(*argv(setup, out))
    assert code == 2 and "different software" in err
    state["fingerprint"]["software"] = software_fingerprint()  # as it was: resumes again
    manifest.write_text(json.dumps(state))
    code, _, err = run_cli(*argv(setup, out))
    assert code == 0, err
    assert "resuming from layer 1 of 3" in caplog.text
    assert_same_bytes(out, reference("FP8"))


def test_a_full_disk_keeps_the_finished_layers_and_a_rerun_resumes(setup, reference, tmp_path,
                                                                   monkeypatch, caplog):
    import lowbit.export

    real, calls = lowbit.export.save_file, []

    def fills_up(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # layer 2's shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(lowbit.export, "save_file", fills_up)
    out = tmp_path / "out"
    code, _, err = run_cli(*argv(setup, out))
    assert code == 2 and len(err.splitlines()) == 1
    assert "No space left on device" in err and "layers 0-1 are kept: rerun the same command" in err
    assert not out.exists() and hidden_siblings(out) == [f".{out.name}.partial"]
    monkeypatch.setattr(lowbit.export, "save_file", real)
    code, _, err = run_cli(*argv(setup, out))
    assert code == 0, err
    assert "resuming from layer 2 of 3" in caplog.text
    assert_same_bytes(out, reference("FP8"))


def test_a_second_run_on_the_same_out_is_refused_while_the_first_writes(setup, killed_after_layer_0,
                                                                        tmp_path):
    import fcntl

    out = tmp_path / "out"
    work = _killed_between_layers(killed_after_layer_0, out)
    fd = os.open(work, os.O_RDONLY)  # what a live run holds
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code, _, err = run_cli(*argv(setup, out))
    finally:
        os.close(fd)
    assert code == 2 and len(err.splitlines()) == 1
    assert f"another lowbit run is writing {work}" in err
    assert (work / "lowbit-partial.json").is_file()
