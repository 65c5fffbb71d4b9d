"""The Lightning callback: growth inside lightning.Trainer.fit with Lightning's optimizer carried,
scheduler kept, events logged, and Lightning's own checkpoint resumed with the grown shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import adaptnet as an

pl = pytest.importorskip("lightning.pytorch")  # the [lightning] extra, installed by `make test`
from adaptnet.integrations.lightning import AdaptnetCallback, load_grown  # noqa: E402


class Regressor(pl.LightningModule):
    """A user's LightningModule: the network is a submodule, an SGD+momentum optimizer, a StepLR."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
        self.example_input_array = torch.zeros(2, 4)
        self.seen: list[int] = []  # id of every parameter the optimizer stepped, per step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The optimizer Lightning steps must hold exactly the module's current parameters.
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert held == {id(p) for p in self.parameters()}
        for p in self.parameters():
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            assert buf is None or buf.shape == p.shape


def _loaders() -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    data = torch.utils.data.TensorDataset(x, y)
    return (torch.utils.data.DataLoader(data, batch_size=16), torch.utils.data.DataLoader(data, batch_size=64))


def _trainer(tmp_path: Path, epochs: int, callback: AdaptnetCallback, **kw: Any) -> Any:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=pl.loggers.CSVLogger(tmp_path),
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      num_sanity_val_steps=0, callbacks=[callback], **kw)


def test_grows_in_lightnings_loop_with_its_optimizer_and_scheduler(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Regressor()
    cb = AdaptnetCallback([an.GrowEvery(every=1, by=2, where="round_robin")], module="net")
    trainer = _trainer(tmp_path, 3, cb)
    train, val = _loaders()
    trainer.fit(model, train, val)
    assert [g.size for g in an.unit_groups(model.net).values()] == [7, 5]
    assert len(cb.events) == 3 and cb.events[-1]["widths_after"] == [7, 5]
    assert cb.history["val_loss"] and len(cb.history["train_loss"]) == 3
    (opt,) = trainer.optimizers
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in model.parameters()}
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.9**3)  # the StepLR stepped the same optimizer
    logged = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "adaptnet/width/2" in logged and "adaptnet/params" in logged


def test_lightning_checkpoint_resumes_with_the_grown_shapes(tmp_path: Path) -> None:
    train, val = _loaders()
    torch.manual_seed(0)
    first = AdaptnetCallback([an.GrowEvery(every=1, by=2, where="last")], module="net")
    trainer = _trainer(tmp_path / "a", 2, first)
    trainer.fit(Regressor(), train, val)
    ckpt = tmp_path / "grown.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["adaptnet"]["spec"]["groups"] == {"0": 3, "2": 7}

    again = AdaptnetCallback([an.GrowEvery(every=1, by=2, where="last")], module="net")
    fresh = Regressor()
    resumed = _trainer(tmp_path / "b", 3, again)
    resumed.fit(fresh, train, val, ckpt_path=str(ckpt))
    assert [g.size for g in an.unit_groups(fresh.net).values()] == [3, 9]  # grown again from 7
    assert len(again.events) == 3 and again.runner.decisions == 3  # the policy's state came back

    loaded = load_grown(Regressor(), ckpt)
    assert loaded.net[2].out_features == 7


def test_a_monitor_nobody_logs_is_named(tmp_path: Path) -> None:
    cb = AdaptnetCallback([an.GrowOnPlateau(patience=1, by=1)], module="net", monitor="valid/loss")
    train, val = _loaders()
    with pytest.raises(ValueError, match=r"monitor='valid/loss' was not logged.*val_loss"):
        _trainer(tmp_path, 1, cb).fit(Regressor(), train, val)
