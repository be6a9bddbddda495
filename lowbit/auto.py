"""`lowbit auto`: the cheapest checkpoint that passes the gate.

Candidate schemes are tried from cheapest to safest (each with its preset's algorithm: GPTQ for
W4A16, AutoSmoothQuant for W8A8_INT8), each evaluated through `compare` (whose results.json
keeps every evaluation, so a candidate is measured once). If no uniform scheme passes, the
cheapest one keeps its worst decoder layers (by the per-layer report) in the next candidate's
scheme (W8A8_INT8 after W4A16), 1, 2, 4, ... of them, until it passes or exceeds the bit
budget; only if that never passes are the worst layers kept unquantized instead (same
sequence). Whole decoder layers are kept so no fused q/k/v or gate/up set is split (vLLM
needs a fused set's shards in one scheme). A mixed checkpoint has a compressed-tensors config
group per scheme (the kept layers' group names them with `re:` targets); vLLM serves W4A16
with W8A8_INT8 layers (each Linear picks its kernel), and transformers loads it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from .errors import LowbitError

CANDIDATES = "W4A16,W8A8_INT8,FP8"  # cheapest to safest


def worst_layers(report: dict) -> list[int]:
    """Decoder-layer indices, worst first, by the largest relative error of their Linears."""
    worst: dict[int, float] = {}
    for row in report["layers"]:
        m = re.search(r"\.layers\.(\d+)\.", row["name"])
        if m:
            i = int(m.group(1))
            worst[i] = max(worst.get(i, 0.0), row["rel_error"])
    return sorted(worst, key=lambda i: -worst[i])


def _kept(path: Path) -> dict[int, str]:
    """Decoder layer -> how a checkpoint keeps it apart from its scheme: "unquantized" (in its
    ignore list) or the override scheme's name (from lowbit_report.json)."""
    from .api import REPORT_FILE

    ignore = json.loads((path / "config.json").read_text())["quantization_config"].get("ignore", [])
    kept = {int(m.group(1)): "unquantized" for n in ignore if (m := re.search(r"\.layers\.(\d+)\.", n))}
    overrides = json.loads((path / REPORT_FILE).read_text()).get("overrides") or {}
    kept.update({int(m.group(1)): o["scheme"] for p, o in overrides.items() if (m := re.match(r"layers\.(\d+)\.", p))})
    return kept


def _spec(plan: list[tuple[str, str, str | None]]) -> str:
    return ",".join(s + (f":{a}" if a else "") for _, s, a in plan)


def auto(model: str | Path, out: str | Path, *, gate: float = 99.0, budget_bits: float | None = None,
         candidates: str = CANDIDATES, **options) -> dict:
    """Write to `out` the cheapest checkpoint of `model` whose every recovery is >= `gate` %
    and whose bits per weight (kept layers counted at their stored bits) is at most `budget_bits`.
    Candidates and the compare report go to OUT.auto/ (reused by a rerun). Returns
    {"pick": name or None, "tried": [...], "notes": [why candidates were skipped], "report":
    OUT.auto, "compare": the last compare() result}; `options` go to compare()."""
    from .compare import compare, parse_schemes, quantize_into, quantized_linears, sizes
    from .outdir import atomic_dir, check_output
    from .schemes import get_scheme

    model, out = Path(model), Path(out)
    options = {"reuse": {}, **options}  # MODEL's answers and task scores, once for every compare() call
    check_output(out, False)
    work = out.with_name(out.name + ".auto")
    plan = [c for c in parse_schemes(candidates)
            if budget_bits is None or get_scheme(c[1]).weights.bits <= budget_bits]
    if not plan:
        raise LowbitError(f"no candidate scheme stores weights in {budget_bits} bits or fewer")
    quantize_options = {k: options[k] for k in ("dataset", "samples", "seq_len", "device", "compute")
                        if k in options}
    tried: list[str] = []
    notes = [f"{n}: {get_scheme(s).weights.bits}-bit weights exceed the budget of {budget_bits:g}"
             for n, s, _ in parse_schemes(candidates) if budget_bits is not None
             and get_scheme(s).weights.bits > budget_bits]
    fits = lambda row: budget_bits is None or (row["bits_per_weight"] or 16) <= budget_bits  # noqa: E731

    def passing(schemes: str, extra: list[Path]) -> tuple[dict | None, dict]:
        c = compare(model, extra, out=work, schemes=schemes, gate=gate, **options)
        rows = {r["name"]: r for r in c["analysis"]["rows"]}
        return next((rows[n] for n in tried if rows[n]["passed"] and fits(rows[n])), None), c

    pick, c = None, None
    for i, (name, _, _) in enumerate(plan):
        tried.append(name)
        pick, c = passing(_spec(plan[: i + 1]), [])
        if pick:
            break
    extra: list[Path] = []
    if pick is None:  # keep the cheapest scheme's worst decoder layers in a safer scheme, else unquantized
        name, scheme, algorithm = plan[0]
        report = json.loads((work / name / "lowbit_report.json").read_text())
        order, quantized = worst_layers(report), quantized_linears(work / name)
        every = parse_schemes(candidates)
        safer = every[[c[0] for c in every].index(name) + 1:][:1]  # the next candidate, budget aside
        for keeper, keeper_scheme, keeper_algorithm in [*safer, (None, None, None)]:
            held = get_scheme(keeper_scheme).with_options(algorithm=keeper_algorithm) if keeper else None
            k = 1
            while k < len(order):
                keep = f"{name}+{keeper}x{k}" if keeper else f"{name}-keep{k}"
                path, want = work / keep, {i: held.name if held else "unquantized" for i in order[:k]}
                if path.exists() and _kept(path) != want:
                    raise LowbitError(f"{path} keeps other layers than {sorted(order[:k])}: remove it")
                layers = [f"layers.{i}.*" for i in order[:k]]
                if not path.exists():
                    quantize_into(model, path, scheme, algorithm, dict(quantize_options, **(
                        {"overrides": dict.fromkeys(layers, held)} if held else {"ignore": layers})))
                bits = sizes(path, model, quantized)["bits_per_weight"]
                if budget_bits is not None and bits > budget_bits:
                    notes.append(f"{keep}: {bits:.2f} bits per weight exceeds the budget of {budget_bits:g}")
                    break
                tried.append(keep)
                extra.append(path)
                pick, c = passing(_spec(plan), extra)
                if pick:
                    break
                k *= 2
            if pick:
                break
    if pick is not None:
        with atomic_dir(out) as tmp:  # a copy: OUT.auto keeps every candidate for a rerun
            shutil.copytree(work / pick["name"], tmp, dirs_exist_ok=True)
    return {"pick": pick["name"] if pick else None, "tried": tried, "notes": notes,
            "report": str(work), "out": str(out) if pick else None, "compare": c}
