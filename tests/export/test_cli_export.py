"""``adaptnet export RUN_DIR --format onnx|pt2``: the latest checkpoint's grown model, written and
loaded back with outputs equal to the checkpoint's model; bad input is one line with exit status 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import adaptnet as an
from adaptnet.cli.main import main
from adaptnet.train.checkpoint import CheckpointManager

ort = pytest.importorskip("onnxruntime")  # the [export] extra; make venv installs it

TINY = """\
seed: 0
data: {name: synthetic, samples: 200, batch_size: 50}
model: {hidden: [3]}
optim: {name: adam, lr: 1.0e-2}
train: {epochs: 2, probe_size: 32}
policies:
  - {name: grow_every, every: 1, by: 2}
"""


@an.register_model
class Branchy(nn.Module):
    """A model whose forward branches on a tensor's value: torch.export cannot capture it."""

    def __init__(self, n: int = 4):
        super().__init__()
        self.fc = nn.Linear(n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h if h.sum() > 0 else -h

    def spec(self) -> dict[str, Any]:
        return {"type": "Branchy", "n": self.fc.in_features}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Branchy:
        return cls(spec["n"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("export")
    (folder / "tiny.yaml").write_text(TINY)
    assert main(["train", str(folder / "tiny.yaml"), "--out", str(folder / "run"), "--quiet"]) == 0
    return folder / "run"


def _one_line_error(capsys: pytest.CaptureFixture[str], *args: str | Path) -> str:
    rc = main(["export", *map(str, args)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("adaptnet: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_exports_the_grown_model_to_onnx_and_pt2(run_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = an.load(CheckpointManager(run_dir / "checkpoints").latest())
    model.eval()
    assert list(model.widths) == [7]  # grown twice from 3 units: the export has to follow the edits
    x = torch.randn(5, 10)  # another batch size than the export's example: the batch is free
    with torch.no_grad():
        expected = model(x)

    assert main(["export", str(run_dir), "--format", "pt2"]) == 0
    assert "input (B, 10)" in capsys.readouterr().out
    program = torch.export.load(run_dir / "model.pt2")
    with torch.no_grad():
        assert (program.module()(x) - expected).abs().max() <= 1e-5

    out = tmp_path / "sub" / "net.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    session = ort.InferenceSession(str(out))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert (torch.from_numpy(got) - expected).abs().max() <= 1e-5


def test_bad_input_is_one_line_with_exit_status_2(run_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert "not found" in _one_line_error(capsys, tmp_path / "nowhere", "--format", "onnx")
    assert "must be one of onnx, pt2" in _one_line_error(capsys, run_dir, "--format", "tflite")
    assert "--input-shape" in _one_line_error(capsys, run_dir, "--format", "pt2", "--input-shape", "3,x")
    assert "does not run on inputs" in _one_line_error(capsys, run_dir, "--format", "pt2", "--input-shape", "7")

    fresh = tmp_path / "fresh"
    (fresh / "checkpoints").mkdir(parents=True)
    (fresh / "config.yaml").write_text(TINY)
    assert "no checkpoint" in _one_line_error(capsys, fresh, "--format", "pt2")

    CheckpointManager(fresh / "checkpoints").save(1, Branchy())
    err = _one_line_error(capsys, fresh, "--format", "pt2")
    assert "Branchy cannot be exported" in err
    assert not (fresh / "model.pt2").exists()
