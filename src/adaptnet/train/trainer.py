"""The Trainer: a plain training loop whose model may change structure between steps.

Per epoch: train (one optimizer step per batch), validate, call the callbacks'
``on_epoch_end`` (with the model that produced the epoch's metrics), ask the policies for
edits and apply them (optimizer state carried, wrappers re-created, each edit logged), write
the metrics row, checkpoint. Resume is exact: the data order of an epoch is derived from
``(seed, epoch)``, and a checkpoint holds every RNG state, the optimizer, the scheduler, the
policies and the loop counters, so an interrupted and resumed run equals an uninterrupted
one bit for bit on CPU.

Under ``torchrun`` (``WORLD_SIZE > 1``) the same loop runs data-parallel: tensor data is
sharded, the model is wrapped in DDP (again after every edit), edits are agreed on by all
ranks and applied to the unwrapped model on each, and only rank 0 writes the run directory.
The plumbing is in ``adaptnet.train.distributed``; see docs/distributed.md.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from adaptnet.edit import Edit
from adaptnet.groups import ensure_traced, widths
from adaptnet.nn.losses import LossFn, adaptive_loss
from adaptnet.nn.protocols import HasSpec
from adaptnet.policy import EditRequest, Policy
from adaptnet.train import _edits, _rng
from adaptnet.train.callbacks import Callback
from adaptnet.train.checkpoint import CheckpointManager, load, restore_optimizer
from adaptnet.train.distributed import ShardedSampler, from_env, resolve_device, shutdown_at_exit
from adaptnet.train.loader import Data, Loader, make_loader
from adaptnet.train.metrics import MetricFn, resolve
from adaptnet.train.rundir import CHECKPOINTS, RunDir
from adaptnet.train.safety import capture_training_state, restore_training_state, stop_on_signals

logger = logging.getLogger(__name__)



class TrainingError(RuntimeError):
    """Training cannot go on (for example the loss stayed non-finite after every rollback)."""


class Trainer:
    """Train ``model`` with ``optimizer``, letting ``policies`` grow and prune it.

    Args:
        model: any ``nn.Module``; for policies, it is traced on the probe batch's inputs to find its
            unit groups (``adaptnet.unit_groups``), unless it was traced before.
        optimizer: built on ``model.parameters()``; edits carry its state.
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar.
        policies: decide edits at the end of each epoch (see ``adaptnet.policy``).
        callbacks: ``Callback`` instances.
        scheduler: an LR scheduler on ``optimizer``, stepped once per epoch.
        metrics: validation metrics by name (``"accuracy"``, ``"mae"``, ``"r2"``) or ``{name: fn}``.
        run_dir: where config, metrics, events, checkpoints and the report go (None: nowhere).
        seed: derives data order, policy generators and probes.
        batch_size: for data given as tensors (batched by ``adaptnet.train.loader.TensorLoader``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``.
        compile: wrap the model with ``torch.compile`` (re-created after every edit).
        checkpoint_every: epochs between checkpoints (also written at the end and on a stop).
        keep_last: checkpoints kept in ``run_dir/checkpoints``.
        on_nonfinite: ``"rollback"`` (restore the epoch's start, scale the LR by
            ``lr_backoff``, retry, at most ``max_rollbacks`` times) or ``"stop"``.
        grad_clip: max gradient norm, or None.
        probe_size: rows of the fixed probe batch (edit decisions and output-change checks).
        progress: show a progress bar (only on a terminal).
        config: the resolved configuration written to ``config.yaml``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        policies: Iterable[Policy] = (),
        callbacks: Iterable[Callback] = (),
        scheduler: Any = None,
        *,
        metrics: dict[str, MetricFn] | Sequence[str] = (),
        run_dir: str | Path | None = None,
        seed: int = 0,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        compile: bool = False,
        checkpoint_every: int = 1,
        keep_last: int | None = 3,
        on_nonfinite: str = "rollback",
        lr_backoff: float = 0.5,
        max_rollbacks: int = 3,
        grad_clip: float | None = None,
        probe_size: int = 256,
        progress: bool = False,
        config: Mapping[str, Any] | None = None,
    ):
        if on_nonfinite not in ("rollback", "stop"):
            raise ValueError(f"on_nonfinite must be 'rollback' or 'stop', got {on_nonfinite!r}")
        if not 0 < lr_backoff < 1:
            raise ValueError(f"lr_backoff must be in (0, 1), got {lr_backoff!r}")
        self.device = resolve_device(device)
        self.dist = from_env(self.device)  # None in a single process
        if self.dist is not None:
            self.device = self.dist.device(self.device)
            shutdown_at_exit()
        self.model = model.to(self.device)
        self.optimizer, self.loss_fn, self.scheduler = optimizer, loss_fn, scheduler
        self.policies, self.callbacks = list(policies), list(callbacks)
        if self.dist is not None and compile and self.policies:
            raise ValueError(_edits.COMPILE_DDP_EDITS)
        self.metrics = resolve(metrics if isinstance(metrics, dict) else tuple(metrics))
        self.seed, self.batch_size, self.compile = seed, batch_size, compile
        self.checkpoint_every, self.on_nonfinite = checkpoint_every, on_nonfinite
        self.lr_backoff, self.max_rollbacks, self.grad_clip = lr_backoff, max_rollbacks, grad_clip
        self.probe_size, self.progress = probe_size, progress
        # Every rank reads checkpoints (resume); only rank 0 writes the run directory.
        self.run = RunDir(run_dir) if run_dir is not None and self.is_main else None
        self.checkpoints = CheckpointManager(Path(run_dir) / CHECKPOINTS, keep_last) if run_dir is not None else None
        if self.run is not None and config is not None:
            self.run.write_config(config)
        # Loop state (all of it is checkpointed).
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps completed
        self.batch_in_epoch = 0
        self.epoch_loss = [0.0, 0]  # sum of batch losses and count, for the running epoch (this rank)
        self.samples_in_epoch = 0  # samples consumed in the running epoch, all ranks together
        # Tensor data is dealt out by a ShardedSampler under DDP (and after resuming a DDP run).
        self._sharded = self.dist is not None
        self.rollbacks = 0
        self.history: dict[str, list[float]] = {}
        self._resume_rng: dict[str, Any] | None = None
        self._stop = False
        self._saved_at: tuple[int, int] | None = None  # (step, batch_in_epoch) of the last checkpoint
        self._snapshot: dict[str, Any] = {}  # what a rollback restores (the epoch's start, or a later edit)
        self.probe: tuple[torch.Tensor, torch.Tensor] | None = None  # the fixed probe batch of ``fit``
        self._forward: Callable[..., torch.Tensor] = self.model
        self._wrapped = False  # whether ``_forward`` is current (dropped while policies decide and edit)
        self._wrap()

    # -- public ------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """True on rank 0 (and in a single process): the process that writes and prints."""
        return self.dist is None or self.dist.is_main

    def request_stop(self) -> None:
        """Finish the current step, checkpoint (with a run directory) and return from ``fit``."""
        self._stop = True

    def fit(self, train: Data, val: Data | None = None, epochs: int = 10, *, resume: bool = False,
            handle_signals: bool = False) -> dict[str, list[float]]:
        """Train until ``epochs`` epochs are completed (or a stop); return the per-epoch history.

        ``train`` and ``val`` are DataLoaders, or ``(inputs, targets)`` tensors (a pair or a
        ``TensorDataset``) batched by ``batch_size``, ``train`` shuffled per epoch.
        With ``resume=True`` and a checkpoint in the run directory, training continues from it
        (``self.model`` is then the restored model). With ``handle_signals``, SIGINT/SIGTERM
        stop training cleanly with a checkpoint.
        """
        if resume:
            self.resume()
        if not self._wrapped:  # an earlier fit raised while its policies had the model unwrapped
            self._wrap()
        train_loader = self._loader(train, shuffle=True)
        val_loader = self._loader(val, shuffle=False) if val is not None else None
        probe = self.probe = self._probe(val_loader or train_loader)
        if self.policies:  # a user's model: its unit groups come from a trace on real inputs
            ensure_traced(self.model, probe[0])
        self._stop = False
        with stop_on_signals(handle_signals, self.request_stop):
            for cb in self.callbacks:
                cb.on_fit_start(self)
            while self.epoch < epochs and not self._stop_everywhere():
                if not self._train_epoch(train_loader):
                    break
                self._end_epoch(val_loader, probe, last=self.epoch + 1 >= epochs)
            if self._stop and self._saved_at != (self.step, self.batch_in_epoch):
                self.save_checkpoint()  # stopped between checkpoints: resumable from here
            for cb in self.callbacks:
                cb.on_fit_end(self)
        if self.run is not None:
            self._write_report()
        return self.history

    def apply_edit(self, fn: Callable[[nn.Module, torch.optim.Optimizer], Edit], *, policy: str = "",
                   reason: str = "") -> Edit:
        """Apply ``fn(model, optimizer) -> Edit`` between steps, as the Trainer applies policies' edits.

        For edits no ``EditRequest`` names, such as ``adaptnet.grow_experts``: ``fn`` edits the
        unwrapped model and carries the optimizer; the DDP / compile wrappers are re-created and
        the event is logged. Call it from a callback (``on_epoch_start``, ``on_batch_end``) or
        between fits; under DDP on every rank at the same step (the ranks' ``Edit`` records
        are compared, and a difference raises ``TrainingError``). ``self.probe`` is the fit's
        probe batch, for edits that calibrate on data. Callbacks get ``on_after_edit`` (there is
        no request for ``on_before_edit``).
        """
        return _edits.apply_function(self, fn, policy, reason)

    def save_checkpoint(self) -> Path | None:
        """Checkpoint (rank 0 writes; under DDP every rank must call it: it all-reduces the loss)."""
        if self.checkpoints is None:
            return None
        epoch_loss = self.dist.sum(self.epoch_loss) if self.dist is not None else list(self.epoch_loss)
        path: Path | None = None
        if self.is_main:
            path = self.checkpoints.save(
                self.step, self.model, self.optimizer, self.scheduler,
                epoch=self.epoch, step=self.step, batch_in_epoch=self.batch_in_epoch,
                epoch_loss=[epoch_loss[0], int(epoch_loss[1])], rollbacks=self.rollbacks, history=self.history,
                policies=[p.state_dict() for p in self.policies], rng=_rng.capture(), seed=self.seed,
                samples_in_epoch=self.samples_in_epoch, sharded=self._sharded,
                world_size=self.dist.world_size if self.dist is not None else 1,
            )
        if self.dist is not None:
            self.dist.barrier()  # the checkpoint is complete before any rank goes on
        self._saved_at = (self.step, self.batch_in_epoch)
        if path is not None:  # rank 0 only
            for cb in self.callbacks:
                cb.on_checkpoint(self, path)
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        """Restore the latest checkpoint of the run directory (or ``path``); False if none."""
        if path is None:
            path = self.checkpoints.latest() if self.checkpoints is not None else None
            if path is None:
                return False
        # adaptnet's own models rebuild themselves from their spec; a user's model is given the
        # saved shapes (it must be freshly built: the Trainer's model, before any edit).
        user_model = None if isinstance(self.model, HasSpec) else self.model
        model, state = load(path, map_location=self.device, model=user_model)
        self.model = model.to(self.device)
        restore_optimizer(self.optimizer, self.model, state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        for policy, saved in zip(self.policies, state["policies"], strict=True):
            policy.load_state_dict(saved)
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        # The checkpoint holds the loss summed over ranks: rank 0 carries it, the others restart at 0.
        self.epoch_loss = list(state["epoch_loss"]) if self.is_main else [0.0, 0]
        self.rollbacks = state["rollbacks"]
        self.samples_in_epoch = int(state.get("samples_in_epoch", self.batch_in_epoch * self.batch_size))
        self._sharded = self._sharded or bool(state.get("sharded", False))
        self.history = {k: list(v) for k, v in state["history"].items()}
        self._resume_rng = state["rng"]
        if self.run is not None:
            self.run.truncate(self.epoch, self.step)
        self._wrap()
        logger.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step)
        return True

    def _stop_everywhere(self) -> bool:
        """Whether a stop was requested (on any rank: the ranks must stop at the same step)."""
        if self.dist is not None:
            self._stop = self.dist.any(self._stop)
        return self._stop

    # -- one epoch ---------------------------------------------------------------------------
    def _batches(self, loader: Loader) -> Iterator[Any]:
        """The epoch's batches, in an order derived from (seed, epoch) alone."""
        torch.manual_seed(_rng.derive_seed(self.seed, self.epoch))
        for owner in (loader, loader.sampler, getattr(loader, "batch_sampler", None)):
            gen = getattr(owner, "generator", None)
            if isinstance(gen, torch.Generator):
                gen.manual_seed(_rng.derive_seed(self.seed, self.epoch, 1))
        skip = self.batch_in_epoch
        if isinstance(loader.sampler, ShardedSampler):
            # Start after the samples consumed (by any number of ranks) instead of skipping batches.
            loader.sampler.start, skip = self.samples_in_epoch, 0
        set_epoch = getattr(loader.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self.epoch)
        batches = iter(loader)
        for _ in range(skip):  # resuming inside an epoch: skip what was done
            next(batches)
        if self._resume_rng is not None:
            # Inside an epoch, continue the interrupted RNG stream; at an epoch boundary the
            # epoch's own seed (set above, and drawn from lazily by the sampler) already is it.
            if self.batch_in_epoch > 0:
                _rng.restore(self._resume_rng)
            self._resume_rng = None
        return batches

    def _train_epoch(self, loader: Loader) -> bool:
        """Train one epoch (retrying after rollbacks); False if training must stop."""
        for cb in self.callbacks:
            cb.on_epoch_start(self, self.epoch)
        self._snapshot = self._epoch_snapshot(self._resume_rng)
        while True:
            outcome = self._run_batches(loader)
            if outcome != "nonfinite":
                return outcome == "done"
            self._rollback(self._snapshot)

    def _run_batches(self, loader: Loader) -> str:
        batches: Iterable[Any] = self._batches(loader)
        if self.progress and sys.stderr.isatty():
            from tqdm import tqdm

            done = 0 if isinstance(loader.sampler, ShardedSampler) else self.batch_in_epoch
            batches = tqdm(batches, total=len(loader) - done, desc=f"epoch {self.epoch + 1}",
                           leave=False)
        self.model.train()
        for x, y in batches:
            x, y = x.to(self.device), y.to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            if self.dist is not None:  # DDP wraps the model with its loss (see distributed.WithLoss)
                loss = self._forward(x, y, self.loss_fn)
            else:
                loss = adaptive_loss(self.model, self.loss_fn, self._forward(x), y)
            nonfinite = not torch.isfinite(loss)
            if self.dist is not None and self.dist.any(nonfinite) and not nonfinite:
                return self._nonfinite(float("nan"), on_other_rank=True)  # every rank rolls back, or none
            if nonfinite:
                return self._nonfinite(loss.item())
            loss.backward()
            if self.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            self.step += 1
            self.batch_in_epoch += 1
            self.epoch_loss = [self.epoch_loss[0] + loss.item(), self.epoch_loss[1] + 1]
            self.samples_in_epoch += len(x) * (self.dist.world_size if self.dist is not None else 1)
            for cb in self.callbacks:
                cb.on_batch_end(self, self.step, loss.detach())
            if self._stop_everywhere():  # a stop on one rank stops all at this step
                return "stopped"
        return "done"

    def _end_epoch(self, val: Loader | None, probe: tuple[torch.Tensor, torch.Tensor], last: bool) -> None:
        began = time.perf_counter()
        loss_sum, count = self.dist.sum(self.epoch_loss) if self.dist is not None else self.epoch_loss
        row: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.step, "train_loss": loss_sum / max(1, count)}
        if val is not None:
            row.update(self._validate(val))
        row["params"] = sum(p.numel() for p in self.model.parameters())
        row["widths"] = widths(self.model)
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        for key, value in row.items():
            if key not in ("epoch", "step", "widths"):
                self.history.setdefault(key, []).append(float(value))
        if self.scheduler is not None:
            self.scheduler.step()
        self.epoch += 1
        self.batch_in_epoch, self.epoch_loss, self.rollbacks, self.samples_in_epoch = 0, [0.0, 0], 0, 0
        # Callbacks see the model that produced ``row`` (a best-model callback keeps what was
        # validated); the policies' edits come after them, and the checkpoint after the edits.
        for cb in self.callbacks:
            cb.on_epoch_end(self, self.epoch, dict(row))  # a copy: what is written stays the Trainer's row
        self._apply_policies(probe)
        row["seconds"] = round(time.perf_counter() - began, 4)
        if self.run is not None:
            self.run.append_metrics(row)
        logger.info("epoch %d: %s", self.epoch, {k: v for k, v in row.items() if k != "epoch"})
        if last or self._stop_everywhere() or (self.checkpoint_every and self.epoch % self.checkpoint_every == 0):
            self.save_checkpoint()

    @torch.no_grad()
    def _validate(self, loader: Loader) -> dict[str, float]:
        self.model.eval()
        outputs, targets = [], []
        # Under DDP every rank evaluates the whole validation set with the unwrapped model
        # (identical parameters: identical numbers, no collective).
        forward = self._forward if self.dist is None else self.model
        for x, y in loader:
            outputs.append(forward(x.to(self.device)))
            targets.append(y.to(self.device))
        out, tgt = torch.cat(outputs), torch.cat(targets)
        result = {"val_loss": float(self.loss_fn(out, tgt))}
        result.update({f"val_{name}": fn(out, tgt) for name, fn in self.metrics.items()})
        return result

    # -- edits (see adaptnet.train._edits) ------------------------------------------------------
    def _apply_policies(self, probe: tuple[torch.Tensor, torch.Tensor]) -> None:
        _edits.apply_policies(self, probe)

    def _edit(self, request: EditRequest, probe: tuple[torch.Tensor, torch.Tensor], gen: torch.Generator) -> Edit:
        return _edits.apply_policy_request(self, request, probe, gen)

    def _unwrap(self) -> None:
        """Drop the wrappers before an edit (and before the policies decide, which may probe with
        edits): a DDP wrapper holds references to the parameters, and an edit swaps their contents
        in place (``torch.utils.swap_tensors`` refuses shared ones)."""
        self._forward = self.model  # the DDP reducer and its hooks go with the wrapper (no cycles)
        self._wrapped = False

    def _wrap(self) -> None:
        """(Re-)create what wraps the model: DDP (its hooks cover only the parameters that exist when
        it is built), then one compile per architecture."""
        module = self.dist.wrap(self.model, self.device) if self.dist is not None else self.model
        shapes = [tuple(p.shape) for p in self.model.parameters()]
        if self.compile and shapes != getattr(self, "_compiled_shapes", shapes):
            # dynamo keeps every compiled version of a forward and, past recompile_limit (8), runs it
            # eagerly without a word: drop the versions of shapes this edit made stale
            torch._dynamo.reset_code(type(self.model).forward.__code__)
        self._compiled_shapes = shapes
        self._forward = torch.compile(module) if self.compile else module
        self._wrapped = True

    # -- non-finite losses ---------------------------------------------------------------------
    def _epoch_snapshot(self, rng: dict[str, Any] | None) -> dict[str, Any]:
        if self.on_nonfinite != "rollback":
            return {}
        # The RNG state a retry starts from: None (the epoch's own seed), or one saved mid-epoch.
        counters = (self.step, self.batch_in_epoch, list(self.epoch_loss), self.samples_in_epoch)
        return {**capture_training_state(self.model, self.optimizer, self.scheduler), "counters": counters,
                "rng": rng}

    def _edited_mid_epoch(self) -> None:
        """After an edit inside an epoch, a rollback restores the edited model, from this step on."""
        if self._snapshot and self.batch_in_epoch > 0:
            self._snapshot = self._epoch_snapshot(_rng.capture())

    def _nonfinite(self, value: float, on_other_rank: bool = False) -> str:
        where = f"epoch {self.epoch + 1}, step {self.step + 1}" + (" (on another rank)" if on_other_rank else "")
        if self.on_nonfinite == "stop":
            raise TrainingError(f"the loss became {value} at {where}; stopped (the last checkpoint is intact)")
        if self.rollbacks >= self.max_rollbacks:
            raise TrainingError(f"the loss became {value} at {where} after {self.rollbacks} rollbacks; "
                                "lower the learning rate or check the data (the last checkpoint is intact)")
        logger.warning("loss became %s at %s: rolling back the epoch, learning rate x%s", value, where,
                       self.lr_backoff)
        return "nonfinite"

    def _rollback(self, start: dict[str, Any]) -> None:
        restore_training_state(start, self.model, self.optimizer, self.scheduler, lr_scale=self.lr_backoff)
        self.step, self.batch_in_epoch, epoch_loss, self.samples_in_epoch = start["counters"]
        self.epoch_loss = list(epoch_loss)
        self._resume_rng = start["rng"]
        self.rollbacks += 1
        if self.run is not None:
            self.run.append_event({"step": self.step, "epoch": self.epoch, "op": "rollback",
                                   "lr": self.optimizer.param_groups[0]["lr"], "rollbacks": self.rollbacks})

    # -- plumbing ----------------------------------------------------------------------------
    def _loader(self, data: Data, shuffle: bool) -> Loader:
        sharded = None
        if self._sharded:  # under DDP, or resuming a DDP run in one process: batch_size rows per rank and step
            sharded = (self.dist.rank, self.dist.world_size) if self.dist is not None else (0, 1)
        return make_loader(data, self.batch_size, shuffle, seed=self.seed, sharded=sharded)

    def _probe(self, loader: Loader) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed batch (the first ``probe_size`` rows of the dataset, never shuffled)."""
        x, y = next(iter(DataLoader(loader.dataset, batch_size=self.probe_size, shuffle=False)))
        return x.to(self.device), y.to(self.device)

    def _write_report(self) -> None:
        assert self.run is not None
        try:
            from adaptnet.train.report import write_report

            write_report([self.run.path], self.run.path / "report.png")
        except Exception as err:  # a report must never lose a finished run
            logger.warning("could not write report.png: %s", err)

