"""The input-adaptive modules, their edits and a growing Trainer run on every device at hand: the same
outputs and decisions as on the CPU, and every tensor (parameters, optimizer state, checkpoints'
reload) where it belongs. The cuda cases are ``gpu`` tests (``make gpu-check`` runs them on a GPU);
the cpu cases run everywhere and keep the comparisons themselves honest."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from adaptive_models import BUILD
from torch import nn

import adaptnet as an
from adaptnet.edit.experts import grow_experts
from adaptnet.nn.early_exit import EarlyExit
from adaptnet.nn.halting import ACT, PonderNet
from adaptnet.nn.losses import adaptive_loss
from adaptnet.nn.moe import MoE
from adaptnet.train.trainer import Trainer

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _decisions(model: nn.Module) -> Any:
    """What the module decided per row in its last eval forward."""
    if isinstance(model, EarlyExit):
        assert model.last_stats is not None
        return model.last_stats.counts
    if isinstance(model, PonderNet | ACT):
        assert model.last_steps is not None
        return model.last_steps.tolist()
    assert isinstance(model, MoE) and model.last_stats is not None
    return (model.last_stats.routed_per_expert, model.last_stats.dropped)


def _on(device: str, tensors: Any) -> bool:
    return all(t.device.type == device for t in tensors)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(BUILD))
def test_eval_on_the_device_gives_the_cpu_outputs_and_decisions(name: str, device: str) -> None:
    torch.manual_seed(0)
    model, x = BUILD[name]()
    model.eval()
    moved = copy.deepcopy(model).to(device)
    with torch.no_grad():
        expected, out = model(x), moved(x.to(device))
    assert out.device.type == device
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-9, atol=1e-9)
    assert _decisions(moved) == _decisions(model)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["pondernet", "act", "moe_capacity"])
def test_training_steps_and_expert_growth_stay_on_the_device(name: str, device: str) -> None:
    torch.manual_seed(0)
    model, x = BUILD[name]()
    model, x = model.to(device).train(), x.to(device)
    y = torch.randn_like(model(x)) if isinstance(model, MoE) else torch.randint(0, 3, (x.shape[0],), device=device)
    loss_fn = F.mse_loss if isinstance(model, MoE) else F.cross_entropy
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(3):
        if step == 1 and isinstance(model, MoE):
            grow_experts(model, 2, optimizer=opt, batch=x, generator=torch.Generator().manual_seed(0))
            assert model.num_experts == 6
        opt.zero_grad()
        loss = adaptive_loss(model, loss_fn, model(x), y)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert _on(device, [*model.parameters(), *model.buffers()])
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}
    for p in model.parameters():
        state = opt.state[p]
        assert state["exp_avg"].shape == p.shape and _on(device, [state["exp_avg"], state["exp_avg_sq"]])


@pytest.mark.parametrize("device", DEVICES)
def test_trainer_grows_by_the_gradient_probe_and_resumes_on_the_device(device: str, tmp_path: Path) -> None:
    """The default policy (where="gradient": a probe of extra units on a batch) grows on the device,
    and the checkpoint it writes loads back on the CPU with the grown widths."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g)
    y = (x[:, :3].sum(dim=1, keepdim=True)).sin()
    torch.manual_seed(0)
    model = an.AdaptiveMLP(6, [2, 2], 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    policy = an.GrowOnPlateau(patience=1, min_delta=100.0, by=2)  # any loss is a plateau: grows each epoch
    trainer = Trainer(model, opt, F.mse_loss, policies=[policy], batch_size=32, device=device, run_dir=tmp_path)
    trainer.fit((x[:192], y[:192]), (x[192:], y[192:]), epochs=3)
    grown = trainer.model
    assert sum(grown.widths) > 4
    assert _on(device, [*grown.parameters(), *(v for s in opt.state.values() for v in s.values()
                                               if isinstance(v, torch.Tensor) and v.dim())])
    restored, _ = an.load(tmp_path / "checkpoints" / sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[-1],
                          map_location="cpu")
    assert restored.widths == grown.widths
    with torch.no_grad():
        torch.testing.assert_close(restored(x), grown(x.to(device)).cpu(), rtol=1e-5, atol=1e-6)

