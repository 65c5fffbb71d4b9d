"""``AdaptnetCallback`` for the Hugging Face ``transformers.Trainer``: adaptnet's policies grow and
prune the model inside ``trainer.train()``.

* Decisions: once per evaluation (``eval_strategy`` "epoch" or "steps": the evaluation's
  ``eval_*`` metrics, ``eval_loss`` kept as ``val_loss``), or once per epoch without evaluation;
  the training ``loss`` logged since the last decision is averaged into ``train_loss``.
* Edits carry the optimizer the Trainer created (under accelerate's wrapper); parameters keep
  their identity, so the LR scheduler goes on as it was. After each edit ``model.config`` is
  updated (``sync_config``) so that ``save_pretrained``/``from_pretrained`` rebuild the grown
  model, as far as the config can say it (one MLP width and head count for all layers).
* Checkpoints: every ``checkpoint-N`` folder gets ``adaptnet.json`` (the starting config, the
  edited shapes, the policies' state). ``from_pretrained(cls, folder)`` rebuilds any grown model
  from it, also one a config cannot describe; ``callback.resume(model, folder)`` reshapes a
  freshly built model before ``trainer.train(resume_from_checkpoint=folder)``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import transformers
from torch import nn

from adaptnet.groups import ensure_traced
from adaptnet.integrations._hf_config import sync_config
from adaptnet.integrations._runner import PolicyRunner, RunsPolicies, plain_optimizer
from adaptnet.nn.losses import LossFn
from adaptnet.policy import Policy
from adaptnet.train import _any_model

logger = logging.getLogger(__name__)

FILE = "adaptnet.json"
__all__ = ["AdaptnetCallback", "from_pretrained", "sync_config"]


class AdaptnetCallback(RunsPolicies, transformers.TrainerCallback):
    """Let adaptnet's policies edit the model while ``transformers.Trainer`` trains it.

    Args:
        policies: adaptnet policies (``GrowOnPlateau``, ``GrowEvery``, ``PruneToBudget``, ...).
        example_inputs: the model's positional inputs to trace it with (a tensor of token ids, or
            a tuple). Default: the ``input_ids`` of the first training batch.
        loss_fn: ``loss_fn(outputs, targets)`` with a probe batch, for ``where="gradient"``
            growth; the probe is ``(input_ids, labels)`` of the first training batch.
        seed: with the step, seeds each decision's generator.
    """

    def __init__(self, policies: Iterable[Policy], example_inputs: Any = None, loss_fn: LossFn | None = None,
                 seed: int = 0):
        self.runner = PolicyRunner(policies, seed=seed, loss_fn=loss_fn)
        self.example_inputs = example_inputs
        self.probe: tuple[torch.Tensor, torch.Tensor] | None = None
        self.base_config: dict[str, Any] | None = None  # the config before any edit
        self.reasons: list[str] = []  # what the config cannot say about the model, after the last edit
        self._losses: list[float] = []

    # -- the loop --------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        assert model is not None
        if getattr(args, "world_size", 1) > 1:
            # The Trainer's DDP wrapper (accelerate's) holds the parameters and is not rebuilt after an
            # edit; adaptnet's Trainer and the Lightning callback rebuild theirs.
            raise ValueError(f"AdaptnetCallback for transformers.Trainer runs in one process; this run has "
                             f"{args.world_size}. Under torchrun, train with adaptnet's Trainer or the Lightning "
                             "callback (adaptnet.integrations.lightning), which rebuild the DDP wrapper after edits")
        if self.base_config is None:
            self.base_config = model.config.to_dict()  # type: ignore[union-attr,operator]
        inputs = self.example_inputs
        batch = next(iter(train_dataloader)) if train_dataloader is not None else None
        if inputs is None and batch is not None:
            inputs = batch["input_ids"][:2]
        if inputs is None:
            raise ValueError("AdaptnetCallback needs example_inputs=(input_ids,) to trace the model")
        device = next(model.parameters()).device
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        ensure_traced(model, tuple(t.to(device) for t in inputs))
        if batch is not None and "labels" in batch:
            self.probe = (batch["input_ids"].to(device), batch["labels"].to(device))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self._losses.append(float(logs["loss"]))

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    model: nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        values = {k: v for k, v in (metrics or {}).items() if k.startswith("eval_")}
        if "eval_loss" in values:
            values["val_loss"] = values["eval_loss"]
        self._decide(state, model, optimizer, values)

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                     optimizer: Any = None, **kwargs: Any) -> None:
        if str(getattr(args, "eval_strategy", "no")).endswith("no"):
            self._decide(state, model, optimizer, {})

    def _decide(self, state: Any, model: nn.Module | None, optimizer: Any, values: dict[str, float]) -> None:
        assert model is not None and optimizer is not None
        if self._losses:
            values["train_loss"] = sum(self._losses) / len(self._losses)
            self._losses = []
        self.runner.record(values)
        edits = self.runner.run(model, plain_optimizer(optimizer), state.global_step, self.probe)
        if not edits:
            return
        reasons = sync_config(model)
        if reasons and reasons != self.reasons:  # said once per change, after all of a decision's edits
            logger.warning("the config of %s cannot describe it after step %d's edits: %s; save_pretrained still "
                           "writes it, load it with adaptnet.integrations.transformers.from_pretrained",
                           type(model).__name__, state.global_step, "; ".join(reasons))
        self.reasons = reasons

    # -- checkpoints -----------------------------------------------------------------------------
    def on_save(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        assert model is not None
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            self.save(model, folder)

    def save(self, model: nn.Module, folder: str | os.PathLike[str]) -> Path:
        """Write ``adaptnet.json`` beside a ``save_pretrained`` folder: call it after ``save_model(folder)``."""
        path = Path(folder) / FILE
        record = {"adaptnet": 1, "base_config": self.base_config, "spec": _any_model.traced_spec(model),
                  "unexpressed": self.reasons, "callback": self.runner.state_dict()}
        path.write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
        return path

    def resume(self, model: nn.Module, folder: str | os.PathLike[str]) -> nn.Module:
        """Before ``trainer.train(resume_from_checkpoint=folder)``: give the freshly built ``model`` the
        checkpoint's shapes and this callback the policies' state (the Trainer then loads the weights)."""
        record = _read(Path(folder))
        _reshape(model, record, Path(folder))
        self.base_config = record["base_config"]
        self.runner.load_state_dict(record["callback"])
        self.reasons = list(record.get("unexpressed", []))
        return model


def _read(folder: Path) -> dict[str, Any]:
    path = folder / FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; it is written by adaptnet's callback into each checkpoint")
    try:
        record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read it as JSON ({err})") from err
    if record.get("adaptnet") != 1 or not isinstance(record.get("spec"), dict):
        raise ValueError(f"{path}: not an adaptnet record (format 1 with a 'spec')")
    return record


def _reshape(model: nn.Module, record: dict[str, Any], folder: Path) -> None:
    with torch.random.fork_rng(devices=[]):
        _any_model.reshape(model, record["spec"], str(folder / FILE))
    sync_config(model)


def from_pretrained(cls: Any, folder: str | os.PathLike[str], **kwargs: Any) -> nn.Module:
    """Rebuild a grown model from a ``save_pretrained`` folder (or Trainer checkpoint) with ``adaptnet.json``.

    Builds ``cls`` from the starting config, replays the saved shapes (also ones a config cannot
    describe, such as one layer's MLP wider than the others) and loads ``model.safetensors``. A folder
    without ``adaptnet.json`` is left to ``cls.from_pretrained(folder, **kwargs)``. Never downloads.
    """
    folder = Path(folder)
    if not (folder / FILE).is_file():
        model: nn.Module = cls.from_pretrained(folder, local_files_only=True, **kwargs)
        return model
    record = _read(folder)
    config = cls.config_class.from_dict(record["base_config"])
    model = cls(config)
    _reshape(model, record, folder)
    weights = safetensors.torch.load_file(str(folder / "model.safetensors"))
    result = model.load_state_dict(weights, strict=False)
    tied = {name for name, p in model.named_parameters(remove_duplicate=False)} - set(dict(model.named_parameters()))
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(f"{folder}: the weights do not match the saved shapes (missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]})")
    model.eval()
    return model
