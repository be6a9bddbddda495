"""`lowbit auto`: the cheapest candidate that passes, the worst decoder layers kept unquantized
when none does, the bit budget, exit 1 when nothing passes; on a tiny random model."""

from __future__ import annotations

import json
import random

import pytest

from lowbit.auto import worst_layers

from test_cli import run_cli, sentence
from test_quality import chats  # noqa: F401 -- a fixture: ShareGPT-style conversations
from tiny import tensors


def test_worst_layers_rank_decoder_layers_by_their_worst_linear():
    report = {"layers": [{"name": "model.layers.1.mlp.down_proj", "rel_error": 0.3},
                         {"name": "model.layers.0.self_attn.q_proj", "rel_error": 0.2},
                         {"name": "model.layers.2.mlp.up_proj", "rel_error": 0.5},
                         {"name": "model.layers.0.mlp.up_proj", "rel_error": 0.4},
                         {"name": "lm_head", "rel_error": 9.0}]}
    assert worst_layers(report) == [2, 0, 1]


@pytest.fixture(scope="module")
def evaldata(tmp_path_factory):
    rng = random.Random(2)
    path = tmp_path_factory.mktemp("data") / "eval.txt"
    path.write_text("".join(f"{sentence(rng)}\n{sentence(rng)}\n\n" for _ in range(200)))
    return path


def auto_args(model, out, data, *extra):
    return ["auto", model, out, "--dataset", data, "--windows", "2", "--seq-len", "32", *extra]


def test_when_nothing_passes_the_worst_layer_is_kept_and_out_is_not_written(tiny_dir, evaldata, tmp_path):
    model, out = tiny_dir("llama"), tmp_path / "pick"
    code, stdout, stderr = run_cli(*auto_args(model, out, evaldata, "--candidates", "W4A16:rtn", "--gate", "101"))
    assert code == 1, stderr
    assert not out.exists() and "nothing passes the 101 % gate" in stdout
    work = tmp_path / "pick.auto"
    report = json.loads((work / "W4A16-rtn" / "lowbit_report.json").read_text())
    worst = worst_layers(report)[0]
    ignore = json.loads((work / "W4A16-rtn-keep1" / "config.json").read_text())["quantization_config"]["ignore"]
    assert sorted(n for n in ignore if n != "lm_head") == sorted(
        r["name"] for r in report["layers"] if r["name"].startswith(f"model.layers.{worst}."))
    rows = {r["name"]: r for r in json.loads((work / "results.json").read_text())["analysis"]["rows"]}
    # a kept layer counts at 16 bits: half of the tiny model's two layers
    assert rows["W4A16-rtn-keep1"]["bits_per_weight"] == pytest.approx((4.25 + 16) / 2)
    assert not any(r["passed"] for r in rows.values())

    # a lower gate: the same candidate passes, is reused, and becomes OUT
    stamp = {p: p.stat().st_mtime_ns for p in (work / "W4A16-rtn").glob("*.safetensors")}
    code, stdout, stderr = run_cli(*auto_args(model, out, evaldata, "--candidates", "W4A16:rtn", "--gate", "1"))
    assert code == 0, stderr
    assert {p: p.stat().st_mtime_ns for p in (work / "W4A16-rtn").glob("*.safetensors")} == stamp
    assert f"wrote {out} (W4A16-rtn)" in stdout
    got, want = tensors(out), tensors(work / "W4A16-rtn")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)


def test_the_cheapest_passing_candidate_wins_within_the_bit_budget(tiny_dir, evaldata, tmp_path):
    model = tiny_dir("llama")
    code, stdout, stderr = run_cli(*auto_args(model, tmp_path / "a", evaldata,
                                              "--candidates", "W4A16:rtn,FP8_DYNAMIC", "--gate", "1"))
    assert code == 0 and "wrote" in stdout and "(W4A16-rtn)" in stdout, stderr
    assert "FP8_DYNAMIC" not in stdout  # never tried: the cheaper one passed
    # a budget of 6 bits rules FP8 out, and keeping a layer in 16 bits exceeds it
    code, stdout, stderr = run_cli(*auto_args(model, tmp_path / "b", evaldata, "--budget-bits", "6",
                                              "--candidates", "W4A16:rtn,FP8_DYNAMIC", "--gate", "101"))
    assert code == 1, stderr
    assert not (tmp_path / "b.auto" / "FP8_DYNAMIC").exists()
    assert "skipped FP8_DYNAMIC: 8-bit weights exceed the budget of 6" in stdout
    assert "skipped W4A16-rtn-keep1: 10.12 bits per weight exceeds the budget of 6" in stdout


def test_generation_quality_reaches_every_candidate_and_the_model_answers_once(tiny_dir, chats, tmp_path,
                                                                               monkeypatch):
    from lowbit import quality

    answered, answers = [], quality._answers
    monkeypatch.setattr(quality, "_answers", lambda path, *a: answered.append(str(path)) or answers(path, *a))
    model = tiny_dir("llama")
    code, stdout, stderr = run_cli("auto", model, tmp_path / "pick", "--dataset", chats, "--windows", "1",
                                   "--seq-len", "16", "--candidates", "W4A16:rtn", "--gate", "101",
                                   "--generate", "2", "--max-new-tokens", "4")
    assert code == 1, stderr  # nothing passes 101 %: two compare runs, W4A16-rtn then -keep1
    work = tmp_path / "pick.auto"
    assert sorted(answered) == sorted(map(str, [model, work / "W4A16-rtn", work / "W4A16-rtn-keep1"]))
    rows = json.loads((work / "results.json").read_text())["analysis"]["rows"]
    assert [sorted(k for k in r["metrics"] if k.startswith("generation.vs_reference")) for r in rows] == \
        [[f"generation.vs_reference.{k}" for k in sorted(quality.ROUGE)]] * 2
    # the random model's answers share no word with the references: no recovery, so no interval
    # (test_report checks intervals on answers that overlap)
    assert all(r["recovery_ci95"] == {} and r["recovery"]["generation.vs_reference.rouge1"] is None
               for r in rows)


def test_the_worst_layer_is_kept_in_the_next_candidates_scheme_before_16_bits(tiny_dir, evaldata, tmp_path):
    model, out = tiny_dir("llama"), tmp_path / "pick"
    cands = "W4A16:rtn,W8A8_INT8"
    code, stdout, stderr = run_cli(*auto_args(model, out, evaldata, "--candidates", cands, "--gate", "101"))
    assert code == 1, stderr
    work = tmp_path / "pick.auto"
    rows = {r["name"]: r for r in json.loads((work / "results.json").read_text())["analysis"]["rows"]}
    # the uniform candidates, then the mixed one, then (it fails too) the layer unquantized
    tried = [line.split()[0] for line in stdout.splitlines() if "bits/weight" in line]
    assert tried == ["W4A16-rtn", "W8A8_INT8", "W4A16-rtn+W8A8_INT8x1", "W4A16-rtn-keep1"]
    assert set(rows) == set(tried)
    worst = worst_layers(json.loads((work / "W4A16-rtn" / "lowbit_report.json").read_text()))[0]
    groups = json.loads((work / "W4A16-rtn+W8A8_INT8x1" / "config.json").read_text())[
        "quantization_config"]["config_groups"]
    assert groups["group_0"]["targets"] == ["Linear"] and groups["group_0"]["weights"]["num_bits"] == 4
    (target,) = groups["group_1"]["targets"]
    assert groups["group_1"]["weights"]["num_bits"] == 8 and f"layers\\.{worst}\\." in target
    # half the Linears at W8A8_INT8's bits, half at W4A16's
    bits = {n: rows[n]["bits_per_weight"] for n in rows}
    assert bits["W4A16-rtn+W8A8_INT8x1"] == pytest.approx((bits["W4A16-rtn"] + bits["W8A8_INT8"]) / 2)

    # a budget that rules uniform W8A8_INT8 out, and a gate the mixed checkpoint meets but W4A16 not
    low, high = rows["W4A16-rtn"]["min_recovery"], rows["W4A16-rtn+W8A8_INT8x1"]["min_recovery"]
    assert low < high
    code, stdout, stderr = run_cli(*auto_args(model, out, evaldata, "--candidates", cands, "--budget-bits", "7",
                                              "--gate", f"{(low + high) / 2 * 100:.6f}"))
    assert code == 0, stderr
    assert f"wrote {out} (W4A16-rtn+W8A8_INT8x1)" in stdout
    assert json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"] == groups
