"""`lowbit compare`: quantize BASE into DIR/<scheme>/ (a finished output is reused), evaluate
every checkpoint against BASE, time it in lowbit's runtime (--speed) or read serving numbers
(--serving), and write DIR/results.json, report.md, report.html and the plots.

What a row holds comes from files and measurements only; report.py turns rows into verdicts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from pathlib import Path

from .errors import LowbitError
from .progress import progress

log = logging.getLogger(__name__)

PLOTS = {"recovery_vs_bytes.png", "recovery_vs_speed.png", "worst_layers.png"}
# eval-result keys that describe the run, not the model's quality
BOOKKEEPING = {"tokens", "windows", "seq_len", "size_bytes", "seconds", "baseline_ppl", "compute_dtype",
               "samples", "limit", "count", "n", "stderr", "ci", "ci_low", "ci_high", "interval",
               "prompts", "prompts_skipped", "max_new_tokens", "bootstrap", "tasks_options"}


def _headers(path: Path) -> dict[str, tuple[str, list[int], int]]:
    """name -> (dtype, shape, bytes) of every tensor in a directory's safetensors files, read
    from the headers alone."""
    found = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with open(f, "rb") as h:
            (n,) = struct.unpack("<Q", h.read(8))
            header = json.loads(h.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                found[name] = (t["dtype"], t["shape"], t["data_offsets"][1] - t["data_offsets"][0])
    if not found:
        raise LowbitError(f"{path} has no safetensors files")
    return found


def quantized_linears(path: Path) -> set[str]:
    """Module names whose weights a checkpoint stores quantized (every lowbit/compressed-tensors
    format stores a weight_scale beside its codes)."""
    return {n[: -len(".weight_scale")] for n in _headers(path) if n.endswith(".weight_scale")}


def sizes(path: Path, base: Path, linears: set[str] | None = None) -> dict:
    """Size on disk, bits per weight over `linears` (default: the Linears `path` quantizes; one
    it leaves unquantized counts at its stored bits) and the weight bytes a decode step reads."""
    t, b = _headers(path), _headers(base)
    linears = quantized_linears(path) if linears is None else linears
    params = weight_bytes = 0
    for m in linears:
        if f"{m}.weight" not in b:
            raise LowbitError(f"{path} quantizes {m}, which the base {base} does not have: "
                              "compare checkpoints quantized from this base")
        params += _count(b[f"{m}.weight"][1])
        # codes, scales, zero points, global scales; weight_shape is metadata no kernel reads
        weight_bytes += sum(v[2] for n, v in t.items()
                            if n.startswith(f"{m}.weight") and n != f"{m}.weight_shape")
    # an untied embedding table is gathered (one row per token), not read whole
    untied = any(n.startswith("lm_head.") for n in t)
    per_token = sum(v[2] for n, v in t.items() if not (untied and n.endswith("embed_tokens.weight")))
    return {"size_bytes": sum(f.stat().st_size for f in Path(path).glob("*.safetensors")),
            "bits_per_weight": 8 * weight_bytes / params if params else None,
            "quantized_params": params, "bytes_per_token": per_token}


def _count(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def parse_schemes(text: str) -> list[tuple[str, str, str | None]]:
    """"W4A16,MXFP4:mr-gptq" -> [(dir name, scheme, algorithm or None)]."""
    from .schemes import get_scheme

    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, algorithm = item.partition(":")
        scheme = get_scheme(name).name  # the LowbitError lists valid names
        if algorithm and algorithm not in ("rtn", "gptq", "mr-gptq"):
            raise LowbitError(f"--schemes {item}: algorithm must be rtn, gptq or mr-gptq")
        out.append((scheme + (f"-{algorithm}" if algorithm else ""), scheme, algorithm or None))
    if not out:
        raise LowbitError("--schemes lists no scheme")
    return out


def quantize_into(base: Path, out: Path, scheme: str, algorithm: str | None, options: dict) -> bool:
    """Quantize `base` into `out` unless `out` is a finished quantization of it with this scheme
    and algorithm (then it is reused). Returns whether it was reused. A killed run left only a
    work directory beside it, which quantize() resumes when it can."""
    from . import api

    report = out / api.REPORT_FILE
    if report.is_file():  # written last, inside the atomically renamed directory: finished
        made = json.loads(report.read_text())
        want = algorithm or _default_algorithm(scheme)
        if made["scheme"] == scheme and made["algorithm"] == want and \
                Path(made["model"]).resolve() == base.resolve():
            log.info("reusing %s (%s, %s)", out, scheme, want)
            return True
        raise LowbitError(f"{out} holds {made['scheme']} ({made['algorithm']}) of {made['model']}, not "
                          f"{scheme} ({want}) of {base}: remove it or choose another --out")
    if out.exists():
        raise LowbitError(f"{out} exists but is not a finished lowbit checkpoint: remove it")
    # OUT does not exist here, so overwrite only decides what happens to a killed run's work
    # directory: resumed when its fingerprint matches, else started over (a compare rerun with
    # other settings or software has no use for it)
    api.quantize(base, out, scheme, algorithm=algorithm, overwrite=True, **options)
    return False


def _default_algorithm(scheme: str) -> str:
    from .schemes import get_scheme

    return get_scheme(scheme).algorithm


def metrics_of(result: dict, prefix: str = "") -> dict[str, float]:
    """Every numeric score in an evaluate() result, nested dicts flattened with dots, bookkeeping
    keys left out. A score evaluate() gives with its interval ({"mean", "ci95"}) or beside the
    baseline's ({"model", "baseline", "recovery"}: ROUGE against the references, task scores)
    is the model's value alone, named as the base's own evaluation names it, so the two meet in
    one column and report.recovery divides them; task scores' "metrics" level is dropped."""
    out = {}
    for k, v in result.items():
        if k in BOOKKEEPING or k.endswith("_stderr"):
            continue
        if isinstance(v, dict) and ("model" in v or "mean" in v):
            v = v.get("model", v.get("mean"))
        if isinstance(v, dict):
            out.update(metrics_of(v, prefix if k == "metrics" else f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = float(v)
    return out


def intervals_of(result: dict, prefix: str = "") -> dict[str, list[float]]:
    """The bootstrap 95 % interval of every recovery an evaluate() result gives with one
    ({"model", "baseline", "recovery", "ci95"}: ROUGE against the references), named as
    metrics_of names the metric, as fractions like the recovery itself."""
    out = {}
    for k, v in result.items():
        if not isinstance(v, dict) or k in BOOKKEEPING:
            continue
        if "recovery" in v and "ci95" in v:
            if v["ci95"] is not None:
                out[prefix + k] = list(v["ci95"])
        elif "mean" not in v and "model" not in v:
            out.update(intervals_of(v, prefix if k == "metrics" else f"{prefix}{k}."))
    return out


def _key(path: Path, base: Path | None, settings: dict) -> str:
    """What a measurement depends on: the checkpoints' files (name, size, mtime) and settings."""
    files = lambda p: [(f.name, f.stat().st_size, f.stat().st_mtime_ns)  # noqa: E731
                       for f in sorted(Path(p).iterdir()) if f.suffix in (".safetensors", ".json")]
    text = json.dumps([str(Path(path).resolve()), files(path), files(base) if base else None, settings],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _previous(out: Path) -> dict:
    """Evaluations and timings of an earlier run in OUT, by their keys."""
    try:
        old = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    found = {}
    for row in [old.get("base") or {}, *old.get("checkpoints", [])]:
        if row.get("eval_key"):
            found[("eval", row["eval_key"])] = {k: row.get(k) or {} for k in ("metrics", "evaluated",
                                                                                "recovery_ci95")}
        if row.get("speed_key") and row.get("speed"):
            found[("speed", row["speed_key"])] = row["speed"]
    return found


def _evaluated(cache: dict, path: Path, base: Path | None, opts: dict, reuse: dict) -> dict:
    """{"metrics", "evaluated", "eval_key"} of `path` against `base`: from the cache or measured
    (`reuse`: answers and task scores this run already has, see api.evaluate)."""
    from . import api

    key = _key(path, base, opts)
    hit = cache.get(("eval", key))
    if hit:
        log.info("reusing the evaluation of %s from results.json", path)
        return {**hit, "eval_key": key}
    r = api.evaluate(path, base, reuse=reuse, **opts)
    return {"metrics": metrics_of(r), "recovery_ci95": intervals_of(r), "eval_key": key, "evaluated": {
        "windows": r["windows"], "tokens": r["tokens"], "compute_dtype": r["compute_dtype"]["dtype"]}}


def compare(base: str | Path, checkpoints=(), *, out: str | Path, schemes: str | None = None,
            gate: float = 99.0, speed: bool = False, serving=None,
            dataset: str = "sharegpt", samples: int = 128, seq_len: int = 512, windows: int = 32,
            prompt_tokens: int = 128, new_tokens: int = 32, repeats: int = 2,
            device: str = "auto", compute: str = "auto", fresh: bool = False,
            eval_options: dict | None = None, reuse: dict | None = None) -> dict:
    """Compare `checkpoints` (directories) and BASE quantized with `schemes` ("S1,S2[:algorithm]",
    into OUT/<scheme>/) against BASE; write the report into OUT. Returns {"results", "analysis"}
    (analysis["any_passed"] is False when nothing passes `gate` %). `serving`: serving result
    files (see serving_results.py). `eval_options` (generate, max_new_tokens, tasks, limit,
    num_fewshot) are passed to lowbit.evaluate for every model; BASE's answers and task scores
    are computed once and kept in `reuse` (a dict; auto() passes one across its calls).
    Evaluations and timings in OUT/results.json whose files and settings are unchanged are
    reused unless `fresh`."""
    from . import api, report
    from .hardware import cpu_isa, cpu_name
    from .runtime.timing import measure_speed
    from .serving_results import read_serving

    base, out = Path(base), Path(out)
    if not gate > 0:
        raise LowbitError(f"--gate must be a positive percentage, got {gate}")
    if (out / "config.json").exists():
        raise LowbitError(f"{out} is a checkpoint directory; give compare an output directory of its own")
    if (eval_options or {}).get("tasks"):  # a missing lm-eval or an unknown task fails before quantizing
        from .harness import task_names

        task_names(eval_options["tasks"])
    rows = [(Path(c).name, Path(c), None) for c in checkpoints]
    planned = parse_schemes(schemes) if schemes else []
    for name, scheme, algorithm in progress(planned, "quantizing"):
        reused = quantize_into(base, out / name, scheme, algorithm, dict(
            dataset=dataset, samples=samples, seq_len=seq_len, device=device, compute=compute))
        rows.append((name, out / name, reused))
    if not rows:
        raise LowbitError("nothing to compare: give checkpoint directories and/or --schemes")
    names = [n for n, _, _ in rows]
    if len(set(names)) < len(names):
        raise LowbitError(f"two checkpoints share a directory name ({', '.join(names)}): rename one")
    serving = [serving] if isinstance(serving, (str, Path)) else list(serving or [])
    serving_rows = read_serving(serving, {"base": base, **{n: p for n, p, _ in rows}}) if serving else {}
    linears = set().union(*(quantized_linears(p) for _, p, _ in rows))
    opts = dict(dataset=dataset, windows=windows, seq_len=seq_len, device=device, compute=compute,
                **(eval_options or {}))
    cache, reuse = {} if fresh else _previous(out), {} if reuse is None else reuse
    base_row = {"name": "base", "path": str(base), **sizes(base, base, linears),
                "serving": serving_rows.get("base"), **_evaluated(cache, base, None, opts, reuse)}
    results = {"gate": gate, "base": base_row, "checkpoints": [],
               "serving_files": [str(f) for f in serving],
               "evaluation": {"dataset": dataset, "seq_len": seq_len, **base_row["evaluated"],
                              **(eval_options or {})}}
    for name, path, reused in progress(rows, "evaluating"):
        made = path / api.REPORT_FILE
        made = json.loads(made.read_text()) if made.is_file() else {}
        results["checkpoints"].append({
            "name": name, "path": str(path), "scheme": made.get("scheme"),
            "algorithm": made.get("algorithm"), "reused": reused, **sizes(path, base, linears),
            "serving": serving_rows.get(name), **_evaluated(cache, path, base, opts, reuse),
            "calibration": {k: made.get(k) for k in ("dataset", "samples", "calibration_tokens")},
            "layer_error": made.get("error"), "layers": made.get("layers") or []})
    results["speed_method"] = None
    if speed:
        import torch

        method = {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
                  "threads": torch.get_num_threads(), "compute": compute,
                  "cpu": f"{cpu_name()} ({cpu_isa()})"}
        for row in progress([base_row, *results["checkpoints"]], "timing"):
            row["speed_key"] = _key(Path(row["path"]), None, method)
            row["speed"] = cache.get(("speed", row["speed_key"])) or measure_speed(
                Path(row["path"]), prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats,
                compute=compute)
        results["speed_method"] = {**method, "dtype": base_row["speed"]["dtype"]}
    analysis = report.analyze(results)
    write_report(out, results, analysis)
    return {"results": results, "analysis": analysis}


def write_report(out: Path, results: dict, analysis: dict) -> None:
    """Write results.json, report.md, report.html and the PNGs into `out`: staged in a temporary
    sibling, then moved in file by file with results.json last, so a crash never leaves a
    report that disagrees with its results (checkpoints under `out` stay where they are)."""
    from . import report
    from .outdir import writing
    from .plots import plots

    pngs = plots(results, analysis)
    files = {"report.md": report.markdown(results, analysis).encode(),
             "report.html": report.html(results, analysis, pngs).encode(), **pngs,
             "results.json": (json.dumps({**results, "analysis": analysis}, indent=2) + "\n").encode()}
    tmp = out / f".report.tmp-{os.getpid()}"
    with writing(out):
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            for name in files:  # dicts keep order: results.json last
                os.replace(tmp / name, out / name)
            for stale in PLOTS - set(files):  # a plot this run did not make is not this run's
                (out / stale).unlink(missing_ok=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
