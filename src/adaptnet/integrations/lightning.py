"""``AdaptnetCallback`` for PyTorch Lightning: adaptnet's policies grow and prune a LightningModule
(or a submodule it names) inside ``lightning.Trainer.fit``.

* Signals: at the end of every training epoch (Lightning runs that epoch's validation before
  ``on_train_epoch_end``), every scalar in ``trainer.callback_metrics`` is appended to the
  history the policies read (averaged over ranks under DDP); ``monitor`` is also kept as
  ``val_loss``, the series a policy with ``monitor="auto"`` reads.
* Edits run there, between optimizer steps, with the optimizer Lightning holds
  (``trainer.optimizers``): parameters keep their identity, so Lightning's optimizer and its
  LR schedulers stay valid, and per-element state follows each edit.
* Events go to Lightning's loggers (``adaptnet/params``, ``adaptnet/width/<group>``) and to
  ``callback.events``.
* Checkpoints: ``on_save_checkpoint`` stores the grown shapes (``checkpoint["adaptnet"]``);
  resuming with ``trainer.fit(model, ckpt_path=...)`` reshapes the fresh module before
  Lightning loads its weights (Lightning calls callbacks' ``on_load_checkpoint`` after the
  weights, so the callback hooks the LightningModule's ``on_load_checkpoint``, which runs
  before). ``load_grown(module, path)`` does the same outside a Trainer.
* ``strategy="ddp"``: decisions are checked equal on every rank (the probe batch comes from
  rank 0), and the DDP wrapper is rebuilt after edits (DDP hooks only the parameters that
  existed when it was built).
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from adaptnet.edit import Edit
from adaptnet.groups import ensure_traced, unit_groups, widths
from adaptnet.integrations._runner import PolicyRunner, RunsPolicies, dist_from_process_group, owning_optimizer
from adaptnet.nn.losses import LossFn
from adaptnet.policy import Policy
from adaptnet.train import _any_model

logger = logging.getLogger(__name__)

KEY = "adaptnet"


class AdaptnetCallback(RunsPolicies, pl.Callback):
    """Let adaptnet's policies edit a LightningModule while ``lightning.Trainer`` trains it.

    Args:
        policies: adaptnet policies (``GrowOnPlateau``, ``PruneToBudget``, ...).
        example_inputs: one batch's positional inputs to trace the module with (a tensor or a
            tuple). Default: the LightningModule's ``example_input_array``, else the first
            element of the first training batch.
        module: the submodule to edit, by its name in the LightningModule (``"net"``); None edits
            the LightningModule itself.
        monitor: the logged metric the policies' ``monitor="auto"`` reads (kept as ``val_loss``).
        loss_fn: ``loss_fn(module(x), y)``, for ``where="gradient"`` growth and gradient importance,
            with a probe batch taken from the first training batch ``(x, y)``.
        probe_size: rows of that probe batch.
        seed: with the step, seeds each decision's generator (the same on every rank).
    """

    def __init__(self, policies: Iterable[Policy], example_inputs: Any = None, module: str | None = None,
                 monitor: str = "val_loss", loss_fn: LossFn | None = None, probe_size: int = 256, seed: int = 0):
        if module is not None and not isinstance(module, str):
            raise TypeError(f"module must be the name of a submodule (a str) or None, got {module!r}")
        self.runner = PolicyRunner(policies, seed=seed, loss_fn=loss_fn)
        self.example_inputs, self.module_name, self.monitor = example_inputs, module, monitor
        self.probe_size = probe_size
        self.probe: tuple[torch.Tensor, torch.Tensor] | None = None

    def target(self, pl_module: pl.LightningModule) -> nn.Module:
        """The module the policies edit."""
        if self.module_name is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module_name)
        except AttributeError:
            names = [n for n, _ in pl_module.named_children()]
            raise ValueError(f"module={self.module_name!r} is not a submodule of {type(pl_module).__name__}; "
                             f"its children: {', '.join(names) or 'none'}") from None

    # -- resuming: reshape before Lightning loads the weights -----------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        original = pl_module.on_load_checkpoint
        if getattr(original, "_adaptnet", False):  # set up by an earlier fit/validate of this module
            return

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            self._reshape(pl_module, checkpoint)
            original(checkpoint)

        on_load_checkpoint._adaptnet = True  # type: ignore[attr-defined]
        # An instance attribute: Lightning looks the hook up on the module, before loading state_dict.
        pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]

    def _reshape(self, pl_module: pl.LightningModule, checkpoint: Mapping[str, Any]) -> None:
        saved = checkpoint.get(KEY)
        if saved is None:
            return
        reshape_module(self.target(pl_module), saved["spec"], "the Lightning checkpoint")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        module = self.target(pl_module)
        if "_adaptnet_trace" in module.__dict__:
            checkpoint[KEY] = {"module": self.module_name, "spec": _any_model.traced_spec(module)}

    def state_dict(self) -> dict[str, Any]:
        return self.runner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.runner.load_state_dict(state_dict)

    # -- the loop --------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        inputs = self.example_inputs
        if inputs is None:
            inputs = getattr(pl_module, "example_input_array", None)
        if inputs is not None:
            self._trace(pl_module, inputs)

    def _trace(self, pl_module: pl.LightningModule, inputs: Any) -> None:
        module = self.target(pl_module)
        device = next(iter(module.parameters())).device
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        ensure_traced(module, tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.probe is not None or not isinstance(batch, (tuple, list)) or not batch:
            return
        if "_adaptnet_trace" not in self.target(pl_module).__dict__:
            self._trace(pl_module, batch[0])
        if len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch):
            probe = (batch[0][: self.probe_size].detach().clone(), batch[1][: self.probe_size].detach().clone())
            # Under DDP each rank sees other rows: rank 0's batch makes decisions identical everywhere.
            self.probe = trainer.strategy.broadcast(probe, src=0) if trainer.world_size > 1 else probe

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.runner.record(self._metrics(trainer))
        module = self.target(pl_module)
        if "_adaptnet_trace" not in module.__dict__:
            raise ValueError("AdaptnetCallback could not trace the module: pass example_inputs=(x,), set the "
                             "LightningModule's example_input_array, or train on (x, y) batches")
        optimizer = owning_optimizer(module, trainer.optimizers)
        dist = dist_from_process_group()
        wrapped = dist is not None and trainer.strategy.model is not pl_module
        if wrapped:
            # DDP's references to the parameters make swap_tensors (every edit) refuse them.
            trainer.strategy.model = pl_module
            gc.collect()
        try:
            self.runner.run(module, optimizer, trainer.global_step, self.probe,
                            agree=dist.agree if dist is not None else None,
                            on_edit=lambda edit, event: self._log(trainer, module, edit))
        finally:
            if wrapped:
                trainer.strategy.configure_ddp()  # type: ignore[attr-defined]

    def _metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items())
                   if isinstance(v, torch.Tensor) and v.numel() == 1}
        if trainer.world_size > 1:  # metrics logged without sync_dist differ per rank
            names = sorted(metrics)
            values = trainer.strategy.reduce(torch.tensor([metrics[n] for n in names], dtype=torch.float64),
                                             reduce_op="mean")
            metrics = dict(zip(names, [float(v) for v in values.tolist()], strict=True))
        if self.monitor not in metrics and self.runner.policies:
            raise ValueError(f"monitor={self.monitor!r} was not logged this epoch; logged: "
                             f"{', '.join(metrics) or 'nothing'} (log it with self.log({self.monitor!r}, ...))")
        if self.monitor != "val_loss" and self.monitor in metrics:
            metrics["val_loss"] = metrics[self.monitor]
        return metrics

    def _log(self, trainer: pl.Trainer, module: nn.Module, edit: Edit) -> None:
        values: dict[str, float] = {"adaptnet/params": float(edit.params_after),
                                    "adaptnet/edits": float(len(self.runner.events))}
        values.update({f"adaptnet/width/{name}": float(g.size) for name, g in unit_groups(module).items()})
        for lg in trainer.loggers:
            lg.log_metrics(values, step=trainer.global_step)


def reshape_module(module: nn.Module, spec: Mapping[str, Any], where: str) -> None:
    """Give a freshly built ``module`` the saved shapes (values come from the weights loaded next)."""
    with torch.random.fork_rng(devices=[]):
        _any_model.reshape(module, dict(spec), where)


def load_grown(pl_module: pl.LightningModule, path: str | os.PathLike[str], module: str | None = None,
               map_location: str | torch.device = "cpu") -> pl.LightningModule:
    """Load a Lightning checkpoint of a grown model into a freshly built ``pl_module`` (no Trainer).

    ``LightningModule.load_from_checkpoint`` builds the module at its starting size and fails on the
    grown weights; this reshapes it first. Reads the file with ``torch.load(weights_only=True)``.
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    saved = checkpoint.get(KEY)
    name = module if module is not None or saved is None else saved.get("module")
    target = pl_module if name is None else pl_module.get_submodule(name)
    if saved is not None:
        reshape_module(target, saved["spec"], str(path))
    pl_module.load_state_dict(checkpoint["state_dict"])
    logger.info("loaded %s: widths %s", path, widths(target))
    return pl_module
