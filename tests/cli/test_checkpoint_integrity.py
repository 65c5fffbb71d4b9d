"""``adaptnet resume`` and ``adaptnet inspect`` with damaged checkpoints: the newest one that verifies is
used, and the skipped ones are named with the reason; with none, one line and exit status 2."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adaptnet.cli.main import main
from adaptnet.train.rundir import read_metrics

TINY = """\
seed: 0
data: {name: synthetic, samples: 300, batch_size: 32}
model: {hidden: [3]}
optim: {name: adam, lr: 1.0e-2}
train: {epochs: 3, probe_size: 64}
policies:
  - {name: grow_every, every: 2, by: 2}
"""
KEYS = ("epoch", "train_loss", "val_loss", "params", "widths")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _main(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _flip(file: Path, position: int) -> None:
    data = bytearray(file.read_bytes())
    data[position] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a 3-epoch run with a checkpoint per epoch, an uninterrupted 4-epoch run of the same config)."""
    root = tmp_path_factory.mktemp("integrity")
    (root / "tiny.yaml").write_text(TINY)
    assert main(["train", str(root / "tiny.yaml"), "--out", str(root / "run"), "--quiet"]) == 0
    assert main(["train", str(root / "tiny.yaml"), "train.epochs=4", "--out", str(root / "whole"), "--quiet"]) == 0
    return root / "run", root / "whole"


def _copy(run: Path, to: Path) -> tuple[Path, list[Path]]:
    shutil.copytree(run, to)
    return to, sorted((to / "checkpoints").iterdir())


@pytest.mark.parametrize("name", ["spec.json", "model.safetensors", "state.pt"])
def test_resume_skips_a_damaged_latest_checkpoint(trained: tuple[Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str], name: str) -> None:
    run, checkpoints = _copy(trained[0], tmp_path / "run")
    assert len(checkpoints) == 3
    damaged = checkpoints[-1] / name
    _flip(damaged, damaged.stat().st_size // 2)

    rc, out, err = _main(capsys, "inspect", run)
    assert rc == 0, err
    assert f"checkpoint: {checkpoints[1]} (epoch 2" in out and "integrity: verified (3 files, SHA-256)" in out
    assert f"skipped {checkpoints[-1].name}, newer but it does not load: {damaged}: its SHA-256 does not match" in out

    rc, out, err = _main(capsys, "resume", run, "--epochs", "4", "--quiet")
    assert rc == 0, err
    assert "Traceback" not in err
    assert err.splitlines() == [
        f"adaptnet: warning: skipping checkpoint {checkpoints[-1].name}, it does not load ({damaged}: its SHA-256 "
        f"does not match manifest.json: the file was damaged or changed after it was saved); resuming from "
        f"{checkpoints[1].name}"]
    # Epoch 3 was trained again from the epoch-2 checkpoint: the run equals an uninterrupted one.
    expected = [[r[k] for k in KEYS] for r in read_metrics(trained[1])]
    assert [[r[k] for k in KEYS] for r in read_metrics(run)] == expected
    # The damaged checkpoint was replaced when the resumed run reached its step again.
    rc, out, err = _main(capsys, "inspect", run)
    assert rc == 0 and "(epoch 4" in out and "skipped" not in out and not err


def test_damaged_checkpoints_only_are_one_line_and_exit_2(trained: tuple[Path, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run, checkpoints = _copy(trained[0], tmp_path / "run")
    for folder, name in zip(checkpoints, ["state.pt", "spec.json", "model.safetensors"], strict=True):
        _flip(folder / name, 0)
    before = (run / "metrics.csv").read_text()
    for args in (("resume", run, "--epochs", "4"), ("inspect", run), ("inspect", checkpoints[-1])):
        rc, out, err = _main(capsys, *args)
        assert rc == 2 and "Traceback" not in err and not out, args
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("adaptnet: error: "), err
        assert f"{checkpoints[-1] / 'model.safetensors'}: its SHA-256 does not match manifest.json" in lines[0]
        if args[0] == "resume":
            assert f"none of its 3 checkpoints loads; the newest, {checkpoints[-1].name}:" in lines[0]
    assert (run / "metrics.csv").read_text() == before  # nothing touched


def test_a_checkpoint_without_manifest_is_shown_as_not_verified(trained: tuple[Path, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    _, checkpoints = _copy(trained[0], tmp_path / "run")
    (checkpoints[-1] / "manifest.json").unlink()
    rc, out, err = _main(capsys, "inspect", checkpoints[-1])
    assert rc == 0 and "integrity: not verified (no manifest.json" in out
    assert err.splitlines() == [f"adaptnet: warning: {checkpoints[-1]} has no manifest.json (saved by an older "
                                "adaptnet): its files cannot be verified"]
