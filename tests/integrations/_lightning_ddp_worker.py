"""Run by torchrun (2 ranks, gloo): the Lightning callback under strategy="ddp", then a resume from
Lightning's checkpoint. Each rank writes what it ended with to OUT/rank-R.json for the test to compare."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from test_lightning import Regressor, _loaders

import adaptnet as an
from adaptnet.integrations.lightning import AdaptnetCallback


def fit(out: Path, epochs: int, ckpt: str | None) -> tuple[Regressor, AdaptnetCallback, pl.Trainer]:
    torch.manual_seed(0)
    model = Regressor()
    cb = AdaptnetCallback([an.GrowEvery(every=1, by=2, where="gradient")], module="net",
                          loss_fn=torch.nn.functional.mse_loss)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=2, strategy="ddp", callbacks=[cb],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=out)
    train, val = _loaders()
    trainer.fit(model, train, val, ckpt_path=ckpt)
    return model, cb, trainer


def main(out: Path) -> None:
    _, cb, trainer = fit(out, 2, None)
    trainer.save_checkpoint(out / "grown.ckpt")  # every rank calls it; rank 0 writes
    trainer.strategy.barrier()
    resumed, cb2, _ = fit(out, 3, str(out / "grown.ckpt"))
    rank = trainer.global_rank
    result = {"widths": [g.size for g in an.unit_groups(resumed.net).values()],
              "first": [e["widths_after"] for e in cb.events], "resumed": [e["widths_after"] for e in cb2.events],
              "weights": [float(p.double().sum()) for p in resumed.parameters()]}
    (out / f"rank-{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
