"""Grow a small causal language model in stages, AdamW carried, against the static model it grows into.

The question the growth literature asks (bert2BERT, staged training, LiGO, MSG, LEMON, G_stack):
does a model that starts small and grows, exactly, into its final size reach the loss of that
final model trained from scratch for less compute? Here on a byte-level GPT (``_lm.TinyGPT``)
trained on the Python standard library's own sources (the first 90% trains, the last 10%, whole
files the model never saw, validates).

Four arms per seed, on the same batches in the same order:

- ``grown``: starts at ``layers[0] x d_model[0]`` (``heads[0]`` heads, ``hidden[0]`` MLP units) and
  grows at the fractions ``grow_at`` of its steps by the kinds in ``grow`` (``mlp``, ``heads``,
  ``d_model``, ``depth``; ``+`` joins kinds done at one step) to the final sizes, one AdamW carried
  through every edit (``adaptnet.widen``/``deepen`` with ``optimizer=``);
- ``grown_fresh``: the same growth, with AdamW re-created at each stage (what the published
  growth methods do);
- ``static``: the final-size model from scratch for ``steps`` steps (the grown runs take
  ``grown_steps``, by default as many); at the grown run's stage steps it follows the probe loss
  as the grown runs do, without an edit: the spike a growth step would show anyway;
- ``static_flops``: the final-size model from scratch, for as many steps as the grown run's
  training FLOPs allow.

Training FLOPs are 6 x the forward multiply-accumulates (``adaptnet.groups.macs``, counted from
the traced graph, attention included) x windows per step. Per growth stage the recipe measures the
edit's relative output change (``max|y' - y| / max|y|`` of the logits on a probe batch, on a float64
copy and on the float32 model), the loss spike (the probe loss's peak over the ``spike_window``
steps after the edit, minus the loss right before it, relative) with the carried and with the
re-created optimizer, and the time of the edit against the median of the training steps just before it.
"""

from __future__ import annotations

import copy
import multiprocessing
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaptnet.edit import deepen, widen
from adaptnet.groups import macs, unit_groups
from adaptnet.recipes import Recipe, say
from adaptnet.recipes._lm import (
    TinyGPT,
    interpolate_crossing,
    lm_loss,
    lr_at,
    relative_change,
    sizes,
    stdlib_text,
    windows,
)
from adaptnet.recipes._lm_report import plot, summarise

ARMS = ("grown", "grown_fresh", "static", "static_flops")
KINDS = ("mlp", "heads", "d_model", "depth")


def _pair(help_text: str, default: tuple[int, int]) -> Any:
    return field(default=default, metadata={"help": f"{help_text}: [start, final]"})


@dataclass(frozen=True)
class LMSettings:
    seeds: int = field(default=5, metadata={"help": "seeds run (first_seed, first_seed + 1, ...)"})
    first_seed: int = field(default=0, metadata={"help": "the first seed (model init and batch order)"})
    layers: tuple[int, ...] = _pair("transformer blocks", (2, 4))
    d_model: tuple[int, ...] = _pair("residual stream width", (64, 128))
    heads: tuple[int, ...] = _pair("attention heads per block", (2, 4))
    head_dim: int = field(default=32, metadata={"help": "width of one attention head"})
    hidden: tuple[int, ...] = _pair("MLP hidden units per block", (256, 512))
    grow: tuple[str, ...] = field(default=("mlp+heads", "d_model", "depth"), metadata={
        "help": "growth stages in order: kinds mlp, heads, d_model, depth, joined by + for one step"})
    grow_at: tuple[float, ...] = field(default=(0.2, 0.35, 0.5), metadata={
        "help": "when each stage of grow happens, as a fraction of the steps (increasing, in (0, 1))"})
    steps: int = field(default=800, metadata={"help": "training steps of the static run"})
    grown_steps: int | None = field(default=1200, metadata={
        "help": "training steps of the grown runs (null: as many as the static run)"})
    batch: int = field(default=32, metadata={"help": "windows per step"})
    context: int = field(default=64, metadata={"help": "bytes per window"})
    chars: int = field(default=1_000_000, metadata={"help": "bytes of stdlib source used (90% train, 10% validation)"})
    lr: float = field(default=3e-3, metadata={"help": "AdamW peak learning rate (warm-up, cosine to a tenth)"})
    warmup: int = field(default=50, metadata={"help": "warm-up steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    eval_every: int = field(default=50, metadata={"help": "validation loss every this many steps"})
    eval_batches: int = field(default=16, metadata={"help": "validation batches (of batch windows) per evaluation"})
    spike_window: int = field(default=10, metadata={"help": "steps after an edit over which the loss spike is taken"})
    workers: int = field(default=1, metadata={"help": "seeds run side by side in this many processes"})
    threads: int = field(default=1, metadata={"help": "torch threads per process"})

    def __post_init__(self) -> None:
        if self.grown_steps is not None and self.grown_steps < 1:
            raise ValueError(f"grown_steps must be at least 1 or null, got {self.grown_steps}")
        for name in ("seeds", "head_dim", "steps", "batch", "context", "eval_every", "eval_batches",
                     "spike_window", "workers", "threads", "warmup"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("layers", "d_model", "heads", "hidden"):
            pair = getattr(self, name)
            if len(pair) != 2 or not 1 <= pair[0] <= pair[1]:
                raise ValueError(f"{name} must be [start, final] with 1 <= start <= final, got {list(pair)}")
        kinds = [k for stage in self.grow for k in stage.split("+")]
        if any(k not in KINDS for k in kinds) or len(set(kinds)) != len(kinds):
            raise ValueError(f"grow must list kinds from {', '.join(KINDS)} (each once, + joins kinds of one "
                             f"stage), got {list(self.grow)}")
        for name, kind in (("layers", "depth"), ("d_model", "d_model"), ("heads", "heads"), ("hidden", "mlp")):
            if (getattr(self, name)[0] != getattr(self, name)[1]) != (kind in kinds):
                raise ValueError(f"{name} grows from {getattr(self, name)[0]} to {getattr(self, name)[1]}: "
                                 f"grow must list {kind!r} exactly when they differ")
        if len(self.grow_at) != len(self.grow) or not all(0 < a < 1 for a in self.grow_at) \
                or list(self.grow_at) != sorted(set(self.grow_at)):
            raise ValueError(f"grow_at must give one increasing fraction in (0, 1) per stage of grow, "
                             f"got {list(self.grow_at)}")
        if self.first_seed < 0 or self.chars < 10 * (self.context + 1) or not 0 < self.lr < 1:
            raise ValueError("first_seed must be >= 0, chars at least 10 windows, lr in (0, 1)")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")

    def start(self) -> dict[str, int]:
        return {"layers": self.layers[0], "d_model": self.d_model[0], "heads": self.heads[0],
                "head_dim": self.head_dim, "hidden": self.hidden[0], "context": self.context}

    def final(self) -> dict[str, int]:
        return {**self.start(), "layers": self.layers[1], "d_model": self.d_model[1], "heads": self.heads[1],
                "hidden": self.hidden[1]}


QUICK: dict[str, Any] = {"seeds": 2, "layers": [1, 2], "d_model": [32, 64], "heads": [2, 4], "head_dim": 8,
                         "hidden": [64, 128], "steps": 150, "grown_steps": None, "batch": 16, "context": 32,
                         "chars": 200_000, "warmup": 10, "eval_every": 25, "eval_batches": 4, "spike_window": 5}


# -- edits ---------------------------------------------------------------------------------------
def grow_stage(model: TinyGPT, stage: str, final: dict[str, int], optimizer: torch.optim.Optimizer | None,
               seed: int) -> list[str]:
    """Apply one growth stage (``"mlp+heads"``, ...) to ``model``, bringing those sizes to ``final``;
    returns what was done. New units: ``init="zero"`` (fresh incoming weights, zero outgoing ones; on
    the residual stream, each token's mean carried, see ``adaptnet.edit.init``);
    new blocks: copies of their neighbours with zero output projections (``init="identity"``)."""
    now, done = sizes(model), []
    g = torch.Generator().manual_seed(seed)  # the same fresh weights for the model and its float64 copy
    for kind in stage.split("+"):
        if kind == "depth":
            # Spread the new blocks: after blocks at even intervals, the last first (indices stay valid).
            n, new = now["layers"], final["layers"] - now["layers"]
            for after in sorted((min(n - 1, max(0, (k + 1) * n // new - 1)) for k in range(new)), reverse=True):
                done.append(deepen(model, after=f"blocks.{after}", init="identity", optimizer=optimizer).group)
            continue
        key = {"mlp": "hidden", "heads": "heads", "d_model": "d_model"}[kind]
        by = final[key] - now[key]
        if kind == "d_model":
            # The residual stream: init="zero" carries each token's mean into the new channels and
            # rescales every LayerNorm (eps * d/d', scale * sqrt(d/d')), so it is exact.
            widen(model, "embed", by, init="zero", optimizer=optimizer, generator=g)
            done.append(f"embed +{by}")
            continue
        for i in range(len(model.blocks)):
            name = f"blocks.{i}.{'fc' if kind == 'mlp' else 'qkv'}"
            widen(model, name, by, init="zero", optimizer=optimizer, generator=g)
            done.append(f"{name} +{by}")
    return done


# -- one arm -------------------------------------------------------------------------------------
@dataclass
class Data:
    train: torch.Tensor
    val_windows: list[tuple[torch.Tensor, torch.Tensor]]
    probe: tuple[torch.Tensor, torch.Tensor]


def load_data(s: LMSettings) -> Data:
    text, _ = stdlib_text(s.chars)
    cut = int(0.9 * text.numel())
    val = text[cut:]
    g = torch.Generator().manual_seed(12345)  # fixed validation windows, the same for every arm and seed
    starts = torch.randint(0, val.numel() - s.context - 1, ((s.eval_batches + 1) * s.batch,), generator=g)
    batches = [windows(val, chunk, s.context) for chunk in starts.split(s.batch)]
    return Data(text[:cut], batches[1:], batches[0])


def evaluate_on(model: TinyGPT, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(lm_loss(model(x), y))


def evaluate(model: TinyGPT, data: Data) -> float:
    with torch.no_grad():
        return statistics.fmean(float(lm_loss(model(x), y)) for x, y in data.val_windows)


def _adamw(model: TinyGPT, s: LMSettings) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=s.weight_decay)


def train_arm(arm: str, s: LMSettings, seed: int, data: Data, steps: int) -> dict[str, Any]:
    """Train one arm; the curve is ``[step, training FLOPs so far, validation loss]`` rows."""
    torch.manual_seed(seed)
    growing = arm.startswith("grown")
    model = TinyGPT(**(s.start() if growing else s.final()))
    probe_x, probe_y = data.probe
    # Traced on two windows: an edit checks itself on the example inputs, so a small one keeps it cheap.
    unit_groups(model, (probe_x[:2],))
    opt = _adamw(model, s)
    at = s.grown_steps or s.steps
    stages = dict(zip((round(a * at) for a in s.grow_at), s.grow, strict=True)) if arm != "static_flops" else {}
    g = torch.Generator().manual_seed(seed)  # the same batches, in the same order, for every arm
    step_flops, flops = 6 * macs(model) * s.batch, 0
    curve: list[list[float]] = [[0, 0, evaluate(model, data)]]
    records: list[dict[str, Any]] = []
    recent: list[float] = []  # the last training steps' times, to set an edit's time against
    watch: dict[str, Any] | None = None
    began = time.perf_counter()
    for step in range(steps):
        if step in stages and not growing:  # no edit: the same measurement, for the spike training shows anyway
            probe_loss = float(evaluate_on(model, probe_x, probe_y))
            watch = {"stage": stages[step], "step": step, "loss_before": probe_loss, "loss_after_edit": probe_loss,
                     "peak": probe_loss, "seen": 0, "spike": 0.0}
            records.append(watch)
        elif step in stages:
            watch = _grow(model, stages[step], s, seed, step, opt if arm == "grown" else None, data, recent)
            records.append(watch)
            if arm == "grown_fresh":
                opt = _adamw(model, s)
            step_flops = 6 * macs(model) * s.batch
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, s.lr, s.warmup)
        x, y = windows(data.train, torch.randint(0, data.train.numel() - s.context - 1, (s.batch,), generator=g),
                       s.context)
        tick = time.perf_counter()
        loss = lm_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = [*recent[-9:], time.perf_counter() - tick]
        flops += step_flops
        if watch is not None:
            watch = None if _watch_spike(watch, model, probe_x, probe_y, s.spike_window) else watch
        if (step + 1) % s.eval_every == 0 or step + 1 == steps:
            curve.append([step + 1, flops, evaluate(model, data)])
    return {"arm": arm, "seed": seed, "steps": steps, "flops": flops, "val_loss": curve[-1][2], "curve": curve,
            "params": sum(p.numel() for p in model.parameters()), "sizes": sizes(model),
            "train_s": round(time.perf_counter() - began, 2), "stages": records}


def _grow(model: TinyGPT, stage: str, s: LMSettings, seed: int, step: int, opt: torch.optim.Optimizer | None,
          data: Data, recent: list[float]) -> dict[str, Any]:
    """One growth stage with its measurements: exactness (float64 copy, float32 model), edit time."""
    probe_x, probe_y = data.probe
    stage_seed = seed * 1000 + step  # the same fresh weights for the model and its float64 copy
    twin = copy.deepcopy(model).double()  # the same edit in float64, on a copy the run never uses
    with torch.no_grad():
        before64, before = twin(probe_x), model(probe_x)
    grow_stage(twin, stage, s.final(), None, stage_seed)
    tick = time.perf_counter()
    done = grow_stage(model, stage, s.final(), opt, stage_seed)
    edit_s = time.perf_counter() - tick
    with torch.no_grad():
        after64, after = twin(probe_x), model(probe_x)
    loss_before, loss_after = float(lm_loss(before, probe_y)), float(lm_loss(after, probe_y))
    step_s = statistics.median(recent) if recent else None
    return {"stage": stage, "step": step, "edits": done, "sizes": sizes(model),
            "rel_change_f64": relative_change(before64, after64), "rel_change_f32": relative_change(before, after),
            "loss_before": loss_before, "loss_after_edit": loss_after, "peak": loss_after, "seen": 0,
            "spike": (loss_after - loss_before) / loss_before,
            "edit_s": edit_s, "train_step_s": step_s, "edit_per_train_step": edit_s / step_s if step_s else None}


def _watch_spike(record: dict[str, Any], model: TinyGPT, x: torch.Tensor, y: torch.Tensor, window: int) -> bool:
    """Follow the probe loss after an edit; the spike is its peak (right after the edit and over the
    ``window`` steps that follow) over the loss right before, relative. True when the window is over."""
    record["peak"] = max(record["peak"], evaluate_on(model, x, y))
    record["seen"] += 1
    record["spike"] = (record["peak"] - record["loss_before"]) / record["loss_before"]
    return record["seen"] >= window


# -- a seed, all arms --------------------------------------------------------------------------------
def run_seed(s: LMSettings, seed: int, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    torch.set_num_threads(s.threads)
    data = load_data(s)
    arms: dict[str, dict[str, Any]] = {}
    for arm in ARMS:
        steps = (s.grown_steps or s.steps) if arm.startswith("grown") else s.steps
        if arm == "static_flops":  # as many steps of the final model as the grown run's FLOPs pay for
            steps = max(1, round(arms["grown"]["flops"] / (arms["static"]["flops"] / s.steps)))
        arms[arm] = train_arm(arm, s, seed, data, steps)
        if log:
            r = arms[arm]
            log(f"  seed {seed}  {arm:<12}  {r['steps']:>5} steps  {r['flops'] / 1e12:7.3f} TFLOPs  "
                f"val loss {r['val_loss']:.4f}  ({r['train_s']:.0f} s)")
    grown = [(f, v) for _, f, v in arms["grown"]["curve"]]
    crossing = interpolate_crossing(grown, arms["static"]["val_loss"])
    # The other way round: the FLOPs the static run spends to come down to the grown run's final loss.
    static_to_grown = interpolate_crossing([(f, v) for _, f, v in arms["static"]["curve"]], arms["grown"]["val_loss"])
    return {"seed": seed, "arms": arms,
            "flops_fraction_to_static_loss": None if crossing is None else crossing / arms["static"]["flops"],
            "grown_flops_over_static_flops_at_grown_loss":
                None if static_to_grown is None else arms["grown"]["flops"] / static_to_grown}


def _seed_in_worker(args: tuple[LMSettings, int]) -> dict[str, Any]:
    return run_seed(*args)


def run(settings: LMSettings, out: Path) -> dict[str, Any]:
    threads = torch.get_num_threads()
    seeds = list(range(settings.first_seed, settings.first_seed + settings.seeds))
    s = settings
    say(f"== byte-level GPT on stdlib sources: {s.layers[0]}x{s.d_model[0]} -> {s.layers[1]}x{s.d_model[1]} "
        f"(heads {s.heads[0]}->{s.heads[1]}, MLP {s.hidden[0]}->{s.hidden[1]}), stages {list(s.grow)} at "
        f"{list(s.grow_at)} of {s.grown_steps or s.steps} steps (static: {s.steps}) of {s.batch}x{s.context} "
        f"bytes; seeds {seeds} ==")
    try:
        if settings.workers > 1 and len(seeds) > 1:
            runs = []
            with multiprocessing.get_context("spawn").Pool(min(settings.workers, len(seeds))) as pool:
                for r in pool.imap(_seed_in_worker, [(settings, seed) for seed in seeds]):  # in order, as they end
                    runs.append(r)
                    for a in r["arms"].values():
                        say(f"  seed {r['seed']}  {a['arm']:<12}  {a['steps']:>5} steps  {a['flops'] / 1e12:7.3f} "
                            f"TFLOPs  val loss {a['val_loss']:.4f}  ({a['train_s']:.0f} s)")
        else:
            runs = [run_seed(settings, seed, say) for seed in seeds]
    finally:
        torch.set_num_threads(threads)
    summary, lines = summarise(runs)
    for line in lines:
        say(line)
    return {"summary": summary, "runs": runs, "plots": plot(runs, out)}


RECIPE = Recipe(
    name="lm",
    summary="a byte-level GPT grown in stages (width, heads, d_model, depth) with AdamW carried, against static",
    settings=LMSettings,
    run=run,
    quick=QUICK,
)
