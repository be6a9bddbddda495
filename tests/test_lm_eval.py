"""lm-evaluation-harness on lowbit's runtime (`lowbit eval --tasks`): the model class against a
float64 transformers computation written here, offline tasks defined in the test (local JSON
data), and the error a user without the extra gets."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lowbit import harness
from lowbit.checkpoint import load_tokenizer
from lowbit.errors import LowbitError
from test_cli import run_cli
from test_quality import chats  # noqa: F401 -- a fixture: ShareGPT-style conversations

pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install 'lowbit[lm-eval]'")
from lm_eval.api.instance import Instance  # noqa: E402

QUESTIONS = [("What color is the sky on a clear day?", ["blue", "green", "red", "black"], 0),
             ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
             ("Which is the largest planet?", ["Mars", "Venus", "Jupiter", "Earth"], 2),
             ("What do bees make?", ["milk", "honey", "silk"], 1)]
MC_YAML = """task: lowbit_test_mc
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""
GEN_YAML = """task: lowbit_test_gen
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
"""
GROUP_YAML = """group: lowbit_test_group
task: [lowbit_test_mc]
aggregate_metric_list:
  - metric: acc
"""
OUTER_YAML = """group: lowbit_test_outer
task: [lowbit_test_group, lowbit_test_gen]
aggregate_metric_list:
  - metric: acc
"""


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """The tiny llama through LowbitLM (float32, batches of 3) and in float64 transformers."""
    path = tiny_dir("llama")
    lm = harness.model_class()(path, dtype=torch.float32, batch_size=3)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    return path, lm, hf, load_tokenizer(path)


def reference_loglikelihood(hf, tok, context: str, continuation: str) -> tuple[float, bool]:
    """HFLM's rule, written out: the context's trailing spaces move to the continuation; the
    continuation's tokens are what the whole text encodes to after the context's encoding; an
    empty context is the BOS token (EOS without one). Float64 log-softmax, summed."""
    if context:
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = tok(context + continuation)["input_ids"]
        ctx = tok(context)["input_ids"]
        cont = whole[len(ctx):]
    else:
        cont = tok(continuation, add_special_tokens=False)["input_ids"]
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        ctx, whole = [prefix], [prefix, *cont]
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([whole[:-1]])).logits[0].double()
    logp = F.log_softmax(logits[len(whole) - 1 - len(cont):], dim=-1)  # rows predicting cont
    target = torch.tensor(cont)
    return logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


def greedy_text(hf, tok, prompt: str, n: int) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_loglikelihood_matches_float64_transformers(tiny):
    _, lm, hf, tok = tiny
    pairs = [("Question: What color is the sky?\nAnswer:", " blue"),
             ("Question: What color is the sky?\nAnswer: ", "blue"),  # a trailing space moves
             ("", "an empty context is conditioned on BOS"),
             ("short", " and a much longer continuation of several words"),
             ("a much longer context " * 6, "x"),
             ("one", "two"), ("three four", " five six seven")]  # 7 requests: batches of 3, 3, 1
    # a continuation that is the greedy choice, so is_greedy is True at least once (the first
    # context whose greedy token is a printable byte, which encodes back to that token)
    for context in ("Question:", "one", "the lazy dog", "abc", "xyz"):
        ids = tok(context)["input_ids"]
        with torch.no_grad():
            best = int(hf(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if tok(context + tok.decode([best]))["input_ids"] == [*ids, best]:
            break
    pairs.append((context, tok.decode([best])))
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    want = [reference_loglikelihood(hf, tok, c, x) for c, x in pairs]
    for (c, x), (lp, greedy), (ref_lp, ref_greedy) in zip(pairs, got, want):
        assert lp == pytest.approx(ref_lp, abs=1e-4, rel=1e-5), (c, x)
        assert greedy == ref_greedy, (c, x)
    assert got[-1][1] and not all(g for _, g in got)


def test_loglikelihood_rolling_scores_each_token_once_with_the_most_context(tiny_dir):
    path = tiny_dir("llama")
    lm = harness.model_class()(path, dtype=torch.float32, batch_size=2, max_length=16)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    tok = lm.tokenizer
    docs = ["the quick brown fox jumps over the lazy dog", "tiny"]
    got = lm.loglikelihood_rolling([request("loglikelihood_rolling", d) for d in docs])
    for doc, lp in zip(docs, got):
        seq = [tok.bos_token_id, *tok(doc)["input_ids"]]  # token j of the doc is seq[j + 1]
        n, total = len(seq) - 1, 0.0
        for first in range(0, n, 16):  # windows of 16 predicted tokens; the last gets 16 of context
            end = min(first + 16, n)
            window = seq[max(0, end - 16):end + 1]
            with torch.no_grad():
                logp = F.log_softmax(hf(input_ids=torch.tensor([window[:-1]])).logits[0].double(), -1)
            picked = logp.gather(1, torch.tensor(window[1:])[:, None])[:, 0]
            total += picked[-(end - first):].sum().item()
        assert lp == pytest.approx(total, abs=1e-4, rel=1e-5), doc
    assert len(tok(docs[0])["input_ids"]) > 32  # three windows, the last one partial


def test_generate_until_is_greedy_and_stops_at_until(tiny):
    _, lm, hf, tok = tiny
    prompts = ["Q: what is two plus two?\nA:", "the lazy dog"]
    plain = [greedy_text(hf, tok, p, 12) for p in prompts]
    stop = plain[0][3:5]  # a stop string the first answer meets
    got = lm.generate_until([request("generate_until", p, {"until": [stop], "max_gen_toks": 12})
                             for p in prompts])
    assert got[0] == plain[0][:plain[0].index(stop)] and len(got[0]) == 3
    assert got[1] == (plain[1][:plain[1].index(stop)] if stop in plain[1] else plain[1])


@pytest.fixture(scope="module")
def tasks(tiny, tmp_path_factory):
    """A multiple-choice and a generate_until task over JSON files written here. The second
    generation target is the tiny model's own greedy answer, so exact_match must be 1/2."""
    import datasets

    _, _, hf, tok = tiny
    root = tmp_path_factory.mktemp("tasks")
    mc = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    (root / "mc.json").write_text(json.dumps(mc))
    answer = greedy_text(hf, tok, "Q: Name a color.\nA:", 8)
    answer = min((answer.split(s)[0] for s in ("\n", ".")), key=len)
    gen = [{"question": "What is 2 plus 2?", "answer": "4"}, {"question": "Name a color.", "answer": answer}]
    (root / "gen.json").write_text(json.dumps(gen))
    (root / "text.txt").write_text("the quick brown fox jumps over the lazy dog\n\n" * 40)  # for ppl
    (root / "mc.yaml").write_text(MC_YAML.format(data=root / "mc.json"))
    (root / "gen.yaml").write_text(GEN_YAML.format(data=root / "gen.json"))
    (root / "group.yaml").write_text(GROUP_YAML)
    (root / "outer.yaml").write_text(OUTER_YAML)
    with pytest.MonkeyPatch.context() as patch:  # lm-eval's datasets cache, here and not in ~/.cache
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf-datasets")
        yield root


def test_offline_tasks_score_as_the_float64_model_would(tiny, tasks):
    path, _, hf, tok = tiny
    code, stdout, stderr = run_cli("eval", path, "--baseline", path, "--dataset", tasks / "text.txt",
                                   "--windows", "1", "--seq-len", "16", "--compute-dtype", "float32",
                                   "--tasks", f"{tasks / 'mc.yaml'},{tasks / 'gen.yaml'}", "--json")
    assert code == 0, stderr
    r = json.loads(stdout)["tasks"]
    assert set(r) == {"lowbit_test_mc", "lowbit_test_gen"}
    acc, acc_norm = [], []
    for q, choices, gold in QUESTIONS:
        lls = [reference_loglikelihood(hf, tok, f"Question: {q}\nAnswer:", f" {c}")[0] for c in choices]
        acc.append(max(range(len(lls)), key=lls.__getitem__) == gold)
        norm = [ll / len(c) for ll, c in zip(lls, choices)]  # lm-eval: per character of the choice
        acc_norm.append(max(range(len(norm)), key=norm.__getitem__) == gold)
    mc = r["lowbit_test_mc"]
    assert mc["samples"] == 4
    assert mc["metrics"]["acc"]["model"] == pytest.approx(sum(acc) / 4)
    assert mc["metrics"]["acc_norm"]["model"] == pytest.approx(sum(acc_norm) / 4)
    assert r["lowbit_test_gen"]["metrics"]["exact_match"]["model"] == 0.5
    for t in r.values():  # the model against itself
        for m in t["metrics"].values():
            assert m["baseline"] == m["model"] and m["recovery"] in (1.0, None)


def test_compare_gates_on_rouge_and_task_recovery_and_answers_for_base_once(tiny, tasks, chats, tmp_path,
                                                                          monkeypatch):
    import shutil

    from lowbit import quality

    base = tiny[0]
    same = shutil.copytree(base, tmp_path / "same")  # answers and scores exactly as BASE
    answered, scored = [], []
    answers, scores = quality._answers, harness.scores
    monkeypatch.setattr(quality, "_answers", lambda path, *a: answered.append(path) or answers(path, *a))
    monkeypatch.setattr(harness, "scores", lambda path, *a, **k: scored.append(path) or scores(path, *a, **k))
    out = tmp_path / "report"
    code, stdout, stderr = run_cli("compare", base, same, "--schemes", "W4A16:rtn", "--out", out,
                                   "--dataset", chats, "--samples", "4", "--windows", "1", "--seq-len", "16",
                                   "--compute-dtype", "float32", "--generate", "2", "--max-new-tokens", "8",
                                   "--tasks", f"{tasks / 'mc.yaml'},{tasks / 'gen.yaml'}", "--gate", "99")
    assert code == 0, stderr  # `same` passes
    # BASE answered and scored once, as the reference row, not again beside each checkpoint
    each_once = sorted(map(str, [base, same, out / "W4A16-rtn"]))
    assert sorted(map(str, answered)) == sorted(map(str, scored)) == each_once
    r = json.loads((out / "results.json").read_text())
    rows = {row["name"]: row for row in r["analysis"]["rows"]}
    b = r["base"]["metrics"]
    rouge, tasks_ = [f"generation.vs_reference.{k}" for k in quality.ROUGE], \
        ["tasks.lowbit_test_mc.acc", "tasks.lowbit_test_mc.acc_norm", "tasks.lowbit_test_gen.exact_match"]
    assert set(b) == {"ppl", *rouge, *tasks_}  # one column each; no prompt counts, seeds or intervals
    for name, row in rows.items():
        m = row["metrics"]
        assert set(m) == {"ppl", "kl", "top1", *rouge, *tasks_, "generation.vs_baseline.exact_match",
                          *[f"generation.vs_baseline.{k}" for k in quality.ROUGE]}
        # ROUGE against the references and task scores: recovered as ckpt / base and gated;
        # sameness with BASE's answers (ROUGE, exact match) shown, not gated
        assert set(row["recovery"]) == {"ppl", "kl", "top1", *rouge, *tasks_}
        for k in [*rouge, *tasks_]:
            want = m[k] / b[k] if b[k] else None
            assert row["recovery"][k] == (pytest.approx(want) if want is not None else None), (name, k)
    assert rows["same"]["passed"] and rows["same"]["metrics"]["generation.vs_baseline.exact_match"] == 1
    assert b["tasks.lowbit_test_gen.exact_match"] == 0.5  # the fixture's: its second target is BASE's answer
    assert "Generation: 2 held-out chat prompts" in (out / "report.md").read_text()


def test_a_group_is_one_row_per_metric_over_limit_documents(tiny, tasks):
    path = tiny[0]
    code, stdout, stderr = run_cli("eval", path, "--dataset", tasks / "text.txt", "--windows", "1",
                                   "--seq-len", "16", "--tasks", str(tasks / "outer.yaml"), "--limit", "2")
    assert code == 0, stderr
    rows = [line for line in stdout.splitlines() if line.startswith("lowbit_test")]
    # a group of a group (2 multiple-choice documents) and a task (2 generated answers)
    assert len(rows) == 1 and rows[0].startswith("lowbit_test_outer acc ") and "[4 docs]" in rows[0]
    assert "recovery" not in stdout  # no baseline


def test_num_fewshot_and_limit_reach_the_prompts(tiny, tasks, monkeypatch):
    cls, seen = harness.model_class(), []
    original = cls.loglikelihood

    def spy(self, requests, **kw):
        seen.extend(r.args[0] for r in requests)
        return original(self, requests, **kw)

    monkeypatch.setattr(cls, "loglikelihood", spy)
    harness.scores(tiny[0], [str(tasks / "mc.yaml")], limit=1, num_fewshot=2, dtype=torch.float32)
    assert len(seen) == len(QUESTIONS[0][1])  # one document: a request per choice
    assert all(c.count("Question:") == 3 and c.endswith(f"Question: {QUESTIONS[0][0]}\nAnswer:") for c in seen)


def test_recovery_is_higher_is_better_aware():
    model = {"t": {"samples": 2, "metrics": {"acc": 0.4, "word_perplexity": 20.0},
                   "higher_is_better": {"acc": True, "word_perplexity": False}}}
    base = {"t": {"samples": 2, "metrics": {"acc": 0.5, "word_perplexity": 10.0}, "higher_is_better": {}}}
    rows = harness.table(model, base)["t"]["metrics"]
    assert rows["acc"]["recovery"] == pytest.approx(0.8)
    assert rows["word_perplexity"]["recovery"] == pytest.approx(0.5)
    assert harness.table(model)["t"]["metrics"]["acc"] == {"model": 0.4, "baseline": None, "recovery": None}


def test_unknown_tasks_and_missing_files_are_one_line_errors(tiny_dir, tmp_path):
    path = tiny_dir("llama")
    for spec, message in ((str(tmp_path / "none.yaml"), "not found"),
                          ("no_such_task_anywhere", "unknown lm-eval task")):
        code, _, stderr = run_cli("eval", path, "--tasks", spec)
        assert code == 2 and message in stderr and len(stderr.splitlines()) == 1, stderr


def test_without_lm_eval_the_error_names_the_extra(tiny_dir, monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(LowbitError, match=r"lowbit\[lm-eval\]"):
        harness.task_names(["hellaswag"])
    code, _, stderr = run_cli("eval", tiny_dir("llama"), "--tasks", "hellaswag")
    assert code == 2 and "pip install 'lowbit[lm-eval]'" in stderr


@pytest.mark.e2e
def test_smollm2_loglikelihood_splits_tokens_at_the_boundary_like_hflm(smollm2_dir):
    lm = harness.model_class()(smollm2_dir, dtype=torch.float32, batch_size=4)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float64).eval()
    tok = lm.tokenizer
    pairs = [("The capital of France is", " Paris"),
             ("The capital of France is ", "Paris"),  # the space moves: " Paris" is one token
             # "Par" + "is" encode as the one token " Paris": the whole text is no longer than the
             # context, so HFLM's rule leaves no continuation token (log-likelihood 0, greedy)
             ("The capital of France is Par", "is"),
             ("", "Hello world"), ("2 + 2 =", " 4")]
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    for (c, x), (lp, greedy) in zip(pairs, got):
        ref_lp, ref_greedy = reference_loglikelihood(hf, tok, c, x)
        assert lp == pytest.approx(ref_lp, abs=2e-3, rel=1e-4), (c, x)
        assert greedy == ref_greedy, (c, x)
    assert got[0][0] == pytest.approx(got[1][0], abs=1e-6)  # the same tokens either way
    assert got[2] == (0.0, True)
