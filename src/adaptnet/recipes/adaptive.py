"""Adaptive learning: start small, grow, prune to a budget, fine-tune; against a width sweep.

The question a user without a known network size asks: does one adaptive run deliver a network
as good as the best of a sweep over static widths, of a size I can afford, for less compute?

1. **Grow** (epochs ``1..prune_at``): an ``AdaptiveMLP`` with ``start`` hidden widths, widened by
   ``by`` units at the layer the gradient favours, at most ``max_width`` units per layer. With
   ``trigger="signal"`` (the default) ``GrowOnSignal`` grows when new units would learn more than
   ``threshold`` times as fast per parameter as the existing ones (measured after every epoch,
   ``cooldown`` epochs after a growth), or after ``patience`` epochs without an improvement of
   ``min_delta`` in the ``monitor``-ed loss; with ``trigger="plateau"``, ``GrowOnPlateau`` grows
   on that plateau only.
2. **Prune, then fine-tune** (epochs ``prune_at+1..epochs``): ``PruneToBudget`` removes the least
   important units of the widest layer after every epoch until the network has at most
   ``budget`` parameters; the epochs after the last prune fine-tune it. Both phases run in one
   Trainer with one optimizer (its state carried through every edit), writing one run directory
   (``OUT/adaptive``: metrics.csv, events.jsonl, checkpoints/, report.png) that ``adaptnet report``
   and ``adaptnet inspect`` read.
3. **Sweep**: a static ``AdaptiveMLP`` per width of ``sweep`` (every hidden layer that wide), same
   data, optimizer, learning rate, batch size, seed and epochs, never edited. The best width is
   chosen on validation (accuracy, or MSE) and reported on test; so is the best width within the
   budget.

Every arm is judged by its final weights (no early stopping). Training FLOPs count 3 x forward MACs
per sample (``adaptnet.count_macs``, re-counted after each edit) x rows, per optimizer step;
validation, probes and growth scores are not counted. Outputs: ``results.json``, ``adaptive.png``
(test metric against parameters for the sweep with the adaptive run marked; the validation curve
with the edits).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from adaptnet.edit import IMPORTANCES, INITS, Edit
from adaptnet.nn import AdaptiveMLP, count_macs
from adaptnet.policy import GrowOnPlateau, GrowOnSignal, PruneToBudget
from adaptnet.recipes import Recipe, say
from adaptnet.train.build import evaluate, loss_and_metrics
from adaptnet.train.callbacks import Callback
from adaptnet.train.data import DataError, Splits, load_data, read_csv
from adaptnet.train.rundir import read_events
from adaptnet.train.trainer import Trainer

BUILTIN_DATA = ("regression", "digits", "wine", "breast_cancer", "diabetes")
RUN_DIR, PLOT = "adaptive", "adaptive.png"


@dataclass(frozen=True)
class AdaptiveSettings:
    data: str = field(default="regression", metadata={
        "help": "regression (the demo's), digits, wine, breast_cancer, diabetes, or a CSV file"})
    target: str = field(default="target", metadata={"help": "the CSV file's target column"})
    seed: int = field(default=0, metadata={"help": "data split, initialisation and batch order"})
    epochs: int = field(default=60, metadata={"help": "epochs of every run (adaptive and static)"})
    start: tuple[int, ...] = field(default=(4, 4), metadata={"help": "hidden widths the adaptive run starts from"})
    trigger: Literal["signal", "plateau"] = field(default="signal", metadata={
        "help": "grow when new units would learn faster (signal, or on a plateau) or on a plateau only"})
    threshold: float = field(default=0.3, metadata={
        "help": "trigger=signal: grow when new units would learn this many times as fast per parameter"})
    cooldown: int = field(default=3, metadata={"help": "trigger=signal: epochs after a growth without growth"})
    patience: int = field(default=10, metadata={"help": "grow after this many epochs without improvement"})
    min_delta: float = field(default=0.02, metadata={
        "help": "a decrease of the monitored loss that counts as an improvement"})
    monitor: Literal["val_loss", "train_loss"] = field(default="val_loss", metadata={
        "help": "the loss whose plateau triggers growth"})
    by: int = field(default=8, metadata={"help": "units added per growth"})
    init: str = field(default="gradmax", metadata={"help": f"new units' init: {', '.join(INITS)}"})
    max_width: int = field(default=128, metadata={"help": "growth stops at this many units per layer"})
    prune_at: int = field(default=40, metadata={"help": "last epoch of growth; pruning starts after it"})
    budget: int | None = field(default=None, metadata={
        "help": "parameters of the final network (null: half of what growth reached)"})
    prune_amount: float = field(default=0.5, metadata={"help": "at most this share of a layer pruned per epoch"})
    importance: Literal["magnitude", "taylor"] = field(default="taylor", metadata={
        "help": "which units pruning keeps"})
    sweep: tuple[int, ...] = field(default=(4, 8, 16, 32, 64, 128), metadata={
        "help": "static widths to compare with (every hidden layer)"})
    lr: float = field(default=0.01, metadata={"help": "Adam learning rate (every run)"})
    batch: int = field(default=64, metadata={"help": "batch size (every run)"})

    def __post_init__(self) -> None:
        for name in ("epochs", "patience", "by", "max_width", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.prune_at <= self.epochs - 2:
            raise ValueError(f"prune_at must be between 1 and epochs - 2 = {self.epochs - 2} (growth, then at "
                             f"least one epoch to prune and one to fine-tune), got {self.prune_at}")
        if not self.start or min(self.start) < 1 or max(self.start) > self.max_width:
            raise ValueError(f"start must be one or more widths between 1 and max_width = {self.max_width}, "
                             f"got {list(self.start)}")
        if not self.sweep or min(self.sweep) < 1:
            raise ValueError(f"sweep must be one or more widths >= 1, got {list(self.sweep)}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")
        if not 0 < self.prune_amount < 1:
            raise ValueError(f"prune_amount must be a fraction in (0, 1), got {self.prune_amount}")
        if self.cooldown < 0 or not self.threshold > 0:
            raise ValueError(f"cooldown must be >= 0 and threshold > 0, got cooldown {self.cooldown}, "
                             f"threshold {self.threshold}")
        if not self.lr > 0 or self.min_delta < 0:
            raise ValueError(f"lr must be > 0 and min_delta >= 0, got lr {self.lr}, min_delta {self.min_delta}")
        n_in, n_out = _sizes(self.data, self.target)  # also checks the data: name, CSV file and column
        smallest = mlp_params(n_in, self.start, n_out)
        if self.budget is not None and self.budget < smallest:
            raise ValueError(f"budget {self.budget} is below the {smallest} parameters of the start network "
                             f"{list(self.start)}; raise budget or shrink start")


def mlp_params(n_in: int, widths: tuple[int, ...] | list[int], n_out: int) -> int:
    """Parameters of ``AdaptiveMLP(n_in, widths, n_out)`` (weights and biases, no norm layers)."""
    sizes = [n_in, *widths, n_out]
    return sum((a + 1) * b for a, b in itertools.pairwise(sizes))


# -- data ----------------------------------------------------------------------------------------
def _check_data(data: str) -> None:
    if data not in BUILTIN_DATA and Path(data).suffix.lower() != ".csv" and not Path(data).exists():
        raise ValueError(f"data: unknown data set {data!r}; use one of {', '.join(BUILTIN_DATA)} or a CSV file path")


def _sizes(data: str, target: str) -> tuple[int, int]:
    """(input features, outputs) of the data; ``ValueError`` for an unknown name, a bad CSV file or column."""
    _check_data(data)
    if data in BUILTIN_DATA:
        info = load_data(data, val_fraction=0.0, test_fraction=0.0).info
        return info.in_features, info.out_features
    try:
        x, _, task, classes = read_csv(data, target)
    except DataError as err:
        raise ValueError(f"data: {err}") from None
    return x.shape[1], len(classes) if task == "classification" and classes else 1


def load_splits(s: AdaptiveSettings) -> Splits:
    """60/20/20 train/val/test split by seed, standardised with training statistics."""
    if s.data in BUILTIN_DATA:
        return load_data(s.data, seed=s.seed)
    return load_data(csv=s.data, target=s.target, seed=s.seed)


# -- training ------------------------------------------------------------------------------------
class FlopMeter(Callback):
    """Training FLOPs: per optimizer step, 3 x forward MACs per sample x the batch's rows."""

    def __init__(self, x1: torch.Tensor, n_train: int, batch: int):
        self.x1, self.n_train, self.batch = x1, n_train, batch  # x1: one input row (1, F)
        self.macs = self.flops = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        self.macs = count_macs(trainer.model, self.x1)

    def on_batch_end(self, trainer: Trainer, step: int, loss: torch.Tensor) -> None:
        rows = min(self.batch, self.n_train - (trainer.batch_in_epoch - 1) * self.batch)
        self.flops += 3 * self.macs * rows

    def on_after_edit(self, trainer: Trainer, edit: Edit, event: dict[str, Any]) -> None:
        self.macs = count_macs(trainer.model, self.x1)


class Progress(Callback):
    """Prints the losses every few epochs and every edit (after its epoch's line), like ``adaptnet demo``."""

    def __init__(self, every: int):
        self.every = every
        self.line: str | None = None  # the last epoch's line while it is not printed yet

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        self.line = (f"  epoch {epoch:3d}  train {metrics['train_loss']:.4f}  val {metrics['val_loss']:.4f}  "
                     f"widths {metrics['widths']}  params {metrics['params']}")
        if epoch % self.every == 0 or epoch == 1:
            say(self.line)
            self.line = None

    def on_after_edit(self, trainer: Trainer, edit: Edit, event: dict[str, Any]) -> None:
        if self.line is not None:  # the epoch's edits come after on_epoch_end: its line first
            say(self.line)
            self.line = None
        say(f"             >> {edit.op} layer {edit.layer}: widths {list(edit.widths_before)} -> "
            f"{list(edit.widths_after)}, params {edit.params_before} -> {edit.params_after}")


def batches(data: tuple[torch.Tensor, torch.Tensor] | None, size: int, shuffle: bool = True) -> DataLoader:
    """Batches sliced from the tensors at once, training batches of ``size`` and validation batches of
    1024 (the Trainer's own tensor loader uses one batch size for both); the Trainer seeds the
    shuffled order of every epoch."""
    assert data is not None
    ds = TensorDataset(*data)
    order = RandomSampler(ds) if shuffle else SequentialSampler(ds)
    return DataLoader(ds, sampler=BatchSampler(order, size, drop_last=False), batch_size=None)


def loaders(splits: Splits, s: AdaptiveSettings) -> tuple[DataLoader, DataLoader]:
    return batches(splits.train, s.batch), batches(splits.val, 1024, shuffle=False)


def _trainer(model: AdaptiveMLP, splits: Splits, s: AdaptiveSettings, **kwargs: Any) -> tuple[Trainer, FlopMeter]:
    """The one training set-up every arm shares: Adam at ``lr``, the task's loss, ``batch``, ``seed``."""
    loss_fn, metrics = loss_and_metrics(splits.info)
    meter = FlopMeter(splits.train[0][:1], len(splits.train[0]), s.batch)
    callbacks = [meter, *kwargs.pop("callbacks", [])]
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=s.lr), loss_fn, callbacks=callbacks,
                      metrics=metrics, seed=s.seed, batch_size=s.batch, device="cpu", **kwargs)
    return trainer, meter


def _scores(trainer: Trainer, model: AdaptiveMLP, splits: Splits, meter: FlopMeter) -> dict[str, Any]:
    """Widths, parameters, validation and test loss and metrics, training FLOPs (edits change ``model``
    in place: it is the trainer's model)."""
    assert splits.val is not None and splits.test is not None
    return {"widths": list(model.widths), "params": sum(p.numel() for p in model.parameters()),
            "val": evaluate(trainer, splits.val), "test": evaluate(trainer, splits.test), "train_flops": meter.flops}


def run_adaptive(s: AdaptiveSettings, splits: Splits, run_dir: Path) -> dict[str, Any]:
    """Grow from ``start`` until ``prune_at``, then prune to the budget and fine-tune, in one run directory."""
    info = splits.info
    torch.manual_seed(s.seed)
    model = AdaptiveMLP(info.in_features, list(s.start), info.out_features)
    config = {"recipe": "adaptive", **{k: list(v) if isinstance(v, tuple) else v
                                       for k, v in dataclasses.asdict(s).items()}}
    trainer, meter = _trainer(model, splits, s, callbacks=[Progress(every=10)], run_dir=run_dir,
                              checkpoint_every=10, config=config)
    plateau = f"{s.monitor} has not improved by {s.min_delta:g} for {s.patience} epoch(s)"
    if s.trigger == "signal":
        trainer.policies = [GrowOnSignal(threshold=s.threshold, cooldown=s.cooldown, by=s.by, init=s.init,
                                         max_width=s.max_width, patience=s.patience, min_delta=s.min_delta,
                                         monitor=s.monitor)]
        when = (f"new units would learn > {s.threshold:g}x faster per parameter (cooldown {s.cooldown}) or "
                f"{plateau}")
    else:
        trainer.policies = [GrowOnPlateau(patience=s.patience, min_delta=s.min_delta, by=s.by, where="gradient",
                                          init=s.init, max_width=s.max_width, monitor=s.monitor)]
        when = plateau
    say(f"grow: epochs 1-{s.prune_at}, from widths {list(s.start)} ({sum(p.numel() for p in model.parameters())} "
        f"params), by {s.by} units ({s.init}) when {when}")
    trainer.fit(*loaders(splits, s), epochs=s.prune_at)
    peak_widths, peak = list(model.widths), sum(p.numel() for p in model.parameters())
    start_params = mlp_params(info.in_features, s.start, info.out_features)
    budget = s.budget if s.budget is not None else max(start_params, peak // 2)
    say(f"prune and fine-tune: epochs {s.prune_at + 1}-{s.epochs}, {peak} params -> at most {budget} "
          f"({s.importance} importance, at most {s.prune_amount:.0%} of a layer per epoch)")
    trainer.policies = [PruneToBudget(target_params=budget, amount=s.prune_amount, importance=s.importance)]
    trainer.fit(*loaders(splits, s), epochs=s.epochs)
    events = [e for e in read_events(run_dir) if e.get("op") != "rollback"]
    last_prune = max((e["epoch"] for e in events if e["op"] == "prune"), default=s.prune_at)
    return {**_scores(trainer, model, splits, meter), "start_widths": list(s.start), "peak_widths": peak_widths,
            "peak_params": peak, "budget": budget, "edits": dict(Counter(e["op"] for e in events)),
            "finetune_epochs": s.epochs - last_prune, "history": trainer.history}


def run_static(s: AdaptiveSettings, splits: Splits, width: int) -> dict[str, Any]:
    """One static network, every hidden layer ``width`` units wide, trained like the adaptive one."""
    torch.manual_seed(s.seed)
    model = AdaptiveMLP(splits.info.in_features, [width] * len(s.start), splits.info.out_features)
    trainer, meter = _trainer(model, splits, s)
    trainer.fit(*loaders(splits, s), epochs=s.epochs)
    return {**_scores(trainer, model, splits, meter), "history": trainer.history}


# -- comparing -----------------------------------------------------------------------------------
def metric(scores: dict[str, float], task: str) -> float:
    """The headline number: accuracy in % (higher is better), or MSE in target variances (lower is better)."""
    return 100 * scores["accuracy"] if task == "classification" else scores["loss"]


def best(runs: list[dict[str, Any]], task: str) -> dict[str, Any] | None:
    """The run with the best validation metric (ties: fewer parameters)."""
    sign = -1 if task == "classification" else 1
    return min(runs, key=lambda r: (sign * metric(r["val"], task), r["params"]), default=None)


def run(s: AdaptiveSettings, out: Path) -> dict[str, Any]:
    splits = load_splits(s)
    info = splits.info
    assert splits.val is not None and splits.test is not None
    rows = {k: len(p[0]) for k, p in (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    say(f"data: {info.name} ({info.task}, {info.in_features} features -> {info.out_features} outputs; "
          f"{rows['train']}/{rows['val']}/{rows['test']} train/val/test rows), Adam lr {s.lr:g}, batch {s.batch}, "
          f"{s.epochs} epochs for every network")
    adaptive = run_adaptive(s, splits, out / RUN_DIR)
    say(f"static sweep: widths {list(s.sweep)} x {len(s.start)} layer(s)")
    static = []
    for width in s.sweep:
        static.append(run_static(s, splits, width))
        r = static[-1]
        say(f"  width {width:4d}  params {r['params']:7d}  val {metric(r['val'], info.task):8.4f}  "
              f"test {metric(r['test'], info.task):8.4f}")
    chosen = best(static, info.task)
    within = best([r for r in static if r["params"] <= adaptive["budget"]], info.task)
    sweep_flops = sum(r["train_flops"] for r in static)
    name = "accuracy %" if info.task == "classification" else "MSE"
    results = {
        "data": info.name, "task": info.task, "metric": name, "rows": rows,
        "adaptive": {k: v for k, v in adaptive.items() if k != "history"},
        "static": [{k: v for k, v in r.items() if k != "history"} for r in static],
        "best_static": chosen["widths"] if chosen else None,
        "best_static_within_budget": within["widths"] if within else None,
        "sweep_train_flops": sweep_flops, "flops_share": adaptive["train_flops"] / sweep_flops,
        "within_budget": adaptive["params"] <= adaptive["budget"], "run_dir": str(out / RUN_DIR), "plot": PLOT,
    }
    plot(out / PLOT, adaptive, static, read_events(out / RUN_DIR), info.task, s,
         f"{info.name}, seed {s.seed}, {s.epochs} epochs")
    say(table(results))
    return results


def table(r: dict[str, Any]) -> str:
    """The comparison as text: every static width, the sweep's picks, and the adaptive run."""
    task, a = r["task"], r["adaptive"]
    lines = [f"\n== {r['data']}: test {r['metric']} (chosen on validation; same data, optimizer and epochs) ==",
             f"  {'network':<34}{'widths':<14}{'params':>8}{'val':>10}{'test':>10}{'train GFLOPs':>14}"]

    def line(label: str, x: dict[str, Any]) -> str:
        return (f"  {label:<34}{x['widths']!s:<14}{x['params']:>8}{metric(x['val'], task):>10.4f}"
                f"{metric(x['test'], task):>10.4f}{x['train_flops'] / 1e9:>14.4f}")

    lines += [line("static", x) for x in r["static"]]
    for label, key in (("best static (on validation)", "best_static"),
                       (f"best static within {a['budget']} params", "best_static_within_budget")):
        pick = next((x for x in r["static"] if x["widths"] == r[key]), None)
        lines.append(line(label, pick) if pick else f"  {label:<34}(none of the sweep fits)")
    lines.append(line(f"adaptive, from {a['start_widths']}", a))
    lines.append(f"  adaptive: grew to {a['peak_widths']} ({a['peak_params']} params), pruned to {a['widths']} "
                 f"({a['params']} <= budget {a['budget']}: {'yes' if r['within_budget'] else 'NO'}), edits "
                 f"{a['edits'] or 'none'}, {a['finetune_epochs']} epochs of fine-tuning after the last prune")
    lines.append(f"  training FLOPs: adaptive {a['train_flops'] / 1e9:.4f} G = {100 * r['flops_share']:.1f}% of the "
                 f"whole sweep's {r['sweep_train_flops'] / 1e9:.4f} G")
    return "\n".join(lines)


def plot(path: Path, adaptive: dict[str, Any], static: list[dict[str, Any]], events: list[dict[str, Any]],
         task: str, s: AdaptiveSettings, title: str) -> None:
    """Left: test metric against parameters (sweep line, adaptive star, budget). Right: validation
    curves of the adaptive run (edits as vertical lines) and of the best static width."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)  # no display, no global pyplot state
    left, right = fig.subplots(1, 2)
    ylabel = "test accuracy (%)" if task == "classification" else "test MSE (target variances)"
    left.plot([r["params"] for r in static], [metric(r["test"], task) for r in static], "o-", color="tab:blue",
              label="static sweep")
    for r, w in zip(static, s.sweep, strict=True):
        left.annotate(str(w), (r["params"], metric(r["test"], task)), textcoords="offset points", xytext=(3, 4),
                      fontsize="small")
    left.plot([adaptive["params"]], [metric(adaptive["test"], task)], "*", color="tab:red", markersize=15,
              label=f"adaptive {adaptive['widths']}")
    left.axvline(adaptive["budget"], color="tab:red", linestyle=":", linewidth=1, label="budget")
    left.set(xscale="log", xlabel="parameters", ylabel=ylabel, title="test metric vs size")
    key = "val_accuracy" if task == "classification" else "val_loss"
    scale = 100 if task == "classification" else 1
    chosen = best(static, task)
    curves = [("adaptive", adaptive, "tab:red")] + ([(f"static {chosen['widths']}", chosen, "tab:blue")] if chosen
                                                    else [])
    for label, r, color in curves:
        values = [scale * v for v in r["history"][key]]
        right.plot(range(1, len(values) + 1), values, color=color, label=label)
    for e in events:  # an edit follows its epoch's validation
        right.axvline(e["epoch"] + 0.5, color={"widen": "tab:green", "prune": "tab:orange"}.get(e["op"], "gray"),
                      alpha=0.6, linewidth=1, linestyle="--")
    right.plot([], [], "--", color="tab:green", label="grow")
    right.plot([], [], "--", color="tab:orange", label="prune")
    right.set(xlabel="epoch", ylabel="validation " + ("accuracy (%)" if task == "classification" else "MSE"),
              title="validation during training", yscale="linear" if task == "classification" else "log")
    for axis in (right.yaxis, left.xaxis):  # plain numbers on log axes, not powers of ten
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"adaptnet recipe adaptive: {title}")
    fig.savefig(path, dpi=80)


RECIPE = Recipe(
    name="adaptive",
    summary=("start small, grow when and where the gradient says, prune to a budget; compared with a sweep "
             "of static widths"),
    settings=AdaptiveSettings,
    run=run,
    quick={"epochs": 14, "prune_at": 9, "patience": 1, "sweep": (4, 16, 64)},
)
