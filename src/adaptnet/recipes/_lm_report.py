"""The ``lm`` recipe's tables and plot, from the runs of its seeds (``lm.run_seed`` results)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

PLOT = "lm_loss_flops.png"
LABELS = {"grown": "grown, AdamW carried", "grown_fresh": "grown, AdamW re-created per stage",
          "static": "static final size, equal steps", "static_flops": "static final size, grown run's FLOPs"}


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _pm(v: dict[str, float], fmt: str = ".4f") -> str:
    return f"{v['mean']:{fmt}} ± {v['std']:{fmt}}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return [lines[0], "  " + "  ".join("-" * w for w in widths), *lines[1:]]


def summarise(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """Mean ± std over seeds: per arm, the FLOPs fraction to the static loss, per growth stage."""
    arms = list(runs[0]["arms"])
    static_flops = statistics.fmean(r["arms"]["static"]["flops"] for r in runs)
    per_arm = {}
    rows = [["arm", "steps", "training FLOPs", "of static", "params", "val loss (nats/byte)"]]
    for arm in arms:
        got = [r["arms"][arm] for r in runs]
        flops = statistics.fmean(a["flops"] for a in got)
        per_arm[arm] = {"val_loss": mean_std([a["val_loss"] for a in got]), "flops": flops,
                        "flops_of_static": flops / static_flops, "steps": got[0]["steps"], "params": got[0]["params"]}
        rows.append([arm, str(got[0]["steps"]), f"{flops:.3e}", f"{flops / static_flops:.1%}",
                     f"{got[0]['params']:,}", _pm(per_arm[arm]["val_loss"])])
    fractions = [r["flops_fraction_to_static_loss"] for r in runs]
    reached = [f for f in fractions if f is not None]
    ratios = [r["grown_flops_over_static_flops_at_grown_loss"] for r in runs]
    got = [f for f in ratios if f is not None]
    summary: dict[str, Any] = {"arms": per_arm, "flops_fraction_to_static_loss": {
        "per_seed": fractions, "reached": len(reached), "seeds": len(runs), **(mean_std(reached) if reached else {})},
        "grown_flops_over_static_flops_at_grown_loss": {
        "per_seed": ratios, "reached": len(got), "seeds": len(runs), **(mean_std(got) if got else {})}}
    lines = ["", f"== {len(runs)} seed(s), mean ± std ==", *_table(rows), ""]
    if got:
        lines.append(f"at its final loss, the grown run (AdamW carried) has spent "
                     f"{_pm(summary['grown_flops_over_static_flops_at_grown_loss'], '.1%')} of the FLOPs the static "
                     f"run spends to come down to that loss ({len(got)} of {len(runs)} seeds)")
    if reached:
        lines.append(f"grown (AdamW carried) reaches the static model's final validation loss at "
                     f"{_pm(summary['flops_fraction_to_static_loss'], '.1%')} of its training FLOPs "
                     f"({len(reached)} of {len(runs)} seeds reach it)")
    else:
        gap = per_arm["grown"]["val_loss"]["mean"] - per_arm["static"]["val_loss"]["mean"]
        lines.append(f"grown (AdamW carried) does not reach the static model's final validation loss in "
                     f"{per_arm['grown']['steps']} steps (final gap {gap:+.4f} nats/byte, mean)")
    stages, stage_rows = [], [["stage", "step", "rel. change f64 (max)", "f32 (max)", "spike carried",
                               "spike re-created", "no edit (static)", "edit / train step"]]
    for i, first in enumerate(runs[0]["arms"]["grown"]["stages"]):
        carried = [r["arms"]["grown"]["stages"][i] for r in runs]
        fresh = [r["arms"]["grown_fresh"]["stages"][i] for r in runs]
        still = [r["arms"]["static"]["stages"][i] for r in runs]
        ratios = [c["edit_per_train_step"] for c in carried if c["edit_per_train_step"] is not None]
        stage = {"stage": first["stage"], "step": first["step"], "sizes": first["sizes"],
                 "rel_change_f64_max": max(c["rel_change_f64"] for c in carried),
                 "rel_change_f32_max": max(c["rel_change_f32"] for c in carried),
                 "spike_carried": mean_std([c["spike"] for c in carried]),
                 "spike_recreated": mean_std([c["spike"] for c in fresh]),
                 "spike_no_edit": mean_std([c["spike"] for c in still]),
                 "edit_s": mean_std([c["edit_s"] for c in carried]),
                 "edit_per_train_step": mean_std(ratios) if ratios else None}
        stages.append(stage)
        stage_rows.append([stage["stage"], str(stage["step"]), f"{stage['rel_change_f64_max']:.1e}",
                           f"{stage['rel_change_f32_max']:.1e}", _pm(stage["spike_carried"], "+.2%"),
                           _pm(stage["spike_recreated"], "+.2%"), _pm(stage["spike_no_edit"], "+.2%"),
                           _pm(stage["edit_per_train_step"], ".2f") if ratios else "-"])
    summary["stages"] = stages
    lines += ["", "per growth stage (spike: probe loss peak after the edit over the loss before, relative):",
              *_table(stage_rows)]
    return summary, lines


def plot(runs: list[dict[str, Any]], out: Path) -> list[str]:
    """Validation loss against training FLOPs, mean over seeds with ± std bands; growth stages marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    lows, static_end = [], statistics.fmean(r["arms"]["static"]["val_loss"] for r in runs)
    for arm, style in zip(runs[0]["arms"], ("-", "--", "-", ":"), strict=True):
        curves = [r["arms"][arm]["curve"] for r in runs]
        x = [row[1] for row in curves[0]][1:]  # the same steps and FLOPs for every seed; from the first step
        ys = [[row[2] for row in c][1:] for c in curves]
        mean = [statistics.fmean(v) for v in zip(*ys, strict=True)]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*ys, strict=True)]
        line, = ax.plot(x, mean, style, label=LABELS.get(arm, arm))
        ax.fill_between(x, [m - d for m, d in zip(mean, std, strict=True)],
                        [m + d for m, d in zip(mean, std, strict=True)], color=line.get_color(), alpha=0.2)
        lows.append(min(mean))
    grown = runs[0]["arms"]["grown"]
    steps, spent = [row[0] for row in grown["curve"]], [row[1] for row in grown["curve"]]
    for stage in grown["stages"]:
        flops = float(np.interp(stage["step"], steps, spent))  # between evaluations: near enough for a marker
        ax.axvline(flops, color="0.7", lw=0.8)
        ax.text(flops, 1.0, " " + stage["stage"], rotation=90, va="top", fontsize=7, transform=ax.get_xaxis_transform())
    ax.axhline(static_end, color="0.4", lw=0.8, ls="--", label="static, final loss")
    ax.set_ylim(min(lows) - 0.05, min(lows) + 1.0)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"byte-level GPT on stdlib sources, {len(runs)} seed(s), mean ± std")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOT)
    plt.close(fig)
    return [PLOT]
