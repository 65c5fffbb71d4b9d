"""``adaptnet demo``: the seed example as written, then a network that grows while it learns."""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn, optim

import adaptnet as an
from adaptnet.edit import Edit
from adaptnet.policy import GrowOnPlateau
from adaptnet.train.callbacks import Callback
from adaptnet.train.data import regression
from adaptnet.train.trainer import Trainer


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the seed example, then an adaptive network that grows on a harder regression",
        description="Run the seed article's example (AdaptiveNet 10->50->1, MSE, SGD lr 0.01, 100 epochs on "
        "5 random samples), then train a small network on a harder regression and let it grow when its "
        "validation loss plateaus, printing each edit as it happens.",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--epochs", type=int, default=60, help="epochs of the adaptive run (default 60)")
    parser.set_defaults(run=run)


def seed_example(seed: int) -> None:
    """The seed article's loop, with its ``AdaptiveNet(10, 50, 1)`` as ``AdaptiveMLP(10, [50], 1)``."""
    torch.manual_seed(seed)
    model = an.AdaptiveMLP(10, [50], 1)
    criterion = nn.MSELoss()
    optimizer = optim.SGD(model.parameters(), lr=0.01)
    inputs = torch.randn(5, 10)
    targets = torch.randn(5, 1)
    for epoch in range(100):
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = criterion(outputs, targets)
        loss.backward()
        optimizer.step()
        if (epoch + 1) % 10 == 0:
            print(f"Epoch [{epoch + 1}/100], Loss: {loss.item():.4f}")


class _PrintEdits(Callback):
    """Print the loss every few epochs and every edit as it happens."""

    def __init__(self, every: int):
        self.every = every

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        if epoch % self.every == 0 or epoch == 1:
            print(f"  epoch {epoch:3d}  train {metrics['train_loss']:.4f}  val {metrics['val_loss']:.4f}  "
                  f"widths {metrics['widths']}  params {metrics['params']}")

    def on_after_edit(self, trainer: Trainer, edit: Edit, event: dict[str, Any]) -> None:
        change = event["max_output_change"]
        print(f"  epoch {event['epoch']:3d}  >> {edit.op} layer {edit.layer} by {len(edit.units_added)} "
              f"({edit.init}): widths {list(edit.widths_before)} -> {list(edit.widths_after)}, "
              f"params {edit.params_before} -> {edit.params_after}, output change {change:.1e}, "
              f"probe loss {event['loss_before']:.4f} -> {event['loss_after']:.4f}")


def _train(model: nn.Module, data: tuple[torch.Tensor, ...], epochs: int, seed: int,
           policies: list[Any], callbacks: list[Callback]) -> dict[str, list[float]]:
    x_train, y_train, x_val, y_val = data
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = Trainer(model, optimizer, nn.functional.mse_loss, policies=policies, callbacks=callbacks,
                      seed=seed, batch_size=64, device="cpu")
    return trainer.fit((x_train, y_train), (x_val, y_val), epochs=epochs)


def run(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    print("== The seed example: AdaptiveNet(10, 50, 1), MSE, SGD lr 0.01, 5 random samples ==")
    seed_example(args.seed)

    print("\n== Adaptive: a harder regression (2000 samples, 10 features), starting from 4-4 hidden units ==")
    print("   grows by 8 units where the gradient says growth helps most, when the validation loss")
    print("   has not improved for 3 epochs, within 700 parameters (init=gradmax: function preserved exactly)")
    x_np, y_np = regression(2000, args.seed)
    x, y = torch.from_numpy(x_np).float(), torch.from_numpy(y_np).float().unsqueeze(1)
    data = (x[:1500], y[:1500], x[1500:], y[1500:])
    torch.manual_seed(args.seed)
    model = an.AdaptiveMLP(10, [4, 4], 1)
    policy = GrowOnPlateau(patience=3, min_delta=0.005, by=8, where="gradient", init="gradmax", max_params=700)
    grown = _train(model, data, args.epochs, args.seed, [policy], [_PrintEdits(every=10)])
    widths = list(model.widths)
    params = sum(p.numel() for p in model.parameters())

    torch.manual_seed(args.seed)
    static = an.AdaptiveMLP(10, [4, 4], 1)
    small = _train(static, data, args.epochs, args.seed, [], [])
    torch.manual_seed(args.seed)
    seed_sized = an.AdaptiveMLP(10, [50], 1)
    big = _train(seed_sized, data, args.epochs, args.seed, [], [])
    torch.manual_seed(args.seed)
    final_sized = an.AdaptiveMLP(10, widths, 1)
    final = _train(final_sized, data, args.epochs, args.seed, [], [])

    print(f"\n== After {args.epochs} epochs (validation MSE; same data, optimizer and epochs) ==")
    print(f"  {'network':<28}{'widths':<12}{'params':>8}{'best val':>11}{'final val':>11}")
    for name, w, p, hist in (
        ("static, 4-4 units", [4, 4], sum(q.numel() for q in static.parameters()), small),
        ("static, 50 units (seed's)", [50], sum(q.numel() for q in seed_sized.parameters()), big),
        ("static, the grown size", widths, sum(q.numel() for q in final_sized.parameters()), final),
        ("adaptive, from 4-4 units", widths, params, grown),
    ):
        print(f"  {name:<28}{w!s:<12}{p:>8}{min(hist['val_loss']):>11.4f}{hist['val_loss'][-1]:>11.4f}")
    print(f"\n(finished in {time.perf_counter() - began:.1f} s)")
    return 0
