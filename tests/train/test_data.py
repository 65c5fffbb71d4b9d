"""Data: built-in sets and CSV files, split by seed, standardised with training statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from adaptnet.train.data import DataError, load_data, read_csv, synthetic


@pytest.mark.parametrize(("name", "task", "features", "classes"), [
    ("synthetic", "regression", 10, None),
    ("regression", "regression", 10, None),
    ("digits", "classification", 64, 10),
    ("wine", "classification", 13, 3),
    ("breast_cancer", "classification", 30, 2),
    ("diabetes", "regression", 10, None),
])
def test_builtin(name: str, task: str, features: int, classes: int | None) -> None:
    splits = load_data(name, seed=0)
    info = splits.info
    assert (info.task, info.in_features, info.num_classes) == (task, features, classes)
    assert info.out_features == (classes or 1)
    x, y = splits.train
    assert x.dtype == torch.float32 and x.shape[1] == features
    if task == "classification":
        assert y.dtype == torch.int64 and y.dim() == 1 and int(y.max()) < (classes or 0)
    else:
        assert y.dtype == torch.float32 and y.shape == (len(x), 1)
        assert abs(float(y.mean())) < 1e-4  # standardised target
    assert torch.allclose(x.mean(0), torch.zeros(features), atol=1e-4)  # train statistics
    assert splits.val is not None and splits.test is not None


def test_split_by_seed_disjoint_and_complete() -> None:
    a, b, c = load_data("wine", seed=0), load_data("wine", seed=0), load_data("wine", seed=1)
    assert torch.equal(a.train[0], b.train[0])
    assert not torch.equal(a.train[0], c.train[0])
    assert a.val is not None and a.test is not None
    rows = torch.cat([a.train[0], a.val[0], a.test[0]])
    assert len(rows) == 178 and len(torch.unique(rows, dim=0)) == 178
    assert (len(a.val[0]), len(a.test[0])) == (36, 36)


def test_no_validation_or_test_split() -> None:
    splits = load_data("wine", val_fraction=0, test_fraction=0)
    assert splits.val is None and splits.test is None and len(splits.train[0]) == 178


def test_digits_as_images() -> None:
    splits = load_data("digits", images=True)
    assert splits.train[0].shape[1:] == (1, 8, 8) and splits.info.image_shape == (1, 8, 8)
    assert abs(float(splits.train[0].mean())) < 1e-4
    with pytest.raises(DataError, match="only digits"):
        load_data("wine", images=True)


def test_synthetic_is_seeded_and_nonlinear() -> None:
    x, y = synthetic(2000, seed=3)
    x2, y2 = synthetic(2000, seed=3)
    assert np.array_equal(x, x2) and np.array_equal(y, y2) and x.shape == (2000, 10)
    design = np.c_[x, np.ones(len(x))]
    residual = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
    assert 1 - residual.var() / y.var() < 0.5  # a linear model explains little of it


def _csv(tmp_path: Path, text: str) -> Path:
    file = tmp_path / "data.csv"
    file.write_text(text)
    return file


def test_csv_classification_and_regression(tmp_path: Path) -> None:
    file = _csv(tmp_path, "a,b,label\n" + "".join(f"{i},{i % 3},{'xyz'[i % 3]}\n" for i in range(30)))
    splits = load_data(csv=file, target="label", seed=0)
    assert splits.info.task == "classification" and splits.info.classes == ("x", "y", "z")
    assert splits.info.in_features == 2 and splits.info.name == "data.csv"
    file = _csv(tmp_path, "a,y\n" + "".join(f"{i},{i % 4 + 1}\n" for i in range(30)))
    assert read_csv(file, "y")[2] == "classification"  # few integer values: classes
    file = _csv(tmp_path, "a,y\n" + "".join(f"{i},{i * 0.37}\n" for i in range(30)))
    features, targets, task, classes = read_csv(file, "y")
    assert task == "regression" and classes is None and features.shape == (30, 1) and targets[1] == 0.37


@pytest.mark.parametrize(("text", "target", "expected"), [
    ("a,y\n1,2\n", "label", "no column 'label'; columns: a, y"),
    ("a,b,y\n1,red,0\n2,blue,1\n", "y", "column 'b' has 'red'; feature columns must be numbers"),
    ("a,y\n1,0\n,1\n", "y", "column 'a' has an empty value"),
    ("a,y\n1,0\n2\n", "y", "line 3: 1 values, the header has 2 columns"),
    ("a,y\n1,0\n2,0\n", "y", "single class"),
    ("a,y\n", "y", "at least one data row"),
])
def test_csv_errors(tmp_path: Path, text: str, target: str, expected: str) -> None:
    with pytest.raises(DataError, match=expected):
        read_csv(_csv(tmp_path, text), target)


def test_missing_csv_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="CSV file not found"):
        load_data(csv=tmp_path / "nope.csv", target="y")
    with pytest.raises(DataError, match="unknown data set"):
        load_data("mnist")
    with pytest.raises(DataError, match="lower val_fraction"):
        load_data("wine", val_fraction=0.5, test_fraction=0.495)
