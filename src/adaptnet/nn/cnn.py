"""AdaptiveCNN: conv blocks (Conv2d, norm, activation, pooling), global average pooling, a head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from adaptnet.nn._stack import StackedNet
from adaptnet.nn.activations import ACTIVATIONS, make_activation
from adaptnet.nn.mlp import _check_positive
from adaptnet.nn.registry import register_model

POOLS = ("max", "avg", None)


@register_model
class AdaptiveCNN(StackedNet):
    """A CNN whose channel counts and depth can be edited.

    Inputs are ``(B, in_channels, H, W)``; outputs are ``(B, num_classes)`` logits.

    Args:
        in_channels: channels of the input images.
        channels: output channels of each conv block (at least one block).
        num_classes: size of the linear head after global average pooling.
        kernel_size: odd kernel size; convolutions keep the spatial size ("same" padding).
        norm: ``"batch"`` (BatchNorm2d) or ``None``.
        pool: ``"max"``, ``"avg"`` (2x2, stride 2, after each conv block) or ``None``.
        activation: as for ``AdaptiveMLP``.
    """

    widths_arg = "channels"

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        num_classes: int,
        kernel_size: int = 3,
        norm: str | None = "batch",
        pool: str | None = "max",
        activation: str = "relu",
    ):
        _check_positive("in_channels", in_channels)
        _check_positive("num_classes", num_classes)
        if isinstance(channels, int):
            channels = [channels]
        if len(channels) < 1:
            raise ValueError("channels must list at least one conv block")
        for i, width in enumerate(channels):
            _check_positive(f"channels[{i}]", width)
        _check_positive("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {kernel_size}")
        if norm not in ("batch", None):
            raise ValueError(f"norm must be 'batch' or None, got {norm!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be 'max', 'avg' or None, got {pool!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        options = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "kernel_size": kernel_size,
            "norm": norm,
            "pool": pool,
            "activation": activation,
        }
        super().__init__(in_channels, num_classes, options)
        self._build([{"kind": "dense", "width": w} for w in channels])

    def _make_op(self, n_in: int, n_out: int) -> nn.Conv2d:
        k = self.options["kernel_size"]
        return nn.Conv2d(n_in, n_out, k, padding=k // 2, bias=self.options["norm"] is None)

    def _make_norm(self, n: int) -> nn.Module:
        return nn.BatchNorm2d(n) if self.options["norm"] == "batch" else nn.Identity()

    def _make_act(self) -> nn.Module:
        return make_activation(self.options["activation"])

    def _make_post(self, residual: bool) -> nn.Module:
        pool = None if residual else self.options["pool"]
        # ceil_mode keeps a 1x1 map at 1x1, so deep stacks on small images stay valid.
        if pool == "max":
            return nn.MaxPool2d(2, ceil_mode=True)
        if pool == "avg":
            return nn.AvgPool2d(2, ceil_mode=True)
        return nn.Identity()

    def _example_shape(self) -> tuple[int, ...]:
        return (self.in_size, 4, 4)  # pooling uses ceil_mode: any size traces

    def _readout(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)
