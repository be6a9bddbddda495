"""lm-evaluation-harness tasks on lowbit's runtime: an lm-eval model class over lowbit.load
(model_class()), scores() to run tasks with it, and table(), which puts the scores and their
recovery against a baseline into `lowbit eval`.

lm-eval is optional (`pip install 'lowbit[lm-eval]'`). Tasks are lm-eval names (hellaswag,
arc_easy, gsm8k, mmlu, ...: their data come from the Hugging Face hub) or paths to task YAML
files, whose `dataset_path: json` with `dataset_kwargs: {data_files: ...}` reads local data.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import LowbitError
from .progress import progress

log = logging.getLogger(__name__)

EXTRA = "pip install 'lowbit[lm-eval]' (lm-eval==0.4.13)"
BATCH = 8  # scoring requests per forward
MAX_GEN_TOKS = 256  # lm-eval's default when a task does not say


def _lm_eval():
    try:
        import lm_eval.api.model
        import lm_eval.evaluator
        import lm_eval.tasks
    except ImportError as e:
        raise LowbitError(f"--tasks needs lm-evaluation-harness ({e.name} is missing): {EXTRA}") from None
    return lm_eval


@functools.cache  # one class, so lm-eval sees the same type on every call
def model_class() -> type:
    """The lm-eval model class (built on first use, so lm-eval stays an optional import)."""
    return _build(_lm_eval().api.model.TemplateLM)


def _build(TemplateLM: type) -> type:
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class LowbitLM(TemplateLM):
        """A lowbit checkpoint as an lm-eval LM. TemplateLM (lm-eval's LM with HFLM's
        tokenization) splits context and continuation where HFLM does: trailing spaces of the
        context move to the continuation, context + continuation is encoded whole and the
        continuation is what follows the context's own encoding."""

        def __init__(self, path: str | Path, dtype: torch.dtype | str = "auto", batch_size: int = BATCH,
                     max_length: int | None = None, max_gen_toks: int = MAX_GEN_TOKS):
            super().__init__()
            from .api import load
            from .checkpoint import load_tokenizer

            self.model = load(path, dtype)
            self.tokenizer = load_tokenizer(path)
            self.batch_size = batch_size
            self.max_gen_toks = max_gen_toks
            self.max_length = max_length or getattr(self.model.config, "max_position_embeddings", 2048)

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:  # what an empty context is conditioned on, as in HFLM
            bos = self.tokenizer.bos_token_id
            return self.eot_token_id if bos is None else bos

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            bos = self.tokenizer.bos_token
            if add_special_tokens is None:  # a string already starting with BOS gets no second one
                add_special_tokens = not (bos and string.startswith(bos))
            return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

        def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
            return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

        @torch.no_grad()
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            """(sum of log p(continuation | context), whether greedy decoding gives it) per
            request; longest first in batches, right-padded (causal attention keeps padding out
            of every real position), logits only where continuations are."""
            rows = []
            for _, context, continuation in requests:
                ids = (context + continuation)[-(self.max_length + 1):]  # left-truncated, as HFLM
                rows.append((ids[:-1], continuation))
            order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
            out: list = [None] * len(rows)
            batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            for batch in progress(batches, "scoring", total=len(batches)):
                width = len(rows[batch[0]][0])
                pad = self.tokenizer.pad_token_id or 0
                ids = torch.tensor([rows[i][0] + [pad] * (width - len(rows[i][0])) for i in batch])
                first = min(len(rows[i][0]) - len(rows[i][1]) for i in batch)
                keep = torch.arange(first, width)  # positions predicting some continuation token
                logits = self.model(input_ids=ids, logits_to_keep=keep).logits
                logp = F.log_softmax(logits.float(), dim=-1)
                for row, i in enumerate(batch):
                    inp, cont = rows[i]
                    where = slice(len(inp) - len(cont) - first, len(inp) - first)
                    lp, target = logp[row, where], torch.tensor(cont)
                    total = lp.gather(1, target[:, None]).double().sum().item()
                    out[i] = (total, bool((lp.argmax(-1) == target).all()))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            """Whole-document log-likelihood in disjoint windows of max_length tokens, each
            with as much preceding context as fits (lm-eval's rolling windows, as HFLM)."""
            windows, owner = [], []
            for n, (string,) in enumerate(r.args for r in requests):
                for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                        self.tok_encode(string), self.prefix_token_id, self.max_length, 1)):
                    windows.append((None, context, continuation))
                    owner.append(n)
            totals = [0.0] * len(requests)
            for n, (logp, _) in zip(owner, self._loglikelihood_tokens(windows)):
                totals[n] += logp
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            """Greedy completions ending at the task's `until` strings or EOS, through
            quality.complete (batch_size decoding together); requests sharing generation
            settings (all of a task's, as a rule) go there together."""
            from .quality import complete

            eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
            groups: dict[tuple, list[tuple[int, list[int]]]] = {}
            sampled = False
            for n, (context, gen_kwargs) in enumerate(r.args for r in requests):
                kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
                sampled |= bool(kw.get("do_sample") and kw.get("temperature", 0) > 0)
                stop = tuple(handle_stop_sequences(kw.pop("until", None), eos=eos))
                new = kw.pop("max_gen_toks")
                ids = self.tok_encode(context)[-max(1, self.max_length - new):]  # room for the answer
                groups.setdefault((new, stop), []).append((n, ids))
            if sampled:
                log.warning("a task asks for sampling; lowbit's harness model answers greedily")
            out = [""] * len(requests)
            for (new, stop), items in groups.items():
                texts = complete(self.model, self.tokenizer, [ids for _, ids in items],
                                 max_tokens=new, stop=stop, batch=self.batch_size)
                for (n, _), text in zip(items, texts):
                    out[n] = text
            return out

    return LowbitLM


def task_names(specs: str | Sequence[str]) -> tuple[list[str], object]:
    """lm-eval task names for `specs` (names, or paths to task YAML files; or one string of
    them separated by commas, as the CLI takes them) and the TaskManager that knows them all."""
    specs = [t.strip() for t in specs.split(",") if t.strip()] if isinstance(specs, str) else list(specs)
    if not specs:
        raise LowbitError("--tasks names no task")
    lm_eval = _lm_eval()
    paths = [Path(s) for s in specs if s.endswith((".yaml", ".yml"))]
    for p in paths:
        if not p.is_file():
            raise LowbitError(f"task file {p} not found")
    names = [s for s in specs if not s.endswith((".yaml", ".yml"))]
    manager = lm_eval.tasks.TaskManager(include_path=sorted({str(p.parent.resolve()) for p in paths}) or None,
                                        include_defaults=bool(names))
    for p in paths:
        found = [e.name for e in manager.task_index.values()
                 if e.yaml_path is not None and Path(e.yaml_path).resolve() == p.resolve()]
        if not found:
            raise LowbitError(f"{p} defines no lm-eval task (it needs a `task:` name)")
        names += found
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise LowbitError(f"unknown lm-eval task(s) {', '.join(unknown)}: see `lm-eval ls tasks`, "
                          "or pass a task YAML path")
    return names, manager


def scores(path: str | Path, tasks: list[str], manager=None, *, limit: int | None = None,
           num_fewshot: int | None = None, dtype: torch.dtype | str = "auto",
           batch_size: int = BATCH) -> dict:
    """lm-eval's scores of checkpoint `path` on `tasks` (names or task YAML paths; or the names
    and TaskManager task_names() gave):
    {task: {"samples": n, "metrics": {metric: value}, "higher_is_better": {metric: bool}}},
    metric names as lm-eval gives them ("acc", "exact_match,strict-match": metric,filter)."""
    lm_eval = _lm_eval()
    names, manager = (tasks, manager) if manager is not None else task_names(tasks)
    model = model_class()(path, dtype=dtype, batch_size=batch_size)
    results = lm_eval.evaluator.simple_evaluate(
        model=model, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        bootstrap_iters=1000, log_samples=False)  # 1000: stderr of non-mean metrics, bounded time
    # the tasks and groups asked for (mmlu, not its 57 subjects); all results for a tag
    asked = [n for n in names if n in results["results"]] or list(results["results"])
    out = {}
    for task in asked:
        metrics = results["results"][task]
        better = results.get("higher_is_better", {}).get(task, {})
        values = {k.removesuffix(",none"): float(v) for k, v in metrics.items()
                  if k not in ("alias", "sample_len") and "_stderr" not in k
                  and isinstance(v, (int, float))}
        out[task] = {"samples": _documents(results, task),
                     "metrics": values,
                     "higher_is_better": {k: bool(better.get(k.split(",")[0], True)) for k in values}}
    return out


def _documents(results: dict, name: str) -> int | None:
    """Documents scored for a task, or summed over a group's tasks and groups."""
    parts = results.get("group_subtasks", {}).get(name)
    if not parts:
        return results.get("n-samples", {}).get(name, {}).get("effective")
    counts = [_documents(results, p) for p in parts]
    return None if None in counts else sum(counts)


def table(model: dict, base: dict | None = None) -> dict:
    """{task: {"samples": n, "metrics": {metric: {"model", "baseline", "recovery"}}}}: recovery is
    model / baseline where higher is better and baseline / model where lower is (perplexities),
    so >= 1 always means as good as the baseline; None without a baseline or when it scores 0."""
    out = {}
    for task, m in model.items():
        rows = {}
        for k, v in m["metrics"].items():
            b = None if base is None else base.get(task, {}).get("metrics", {}).get(k)
            num, den = (v, b) if m["higher_is_better"][k] else (b, v)
            rows[k] = {"model": v, "baseline": b, "recovery": num / den if b is not None and den else None}
        out[task] = {"samples": m["samples"], "metrics": rows}
    return out
