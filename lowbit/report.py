"""The trade-off report: a results dict (what `lowbit compare` measured) -> recoveries, the gate,
the Pareto front, recommendations, and the report as Markdown and one HTML page (the plots it
embeds come from plots.py).

Pure: nothing here loads a model or reads a file. Recovery is "how much of the base model's
quality the checkpoint keeps", as a fraction, and each metric says how it is computed:

    ppl        base_ppl / ppl            (lower is better; > 1 when the checkpoint scores better)
    kl         exp(-KL(base || ckpt))    = ppl of the base's own predictions under the base /
                                           under the checkpoint: the ppl recovery on text the
                                           base model would write, 1 only when identical
    top1       the agreement itself      (the base agrees with itself on every token)
    NAME_recovery / NAME.recovery        a recovery the evaluator computed, taken as it is
    any other metric in both rows        ckpt / base (base / ckpt for LOWER_IS_BETTER names)

A checkpoint PASSes when every recovery is >= gate % (MLPerf's 99 % / 99.9 % of the original's
accuracy); a metric whose recovery is undefined (base score 0) is shown and left out of the gate.
"""

from __future__ import annotations

import base64
import html as _html
import math

LOWER_IS_BETTER = {"ppl", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "loss", "ter"}
DEPLOYMENTS = ("latency-bound", "throughput-bound", "memory-bound")
CAPTIONS = {
    "recovery_vs_bytes.png": "Recovery of each metric against the weight bytes a decode step reads; "
                             "each checkpoint is labelled at its worst metric.",
    "recovery_vs_speed.png": "Worst recovery against speed; squares: the Pareto front (nothing is "
                             "both faster and more accurate).",
    "worst_layers.png": "Each checkpoint's worst Linears by relative error, from its "
                        "lowbit_report.json: output error on calibration data, or weight error "
                        "||W - Q|| / ||W|| for data-free schemes.",
}


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def recovery(base: dict, ckpt: dict) -> dict[str, float | None]:
    """Recovery per metric (a fraction) of a checkpoint's metrics against the base's."""
    out: dict[str, float | None] = {}
    for name, value in ckpt.items():
        if name == "kl":
            out[name] = math.exp(-value)
        elif name == "top1" or name.endswith("_recovery") or name.endswith(".recovery"):
            out[name] = value
        elif name in base:
            ref = base[name]
            lower = _leaf(name) in LOWER_IS_BETTER
            num, den = (ref, value) if lower else (value, ref)
            out[name] = num / den if den else None  # a base score of 0 has no ratio
    return out


def verdict(recoveries: dict[str, float | None], gate: float) -> tuple[bool, list[str]]:
    """(passed, the metrics below gate %): recovery >= gate / 100 on every defined metric."""
    failing = [m for m, r in recoveries.items() if r is not None and r * 100 < gate]
    gated = [r for r in recoveries.values() if r is not None]
    return bool(gated) and not failing, failing


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both maximized)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any(a >= x and b >= y and (a > x or b > y) for a, b in points):
            front.append(i)
    return front


def throughput(row: dict) -> tuple[float, str] | None:
    """The serving throughput of a row, and where it came from; None when none was measured."""
    serving = row.get("serving") or {}
    if serving.get("output_throughput") is not None:
        return serving["output_throughput"], f"serving {serving['keys']['output_throughput']}"
    return None


def decode_speed(row: dict) -> tuple[float, str] | None:
    """Decode tok/s at batch 1 (--speed), else the serving throughput; None when neither."""
    if (row.get("speed") or {}).get("decode_tok_s") is not None:
        return row["speed"]["decode_tok_s"], "decode tok/s, batch 1"
    return throughput(row)


def memory(row: dict) -> tuple[float, str]:
    """Resident memory of a row: weights + KV cache measured in the runtime, else size on disk."""
    speed = row.get("speed") or {}
    if speed.get("memory_bytes") is not None:
        return speed["memory_bytes"], "weights + KV cache resident in lowbit's runtime"
    return row["size_bytes"], "size on disk (no --speed: resident memory not measured)"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def recommend(rows: list[dict]) -> dict[str, dict]:
    """Per deployment, the passing checkpoint to deploy and the measured numbers that decided it.
    `rows` are analyzed checkpoint rows (with "passed")."""
    ok = [r for r in rows if r["passed"]]
    picks = {}
    if not ok:
        return {d: {"pick": None, "why": "no checkpoint passes the gate"} for d in DEPLOYMENTS}
    best = min(ok, key=lambda r: r["bytes_per_token"])
    timed = ""
    if best.get("speed"):
        timed = f"; measured decode {best['speed']['decode_tok_s']:.1f} tok/s at batch 1"
        fastest = max((r for r in ok if r.get("speed")), key=lambda r: r["speed"]["decode_tok_s"])
        if fastest is not best:  # bytes decide for an engine with native kernels; say when ours disagrees
            timed += (f", but {fastest['name']} decodes faster in lowbit's runtime "
                      f"({fastest['speed']['decode_tok_s']:.1f} tok/s)")
    picks["latency-bound"] = {"pick": best["name"], "why": (
        f"smallest weight bytes read per decoded token among passing checkpoints: "
        f"{_mib(best['bytes_per_token'])} ("
        + ", ".join(f"{r['name']} {_mib(r['bytes_per_token'])}" for r in ok) + f"){timed}")}
    measured = [(throughput(r), r) for r in ok if throughput(r)]
    if measured:
        (value, source), best = max(measured, key=lambda t: t[0][0])
        picks["throughput-bound"] = {"pick": best["name"], "why": (
            f"highest measured throughput among passing checkpoints: {value:.1f} tok/s ({source}; "
            + ", ".join(f"{r['name']} {v:.1f}" for (v, _), r in measured) + ")")}
    else:
        picks["throughput-bound"] = {"pick": None, "why": (
            "no throughput measured: batch-1 decode speed is a latency figure; give a "
            "`lowbit bench serve` result with --serving FILE")}
    best = min(ok, key=lambda r: memory(r)[0])
    picks["memory-bound"] = {"pick": best["name"], "why": (
        f"smallest {memory(best)[1]} among passing checkpoints: {_mib(memory(best)[0])} ("
        + ", ".join(f"{r['name']} {_mib(memory(r)[0])}" for r in ok) + ")")}
    return picks


def analyze(results: dict) -> dict:
    """Recoveries, PASS/FAIL, the Pareto front and the recommendations of a results dict."""
    gate, base = results["gate"], results["base"]
    rows = []
    for ckpt in results["checkpoints"]:
        rec = recovery(base["metrics"], ckpt["metrics"])
        passed, failing = verdict(rec, gate)
        ci = ckpt.get("recovery_ci95") or {}
        # a failure the metric's own 95 % interval does not rule out: more prompts would decide it
        unsure = [m for m in failing if m in ci and ci[m][1] * 100 >= gate]
        rows.append({**ckpt, "recovery": rec, "passed": passed, "failing": failing, "unsure": unsure,
                     "min_recovery": min((r for r in rec.values() if r is not None), default=None)})
    timed = [r for r in rows if decode_speed(r) and r["min_recovery"] is not None]
    for k in pareto_front([(decode_speed(r)[0], r["min_recovery"]) for r in timed]):
        timed[k]["pareto"] = True
    return {"rows": rows, "recommendations": recommend(rows), "any_passed": any(r["passed"] for r in rows)}


# ------------------------------------------------------------------------------- rendering

def metric_names(rows: list[dict]) -> list[str]:
    """Every metric any row has, in first-seen order."""
    names: list[str] = []
    for r in rows:
        names += [m for m in r["metrics"] if m not in names]
    return names


def _num(v, spec: str = ".4g") -> str:
    return "" if v is None else format(v, spec)


def label(metric: str) -> str:
    """A metric's column name: ROUGE's nested keys spelled with spaces so a header can wrap."""
    for key, words in (("generation.vs_reference.", "vs reference "), ("generation.vs_baseline.", "vs base "),
                       ("generation.", "generation ")):
        if metric.startswith(key):
            return words + metric[len(key):]
    return metric


def table(results: dict, analysis: dict) -> tuple[list[str], list[list[str]]]:
    """The decision table as (header, rows of cells), the base first, then each checkpoint:
    size, bits, bytes per token, every recovery, speed, memory and the gate. The metrics the
    recoveries come from are metrics_table's."""
    rows = analysis["rows"]
    metrics = metric_names(rows)
    recovered = [m for m in metrics if any(r["recovery"].get(m) is not None for r in rows)]
    serving = sorted({k for r in [results["base"], *rows] for k in (r.get("serving") or {}).get("keys", {})})
    header = ["checkpoint", "size on disk (MiB)", "bits/weight", "bytes/token (MiB)",
              *[f"recovery {label(m)}" for m in recovered], "decode tok/s", "prefill tok/s",
              "resident memory (MiB)", "peak RSS (MiB)", *[f"{k} ({_unit(k)})" for k in serving], "gate"]
    body = []
    for r in [dict(results["base"], recovery={}, passed=None), *rows]:
        sp, sv, ref = r.get("speed") or {}, r.get("serving") or {}, r["passed"] is None
        gate = "" if ref else "PASS" if r["passed"] else f"FAIL ({', '.join(map(label, r['failing']))})" + (
            f"; 95 % interval reaches the gate: {', '.join(map(label, r['unsure']))}" if r.get("unsure") else "")
        body.append([r["name"], _num(r["size_bytes"] / 2**20, ".2f"), _num(r.get("bits_per_weight"), ".2f"),
                     _num(r["bytes_per_token"] / 2**20, ".2f"),
                     *["reference" if ref else _pct(r["recovery"].get(m), (r.get("recovery_ci95") or {}).get(m))
                       for m in recovered],
                     _num(sp.get("decode_tok_s"), ".1f"), _num(sp.get("prefill_tok_s"), ".1f"),
                     *[_num(sp[k] / 2**20 if sp.get(k) else None, ".1f")
                       for k in ("memory_bytes", "peak_rss_bytes")],
                     *[_num(sv.get(k)) for k in serving], gate])
    return header, body


def metrics_table(results: dict, analysis: dict) -> tuple[list[str], list[list[str]]]:
    """Every measured metric's value per checkpoint (the base first), as (header, rows)."""
    rows = analysis["rows"]
    metrics = metric_names([results["base"], *rows])
    return (["checkpoint", *map(label, metrics)],
            [[r["name"], *[_num(r["metrics"].get(m)) for m in metrics]] for r in [results["base"], *rows]])


def _unit(key: str) -> str:
    return "tok/s" if key == "output_throughput" else "ms"


def _pct(v: float | None, ci: list[float] | None = None) -> str:
    """A recovery in percent, with its bootstrap 95 % interval where the evaluator gave one."""
    if v is None:
        return "n/a"
    return f"{v * 100:.2f} %" + (f" [{ci[0] * 100:.1f}, {ci[1] * 100:.1f}]" if ci else "")


def notes(results: dict) -> list[str]:
    """What each number is and how it was measured."""
    ev, lines = results["evaluation"], []
    lines.append(f"Quality: {ev['windows']} held-out windows of {ev['seq_len']} tokens from "
                 f"{ev['dataset']} (evaluation split), computed in {ev['compute_dtype']}; KL in nats "
                 "per token.")
    lines.append("Recovery: ppl base_ppl/ppl; KL exp(-KL) (the ppl recovery on text the base model "
                 "would write); top-1 the agreement itself; other metrics ckpt/base (base/ckpt when "
                 "lower is better); NAME_recovery as the evaluator computed it.")
    if ev.get("generate"):
        from .quality import RESAMPLES, SEED

        lines.append(f"Generation: {ev['generate']} held-out chat prompts answered greedily (at most "
                     f"{ev['max_new_tokens']} new tokens, lowbit's batched runtime). vs reference "
                     "(generation.vs_reference.* in results.json): ROUGE F-measure (Porter stemming) "
                     "against the dataset's replies, recovered as ckpt/base and gated (MLPerf's accuracy "
                     "criterion); vs base (generation.vs_baseline.*): ROUGE "
                     "against the base's answers and the exact-match rate, which measure sameness, not "
                     "quality: shown, not gated. A recovery in brackets is its 95 % interval: a "
                     f"paired percentile bootstrap over the prompts ({RESAMPLES} resamples, seed {SEED}); the gate "
                     "reads the point value, and a FAIL says which failing metrics' intervals reach the "
                     "gate (more prompts, --generate N, would decide those).")
    if ev.get("tasks"):
        lines.append(f"Tasks: lm-evaluation-harness {ev['tasks']} on lowbit's runtime (limit "
                     f"{ev.get('limit')}, num_fewshot {ev.get('num_fewshot')}: None is all documents, "
                     "each task's own shots), tasks.TASK.METRIC; recovered and gated as other metrics.")
    lines.append(f"Gate: PASS when every recovery is >= {results['gate']:g} %.")
    lines.append("bits/weight: bytes of the stored weight tensors (codes, scales, zero points, global "
                 "scales; not weight_shape metadata or activation/KV scales) x 8 / parameter count, over "
                 "the Linears any compared checkpoint quantizes (one a checkpoint keeps unquantized "
                 "counts at its stored bits, and the base at its own). bytes/token: weight bytes a "
                 "decode step reads at batch 1 (every tensor but an untied embedding table, of which one row "
                 "is read; KV cache reads not included).")
    sm = results.get("speed_method")
    if sm:
        lines.append(f"Speed: lowbit's runtime (lowbit.generate, packed kernels, {sm['dtype']}), batch "
                     f"1, {sm['prompt_tokens']}-token prompt, {sm['new_tokens']} new tokens (EOS ignored), "
                     f"best of {sm['repeats']} after a warm-up, {sm['threads']} torch thread(s), on "
                     f"{sm['cpu']}. prefill tok/s = "
                     "prompt tokens / prefill seconds; decode tok/s = decode steps / decode seconds. "
                     "memory = resident weights (parameters and buffers, packed) + the KV cache for the "
                     "measured context; peak RSS = the process's high-water mark from loading the "
                     "model to the end of its timing (Python, torch and transformers included; Linux "
                     "VmHWM, reset before each model).")
    else:
        lines.append("Speed: not measured (pass --speed).")
    base_weights = ((results["base"].get("speed") or {}).get("weights_bytes") or 0) * 0.9
    unpacked = [r["name"] for r in results["checkpoints"] if (r.get("speed") or {}).get("weights_bytes", 0)
                >= base_weights > 0 and r["size_bytes"] < 0.8 * results["base"]["size_bytes"]]
    if unpacked:
        lines.append(f"{', '.join(unpacked)}: lowbit's CPU runtime widens these weights to the compute "
                     "dtype at load (formats without a packed Linear in lowbit/runtime/linear.py), so "
                     "their resident memory and decode speed here are the base's kind; an engine "
                     "with native kernels for the format reads their size on disk.")
    if results.get("serving_files"):
        lines.append(f"Serving: from {', '.join(results['serving_files'])}; the key each number came "
                     "from is in results.json.")
    return lines


def markdown(results: dict, analysis: dict) -> str:
    """The report as Markdown: table, recommendations, notes."""
    def md(header, body):
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                *["| " + " | ".join(row) + " |" for row in body]]

    out = [f"# lowbit compare: {results['base']['path']}", "", *md(*table(results, analysis)),
           "", "## Measured metrics", "", *md(*metrics_table(results, analysis))]
    out += ["", "## Recommendation", ""]
    for d, rec in analysis["recommendations"].items():
        out.append(f"- **{d}**: {rec['pick'] or 'none'}: {rec['why']}")
    out += ["", "## How it was measured", ""] + [f"- {n}" for n in notes(results)]
    return "\n".join(out) + "\n"


def html(results: dict, analysis: dict, pngs: dict[str, bytes]) -> str:
    """One self-contained page: the table, the plots as data: URIs, recommendations, notes."""
    e = _html.escape

    def tab(header, body):
        rows = "".join("<tr>" + "".join(f'<td class="{_cls(c)}">{e(c)}</td>' for c in row) + "</tr>"
                       for row in body)
        return f"<table><thead><tr>{''.join(f'<th>{e(h)}</th>' for h in header)}</tr></thead><tbody>{rows}</tbody></table>"

    imgs = "".join(f'<figure><img alt="{e(n)}" src="data:image/png;base64,{base64.b64encode(p).decode()}">'
                   f"<figcaption>{e(CAPTIONS.get(n, n))}</figcaption></figure>" for n, p in pngs.items())
    recs = "".join(f"<li><b>{e(d)}</b>: {e(r['pick'] or 'none')}: {e(r['why'])}</li>"
                   for d, r in analysis["recommendations"].items())
    notes_html = "".join(f"<li>{e(n)}</li>" for n in notes(results))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lowbit compare</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.5em; text-align: right; }}
td {{ white-space: nowrap; }} td.fail {{ white-space: normal; min-width: 12em; text-align: left; }}
td:first-child, th {{ text-align: left; }}
.pass {{ background: #d9f2d9; }} .fail {{ background: #f7d4d4; }}
figure {{ display: inline-block; margin: 1em; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>lowbit compare: {e(str(results['base']['path']))}</h1>
{tab(*table(results, analysis))}
<h2>Recommendation</h2><ul>{recs}</ul>
<h2>Plots</h2>{imgs}
<h2>Measured metrics</h2>{tab(*metrics_table(results, analysis))}
<h2>How it was measured</h2><ul>{notes_html}</ul>
</body></html>
"""


def _cls(cell: str) -> str:
    return "pass" if cell == "PASS" else "fail" if cell.startswith("FAIL") else ""
