"""Generation quality (`lowbit eval --generate`): ROUGE recomputed here from its definition, the
paired bootstrap, the held-out prompt selection, and whole runs on tiny models and SmolLM2."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch

import lowbit
from lowbit import data, quality
from lowbit.errors import LowbitError
from test_cli import run_cli

# Porter stems (the MLPerf / rouge-score setting) of the words below that have more than 3 letters
STEM = {"cats": "cat", "running": "run", "runs": "run", "dogs": "dog", "jumped": "jump",
        "jumps": "jump", "birds": "bird", "flying": "fly", "singing": "sing", "songs": "song"}
PAIRS = [  # (prediction, target)
    ("The cats were running, and the dogs jumped!", "A cat runs and jumps; the dog was here."),
    ("birds flying birds flying birds", "The birds were singing songs while flying."),
    ("nothing in common", "completely different words"),
    ("the the the the", "the cat the dog"),  # repeated n-grams are clipped to the target's count
]


def words(text: str) -> list[str]:
    toks = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return [STEM.get(t, t) for t in toks]


def f1(overlap: int, n_pred: int, n_target: int) -> float:
    if overlap == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_target
    return 2 * p * r / (p + r)


def rouge_n(pred: list[str], target: list[str], n: int) -> float:
    grams = lambda ws: Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))
    p, t = grams(pred), grams(target)
    return f1(sum((p & t).values()), sum(p.values()), sum(t.values()))


def rouge_l(pred: list[str], target: list[str]) -> float:
    table = [[0] * (len(target) + 1) for _ in range(len(pred) + 1)]
    for i, a in enumerate(pred):
        for j, b in enumerate(target):
            table[i + 1][j + 1] = table[i][j] + 1 if a == b else max(table[i][j + 1], table[i + 1][j])
    return f1(table[-1][-1], len(pred), len(target))


def test_rouge_matches_its_definition_with_porter_stemming():
    preds, targets = zip(*PAIRS)
    got = quality.rouge(preds, targets)
    for i, (p, t) in enumerate(PAIRS):
        wp, wt = words(p), words(t)
        assert got["rouge1"][i] == pytest.approx(rouge_n(wp, wt, 1), abs=1e-12), p
        assert got["rouge2"][i] == pytest.approx(rouge_n(wp, wt, 2), abs=1e-12), p
        assert got["rougeL"][i] == pytest.approx(rouge_l(wp, wt), abs=1e-12), p
    # stemming is on: "cats ... running" meets "cat runs" only through the stems
    plain = rouge_n(PAIRS[0][0].lower().replace(",", "").replace("!", "").split(),
                    PAIRS[0][1].lower().replace(";", "").replace(".", "").split(), 1)
    assert got["rouge1"][0] > plain + 0.1
    assert 0 < got["rouge1"][3] < 1 and got["rouge1"][2] == 0


def test_identical_answers_score_one_even_when_empty():
    got = quality.rouge(["", "same words", "!!"], ["", "same words", "!!"])
    assert all(list(v) == [1.0, 1.0, 1.0] for v in got.values())


def test_recovery_interval_contains_the_point_and_is_deterministic():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.2, 0.6, 40)
    model = np.clip(base + rng.normal(-0.05, 0.1, 40), 0, 1)
    r = quality.recovery(model, base)
    assert r["recovery"] == pytest.approx(model.mean() / base.mean())
    lo, hi = r["ci95"]
    assert lo < r["recovery"] < hi and hi - lo > 0.01
    assert quality.recovery(model, base) == r  # fixed seed: the same interval every run
    assert quality.recovery(model, base, seed=1)["ci95"] != r["ci95"]  # and the seed matters
    assert len({tuple(quality.recovery(model, base, resamples=k)["ci95"]) for k in (200, 1000)}) == 2
    m = quality.mean_interval(model)
    assert m["mean"] == pytest.approx(model.mean()) and m["ci95"][0] < m["mean"] < m["ci95"][1]


def test_resampling_is_paired():
    # the model keeps exactly 90 % of the baseline's score on every prompt: any paired resample
    # gives 0.9, while resampling the two sides independently would spread it widely
    base = np.random.default_rng(2).uniform(0.1, 0.9, 30)
    r = quality.recovery(0.9 * base, base)
    assert r["ci95"] == pytest.approx([0.9, 0.9], abs=1e-12)


def test_recovery_of_a_baseline_scoring_zero_is_none():
    r = quality.recovery(np.array([0.1, 0.2]), np.zeros(2))
    assert r["recovery"] is None and r["ci95"] is None and r["model"] == pytest.approx(0.15)


def test_score_of_identical_answers_recovers_fully_and_of_others_as_the_ratio():
    preds, refs = [p for p, _ in PAIRS], [t for _, t in PAIRS]
    same = quality.score(preds, preds, refs)
    assert all(same["vs_baseline"][k] == {"mean": 1.0, "ci95": [1.0, 1.0]} for k in same["vs_baseline"])
    for k in quality.ROUGE:
        assert same["vs_reference"][k]["recovery"] == 1 and same["vs_reference"][k]["ci95"] == [1, 1]
    worse = quality.score(["the", "birds", "nothing", "the"], preds, refs)
    assert worse["vs_baseline"]["exact_match"]["mean"] == 0
    r1 = worse["vs_reference"]["rouge1"]
    ours = np.mean([rouge_n(words(p), words(t), 1) for p, t in zip(["the", "birds", "nothing", "the"], refs)])
    theirs = np.mean([rouge_n(words(p), words(t), 1) for p, t in PAIRS])
    assert r1["recovery"] == pytest.approx(ours / theirs) and r1["recovery"] < 1
    alone = quality.score(preds, None, refs)
    assert set(alone) == {"prompts", "bootstrap", "vs_reference"}
    assert alone["vs_reference"]["rouge1"]["mean"] == pytest.approx(theirs)


def conversation(user: str, reply: str, first: str = "user") -> dict:
    turns = [{"from": "human" if first == "user" else "gpt", "value": user},
             {"from": "gpt" if first == "user" else "human", "value": reply}]
    return {"conversations": turns}


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """A ShareGPT-style .json: 300 conversations, some starting with the assistant, some text."""
    records = []
    for i in range(300):
        if i % 7 == 3:
            records.append(f"plain text record {i}")
        elif i % 7 == 5:
            records.append(conversation(f"hello {i}", f"an assistant opener {i}", first="assistant"))
        else:
            records.append(conversation(f"question {i}: what jumps over dog {i}?",
                                        f"the fox {i} jumps over the lazy dog {i % 5}"))
    path = tmp_path_factory.mktemp("chats") / "chats.json"
    path.write_text(json.dumps(records))
    return path


def test_prompts_are_the_first_user_turns_of_the_eval_split_in_file_order(tiny_dir, chats):
    tok = lowbit.api.load_tokenizer(tiny_dir("llama"))
    records = data.read_records(str(chats))
    got = quality.held_out_prompts(tok, records, 5)
    held_out = [r for r in data.split(records, "eval") if isinstance(r, list) and r[0]["role"] == "user"]
    assert got.messages == [[r[0]] for r in held_out[:5]]
    assert got.references == [r[1]["content"] for r in held_out[:5]]
    assert quality.held_out_prompts(tok, records, 5) == got
    assert got.skipped == sum(1 for r in data.split(records, "eval")[:data.split(records, "eval").index(held_out[4])]
                              if r not in held_out)
    with pytest.raises(LowbitError, match="at most 3 tokens"):
        quality.held_out_prompts(tok, records, 5, max_tokens=3)


def test_eval_generate_against_itself_is_perfect_and_against_another_model_is_not(tiny_dir, chats, tmp_path):
    from tiny import save_tiny

    src = tiny_dir("llama")
    args = ["--dataset", chats, "--windows", "1", "--seq-len", "32", "--generate", "4",
            "--max-new-tokens", "12", "--json"]
    code, stdout, stderr = run_cli("eval", src, "--baseline", src, *args)
    assert code == 0, stderr
    g = json.loads(stdout)["generation"]
    assert g["prompts"] == 4 and g["max_new_tokens"] == 12 and g["bootstrap"]["resamples"] == 1000
    for k in ("rouge1", "rouge2", "rougeL", "exact_match"):
        assert g["vs_baseline"][k] == {"mean": 1.0, "ci95": [1.0, 1.0]}, k
    for k in ("rouge1", "rouge2", "rougeL"):
        m = g["vs_reference"][k]
        assert m["model"] == m["baseline"]
        assert m["recovery"] in (1.0, None) and m["ci95"] in ([1.0, 1.0], None)

    other = save_tiny("llama", tmp_path / "other", seed=1)
    code, stdout, stderr = run_cli("eval", src, "--baseline", other, *args)
    assert code == 0, stderr
    g = json.loads(stdout)["generation"]
    assert g["vs_baseline"]["exact_match"]["mean"] < 1 and g["vs_baseline"]["rouge1"]["mean"] < 1


def test_eval_generate_prints_rouge_rows(tiny_dir, chats):
    src = tiny_dir("llama")
    code, stdout, stderr = run_cli("eval", src, "--dataset", chats, "--windows", "1", "--seq-len", "32",
                                   "--generate", "2", "--max-new-tokens", "4")
    assert code == 0, stderr
    assert "rouge1 vs reference" in stdout and "2 held-out prompts" in stdout
    assert "vs baseline" not in stdout  # no baseline, nothing to compare with


@pytest.mark.e2e
def test_smollm2_answers_like_itself_and_partly_like_the_dataset(smollm2_dir):
    r = lowbit.evaluate(smollm2_dir, smollm2_dir, windows=1, seq_len=32, generate=2,
                        max_new_tokens=16)
    g = r["generation"]
    assert g["vs_baseline"]["exact_match"]["mean"] == 1
    for k in ("rouge1", "rougeL"):
        m = g["vs_reference"][k]
        assert 0 < m["model"] == m["baseline"] < 1 and m["recovery"] == 1 and m["ci95"] == [1, 1]


@pytest.mark.parametrize("extra, message", [(["--max-new-tokens", "300"], "leaves no room for a prompt"),
                                            (["--text-only"], "no held-out prompts")])
def test_generate_errors_are_one_line_and_come_before_any_model_runs(tiny_dir, chats, tmp_path, extra,
                                                                     message, monkeypatch):
    from lowbit import metrics

    monkeypatch.setattr(metrics, "compare", lambda *a: pytest.fail("a model ran before the error"))
    dataset = chats
    if extra == ["--text-only"]:  # records with no conversation to take a prompt from
        dataset, extra = tmp_path / "text.txt", []
        dataset.write_text("".join(f"plain text record {i} to score\n\n" for i in range(300)))
    code, _, stderr = run_cli("eval", tiny_dir("llama"), "--dataset", dataset, "--windows", "1",
                              "--seq-len", "8", "--generate", "2", *extra)
    assert code == 2 and message in stderr and len(stderr.splitlines()) == 1, stderr


def test_complete_answers_families_the_batch_runtime_lacks_one_at_a_time_saying_why_once(caplog):
    import logging

    from tiny import tiny_model, tiny_tokenizer

    model, tok = tiny_model("llama", dtype=torch.float64), tiny_tokenizer()
    model.config.model_type = "olmo"  # any family runtime/batch.py has no path for
    prompts = ["a", "the lazy dog", "xyz"]
    with caplog.at_level(logging.WARNING, logger="lowbit.quality"):
        got = quality.complete(model, tok, prompts, max_tokens=6)
    assert [r.getMessage() for r in caplog.records] == [
        "batched decoding runs llama, mistral, qwen2, qwen3, phi3, gemma, gemma2, gemma3_text models; "
        "'olmo' is not one of them: answering 3 prompts one at a time"]
    assert got == [lowbit.generate(model, p, max_tokens=6, tokenizer=tok).text for p in prompts]
