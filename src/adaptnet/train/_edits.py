"""How the Trainer changes its model: the policies' requests and edit functions, between steps.

Every edit goes the same way: the wrappers (DDP, compile) are dropped, the edit runs on the
unwrapped model with the optimizer (whose state follows the index map), the wrappers are built
again (also when the edit failed and was rolled back), and the event is logged. Under DDP every
rank does this at the same step: the policies' requests are agreed on before they are applied,
the records of edit functions (``Trainer.apply_edit``) after.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from adaptnet.edit import Edit
from adaptnet.policy import EditRequest, Policy, Signals, apply_request
from adaptnet.train import _rng

if TYPE_CHECKING:
    from adaptnet.train.trainer import Trainer

logger = logging.getLogger(__name__)

EditFn = Callable[[nn.Module, torch.optim.Optimizer], Edit]
Probe = tuple[torch.Tensor, torch.Tensor]

# Measured on torch 2.13 (CPU, gloo): after one step of torch.compile(DDP(model)), the fake-tensor
# mode of the compiled graph stays alive (torch.compiler.reset() and gc do not free it) and keeps a
# weak-key table of the parameters; torch.utils.swap_tensors, which every edit relies on, refuses
# a tensor with a weak reference. A compiled model is fine in one process, and DDP without compile.
COMPILE_DDP_EDITS = (
    "compile=True cannot be combined with edits under DDP (WORLD_SIZE > 1): after a compiled DDP step "
    "torch keeps weak references to the parameters, and an edit must swap them in place (swap_tensors "
    "refuses). Use compile=False under torchrun, or compile in a single process; see docs/distributed.md"
)


def run_policies(policies: Sequence[Policy], signals: Signals, apply_one: Callable[[EditRequest], Edit],
                 agree: Callable[[str, dict[str, Any]], None] | None = None) -> list[Edit]:
    """Ask every policy for edits and apply them in order: the one place this is done.

    adaptnet's Trainer and the Lightning and Hugging Face callbacks all come through here; they
    differ only in ``apply_one`` (how a request is carried out around their own loop: wrappers,
    logging) and ``agree`` (how the processes of a distributed run check that they decided the
    same, given a description and the decision; it raises when they did not).
    """
    edits: list[Edit] = []
    for policy in policies:
        requests = policy.decide(signals)
        if agree is not None:
            agree(f"the edits of policy {getattr(policy, 'name', type(policy).__name__)!r} at step {signals.step}",
                  {"params": signals.num_params, "requests": [r.to_dict() for r in requests]})
        edits.extend(apply_one(request) for request in requests)
    return edits


def edit_event(edit: Edit, step: int, epoch: int, policy: str, reason: str, loss_before: float | None = None,
               loss_after: float | None = None) -> dict[str, Any]:
    """The record of one edit as ``events.jsonl`` holds it (and the integrations log it)."""
    return {"step": step, "epoch": epoch, **edit.to_dict(), "policy": policy, "reason": reason,
            "loss_before": loss_before, "loss_after": loss_after}


def apply_policies(trainer: Trainer, probe: Probe) -> None:
    """Ask every policy for edits (identical signals on every rank) and apply them in order."""
    if not trainer.policies:
        return
    signals = Signals(trainer.epoch, trainer.step, trainer.model, trainer.history, probe, trainer.loss_fn,
                      _rng.generator(trainer.seed, trainer.step), lr=trainer.optimizer.param_groups[0]["lr"])
    # Why: deciding may edit the model for a moment (where="gradient" adds probe units with swap_tensors),
    # which a live DDP wrapper's references refuse. Not re-wrapped on an error (a collective; one rank may
    # fail alone): the next fit() re-wraps.
    trainer._unwrap()
    run_policies(trainer.policies, signals,
                 lambda request: apply_policy_request(trainer, request, probe, signals.generator),
                 trainer.dist.agree if trainer.dist is not None else None)
    trainer._wrap()


def apply_policy_request(trainer: Trainer, request: EditRequest, probe: Probe, generator: torch.Generator) -> Edit:
    """One request of a policy (already agreed on by the ranks)."""
    for cb in trainer.callbacks:
        cb.on_before_edit(trainer, request)
    run = partial(apply_request, request, trainer.model, trainer.optimizer, probe, trainer.loss_fn, generator)
    return apply(trainer, run, probe, policy=request.policy, reason=request.reason)


def apply_function(trainer: Trainer, fn: EditFn, policy: str, reason: str) -> Edit:
    """``fn(model, optimizer)`` on the unwrapped model; under DDP the ranks' records must agree."""
    if trainer.compile and trainer.dist is not None:
        raise ValueError(COMPILE_DDP_EDITS)
    edit = apply(trainer, lambda: fn(trainer.model, trainer.optimizer), trainer.probe, policy=policy,
                 reason=reason, check=True)
    trainer._edited_mid_epoch()
    return edit


def apply(trainer: Trainer, run: Callable[[], Edit], probe: Probe | None, policy: str, reason: str,
          check: bool = False) -> Edit:
    """Unwrap, ``run()``, re-wrap, log the event and tell the callbacks.

    With ``check`` (edits nobody agreed on beforehand), the ranks compare the edit records
    before re-wrapping: DDP would otherwise fail on the parameter shapes, without saying why.
    Called with the model already unwrapped (the policies' edits), it leaves re-wrapping to
    the caller, except after a failed edit.
    """
    loss_before = probe_loss(trainer, probe)
    rewrap = trainer._wrapped
    trainer._unwrap()
    try:
        edit = run()
    except BaseException:
        trainer._wrap()  # a failed edit was rolled back: the model is the one before
        raise
    if not isinstance(edit, Edit):
        trainer._wrap()
        raise TypeError(f"an edit function must return the Edit record of the edit it made, got {type(edit)}")
    if check and trainer.dist is not None:  # the ranks' models differ if this raises: no re-wrap
        trainer.dist.agree(f"the edit {edit.op!r} at step {trainer.step} (apply_edit)", edit.to_dict())
    if rewrap:
        trainer._wrap()
    event = edit_event(edit, trainer.step, trainer.epoch, policy, reason, loss_before, probe_loss(trainer, probe))
    logger.info("edit at step %d: %s layer %d -> widths %s", trainer.step, edit.op, edit.layer,
                list(edit.widths_after))
    if trainer.run is not None:
        trainer.run.append_event(event)
    for cb in trainer.callbacks:
        cb.on_after_edit(trainer, edit, event)
    return edit


@torch.no_grad()
def probe_loss(trainer: Trainer, probe: Probe | None) -> float | None:
    """The loss on the probe batch in eval mode (None without a probe)."""
    if probe is None:
        return None
    model = trainer.model
    training = model.training
    model.eval()
    loss = float(trainer.loss_fn(model(probe[0]), probe[1]))
    model.train(training)
    return loss
