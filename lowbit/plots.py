"""The report's plots as PNG bytes (matplotlib's object API on the Agg canvas: no pyplot, so no
global backend or figure state): accuracy recovery vs bytes, worst recovery vs speed with the
Pareto front, and the per-layer error of the worst Linears."""

from __future__ import annotations

import io
import math

from .report import decode_speed, label, metric_names

WORST = 6  # Linears shown per checkpoint


def plots(results: dict, analysis: dict) -> dict[str, bytes]:
    """PNG plots by file name: recovery vs bytes, recovery vs speed (if measured), worst layers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    rows, gate = analysis["rows"], results["gate"]
    out = {}

    def png(fig) -> bytes:
        buf = io.BytesIO()
        FigureCanvasAgg(fig).print_png(buf)
        return buf.getvalue()

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    for m in [m for m in metric_names(rows) if any(r["recovery"].get(m) is not None for r in rows)]:
        pts = [(r["bytes_per_token"] / 2**20, r["recovery"][m] * 100)
               for r in rows if r["recovery"].get(m) is not None]
        ax.plot(*zip(*pts), "o", label=label(m), alpha=0.8)
    for r in rows:
        if r["min_recovery"] is not None:
            ax.annotate(r["name"], (r["bytes_per_token"] / 2**20, r["min_recovery"] * 100), fontsize=8,
                        xytext=(4, -10), textcoords="offset points")
    ax.axhline(gate, color="red", ls="--", lw=1, label=f"gate {gate:g} %")
    ax.set(xlabel="weight bytes per decoded token (MiB)", ylabel="recovery (%)",
           title="Accuracy recovery vs bytes")
    ax.legend(fontsize=8)
    out["recovery_vs_bytes.png"] = png(fig)

    timed = [(decode_speed(r), r) for r in rows if decode_speed(r) and r["min_recovery"] is not None]
    if timed:
        fig = Figure(figsize=(7, 4.5), dpi=100)
        ax = fig.add_subplot()
        xs, ys = [s[0] for s, _ in timed], [r["min_recovery"] * 100 for _, r in timed]
        ax.plot(xs, ys, "o", label="checkpoint (worst metric)")
        front = sorted((x, y) for (x, y), (_, r) in zip(zip(xs, ys), timed) if r.get("pareto"))
        ax.plot(*zip(*front), "-s", color="tab:orange", mfc="none", ms=10, label="Pareto front")
        for x, y, (_, r) in zip(xs, ys, timed):
            ax.annotate(r["name"], (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.axhline(gate, color="red", ls="--", lw=1, label=f"gate {gate:g} %")
        ax.set(xlabel=timed[0][0][1], ylabel="worst recovery (%)", title="Recovery vs decode speed")
        ax.legend(fontsize=8)
        out["recovery_vs_speed.png"] = png(fig)

    ranked = [r for r in rows if r.get("layers")]
    if ranked:
        # one panel per checkpoint, each on its own scale: output errors of a W4A4 scheme and
        # weight errors of a data-free one are not comparable, and a shared axis hides the small
        cols = min(2, len(ranked))
        fig = Figure(figsize=(7 * cols, 0.6 + 2.2 * math.ceil(len(ranked) / cols)), dpi=100)
        for j, r in enumerate(ranked):
            ax = fig.add_subplot(math.ceil(len(ranked) / cols), cols, j + 1)
            top = sorted(r["layers"], key=lambda x: -x["rel_error"])[:WORST]
            ax.barh(range(len(top)), [x["rel_error"] for x in top], color=f"C{j % 10}")
            ax.set_yticks(range(len(top)), [x["name"].removeprefix("model.") for x in top], fontsize=7)
            ax.invert_yaxis()
            ax.set_title(f"{r['name']}: {r.get('layer_error') or '?'} error", fontsize=9)
            ax.tick_params(axis="x", labelsize=7)
        fig.suptitle(f"Worst {WORST} Linears per checkpoint (relative error)")
        fig.tight_layout()
        out["worst_layers.png"] = png(fig)
    return out
