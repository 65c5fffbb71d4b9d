"""The tasks of ``benchmarks/early_exit.py``: data (generated in code or shipped with scikit-learn)
and the early-exit models they are timed on."""

from __future__ import annotations

from typing import Any

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from adaptnet.nn.early_exit import EarlyExit

Split = tuple[torch.Tensor, torch.Tensor]
SPLITS = ("train", "val", "test")


def checkerboard(rows: tuple[int, int, int], cells: int = 6, classes: int = 4) -> dict[str, Split]:
    def split(n: int, seed: int) -> Split:
        x = torch.rand(n, 2, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # (n, 2)
        cell = ((x + 1) / 2 * cells).floor().long().clamp(max=cells - 1)  # (n, 2) grid cell
        return x, (cell[:, 0] + 2 * cell[:, 1]) % classes

    return {name: split(n, seed) for seed, (name, n) in enumerate(zip(SPLITS, rows, strict=True))}


def mixture(rows: tuple[int, int, int], inner: float = 0.5, cells: int = 4) -> dict[str, Split]:
    """Easy samples (the quadrant, outside |x|_inf < inner) mixed with hard ones (a checkerboard inside)."""
    def split(n: int, seed: int) -> Split:
        x = torch.rand(n, 2, generator=torch.Generator().manual_seed(100 + seed)) * 2 - 1  # (n, 2)
        quadrant = 2 * (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # (n,) in 0..3
        cell = ((x + inner) / (2 * inner) * cells).floor().long().clamp(0, cells - 1)  # (n, 2) inside the square
        hard = x.abs().amax(dim=1) < inner
        return x, torch.where(hard, (cell[:, 0] + 2 * cell[:, 1]) % 4, quadrant)

    return {name: split(n, seed) for seed, (name, n) in enumerate(zip(SPLITS, rows, strict=True))}


def _digit_splits() -> dict[str, tuple[Any, Any]]:
    """scikit-learn's 8x8 digits (values 0..1), 60/20/20 stratified split, as numpy arrays."""
    data = load_digits()
    x, y = data.data.astype("float32") / 16.0, data.target
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.4, stratify=y, random_state=0)
    x_val, x_te, y_val, y_te = train_test_split(x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=0)
    return {"train": (x_tr, y_tr), "val": (x_val, y_val), "test": (x_te, y_te)}


def digits() -> dict[str, Split]:
    return {name: (torch.from_numpy(a), torch.from_numpy(b).long()) for name, (a, b) in _digit_splits().items()}


def shifted_digits(copies: int, canvas: int = 12, hard: float = 0.4, noise: float = 0.1) -> dict[str, Split]:
    """Easy and hard images by design: each 8x8 digit is drawn ``copies`` times on a ``canvas`` x
    ``canvas`` image (1 channel), plus Gaussian pixel noise (std ``noise``). An easy copy (60%) sits
    in the centre; a hard one (``hard`` = 40%) at a uniformly random offset (0..canvas - 8 on each
    axis). The splits are those of ``digits`` (each source image in one split only)."""
    out = {}
    for seed, (name, (a, b)) in enumerate(_digit_splits().items()):
        g = torch.Generator().manual_seed(200 + seed)
        image = torch.from_numpy(a).view(-1, 1, 8, 8).repeat(copies, 1, 1, 1)  # (n, 1, 8, 8)
        n, room = image.shape[0], canvas - 8
        is_hard = torch.rand(n, generator=g) < hard
        offset = torch.where(is_hard[:, None], torch.randint(0, room + 1, (n, 2), generator=g), room // 2)  # (n, 2)
        x = torch.zeros(n, 1, canvas, canvas)
        for i in range(room + 1):
            for j in range(room + 1):
                at = (offset[:, 0] == i) & (offset[:, 1] == j)
                x[at, :, i:i + 8, j:j + 8] = image[at]
        out[name] = (x + noise * torch.randn(x.shape, generator=g), torch.from_numpy(b).long().repeat(copies))
    return out


def conv_early_exit(canvas: int, channels: int, blocks: int, classes: int) -> EarlyExit:
    """Block 0: ``Conv2d(1, c, 3, padding=1)`` + ReLU; blocks 1..: ``Conv2d(c, c, 3, padding=1)`` + ReLU,
    all at the full ``canvas`` x ``canvas`` resolution; each head ``Flatten`` + ``Linear(c * canvas^2,
    classes)``. Blocks 1.. reuse each weight at every position of every image: compute per sample
    (``9 c^2 canvas^2`` MACs) is large next to the weights (``9 c^2``)."""
    body = [nn.Sequential(nn.Conv2d(1 if i == 0 else channels, channels, 3, padding=1), nn.ReLU(inplace=True))
            for i in range(blocks)]
    heads = [nn.Sequential(nn.Flatten(), nn.Linear(channels * canvas * canvas, classes)) for _ in range(blocks)]
    return EarlyExit(body, heads)


def build(name: str, config: dict[str, Any]) -> tuple[dict[str, Split], EarlyExit, str]:
    """Data, a freshly initialised model (the caller seeds) and a description of the model."""
    if name == "shifted":
        data = shifted_digits(config["copies"], config["canvas"])
        c, s, k = config["channels"], config["canvas"], config["blocks"]
        return data, conv_early_exit(s, c, k, 10), (
            f"EarlyExit(conv 3x3 on {s}x{s}: 1->{c}, then {c}->{c} x {k - 1}; heads Flatten+Linear({c * s * s}, 10))")
    data = digits() if name == "digits" else {"mixture": mixture, "checkerboard": checkerboard}[name](config["rows"])
    d, classes, w, k = data["test"][0].shape[1], int(data["train"][1].max()) + 1, config["width"], config["blocks"]
    return data, EarlyExit.mlp(d, [w] * k, classes), f"EarlyExit.mlp({d}, [{w}] x {k}, {classes})"
