"""Checkpoint integrity: every file's SHA-256 is in ``manifest.json``; one flipped byte anywhere is refused."""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import adaptnet as an
from adaptnet.train import _integrity
from adaptnet.train import checkpoint as ck
from adaptnet.train.checkpoint import CheckpointError

FILES = ("spec.json", "model.safetensors", "state.pt")


def _saved(folder: Path) -> Path:
    """A checkpoint with optimizer state (so state.pt holds tensors), of a model trained one step."""
    torch.manual_seed(0)
    model = an.AdaptiveMLP(3, [4], 2, norm="batch")
    opt = torch.optim.Adam(model.parameters())
    opt.zero_grad()
    F.mse_loss(model(torch.randn(8, 3)), torch.randn(8, 2)).backward()
    opt.step()
    return ck.save(folder, model, opt, step=1, epoch=1)


def _flip(file: Path, position: int, mask: int = 0x01) -> None:
    data = bytearray(file.read_bytes())
    data[position] ^= mask
    file.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _saved(tmp_path_factory.mktemp("integrity") / "c")


def test_the_manifest_lists_every_file_with_its_size_and_digest(checkpoint: Path) -> None:
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["adaptnet_manifest"] == 1 and manifest["algorithm"] == "sha256"
    assert sorted(manifest["files"]) == sorted(FILES)
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (checkpoint / name).stat().st_size
        assert entry["sha256"] == _integrity.sha256_file(checkpoint / name)
    found = _integrity.verify(checkpoint)
    assert found is not None and sorted(found.files) == sorted(FILES)
    assert found.describe() == "verified (3 files, SHA-256)"


@pytest.mark.parametrize("name", FILES)
def test_every_flipped_byte_of_a_file_is_refused(tmp_path: Path, checkpoint: Path, name: str) -> None:
    """Each byte of the file in turn, one bit flipped, then restored: the check catches all of them."""
    folder = tmp_path / "c"
    folder.mkdir()
    for p in checkpoint.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    file = folder / name
    original = file.read_bytes()
    for position in range(len(original)):
        _flip(file, position)
        with pytest.raises(CheckpointError) as info:
            _integrity.verify(folder)
        assert str(info.value).startswith(f"{file}: its SHA-256 does not match manifest.json"), position
        file.write_bytes(original)
    assert _integrity.verify(folder) is not None


@pytest.mark.parametrize("name", FILES)
def test_load_refuses_a_flipped_byte_and_names_the_file(tmp_path: Path, name: str) -> None:
    rng = random.Random(name)
    for i in range(6):
        path = _saved(tmp_path / f"c{i}")
        size = (path / name).stat().st_size
        position = (0, size // 2, size - 1)[i] if i < 3 else rng.randrange(size)
        _flip(path / name, position, mask=0xFF)
        with pytest.raises(CheckpointError, match=re.escape(f"{path / name}: its SHA-256 does not match")):
            ck.load(path)


def test_every_flipped_byte_of_the_manifest_is_refused_as_a_damaged_manifest(tmp_path: Path,
                                                                             checkpoint: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    for p in checkpoint.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    file = folder / "manifest.json"
    original = file.read_bytes()
    for position in range(len(original)):
        _flip(file, position)
        with pytest.raises(CheckpointError) as info:
            _integrity.verify(folder)
        assert str(info.value).startswith(f"{file}: the checkpoint's manifest is damaged"), position
        file.write_bytes(original)


@pytest.mark.parametrize(("damage", "message"), [
    ("truncated", "bytes, but manifest.json recorded"),
    ("emptied", "0 bytes, but manifest.json recorded"),
    ("missing", "missing; the checkpoint is incomplete"),
])
@pytest.mark.parametrize("name", FILES)
def test_truncated_emptied_or_missing_files_are_named(tmp_path: Path, name: str, damage: str, message: str) -> None:
    path = _saved(tmp_path / "c")
    file = path / name
    if damage == "missing":
        file.unlink()
    else:
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2] if damage == "truncated" else b"")
    with pytest.raises(CheckpointError, match=re.escape(f"{file}: ") + ".*" + re.escape(message)):
        ck.load(path)


def test_a_checkpoint_without_manifest_loads_with_a_warning(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    path = _saved(tmp_path / "c")
    (path / "manifest.json").unlink()  # as written before checkpoints had one
    with caplog.at_level(logging.WARNING, logger="adaptnet"):
        model, state = ck.load(path)
    assert state["step"] == 1 and model.widths == [4]
    assert any("has no manifest.json" in r.getMessage() and "cannot be verified" in r.getMessage()
               for r in caplog.records)
    found = _integrity.verify(path)
    assert found is not None and not found.has_manifest and found.describe().startswith("not verified")
    ck.save(path, model)  # saving again over it writes a manifest
    assert (path / "manifest.json").is_file() and _integrity.verify(path) is not None


def test_a_checkpoint_with_a_manifest_but_no_spec_can_be_replaced(tmp_path: Path) -> None:
    """After `adaptnet resume` skipped a damaged checkpoint, the run saves to the same step again."""
    path = _saved(tmp_path / "c")
    (path / "spec.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{path / 'spec.json'}: missing")):
        ck.load(path)
    ck.save(path, an.AdaptiveMLP(3, [5], 2), step=2)
    assert ck.load(path)[1]["step"] == 2
