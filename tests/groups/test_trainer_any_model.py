"""The Trainer and its policies on a user's model: traced on the probe batch, grown, checkpointed, resumed."""

from __future__ import annotations

from pathlib import Path

import group_models as gm
import torch
import torch.nn.functional as F

import adaptnet as an
from adaptnet.groups import macs


def _data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=g)
    y = torch.sin(x[:, :3].sum(dim=1, keepdim=True)) + 0.1 * x[:, 3:4]
    return (x[:192], y[:192]), (x[192:], y[192:])


def _trainer(run: Path | None, max_flops: int | None = None) -> an.Trainer:
    torch.manual_seed(0)
    model = gm.Seed()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    policy = an.GrowEvery(every=2, by=4, where="gradient", init="gradmax", max_flops=max_flops)
    return an.Trainer(model, opt, F.mse_loss, policies=[policy], run_dir=run, batch_size=32, seed=0, progress=False)


def test_policies_grow_a_users_model_within_a_flops_budget() -> None:
    train, val = _data()
    trainer = _trainer(None, max_flops=10 * 58 + 58)  # room for 8 more hidden units
    trainer.fit(train, val, epochs=8)
    assert trainer.model.fc1.out_features == 58 and trainer.model.fc2.in_features == 58
    assert macs(trainer.model) == 10 * 58 + 58
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in trainer.model.parameters()}


def test_a_users_model_resumes_from_its_checkpoint_bit_for_bit(tmp_path: Path) -> None:
    train, val = _data()
    whole = _trainer(tmp_path / "whole")
    whole.fit(train, val, epochs=6)
    first = _trainer(tmp_path / "split")
    first.fit(train, val, epochs=3)
    resumed = _trainer(tmp_path / "split")
    resumed.fit(train, val, epochs=6, resume=True)
    assert resumed.model.fc1.out_features == whole.model.fc1.out_features > 50
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
