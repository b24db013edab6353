"""Statistics, tables and plots for growth_quality.py: per-seed savings against the same
seed's scratch run, means with 95% Student-t intervals, and paired differences.

Each seed changes everything random in a row (the source's initialisation and data order,
the growth's noise, the fit's and the training's batches, scratch's initialisation), so a
row's interval is its spread over independent repeats of the whole pipeline. Comparisons
between two rows are made per seed first (paired), which removes the spread the rows
share: the source, above all.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

# Two-sided 95% quantiles of Student's t for 1..10 degrees of freedom (any table has
# them; not worth scipy for a benchmark). Beyond 10 the normal 1.96 is close enough.
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def interval(values: list[float]) -> dict[str, float] | None:
    """Mean and 95% half-width (t interval); the half-width is 0 for one value."""
    if not values:
        return None
    mean = statistics.fmean(values)
    if len(values) == 1:
        return {"mean": mean, "half": 0.0, "n": 1}
    t = T95[len(values) - 2] if len(values) - 1 <= len(T95) else 1.96
    return {"mean": mean, "half": t * statistics.stdev(values) / math.sqrt(len(values)), "n": len(values)}


def reach_step(curve: list[list[float]], target: float) -> float | None:
    """First step at which the validation loss is at or below ``target`` (linear
    interpolation between evaluations), or None if it never gets there."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l0 <= target:
            return s0
        if l1 <= target:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return curve[-1][0] if curve and curve[-1][1] <= target else None


def saving(run: dict, goal: float, budget: int) -> tuple[float | None, float | None]:
    """(steps to ``goal``, % of scratch's compute saved), the fit charged at its measured
    cost: fit steps x (fit step time / training step time of the same run)."""
    step = reach_step(run["val_curve"], goal)
    if step is None:
        return None, None
    charged = step + run["fit_steps"] * run.get("fit_cost", 1.0)
    return step, 100 * (1 - charged / budget)


def summarise(result: dict) -> list[dict]:
    """One summary per (block, row): intervals over seeds, and paired differences against
    the block's plain copy under the same schedule."""
    out = []
    for block in result["blocks"]:
        runs = [r for r in result["runs"] if r["block"] == block["name"]]
        seeds = sorted({r["seed"] for r in runs})
        by = {(r["row"], r["seed"]): r for r in runs}
        scratch = {s: by[("scratch", s)]["final_val"] for s in seeds if ("scratch", s) in by}
        for row in block["rows"]:
            mine = [by[(row["label"], s)] for s in seeds if (row["label"], s) in by]
            if not mine:
                continue
            steps, saved = [], []
            for r in mine:
                step, pct = saving(r, scratch[r["seed"]], block["budget"]) if r["seed"] in scratch else (None, None)
                r["steps_to_scratch_final"], r["saving_pct"] = step, pct
                if pct is not None:
                    steps.append(step)
                    saved.append(pct)
            base = f"copy, {row['schedule']}"
            paired = [r["final_val"] - by[(base, r["seed"])]["final_val"] for r in mine
                      if (base, r["seed"]) in by and row["label"] != base and row["start"] != "scratch"]
            out.append({
                "block": block["name"], "run": row["label"], "seeds": len(mine),
                "after_growth": interval([r["val_after_growth"] for r in mine]),
                "final": interval([r["final_val"] for r in mine]),
                "reached": len(saved), "steps": interval(steps), "saving_pct": interval(saved),
                "vs_copy_final": interval(paired) if paired else None,
                "fit_cost": interval([r["fit_cost"] for r in mine if r["fit_steps"]]),
                "trainable_params": mine[0]["trainable_params"],
                "optimizer_state_bytes": mine[0]["optimizer_state_bytes"],
                "final_vs_copy_pct": interval([100 * (r["final_val"] / by[(base, r["seed"])]["final_val"] - 1)
                                               for r in mine if (base, r["seed"]) in by and row["label"] != base])
                if paired else None,
            })
    return out


def fmt(iv: dict | None, digits: int = 3, unit: str = "") -> str:
    if iv is None:
        return "—"
    if iv["n"] == 1:
        return f"{iv['mean']:.{digits}f}{unit}"
    return f"{iv['mean']:.{digits}f} ± {iv['half']:.{digits}f}{unit}"


def table(result: dict) -> str:
    lines = []
    for block in result["blocks"]:
        lines += ["", f"### {block['name']}: source val {fmt(block['source_val'])}, scratch final "
                      f"{fmt(block['scratch_final'])} (means ± 95% intervals over {result['seeds']} seeds)", "",
                  "| run | val after growth | final val | final − copy (paired) | steps to scratch's final "
                  "| **saving vs scratch** |", "| --- | --- | --- | --- | --- | --- |"]
        for s in (s for s in result["summary"] if s["block"] == block["name"]):
            fit = f" (+{block['fit_steps']} fit × {s['fit_cost']['mean']:.2f})" if s["fit_cost"] else ""
            reached = "" if s["reached"] == s["seeds"] else f" ({s['reached']}/{s['seeds']} seeds reach it)"
            lines.append(f"| {s['run']} | {fmt(s['after_growth'])} | {fmt(s['final'])} | "
                         f"{fmt(s['vs_copy_final'], 4)} | {fmt(s['steps'], 0)}{fit}{reached} | "
                         f"**{fmt(s['saving_pct'], 0, '%')}** |")
    return "\n".join(lines)


def draw(result: dict, path: Path) -> None:
    """Mean validation curve per row with the band every seed's curve lies in, one panel per block."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    blocks = result["blocks"]
    fig, axes = plt.subplots(1, len(blocks), figsize=(6.5 * len(blocks), 4.4), dpi=120, squeeze=False)
    for ax, block in zip(axes[0], blocks):
        lows = []
        for row in block["rows"]:
            curves = [r["val_curve"] for r in result["runs"] if r["block"] == block["name"] and r["row"] == row["label"]]
            if not curves:
                continue
            steps = [s for s, _ in curves[0]]
            at = [[c[i][1] for c in curves] for i in range(len(steps))]
            mean = [statistics.fmean(v) for v in at]
            line, = ax.plot(steps, mean, lw=1.4, label=row["label"], ls={"continue": "--", "rewarm": "-"}.get(row["schedule"], ":"))
            # The band is every seed's curve (min to max): with 3 seeds a t-interval of
            # the mean would be 4.3 standard errors wide and hide the curves.
            ax.fill_between(steps, [min(v) for v in at], [max(v) for v in at], color=line.get_color(), alpha=0.12)
            lows += [m for m in mean if math.isfinite(m)]
        src = block["source_val"]["mean"]
        ax.axhline(src, color="grey", ls=":", lw=1, label="source (small model)")
        ax.axhline(block["scratch_final"]["mean"], color="black", ls="--", lw=0.8, label="scratch final")
        if lows:
            ax.set_ylim(min(lows) - 0.03, src + 0.6)
        ax.set_xlabel("training step of the grown model")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_title(f"{block['name']}: 2x wide, 2x deep (mean of {result['seeds']} seeds; band: every seed)"
                     + (" (quick)" if result["quick"] else ""),
                     fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
