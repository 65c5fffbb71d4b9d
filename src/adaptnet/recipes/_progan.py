"""Progressive growing (ProGAN, Karras et al. 2018) at digit scale: 4x4 -> 8x8 with a fade-in.

Both networks start at 4x4. ``grow()`` adds an 8x8 block; while ``alpha`` goes 0 -> 1 its
output is blended with the old path, so the function changes smoothly from the old one. The
blocks are dense layers rather than convolutions: at 8x8 pixels a dense layer sees the whole
image for the price of a small convolution and trains several times faster on a CPU.

* generator:     ``(1 - alpha) * upsample(tanh(rgb4(h))) + alpha * tanh(rgb8(block8(h)))``
* discriminator: ``base((1 - alpha) * from4(avgpool(x)) + alpha * block8(x))``

At ``alpha = 0`` the grown generator outputs exactly the nearest-neighbour upsampling of the
old 4x4 image, and the grown discriminator scores an 8x8 image exactly as the old one scored
its 4x4 average pooling (``0 * new`` adds nothing). The new layers join the optimizer through
``adaptnet.edit.optim.sync_parameters``: the old parameters keep their objects and their Adam
moments, so training goes on without a rebuilt optimizer.

Both models have ``spec()``/``from_spec()`` and are registered, so ``adaptnet.save``/``load``
handle them like the built-in adaptive models (import this module before ``load``).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptnet.edit.optim import sync_parameters
from adaptnet.nn import register_model

RESOLUTIONS = (4, 8)


def _dense(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_out), nn.LeakyReLU(0.2))


def _check(latent: int, hidden: int, resolution: int, alpha: float) -> None:
    for name, value in (("latent", latent), ("hidden", hidden)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")


class _Progressive(nn.Module, abc.ABC):
    """What both networks share: resolution, fade-in ``alpha``, spec, and growth with the optimizer."""

    block8: nn.Module | None

    def __init__(self, latent: int, hidden: int, resolution: int, alpha: float):
        _check(latent, hidden, resolution, alpha)
        super().__init__()
        self.latent, self.hidden = latent, hidden
        self.resolution, self.alpha = 4, 1.0

    @abc.abstractmethod
    def _add_block(self) -> None:
        """Build the 8x8 block and its 4x4-to-8x8 skip path (what ``grow`` adds)."""

    def _start(self, resolution: int, alpha: float) -> None:
        """Built grown (the static baseline, or from a spec): the 8x8 block exists from the start."""
        if resolution == 8:
            self._add_block()
            self.resolution, self.alpha = 8, float(alpha)

    def grow(self, optimizer: torch.optim.Optimizer | None = None) -> list[nn.Parameter]:
        """Go from 4x4 to 8x8 with the new block faded in from ``alpha = 0``; returns the new parameters.

        ``optimizer`` gets the new parameters (in the param group of their neighbours); the
        existing ones keep their objects and optimizer state.
        """
        if self.resolution != 4:
            raise ValueError(f"{type(self).__name__} is already at {self.resolution}x{self.resolution}")
        before = list(self.parameters())
        ref = before[0]
        self._add_block()
        self.to(device=ref.device, dtype=ref.dtype)
        self.resolution, self.alpha = 8, 0.0
        if optimizer is not None:
            sync_parameters(optimizer, self, before)
        old = {id(p) for p in before}
        return [p for p in self.parameters() if id(p) not in old]

    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "latent": self.latent, "hidden": self.hidden,
                "resolution": self.resolution, "alpha": self.alpha}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> _Progressive:
        if spec.get("type") != cls.__name__:
            raise ValueError(f"spec is for {spec.get('type')!r}, not {cls.__name__}")
        return cls(int(spec["latent"]), int(spec["hidden"]), int(spec["resolution"]), float(spec["alpha"]))


@register_model
class ProGenerator(_Progressive):
    """``z (B, latent) -> images (B, 1, r, r)`` in [-1, 1], ``r`` = ``resolution`` (4 or 8).

    Args:
        latent: size of the Gaussian noise input.
        hidden: units of every block.
        resolution: 4 (a fresh progressive run) or 8 (built grown, as for the static baseline).
        alpha: fade-in of the 8x8 block (1: fully faded in).
    """

    def __init__(self, latent: int = 16, hidden: int = 128, resolution: int = 4, alpha: float = 1.0):
        super().__init__(latent, hidden, resolution, alpha)
        self.base = nn.Sequential(_dense(latent, hidden), _dense(hidden, hidden))  # (B, latent) -> (B, hidden)
        self.rgb4 = nn.Linear(hidden, 16)  # -> 4x4 pixels
        self.block8: nn.Module | None = None
        self.rgb8: nn.Module | None = None
        self._start(resolution, alpha)

    def _add_block(self) -> None:
        self.block8 = _dense(self.hidden, self.hidden)
        self.rgb8 = nn.Linear(self.hidden, 64)  # -> 8x8 pixels

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.base(z)  # (B, hidden)
        old = torch.tanh(self.rgb4(h)).view(-1, 1, 4, 4)
        if self.block8 is None or self.rgb8 is None:
            return old
        new = torch.tanh(self.rgb8(self.block8(h))).view(-1, 1, 8, 8)
        if self.alpha >= 1.0:
            return new
        return (1.0 - self.alpha) * F.interpolate(old, scale_factor=2, mode="nearest") + self.alpha * new


def _minibatch_std(h: torch.Tensor) -> torch.Tensor:
    """Append the batch's mean feature standard deviation as one more feature (ProGAN's
    minibatch-stddev): a batch of near-identical fakes is then easy to tell from real ones,
    which pushes the generator towards variety. ``(B, hidden) -> (B, hidden + 1)``."""
    std = h.std(dim=0, unbiased=False).mean() if h.shape[0] > 1 else h.new_zeros(())
    return torch.cat([h, std.expand(h.shape[0], 1)], dim=1)


@register_model
class ProDiscriminator(_Progressive):
    """``images (B, 1, r, r) -> logits (B, 1)``; arguments as ``ProGenerator`` (``latent`` unused
    but kept so that both networks share one spec format)."""

    def __init__(self, latent: int = 16, hidden: int = 128, resolution: int = 4, alpha: float = 1.0):
        super().__init__(latent, hidden, resolution, alpha)
        self.from4 = nn.Sequential(nn.Flatten(), _dense(16, hidden))  # (B, 1, 4, 4) -> (B, hidden)
        self.base = nn.Sequential(_dense(hidden + 1, hidden), nn.Linear(hidden, 1))
        self.block8: nn.Module | None = None
        self._start(resolution, alpha)

    def _add_block(self) -> None:
        self.block8 = nn.Sequential(nn.Flatten(), _dense(64, self.hidden), _dense(self.hidden, self.hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block8 is None:
            h = self.from4(x)  # (B, hidden)
        else:
            h = self.block8(x)  # (B, 1, 8, 8) -> (B, hidden)
            if self.alpha < 1.0:
                h = (1.0 - self.alpha) * self.from4(F.avg_pool2d(x, 2)) + self.alpha * h
        return self.base(_minibatch_std(h))


def digits_data(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 handwritten digits as ``(N, 1, r, r)`` in [-1, 1] (0..16 scaled), and labels.

    ``r = 4`` is the 2x2 average pooling of the 8x8 images: what a 4x4 discriminator sees.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # (N, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    return (F.avg_pool2d(x, 2) if resolution == 4 else x), y
