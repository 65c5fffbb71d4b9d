"""A model holding an input-adaptive module copies (``copy.deepcopy``) and pickles after a training
step, when the module still holds that forward's loss terms (graph tensors)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from adaptive_models import BUILD

from adaptnet.nn.losses import adaptive_loss


@pytest.mark.parametrize("name", list(BUILD))
def test_a_model_copies_and_pickles_after_a_training_step(name: str, tmp_path: Path) -> None:
    """Its last forward's loss terms (graph tensors) stay with the original, which still trains;
    the copy (an EMA, a best-so-far snapshot) and the pickle are whole models."""
    torch.manual_seed(0)
    model, x = BUILD[name]()
    model.train()
    out = model(x)
    loss_fn = F.mse_loss
    copied = copy.deepcopy(model)
    torch.save(model, tmp_path / "model.pt")
    pickled = torch.load(tmp_path / "model.pt", weights_only=False)
    adaptive_loss(model, loss_fn, out, torch.zeros_like(out)).backward()  # the original's state is intact
    for twin in (copied, pickled):
        assert all(torch.equal(p, q) for p, q in zip(twin.parameters(), model.parameters(), strict=True))
        twin.eval()
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
        model.train()
