"""Built-in data sets (no download) and user CSV files, split and standardised by seed.

* ``synthetic``: the seed's regression, 10 features -> 1 target, a sum of random sine
  ridges plus an interaction term, so that a wider network fits it better than a narrow one.
* ``regression``: the demo's regression (``adaptnet demo``), 10 features -> 1 target with
  interactions and oscillations that a 4-unit network underfits.
* ``digits`` (8x8 images, 10 classes; 64 features, or ``(1, 8, 8)`` images for a CNN),
  ``wine`` (3 classes), ``breast_cancer`` (2 classes) and ``diabetes`` (regression), from
  scikit-learn's bundled copies.
* a CSV file with a header: numeric feature columns and one target column. The target is
  a class label if it is not numeric, or integer-valued with at most ``MAX_CLASSES`` values;
  otherwise it is a regression target.

Features are standardised with the training split's statistics (per feature; one mean and
standard deviation for images); regression targets too, so losses are in target standard
deviations. Classification targets are ``int64`` class indices ``(N,)``, regression targets
``float32`` ``(N, 1)``.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

logger = logging.getLogger(__name__)

DATASETS = ("synthetic", "regression", "digits", "wine", "breast_cancer", "diabetes")
MAX_CLASSES = 20  # an integer CSV target with more distinct values is a regression target
Task = Literal["classification", "regression"]
Pair = tuple[torch.Tensor, torch.Tensor]


class DataError(ValueError):
    """The data cannot be loaded; the message names the file, column or row at fault."""


@dataclass(frozen=True)
class TaskInfo:
    """What a model needs to know about the data.

    Attributes:
        name: the data set's name (the file name for a CSV).
        task: ``"classification"`` or ``"regression"``.
        in_features: features per row (64 for digits, even as images).
        out_features: model outputs: ``num_classes``, or 1 for regression.
        num_classes: classes of a classification task, else None.
        image_shape: ``(C, H, W)`` when inputs are images, else None.
        classes: the class labels in index order (classification), else None.
        target_mean, target_std: how a standardised regression target maps back to its units.
    """

    name: str
    task: Task
    in_features: int
    out_features: int
    num_classes: int | None = None
    image_shape: tuple[int, int, int] | None = None
    classes: tuple[str, ...] | None = None
    target_mean: float = 0.0
    target_std: float = 1.0


@dataclass
class Splits:
    """Train, validation and test ``(inputs, targets)`` tensors (val/test None when empty)."""

    train: Pair
    val: Pair | None
    test: Pair | None
    info: TaskInfo


def synthetic(samples: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The seed's regression: ``x`` (samples, 10) standard normal, ``y`` (samples,).

    ``y = sum_k a_k sin(x . w_k + b_k) + 0.5 x_0 x_1 + noise`` with 32 random ridges: a few
    hidden units cannot represent it, a few dozen can.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, 10))
    ridges = 32
    w = rng.standard_normal((10, ridges)) * 0.8
    b = rng.uniform(0, 2 * np.pi, ridges)
    a = rng.standard_normal(ridges) / np.sqrt(ridges)
    y = np.sin(x @ w + b) @ a + 0.5 * x[:, 0] * x[:, 1] + 0.05 * rng.standard_normal(samples)
    return x, y


def regression(samples: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The demo's regression: ``x`` (samples, 10) standard normal, ``y`` (samples,).

    ``y = sin(2 z0) + z1 z2 + 0.5 tanh(3 z3) + noise`` with ``z = x W / sqrt(10)`` for a random
    10x4 ``W``. Drawn in float32 with torch's generator (the demo trains on these tensors as drawn).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 10, generator=g)
    w = torch.randn(10, 4, generator=g)
    z = x @ w / math.sqrt(10)
    y = torch.sin(2 * z[:, 0]) + z[:, 1] * z[:, 2] + 0.5 * torch.tanh(3 * z[:, 3])
    y = y + 0.05 * torch.randn(samples, generator=g)
    return x.double().numpy(), y.double().numpy()


def _sklearn(name: str) -> tuple[np.ndarray, np.ndarray, Task, tuple[str, ...] | None]:
    from sklearn import datasets

    loader = {"digits": datasets.load_digits, "wine": datasets.load_wine,
              "breast_cancer": datasets.load_breast_cancer, "diabetes": datasets.load_diabetes}[name]
    bunch = loader()
    if name == "diabetes":
        return bunch.data, bunch.target, "regression", None
    names = getattr(bunch, "target_names", None)
    classes = tuple(str(c) for c in names) if names is not None else None
    return bunch.data, bunch.target, "classification", classes


def read_csv(path: str | Path, target: str) -> tuple[np.ndarray, np.ndarray, Task, tuple[str, ...] | None]:
    """Read a CSV file: ``(features (N, F), targets (N,), task, class labels or None)``.

    Raises:
        DataError: a missing file or column, an empty or non-numeric value, too few rows.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"CSV file not found: {file}")
    try:
        with file.open(newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{file}: cannot read it as CSV ({err})") from None
    if len(rows) < 2:
        raise DataError(f"{file}: needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    if target not in header:
        raise DataError(f"{file}: no column {target!r}; columns: {', '.join(header)}")
    if len(header) < 2:
        raise DataError(f"{file}: needs at least one feature column besides {target!r}")
    t = header.index(target)
    features = np.empty((len(rows) - 1, len(header) - 1))
    labels: list[str] = []
    for r, row in enumerate(rows[1:]):
        line = r + 2
        if len(row) != len(header):
            raise DataError(f"{file}, line {line}: {len(row)} values, the header has {len(header)} columns")
        cells = [c.strip() for c in row]
        labels.append(cells[t])
        for j, (name, cell) in enumerate((h, c) for i, (h, c) in enumerate(zip(header, cells, strict=True)) if i != t):
            try:
                features[r, j] = float(cell)
            except ValueError:
                what = "an empty value" if not cell else f"{cell!r}"
                raise DataError(f"{file}, line {line}: column {name!r} has {what}; feature columns must be numbers "
                                "(drop or encode the column)") from None
    if not all(np.isfinite(features).ravel()):
        raise DataError(f"{file}: feature values must be finite numbers (found nan or inf)")
    return (features, *_target(labels, file, target))


def _target(labels: list[str], file: Path, column: str) -> tuple[np.ndarray, Task, tuple[str, ...] | None]:
    if any(not label for label in labels):
        raise DataError(f"{file}: target column {column!r} has empty values")
    try:
        values = np.array([float(label) for label in labels])
    except ValueError:
        values = None
    if values is not None and not (np.all(values == np.round(values)) and len(set(values)) <= MAX_CLASSES):
        if not np.all(np.isfinite(values)):
            raise DataError(f"{file}: target column {column!r} must hold finite numbers or class labels")
        return values, "regression", None
    keys = sorted(set(values)) if values is not None else sorted(set(labels))
    if len(keys) < 2:
        raise DataError(f"{file}: target column {column!r} has a single class; classification needs two or more")
    index = {k: i for i, k in enumerate(keys)}
    classes = tuple(str(int(k)) if isinstance(k, float) else str(k) for k in keys)
    indices = np.array([index[v] for v in (values if values is not None else labels)])
    return indices, "classification", classes


def load_data(
    name: str | None = None,
    *,
    csv: str | Path | None = None,
    target: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    standardize: bool = True,
    images: bool = False,
    samples: int | None = None,
) -> Splits:
    """Load a built-in data set or a CSV file and split it into train/val/test by ``seed``.

    Args:
        name: one of ``DATASETS`` (or None with ``csv``).
        csv, target: a CSV file and its target column.
        seed: the split (and the synthetic data) derive from it.
        val_fraction, test_fraction: shares of the rows held out (0: no such split).
        standardize: standardise features (and regression targets) with training statistics.
        images: inputs as images ``(N, C, H, W)`` (only ``digits``: ``(N, 1, 8, 8)``).
        samples: rows of the synthetic or regression data set (default 2000).
    """
    if (name is None) == (csv is None):
        raise DataError("give a data set name or a CSV file (and not both)")
    if name is not None and name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; built in: {', '.join(DATASETS)}")
    if images and name != "digits":
        raise DataError(f"{name or csv} has no image form; only digits does (1x8x8)")
    classes: tuple[str, ...] | None
    if name in ("synthetic", "regression"):
        x, y = (synthetic if name == "synthetic" else regression)(samples or 2000, seed)
        task: Task = "regression"
        classes = None
    elif name is not None:
        x, y, task, classes = _sklearn(name)
    else:
        if target is None:
            raise DataError("a CSV file needs a target column")
        assert csv is not None
        x, y, task, classes = read_csv(csv, target)
    return _split(x, y, task, classes, name or Path(str(csv)).name, seed, val_fraction, test_fraction,
                  standardize, images)


def _split(x: np.ndarray, y: np.ndarray, task: Task, classes: tuple[str, ...] | None, name: str, seed: int,
           val_fraction: float, test_fraction: float, standardize: bool, images: bool) -> Splits:
    n = len(x)
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n - n_val - n_test < 2:
        raise DataError(f"{name}: {n} rows leave {n - n_val - n_test} for training; lower val_fraction/test_fraction")
    order = np.random.default_rng(seed).permutation(n)
    parts = {"train": order[: n - n_val - n_test], "val": order[n - n_val - n_test: n - n_test],
             "test": order[n - n_test:]}
    x = x.astype(np.float64)
    train_x = x[parts["train"]]
    if standardize:  # per feature; images: one mean and std over all pixels (a channel)
        mean = train_x.mean() if images else train_x.mean(axis=0)
        std = train_x.std() if images else train_x.std(axis=0)
        x = (x - mean) / np.where(std > 0, std, 1.0)
    target_mean, target_std = 0.0, 1.0
    if task == "regression" and standardize:
        target_mean, target_std = float(y[parts["train"]].mean()), float(y[parts["train"]].std()) or 1.0
        y = (y - target_mean) / target_std
    image_shape = (1, 8, 8) if images else None
    num_classes = len(classes) if classes is not None else (int(y.max()) + 1 if task == "classification" else None)
    info = TaskInfo(name, task, x.shape[1], num_classes or 1, num_classes, image_shape, classes,
                    target_mean, target_std)

    def tensors(idx: np.ndarray) -> Pair | None:
        if len(idx) == 0:
            return None
        inputs = torch.tensor(x[idx], dtype=torch.float32)
        if image_shape is not None:
            inputs = inputs.reshape(-1, *image_shape)  # (N, 1, 8, 8)
        if task == "classification":
            return inputs, torch.tensor(y[idx], dtype=torch.int64)  # (N,)
        return inputs, torch.tensor(y[idx], dtype=torch.float32).reshape(-1, 1)  # (N, 1)

    train = tensors(parts["train"])
    assert train is not None
    logger.info("%s: %s, %d train / %d val / %d test rows", name, task, len(parts["train"]), n_val, n_test)
    return Splits(train, tensors(parts["val"]), tensors(parts["test"]), info)
