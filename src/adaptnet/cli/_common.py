"""What the train and resume commands share: epoch lines, fitting, the closing summary."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from adaptnet.edit import Edit
from adaptnet.train.build import Run, evaluate
from adaptnet.train.callbacks import Callback
from adaptnet.train.checkpoint import CheckpointError, CheckpointManager, load
from adaptnet.train.distributed import from_env, resolve_device
from adaptnet.train.report import summarize
from adaptnet.train.rundir import CHECKPOINTS

if TYPE_CHECKING:
    from adaptnet.train.trainer import Trainer

# Exit status of a run stopped by a signal (SIGINT/SIGTERM): interrupted, resumable.
EXIT_STOPPED = 130


class CLIError(Exception):
    """A problem with the command's arguments or files (printed as one line, exit status 2)."""


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class EpochPrinter(Callback):
    """Prints one line per epoch and one per edit (the CLI's progress, on stdout)."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        keys = [k for k in metrics if k.endswith("_loss") or k.startswith("val_")] + ["params", "widths"]
        fields = "  ".join(f"{k} {_fmt(metrics[k])}" for k in keys if k in metrics)
        print(f"epoch {epoch}/{self.epochs}  {fields}", flush=True)

    def on_after_edit(self, trainer: Trainer, edit: Edit, event: dict[str, Any]) -> None:
        # The policies' edits come after on_epoch_end, so each prints under its epoch's line (an edit
        # a callback makes during the epoch, through trainer.apply_edit, prints before that line).
        print(f"  {event.get('policy') or 'edit'}: {edit.op} layer {edit.layer}, widths "
              f"{list(edit.widths_before)} -> {list(edit.widths_after)}, params {edit.params_before} -> "
              f"{edit.params_after} ({event.get('reason', '')})", flush=True)


def describe(run: Run, model: nn.Module | None = None) -> str:
    """One line on a run: data, model (``model``, default the trainer's), optimizer, epochs, device."""
    info, cfg = run.data.info, run.config
    sizes = "/".join(str(len(s[0])) if s is not None else "0" for s in (run.data.train, run.data.val, run.data.test))
    widths = list(getattr(model or run.trainer.model, "widths", []))
    return (f"{info.name} ({info.task}, {sizes} train/val/test rows), {cfg.model.type} {widths}, "
            f"{cfg.optim.name} lr {cfg.optim.lr:g}, {cfg.train.epochs} epochs on {run.trainer.device}")


def newest_loadable(run_dir: Path, none: str, fresh: Callable[[], nn.Module] | None = None
                    ) -> tuple[Path, nn.Module, dict[str, Any], list[tuple[Path, str]]]:
    """The newest checkpoint of a run that loads and verifies: ``(path, model, state, skipped)``.

    ``fresh`` builds the model a checkpoint of a user's (or a transformers) model loads into
    (``adaptnet.train.build.fresh_model``); adaptnet's own models need none.

    ``skipped`` lists the newer checkpoints refused on the way, each with the one-line reason
    (a damaged file, a missing one). ``CLIError`` when none loads, and ``CLIError(none)`` when the
    run has no checkpoint at all.
    """
    found = CheckpointManager(run_dir / CHECKPOINTS).all()
    if not found:
        raise CLIError(none)
    skipped: list[tuple[Path, str]] = []
    for path in reversed(found):
        try:
            model, state = load(path, model=fresh() if fresh is not None else None)
        except CheckpointError as err:
            skipped.append((path, " ".join(str(err).split())))
            continue
        return path, model, state, skipped
    newest, reason = skipped[0]
    if len(found) == 1:
        raise CLIError(f"{run_dir}: its only checkpoint, {newest.name}, does not load: {reason}")
    raise CLIError(f"{run_dir}: none of its {len(found)} checkpoints loads; the newest, {newest.name}: {reason}")


def on_main_then_share(device: str, compute: Callable[[], str]) -> str:
    """``compute()`` on rank 0 (a ``CLIError`` it raises is raised on every rank), shared with all.

    In a single process this is just ``compute()``. Under torchrun the process group is
    initialised here (the Trainer then uses it).
    """
    dist = from_env(resolve_device(device))
    if dist is None:
        return compute()
    import torch.distributed as torch_dist

    box: list[Any] = [None, None]
    if dist.is_main:
        try:
            box[0] = compute()
        except CLIError as err:
            box[1] = str(err)
    torch_dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise CLIError(box[1])
    return str(box[0])


def fit_and_summarize(run: Run, run_dir: Path, *, resume: bool) -> int:
    """Train (or continue) to the configured epochs, print the summary; the exit status.

    Under torchrun every rank trains and only rank 0 prints.
    """
    trainer = run.trainer
    trainer.fit(run.data.train, run.data.val, run.epochs, resume=resume, handle_signals=True)
    if not trainer.is_main:
        return EXIT_STOPPED if trainer.epoch < run.epochs else 0
    print(summarize(run_dir))
    if trainer.epoch < run.epochs:
        print(f"adaptnet: stopped at epoch {trainer.epoch} of {run.epochs} (checkpoint saved); "
              f"continue with: adaptnet resume {run_dir}", file=sys.stderr)
        return EXIT_STOPPED
    if run.data.test is not None:
        result = evaluate(trainer, run.data.test)
        print("test: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    print(f"report: {run_dir / 'report.png'}")
    return 0
