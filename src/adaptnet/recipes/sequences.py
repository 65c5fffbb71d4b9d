"""Variable-length sequences: per-token PonderNet halting on parity and multi-digit addition.

The model is ``PerToken(PonderNet(RecurrentStep(F, hidden, C, cell="gru")))``: every real token
of a padded batch ponders (repeats the GRU cell on itself) until it halts, carrying the
recurrent state to the next token; padding never computes. Training runs every ponder step and
minimises the expected loss over the halting distribution plus ``beta * KL`` to a geometric
prior (``adaptive_loss``); evaluation halts each token at the median of its distribution.

Trained on lengths ``train_min_len..train_max_len``, it is evaluated on ``test_lengths`` (some
longer than any seen in training), in shuffled batches of mixed lengths, with accuracy and
ponder steps reported per length, two plots, and the model saved with ``adaptnet.save``. The
tasks and their encodings are in ``_seqdata``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.nn import functional as F

from adaptnet.nn.halting import PonderNet, RecurrentStep
from adaptnet.nn.losses import adaptive_loss
from adaptnet.nn.sequences import PerToken, lengths_to_mask
from adaptnet.recipes import Recipe, say
from adaptnet.recipes._seqdata import CLASSES, FEATURES, TASKS, sample, tokens
from adaptnet.train.checkpoint import save


@dataclass(frozen=True)
class SequenceSettings:
    task: Literal["parity", "addition"] = field(default="parity", metadata={
        "help": "parity of a bit sequence, or addition of two numbers digit by digit (least significant first)"})
    seed: int = field(default=0, metadata={"help": "seeds the model, the training data and the test data"})
    train_min_len: int = field(default=1, metadata={"help": "shortest training sequence (bits, or digits per number)"})
    train_max_len: int = field(default=12, metadata={"help": "longest training sequence"})
    test_lengths: tuple[int, ...] = field(default=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96), metadata={
        "help": "lengths evaluated; at least one must exceed train_max_len"})
    test_size: int = field(default=256, metadata={"help": "test sequences per length"})
    steps: int = field(default=600, metadata={"help": "training steps (one batch each)"})
    batch: int = field(default=64, metadata={"help": "sequences per training batch (lengths mixed)"})
    hidden: int = field(default=64, metadata={"help": "GRU hidden units"})
    max_ponder: int = field(default=4, metadata={"help": "most ponder steps per token"})
    lambda_p: float = field(default=0.5, metadata={"help": "geometric prior's halting probability per step"})
    beta: float = field(default=0.01, metadata={"help": "weight of the KL to the prior"})
    lr: float = field(default=1e-2, metadata={"help": "Adam learning rate (cosine decay to zero)"})
    log_every: int = field(default=100, metadata={"help": "print a progress line every this many steps"})
    threads: int = field(default=1, metadata={
        "help": "torch intra-op threads during the run (tiny per-token ops: one is fastest, and immune to a busy CPU)"})

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        for name in ("train_min_len", "test_size", "steps", "batch", "hidden", "max_ponder", "log_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.train_max_len < self.train_min_len:
            raise ValueError(f"train_max_len ({self.train_max_len}) must be >= train_min_len ({self.train_min_len})")
        if not self.test_lengths or min(self.test_lengths) < 1:
            raise ValueError(f"test_lengths must be a non-empty list of lengths >= 1, got {list(self.test_lengths)}")
        if len(set(self.test_lengths)) != len(self.test_lengths):
            raise ValueError(f"test_lengths must not repeat a length, got {list(self.test_lengths)}")
        if max(self.test_lengths) <= self.train_max_len:
            raise ValueError(f"test_lengths must include a length above train_max_len ({self.train_max_len}) "
                             f"to measure extrapolation, got {list(self.test_lengths)}")
        if not 0 < self.lambda_p <= 1:
            raise ValueError(f"lambda_p must be in (0, 1], got {self.lambda_p}")
        if self.beta < 0 or not math.isfinite(self.beta):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a positive number, got {self.lr}")


QUICK: dict[str, Any] = {"steps": 300, "batch": 32, "hidden": 32, "max_ponder": 2, "train_max_len": 5,
                         "test_lengths": [1, 3, 5, 8, 10], "test_size": 32, "log_every": 50}


def build_model(settings: SequenceSettings) -> PerToken:
    """Per-token PonderNet: one label per sequence (parity) or per token (addition)."""
    step = RecurrentStep(FEATURES[settings.task], settings.hidden, CLASSES[settings.task], cell="gru")
    halting = PonderNet(step, max_steps=settings.max_ponder, lambda_p=settings.lambda_p, beta=settings.beta)
    return PerToken(halting, output="last" if settings.task == "parity" else "all")


def correct(task: str, out: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B,)`` whole sequence right, and ``(B,)`` fraction of scored tokens right (padding excluded)."""
    pred = out.argmax(dim=-1)
    if task == "parity":
        right = (pred == targets).float()
        return right, right
    mask = lengths_to_mask(lengths, targets.shape[1])  # (B, T)
    hits = ((pred == targets) & mask).sum(dim=1)
    return (hits == lengths).float(), hits / lengths


def train(model: PerToken, settings: SequenceSettings) -> list[dict[str, float]]:
    """Adam with cosine decay on fresh batches of mixed lengths; returns the logged curve."""
    g = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.steps)
    curve, window, began = [], [], time.perf_counter()
    model.train()
    for step in range(1, settings.steps + 1):
        lengths = torch.randint(settings.train_min_len, settings.train_max_len + 1, (settings.batch,), generator=g)
        x, token_lengths, y = sample(settings.task, lengths.tolist(), g)
        out = model(x, token_lengths)
        loss = adaptive_loss(model, F.cross_entropy, out, y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append((loss.item(), correct(settings.task, out.detach(), y, token_lengths)[0].mean().item()))
        if step % settings.log_every == 0 or step == settings.steps:
            loss_avg, acc_avg = (sum(v) / len(window) for v in zip(*window, strict=True))
            curve.append({"step": step, "loss": round(loss_avg, 5), "train_accuracy": round(acc_avg, 4)})
            say(f"  step {step:5d}/{settings.steps}  loss {loss_avg:.4f}  train acc {acc_avg:.3f}  "
                  f"({time.perf_counter() - began:.0f} s)")
            window = []
    return curve


@torch.no_grad()
def evaluate(model: PerToken, settings: SequenceSettings, eval_batch: int = 256) -> list[dict[str, Any]]:
    """Accuracy and ponder steps per test length, from shuffled batches that mix the lengths."""
    g = torch.Generator().manual_seed(10_000 + settings.seed)  # test data apart from the training stream
    lengths = torch.tensor(settings.test_lengths).repeat_interleave(settings.test_size)
    lengths = lengths[torch.randperm(lengths.numel(), generator=g)]
    seq_right, tok_right, ponder = (torch.zeros(lengths.numel()) for _ in range(3))
    model.eval()
    for start in range(0, lengths.numel(), eval_batch):
        rows = slice(start, start + eval_batch)
        x, token_lengths, y = sample(settings.task, lengths[rows].tolist(), g)
        out = model(x, token_lengths)
        seq_right[rows], tok_right[rows] = correct(settings.task, out, y, token_lengths)
        assert model.last_steps is not None  # (B, T) ponder steps per token, 0 on padding
        ponder[rows] = model.last_steps.sum(dim=1) / token_lengths
    table = []
    for length in sorted(settings.test_lengths):
        pick = lengths == length
        table.append({"length": length, "tokens": tokens(settings.task, length),
                      "seen_in_training": settings.train_min_len <= length <= settings.train_max_len,
                      "accuracy": round(seq_right[pick].mean().item(), 4),
                      "token_accuracy": round(tok_right[pick].mean().item(), 4),
                      "ponder_per_token": round(ponder[pick].mean().item(), 3),
                      "ponder_per_sequence": round((ponder[pick] * tokens(settings.task, length)).mean().item(), 2)})
    return table


def render_table(table: list[dict[str, Any]]) -> list[str]:
    lines = [f"  {'length':>6}  {'tokens':>6}  {'seen':>4}  {'accuracy':>8}  {'token acc':>9}  "
             f"{'ponder/token':>12}  {'ponder/seq':>10}"]
    for r in table:
        lines.append(f"  {r['length']:>6}  {r['tokens']:>6}  {'yes' if r['seen_in_training'] else 'no':>4}  "
                     f"{r['accuracy']:>8.3f}  {r['token_accuracy']:>9.3f}  {r['ponder_per_token']:>12.2f}  "
                     f"{r['ponder_per_sequence']:>10.1f}")
    return lines


def plot(table: list[dict[str, Any]], settings: SequenceSettings, out: Path) -> list[str]:
    """``accuracy.png`` and ``ponder.png`` against length, the training range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r["length"] for r in table]
    names = []
    for name, keys, ylabel, top in (("accuracy.png", ("accuracy", "token_accuracy"), "accuracy", 1.02),
                                    ("ponder.png", ("ponder_per_token",), "mean ponder steps per token",
                                     settings.max_ponder + 0.2)):
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=90)
        ax.axvspan(settings.train_min_len - 0.5, settings.train_max_len + 0.5, color="0.9", label="training lengths")
        for key in keys:
            if key == "token_accuracy" and settings.task == "parity":
                continue  # one label per sequence: the same as accuracy
            ax.plot(lengths, [r[key] for r in table], "o-", label=key.replace("_", " "))
        ax.set_xlabel("sequence length (bits)" if settings.task == "parity" else "digits per number")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, top)
        ax.set_title(f"{settings.task}, seed {settings.seed}")
        ax.legend(fontsize=8, loc="lower left")
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        names.append(name)
    return names


def run(settings: SequenceSettings, out: Path) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _run(settings, out)
    finally:
        torch.set_num_threads(threads)


def _run(settings: SequenceSettings, out: Path) -> dict[str, Any]:
    torch.manual_seed(settings.seed)
    model = build_model(settings)
    params = sum(p.numel() for p in model.parameters())
    say(f"== {settings.task}: per-token PonderNet (GRU {settings.hidden}, up to {settings.max_ponder} ponder steps, "
          f"{params} parameters), lengths {settings.train_min_len}..{settings.train_max_len}, "
          f"{settings.steps} steps of {settings.batch} ==")
    began = time.perf_counter()
    curve = train(model, settings)
    train_s = time.perf_counter() - began
    table = evaluate(model, settings)
    say(f"\n== test: {settings.test_size} sequences per length, mixed-length batches, halting at the median ==")
    for line in render_table(table):
        say(line)
    seen = [r["accuracy"] for r in table if r["seen_in_training"]]
    beyond = [r["accuracy"] for r in table if r["length"] > settings.train_max_len]
    save(out / "model", model)  # PerToken/PonderNet/RecurrentStep have specs: an.load rebuilds it
    plots = plot(table, settings, out)
    return {"task": settings.task, "params": params, "train_s": round(train_s, 1), "curve": curve, "table": table,
            "accuracy_seen_lengths": round(sum(seen) / len(seen), 4) if seen else None,
            "accuracy_longer_lengths": round(sum(beyond) / len(beyond), 4),
            "model": "model", "plots": plots}


RECIPE = Recipe(
    name="sequences",
    summary="per-token PonderNet on variable-length parity and addition, tested on longer sequences",
    settings=SequenceSettings,
    run=run,
    quick=QUICK,
)
