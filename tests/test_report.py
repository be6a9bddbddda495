"""`lowbit compare` and the trade-off report: recovery math by hand, the Pareto front against a
brute force, the gate and the recommendations on a synthetic results dict; the HTML page
self-contained and rendered in a real browser; end to end on a tiny random model."""

from __future__ import annotations

import base64
import html
import json
import math
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lowbit import report
from lowbit.errors import LowbitError
from lowbit.plots import plots
from lowbit.serving_results import read_serving

from test_cli import run_cli, sentence
from tiny import tiny_config

MIB = 2**20


def _row(name, *, ppl, kl, top1, bytes_per_token, size=None, speed=None, serving=None, **metrics):
    return {"name": name, "path": f"/ckpt/{name}", "size_bytes": size or bytes_per_token,
            "bits_per_weight": 4.0, "bytes_per_token": bytes_per_token,
            "metrics": {"ppl": ppl, "kl": kl, "top1": top1, **metrics}, "speed": speed,
            "serving": serving, "layer_error": "weight",
            "layers": [{"name": "model.layers.0.mlp.down_proj", "rel_error": 0.1},
                       {"name": "model.layers.1.self_attn.q_proj", "rel_error": 0.05}]}


def _serving(tok_s):
    return {"output_throughput": tok_s, "keys": {"output_throughput": "output_throughput"}}


def synthetic(gate=99.0) -> dict:
    """Three checkpoints: A small and lossy, B bigger and near-lossless, C the fastest, between."""
    speed = lambda d, mem: {"decode_tok_s": d, "prefill_tok_s": 10 * d, "memory_bytes": mem}  # noqa: E731
    return {
        "gate": gate,
        "base": {"name": "base", "path": "/base", "size_bytes": 200 * MIB, "bits_per_weight": 16.0,
                 "bytes_per_token": 200 * MIB, "metrics": {"ppl": 10.0, "acc": 0.5}, "speed": speed(20, 210 * MIB)},
        "checkpoints": [
            _row("A", ppl=11.0, kl=0.05, top1=0.90, acc=0.45, bytes_per_token=50 * MIB,
                 speed=speed(60, 60 * MIB), serving=_serving(900.0)),
            _row("B", ppl=10.05, kl=0.002, top1=0.995, acc=0.499, bytes_per_token=100 * MIB,
                 speed=speed(40, 110 * MIB), serving=_serving(1500.0)),
            _row("C", ppl=10.08, kl=0.004, top1=0.992, acc=0.498, bytes_per_token=110 * MIB,
                 speed=speed(70, 105 * MIB), serving=_serving(1200.0)),
        ],
        "evaluation": {"dataset": "sharegpt", "windows": 4, "seq_len": 64, "compute_dtype": "float32"},
        "speed_method": {"prompt_tokens": 16, "new_tokens": 8, "repeats": 1, "threads": 1,
                         "dtype": "float32", "cpu": "test"},
        "serving_files": ["serve.json"],
    }


# ------------------------------------------------------------------------------ recovery, gate

def test_recovery_of_each_metric_matches_its_definition():
    base = {"ppl": 10.0, "acc": 0.5, "loss": 2.0, "zero": 0.0}
    ckpt = {"ppl": 12.5, "kl": 0.02, "top1": 0.97, "acc": 0.45, "loss": 2.5, "zero": 0.1,
            "rouge1_recovery": 0.98, "only_here": 3.0}
    r = report.recovery(base, ckpt)
    assert r["ppl"] == pytest.approx(0.8)  # 10 / 12.5: lower is better
    assert r["kl"] == pytest.approx(0.98019867)  # e^-0.02
    assert r["top1"] == 0.97
    assert r["acc"] == pytest.approx(0.9)  # 0.45 / 0.5
    assert r["loss"] == pytest.approx(0.8)  # 2.0 / 2.5
    assert r["rouge1_recovery"] == 0.98
    assert r["zero"] is None  # no ratio to a base score of 0
    assert "only_here" not in r  # no base value: shown, not recovered


def test_scores_a_richer_evaluation_returns_join_the_table_and_the_gate():
    from lowbit.compare import metrics_of

    base = {"ppl": 10.0, "tokens": 4096, "seconds": 3.0, "compute_dtype": {"dtype": "bfloat16"},
            "tasks": {"hellaswag": {"acc": 0.4, "acc_stderr": 0.01}}}
    ckpt = {"ppl": 10.0, "kl": 0.0, "top1": 1.0, "baseline_ppl": 10.0, "windows": 4,
            "tasks": {"hellaswag": {"acc": 0.38, "acc_stderr": 0.01}},
            "generation": {"rouge1_recovery": 0.995, "bootstrap": [0.99, 1.0]}}
    assert metrics_of(base) == {"ppl": 10.0, "tasks.hellaswag.acc": 0.4}
    assert metrics_of(ckpt) == {"ppl": 10.0, "kl": 0.0, "top1": 1.0, "tasks.hellaswag.acc": 0.38,
                                "generation.rouge1_recovery": 0.995}
    results = synthetic()
    results["base"]["metrics"] = metrics_of(base)
    results["checkpoints"] = [dict(results["checkpoints"][1], metrics=metrics_of(ckpt))]
    a = report.analyze(results)
    row = a["rows"][0]
    assert row["recovery"]["tasks.hellaswag.acc"] == pytest.approx(0.95)
    assert row["failing"] == ["tasks.hellaswag.acc"]
    header, _ = report.table(results, a)
    assert {"recovery tasks.hellaswag.acc", "recovery generation rouge1_recovery"} <= set(header)


def test_rouge_and_task_scores_as_evaluate_returns_them_recover_as_their_evaluators_do():
    from lowbit import harness, quality
    from lowbit.compare import metrics_of

    refs = ["the cat sat on the mat", "a dog runs in the park", "birds sing songs"]
    base_answers = ["the cat sat on a mat", "a dog runs", "birds sing"]
    answers = ["the cat sat", "a dog runs", "birds swim"]  # one answer as the base's
    raw = lambda acc, ppl: {"t": {"samples": 3, "metrics": {"acc": acc, "word_perplexity": ppl},  # noqa: E731
                                  "higher_is_better": {"acc": True, "word_perplexity": False}}}
    base = {"ppl": 10.0, "generation": {**quality.score(base_answers, None, refs), "max_new_tokens": 8},
            "tasks": harness.table(raw(0.5, 20.0)), "tasks_options": {"limit": 3, "num_fewshot": 0}}
    gen = quality.score(answers, base_answers, refs)
    ckpt = {"ppl": 10.0, "kl": 0.0, "top1": 1.0, "generation": {**gen, "max_new_tokens": 8},
            "tasks": harness.table(raw(0.4, 25.0), raw(0.5, 20.0)), "tasks_options": {"limit": 3, "num_fewshot": 0}}
    results = synthetic()
    results["base"]["metrics"] = metrics_of(base)
    results["checkpoints"] = [dict(results["checkpoints"][1], metrics=metrics_of(ckpt))]
    rec = report.analyze(results)["rows"][0]["recovery"]
    for k in quality.ROUGE:  # the paired bootstrap's point value: mean(model) / mean(baseline)
        assert rec[f"generation.vs_reference.{k}"] == pytest.approx(gen["vs_reference"][k]["recovery"])
    for k, m in ckpt["tasks"]["t"]["metrics"].items():  # higher- and lower-is-better as lm-eval says
        assert rec[f"tasks.t.{k}"] == pytest.approx(m["recovery"])
    assert rec["tasks.t.word_perplexity"] == pytest.approx(0.8)
    # sameness with the base's answers is shown, not gated; counts, seeds, options are not metrics
    assert 0 < results["checkpoints"][0]["metrics"]["generation.vs_baseline.exact_match"] < 1
    assert set(rec) == {"ppl", "kl", "top1", "tasks.t.acc", "tasks.t.word_perplexity",
                        *[f"generation.vs_reference.{k}" for k in quality.ROUGE]}


def test_rouge_recovery_intervals_reach_the_table_results_and_html():
    from lowbit import quality
    from lowbit.compare import intervals_of, metrics_of

    refs = ["the cat sat on the mat", "a dog runs in the park", "birds sing songs", "fish swim"]
    base_answers = ["the cat sat on a mat", "a dog runs", "birds sing", "fish swim"]
    answers = ["the cat sat", "a dog runs", "birds swim", "fish"]
    base = {"ppl": 10.0, "generation": quality.score(base_answers, None, refs)}
    gen = quality.score(answers, base_answers, refs)
    ckpt = {"ppl": 10.0, "kl": 0.0, "top1": 1.0, "generation": gen}
    ci = intervals_of(ckpt)
    assert set(ci) == {f"generation.vs_reference.{k}" for k in quality.ROUGE}  # not vs_baseline's
    assert intervals_of(base) == {}  # the base has values, no recoveries
    results = synthetic()
    results["base"]["metrics"] = metrics_of(base)
    results["checkpoints"] = [dict(results["checkpoints"][1], metrics=metrics_of(ckpt), recovery_ci95=ci)]
    results["evaluation"]["generate"], results["evaluation"]["max_new_tokens"] = 4, 8
    a = report.analyze(results)
    header, body = report.table(results, a)
    cell = body[1][header.index("recovery vs reference rouge1")]
    lo, hi = gen["vs_reference"]["rouge1"]["ci95"]
    point = gen["vs_reference"]["rouge1"]["recovery"]
    assert lo <= point <= hi and lo < hi
    assert cell == f"{point * 100:.2f} % [{lo * 100:.1f}, {hi * 100:.1f}]"
    assert body[1][header.index("recovery ppl")] == "100.00 %"  # no interval where none was computed
    # a failure its own interval does not rule out says so; one the interval rules out does not
    for gate, says in ((hi * 100 - 0.01, True), (hi * 100 + 0.01, False)):
        results["gate"] = gate
        g = report.table(results, report.analyze(results))[1][1][-1]
        assert g.startswith("FAIL (") and ("vs reference rouge1" in g) == (point * 100 < gate)
        unsure = g.split("95 % interval reaches the gate: ")[1].split(", ") if "interval" in g else []
        assert ("vs reference rouge1" in unsure) == (says and point * 100 < gate)
    results["gate"] = 99
    # the values the recoveries come from are in a table of their own, under the same labels
    names, values = report.metrics_table(results, a)
    assert "ppl" not in header and values[1][names.index("ppl")] == "10"
    rouge1 = gen["vs_reference"]["rouge1"]["model"]
    assert values[1][names.index("vs reference rouge1")] == format(rouge1, ".4g")
    assert cell in report.markdown(results, a) and html.escape(cell) in report.html(results, a, {})
    assert "95 % interval" in report.markdown(results, a)


def test_gate_needs_every_defined_recovery_at_or_above_it():
    assert report.verdict({"ppl": 0.99, "top1": 0.995}, 99) == (True, [])
    assert report.verdict({"ppl": 0.99, "top1": 0.9899}, 99) == (False, ["top1"])
    assert report.verdict({"ppl": 1.2, "zero": None}, 99.9) == (True, [])
    assert report.verdict({}, 99)[0] is False  # nothing measured passes nothing


def test_pareto_front_matches_a_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        pts = [(rng.randint(0, 5), rng.randint(0, 5)) for _ in range(rng.randint(1, 9))]
        p = np.array(pts)
        beaten = [((p[:, 0] >= x) & (p[:, 1] >= y) & ((p[:, 0] > x) | (p[:, 1] > y))).any() for x, y in pts]
        assert report.pareto_front(pts) == [i for i, b in enumerate(beaten) if not b], pts
    assert report.pareto_front([(1, 1), (2, 0.5), (0.5, 2), (0.9, 0.9)]) == [0, 1, 2]


def test_analysis_passes_recommends_and_marks_the_front():
    a = report.analyze(synthetic())
    rows = {r["name"]: r for r in a["rows"]}
    assert not rows["A"]["passed"] and set(rows["A"]["failing"]) == {"ppl", "kl", "top1", "acc"}
    assert rows["B"]["passed"] and rows["C"]["passed"]
    assert rows["B"]["recovery"]["acc"] == pytest.approx(0.998)
    rec = a["recommendations"]
    assert rec["latency-bound"]["pick"] == "B"  # 100 MiB/token < C's 110; A fails
    assert rec["throughput-bound"]["pick"] == "B"  # 1500 tok/s served beats C's 1200
    assert rec["memory-bound"]["pick"] == "C"  # 105 MiB resident < B's 110
    assert "1500.0 tok/s" in rec["throughput-bound"]["why"] and "105.0 MiB" in rec["memory-bound"]["why"]
    # (decode tok/s, worst recovery): A (60, 0.90), B (40, 0.995), C (70, top-1 0.992): C beats A
    assert rows["C"]["min_recovery"] == 0.992
    assert {n for n, r in rows.items() if r.get("pareto")} == {"B", "C"}
    assert a["any_passed"]


def test_without_measurements_the_recommendations_say_what_decided_them():
    results = synthetic()
    for row in results["checkpoints"]:
        row["speed"] = row["serving"] = None
    rec = report.analyze(results)["recommendations"]
    assert rec["throughput-bound"]["pick"] is None and "no throughput measured" in rec["throughput-bound"]["why"]
    assert rec["memory-bound"]["pick"] == "B" and "size on disk" in rec["memory-bound"]["why"]


def test_nothing_passing_a_high_gate_recommends_nothing():
    a = report.analyze(synthetic(gate=99.9))
    assert not a["any_passed"]
    assert all(r["pick"] is None for r in a["recommendations"].values())
    assert "FAIL" in report.markdown(synthetic(gate=99.9), a)


def test_html_is_self_contained_with_every_plot_embedded():
    results = synthetic()
    a = report.analyze(results)
    pngs = plots(results, a)
    assert set(pngs) == {"recovery_vs_bytes.png", "recovery_vs_speed.png", "worst_layers.png"}
    page = report.html(results, a, pngs)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert len(srcs) == 3
    for s in srcs:
        assert s.startswith("data:image/png;base64,")
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PASS" in page and "FAIL (ppl, kl, top1, acc)" in page


def test_serving_numbers_are_read_from_the_shapes_a_bench_may_write(tmp_path):
    rows = {"base": Path("/m/base"), "W4A16": Path("/m/out/W4A16"), "FP8": Path("/m/out/FP8")}
    f = tmp_path / "s.json"
    f.write_text(json.dumps([{"model_id": "/m/out/W4A16", "output_throughput": 321.5, "mean_ttft_ms": 12.0,
                              "mean_tpot_ms": 3.0},
                             {"model": "FP8", "metrics": {"output_tokens_per_second": 200, "ttft_s": 0.5,
                                                          "tpot": {"median": 4.0}}}]))
    s = read_serving(f, rows)
    assert s["W4A16"] == {"output_throughput": 321.5, "ttft": 12.0, "tpot": 3.0, "keys": {
        "output_throughput": "output_throughput", "ttft": "mean_ttft_ms", "tpot": "mean_tpot_ms"}}
    assert s["FP8"]["ttft"] == 500.0 and "(s, as ms)" in s["FP8"]["keys"]["ttft"]
    assert s["FP8"]["tpot"] == 4.0 and "taken as ms" in s["FP8"]["keys"]["tpot"]
    f.write_text(json.dumps({"W4A16": {"output_throughput": 1.0}}))
    assert read_serving(f, rows)["W4A16"]["output_throughput"] == 1.0
    # `lowbit bench serve --json`, one file per checkpoint
    bench = tmp_path / "fp8.json"
    bench.write_text(json.dumps({"config": {"model": "/m/out/FP8", "num_prompts": 8},
                                 "metrics": {"completed": 8, "output_throughput": 55.5, "request_throughput": 1.0,
                                             "ttft_ms": {"mean": 120.0, "median": 110.0, "p99": 300.0},
                                             "tpot_ms": {"mean": 20.0, "median": 19.0}},
                                 "requests": [{"ttft_ms": 1.0}], "machine": {"cpus": 2}}))
    s = read_serving([f, bench], rows)
    assert s["FP8"] == {"output_throughput": 55.5, "ttft": 120.0, "tpot": 20.0, "keys": {
        "output_throughput": "output_throughput", "ttft": "ttft_ms.mean", "tpot": "tpot_ms.mean"}}
    assert s["W4A16"]["output_throughput"] == 1.0
    f.write_text(json.dumps({"model": "other", "output_throughput": 1.0}))
    with pytest.raises(LowbitError, match="names one of"):
        read_serving(f, rows)


# ------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def evaldata(tmp_path_factory) -> Path:
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("data") / "eval.txt"
    path.write_text("".join(f"{sentence(rng)}\n{sentence(rng)}\n\n" for _ in range(200)))
    return path


def compare_args(base, out, data, *extra):
    return ["compare", base, "--schemes", "FP8_DYNAMIC,W4A16:rtn", "--out", out, "--dataset", data,
            "--windows", "2", "--seq-len", "32", *extra]


@pytest.fixture(scope="module")
def compared(tiny_dir, evaldata, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "report"
    code, stdout, stderr = run_cli(*compare_args(tiny_dir("llama"), out, evaldata, "--gate", "1", "--speed",
                                                 "--prompt-tokens", "16", "--new-tokens", "8", "--repeats", "1"))
    return code, stdout, stderr, out


def test_compare_quantizes_evaluates_times_and_writes_the_report(compared):
    code, stdout, stderr, out = compared
    assert code == 0, stderr
    assert {"results.json", "report.md", "report.html", "FP8_DYNAMIC", "W4A16-rtn"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind
    r = json.loads((out / "results.json").read_text())
    rows = {c["name"]: c for c in r["checkpoints"]}
    c = tiny_config("llama")
    # per layer: q, o (64x64), k, v (32x64), gate, up (128x64), down (64x128)
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * c.num_hidden_layers
    params, rows_out = sum(o * i for o, i in shapes), sum(o for o, _ in shapes)
    # FP8: one byte per weight and one bf16 scale per output channel
    assert rows["FP8_DYNAMIC"]["bits_per_weight"] == pytest.approx(8 + 16 * rows_out / params)
    # INT4 group 64 (128 does not divide 64): a bf16 scale per 64 weights
    assert rows["W4A16-rtn"]["bits_per_weight"] == pytest.approx(4 + 16 / 64)
    assert r["base"]["bits_per_weight"] == 16.0
    assert rows["W4A16-rtn"]["bytes_per_token"] < rows["FP8_DYNAMIC"]["bytes_per_token"] < r["base"]["bytes_per_token"]
    for row in [r["base"], *r["checkpoints"]]:
        s = row["speed"]
        assert s["decode_tok_s"] > 0 and s["prefill_tok_s"] > 0
        assert s["memory_bytes"] == s["weights_bytes"] + s["kv_cache_bytes"]
    a = r["analysis"]["rows"]
    for row in a:  # recovery recomputed by hand from the stored metrics
        m = row["metrics"]
        assert row["recovery"]["ppl"] == pytest.approx(r["base"]["metrics"]["ppl"] / m["ppl"])
        assert row["recovery"]["kl"] == pytest.approx(math.exp(-m["kl"]))
        assert row["passed"]
    assert "## Recommendation" in stdout and "latency-bound**: W4A16-rtn" in stdout


def test_a_rerun_reuses_quantized_outputs_and_measurements_and_exits_1_when_nothing_passes(
        compared, tiny_dir, evaldata):
    _, _, _, out = compared
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("*/*.safetensors")}
    first = json.loads((out / "results.json").read_text())
    planted = json.loads(json.dumps(first))
    planted["checkpoints"][0]["metrics"]["ppl"] = 1e9  # a value no evaluation gives: seen only if reused
    (out / "results.json").write_text(json.dumps(planted))
    code, stdout, stderr = run_cli(*compare_args(tiny_dir("llama"), out, evaldata, "--gate", "101"))
    assert code == 1, stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.safetensors")} == stamp
    r = json.loads((out / "results.json").read_text())
    assert all(c["reused"] for c in r["checkpoints"]) and r["speed_method"] is None
    assert r["checkpoints"][0]["metrics"]["ppl"] == 1e9
    assert not (out / "recovery_vs_speed.png").exists()  # no speed this time: the old plot is gone
    assert "FAIL" in (out / "report.md").read_text()
    serving = out.parent / "serve.json"
    serving.write_text(json.dumps([{"model": str(out / "W4A16-rtn"), "output_throughput": 123.0,
                                    "mean_ttft_ms": 9.5}]))
    code, _, stderr = run_cli(*compare_args(tiny_dir("llama"), out, evaldata, "--fresh", "--serving", serving))
    r = json.loads((out / "results.json").read_text())
    assert r["checkpoints"][0]["metrics"] == first["checkpoints"][0]["metrics"], stderr
    assert r["checkpoints"][1]["serving"]["output_throughput"] == 123.0
    assert "output_throughput (tok/s)" in (out / "report.md").read_text()


def test_a_directory_holding_another_scheme_is_refused(tiny_dir, evaldata, tmp_path, compared):
    out = tmp_path / "r"
    out.mkdir()
    shutil.copytree(compared[3] / "FP8_DYNAMIC", out / "W4A16-rtn")
    code, _, stderr = run_cli(*compare_args(tiny_dir("llama"), out, evaldata))
    assert code == 2 and "holds FP8_DYNAMIC" in stderr and len(stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ in a browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => __errors.push(e.message || 'failed to load ' +
  String(e.target.currentSrc || e.target.src || e.target.tagName).slice(0, 80)), true);
const _ce = console.error; console.error = (...a) => { __errors.push('console.error: ' + a.join(' ')); _ce(...a); };
window.addEventListener('load', () => { const imgs = [...document.images];
  document.body.setAttribute('data-probe', JSON.stringify({images: imgs.length, errors: __errors,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
    shown: imgs.filter(i => i.getBoundingClientRect().width > 200 && i.getBoundingClientRect().height > 200).length})); });
</script>"""


def _chromium(*args) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=5000", *args], capture_output=True, text=True, timeout=60)


def _probe(page: Path) -> dict:
    probe = page.with_name("probe-" + page.name)
    probe.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    dom = _chromium("--dump-dom", probe.as_uri()).stdout
    return json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', dom).group(1)))


def _colored_pixels(page: Path) -> int:
    shot = page.with_suffix(".png")
    _chromium("--enable-logging=stderr", "--v=0", "--window-size=1400,2600", f"--screenshot={shot}", page.as_uri())
    from PIL import Image

    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # plot markers and bars are saturated; text is grey and the PASS/FAIL cells pale
    return int(((rgb.max(-1) - rgb.min(-1)) > 80).sum())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_report_renders_in_chromium_with_no_errors_and_visible_plots(tmp_path):
    results = synthetic()
    a = report.analyze(results)
    page = tmp_path / "report.html"
    page.write_text(report.html(results, a, plots(results, a)))
    log = _chromium("--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()).stderr
    assert not [line for line in log.splitlines() if ":CONSOLE" in line]  # the page logs nothing
    p = _probe(page)
    assert p == {"images": 3, "errors": [], "broken": [], "shown": 3}, p
    assert _colored_pixels(page) > 5000
    # the same checks see a broken plot, and a page without plots
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace("base64,", "base64,AAAA", 1))
    p = _probe(broken)
    assert p["broken"] == ["recovery_vs_bytes.png"] and p["errors"], p
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r"<img[^>]*>", "", page.read_text()))
    assert _colored_pixels(bare) < 100


# ------------------------------------------------------------------------------ the real model

@pytest.mark.e2e
def test_compare_on_smollm2_counts_bits_and_bytes_from_its_shapes(smollm2_dir, tmp_path):
    """FP8_DYNAMIC (data-free) against the real model on ShareGPT: bits per weight and bytes per
    token from SmolLM2's shapes by hand, and a near-lossless FP8 scoring as one."""
    out = tmp_path / "cmp"
    code, stdout, stderr = run_cli("compare", smollm2_dir, "--schemes", "FP8_DYNAMIC", "--out", out,
                                   "--windows", "2", "--seq-len", "64", "--gate", "50")
    assert code == 0, stderr
    r = json.loads((out / "results.json").read_text())
    row = r["checkpoints"][0]
    h, i, kv, layers, vocab = 576, 1536, 3 * 64, 30, 49152
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # q k v o gate up down
    params = layers * sum(o * n for o, n in shapes)
    channels = layers * sum(o for o, _ in shapes)  # one bf16 scale per output channel
    assert row["bits_per_weight"] == pytest.approx(8 + 16 * channels / params)
    # tied embeddings: the table is the lm_head, read whole every step; plus the norms (bf16)
    norms = 2 * (layers * 2 * h + h)
    assert row["bytes_per_token"] == params + 2 * channels + 2 * vocab * h + norms
    assert r["base"]["bytes_per_token"] == 2 * (params + vocab * h) + norms
    m = row["metrics"]
    assert m["kl"] < 0.1 and m["top1"] > 0.8 and r["analysis"]["rows"][0]["passed"]
