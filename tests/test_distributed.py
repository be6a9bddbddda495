"""Distributed calibration: 2 local gloo ranks give the checkpoint one process gives.

Tolerance (also in README): ranges are merged by MAX and batches are shared out whole, so
schemes without Hessians are byte-identical; Hessian sums are added in a different order
(each rank's partial sum, then across ranks), which can move their last bits, so GPTQ codes may
differ by one grid step in a few places.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowbit import distributed
from lowbit.checkpoint import Checkpoint
from lowbit.export import CheckpointWriter
from lowbit.pipeline import quantize_layers
from lowbit.schemes import PRESETS
from tiny import tensors

# FP8 with an FP8 KV cache: static input and KV ranges (MAX); W8A8_INT8: AutoSmoothQuant's
# activation sample (gathered); W4A16: GPTQ Hessians (SUM)
SCHEMES = {"FP8": dict(kv_cache="fp8"), "W8A8_INT8": {}, "W4A16": dict(group_size=32)}


def calibration_samples() -> list[torch.Tensor]:
    """Three batches of unequal size (8 and 2 of 48 tokens, 5 of 40): ranks get 1 and 2."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(7, 250, (48 if i < 10 else 40,), generator=g) for i in range(15)]


def quantize(src: Path, out: Path, name: str) -> list[dict]:
    scheme = PRESETS[name].with_options(**SCHEMES[name])
    with CheckpointWriter(out, src, scheme, overwrite=True) as writer:
        return quantize_layers(Checkpoint(src), scheme, calibration_samples(), writer)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, src: Path, root: Path) -> None:
    """One rank: every scheme in turn, each rank writing its own copy (to compare them)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        assert distributed.world() == world and distributed.rank() == rank
        for name in SCHEMES:
            report = quantize(src, root / f"{name}-rank{rank}", name)
            (root / f"{name}-rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """The tiny Llama quantized with each scheme by one process and by 2 ranks."""
    src, root = tiny_dir("llama"), tmp_path_factory.mktemp("dist")
    mp.spawn(_rank_main, args=(2, _free_port(), src, root), nprocs=2, join=True)
    torch.set_num_threads(1)  # as the ranks ran (thread count can change float sums' order)
    try:
        for name in SCHEMES:
            report = quantize(src, root / f"{name}-single", name)
            (root / f"{name}-single.json").write_text(json.dumps(report))
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    return root


def _same_files(a: Path, b: Path) -> None:
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for f in files:
        if f != "lowbit_report.json":
            assert (a / f).read_bytes() == (b / f).read_bytes(), f


@pytest.mark.parametrize("name", SCHEMES)
def test_every_rank_derives_the_same_checkpoint(runs, name):
    _same_files(runs / f"{name}-rank0", runs / f"{name}-rank1")


@pytest.mark.parametrize("name", ["FP8", "W8A8_INT8"])
def test_range_statistics_match_one_process_exactly(runs, name):
    _same_files(runs / f"{name}-rank0", runs / f"{name}-single")
    scales = [k for k in tensors(runs / f"{name}-single") if k.endswith(("input_scale", "k_scale"))]
    assert scales or name == "W8A8_INT8"  # static ranges were really merged across ranks


def test_gptq_matches_one_process_within_one_grid_step(runs):
    ours, ref = tensors(runs / "W4A16-rank0"), tensors(runs / "W4A16-single")
    assert ours.keys() == ref.keys()
    from lowbit.formats.pack import unpack_int32

    changed = total = 0
    for k in ref:
        if not k.endswith("weight_packed"):
            assert torch.equal(ours[k], ref[k]), k
            continue
        shape = ref[k.replace("packed", "shape")].tolist()
        a, b = unpack_int32(ours[k], 4, shape), unpack_int32(ref[k], 4, shape)
        assert (a.int() - b.int()).abs().max() <= 1, k
        changed, total = changed + (a != b).sum().item(), total + a.numel()
    assert changed <= 0.001 * total


def test_error_report_matches_one_process(runs):
    for name in SCHEMES:
        ours = json.loads((runs / f"{name}-rank0.json").read_text())
        ref = json.loads((runs / f"{name}-single.json").read_text())
        assert [r["name"] for r in ours] == [r["name"] for r in ref]
        for a, b in zip(ours, ref):
            assert a["rel_error"] == pytest.approx(b["rel_error"], rel=1e-6, abs=1e-12), a["name"]


def test_torchrun_cli_writes_once_and_prints_once(tiny_dir, tmp_path):
    """The documented command, with 2 ranks: rank 0 alone prints and writes the checkpoint."""
    data = tmp_path / "calib.txt"
    data.write_text("".join(f"record {i}: " + "the quick brown fox jumps over the lazy dog " * 3 + "\n\n"
                            for i in range(30)))
    args = ["quantize", str(tiny_dir("llama")), "--scheme", "FP8", "--dataset", str(data),
            "--samples", "16", "--seq-len", "32"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), "-m", "lowbit", *args,
                           str(tmp_path / "out2"), "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # exactly one JSON document: only rank 0 printed
    assert summary["samples"] == 16
    subprocess.run([sys.executable, "-m", "lowbit", *args, str(tmp_path / "out1")], check=True,
                   capture_output=True, env=env, timeout=300)
    _same_files(tmp_path / "out2", tmp_path / "out1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "out1", "out2"]
