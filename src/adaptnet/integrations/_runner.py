"""What the Lightning and Hugging Face callbacks share: policies, their history, and applying edits.

A ``PolicyRunner`` is fed the metrics of each decision point (an epoch, or an evaluation),
builds the ``Signals`` a policy sees, and hands the requests to ``run_policies`` (the one
decision-and-apply loop, shared with adaptnet's Trainer) with an ``apply_one`` that edits the
module with the optimizer the host loop holds. Edits keep every ``nn.Parameter`` object
(``torch.utils.swap_tensors``), so that optimizer, its LR scheduler and any reference the host
keeps stay valid; only per-element optimizer state follows the index map.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from adaptnet.edit import Edit
from adaptnet.nn.losses import LossFn
from adaptnet.policy import EditRequest, Policy, Signals, apply_request
from adaptnet.train import _edits, _rng
from adaptnet.train.distributed import Dist

logger = logging.getLogger(__name__)

Probe = tuple[torch.Tensor, torch.Tensor]
Agree = Callable[[str, dict[str, Any]], None]


def plain_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` under a host's wrapper (accelerate's, Lightning's ``.optimizer``)."""
    # accelerate's AcceleratedOptimizer subclasses Optimizer but keeps the state in the one it wraps.
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer (or a wrapper with .optimizer), got {type(optimizer)}")
    return optimizer


def owning_optimizer(module: nn.Module, optimizers: Iterable[Any]) -> torch.optim.Optimizer | None:
    """The one optimizer that trains ``module``'s parameters (None when none does).

    Raises:
        ValueError: the module's parameters are split between optimizers: an edit carries one.
    """
    params = {id(p) for p in module.parameters()}
    owners = [opt for opt in map(plain_optimizer, optimizers)
              if any(id(p) in params for g in opt.param_groups for p in g["params"])]
    if len(owners) > 1:
        raise ValueError(f"{len(owners)} optimizers train parts of {type(module).__name__}; an edit carries one: "
                         "name a submodule that one optimizer trains (module=...)")
    return owners[0] if owners else None


def dist_from_process_group() -> Dist | None:
    """A ``Dist`` for an initialised process group of several ranks (set up by the host), else None."""
    import torch.distributed as torch_dist

    if not (torch_dist.is_available() and torch_dist.is_initialized()) or torch_dist.get_world_size() < 2:
        return None
    rank = torch_dist.get_rank()
    return Dist(rank, torch_dist.get_world_size(), rank, str(torch_dist.get_backend()))


class PolicyRunner:
    """Policies, the per-decision history they read, the edit events, and how to apply their requests.

    Args:
        policies: the same policy objects as adaptnet's ``Trainer`` takes.
        seed: with the step, seeds the generator of each decision (identical on every rank).
        loss_fn: ``loss_fn(outputs, targets)``, needed by ``where="gradient"`` growth and
            gradient-based importance (with a probe batch).
    """

    def __init__(self, policies: Iterable[Policy], seed: int = 0, loss_fn: LossFn | None = None):
        self.policies = list(policies)
        for p in self.policies:
            if not isinstance(p, Policy):
                raise TypeError(f"policies must be adaptnet policies (decide, state_dict, load_state_dict), got {p!r}")
        self.seed, self.loss_fn = seed, loss_fn
        self.history: dict[str, list[float]] = {}
        self.events: list[dict[str, Any]] = []
        self.decisions = 0  # decision points seen: a policy's "epochs"

    def record(self, metrics: Mapping[str, Any]) -> None:
        """Append one value per series (scalars only; NaN and non-numbers are left out)."""
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    continue
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.history.setdefault(key, []).append(float(value))

    def run(self, module: nn.Module, optimizer: torch.optim.Optimizer | None, step: int, probe: Probe | None,
            agree: Agree | None = None, on_edit: Callable[[Edit, dict[str, Any]], None] | None = None) -> list[Edit]:
        """One decision point: every policy decides on ``module`` and its requests are applied in order."""
        self.decisions += 1
        if not self.policies:
            return []
        lr = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else 0.0
        signals = Signals(self.decisions, step, module, self.history, probe, self.loss_fn,
                          _rng.generator(self.seed, step), lr=lr)

        def apply_one(request: EditRequest) -> Edit:
            edit = apply_request(request, module, optimizer, probe, self.loss_fn, signals.generator)
            event = _edits.edit_event(edit, step, self.decisions, request.policy, request.reason)
            self.events.append(event)
            logger.info("edit at step %d: %s %s -> widths %s (%s)", step, edit.op, edit.layer,
                        list(edit.widths_after), request.reason)
            if on_edit is not None:
                on_edit(edit, event)
            return edit

        return _edits.run_policies(self.policies, signals, apply_one, agree)

    def state_dict(self) -> dict[str, Any]:
        """Plain values: the policies' states, the history, the events and the decision count."""
        return {"policies": [p.state_dict() for p in self.policies], "history": self.history,
                "events": self.events, "decisions": self.decisions}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = list(state.get("policies", []))
        if len(saved) != len(self.policies):
            raise ValueError(f"the checkpoint holds the state of {len(saved)} policies, this callback has "
                             f"{len(self.policies)}: pass the same policies as the run that saved it")
        for policy, s in zip(self.policies, saved, strict=True):
            policy.load_state_dict(s)
        self.history = {k: [float(v) for v in values] for k, values in state.get("history", {}).items()}
        self.events = [dict(e) for e in state.get("events", [])]
        self.decisions = int(state.get("decisions", 0))


class RunsPolicies:
    """What both callbacks show of their ``PolicyRunner`` (``self.runner``)."""

    runner: PolicyRunner

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every edit so far, as adaptnet's ``events.jsonl`` records them."""
        return self.runner.events

    @property
    def history(self) -> dict[str, list[float]]:
        """The series the policies read (one value per decision)."""
        return self.runner.history
