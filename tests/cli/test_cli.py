"""The ``adaptnet`` command end to end: train, report, inspect, resume, SIGTERM, one-line errors."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adaptnet.cli.main import main
from adaptnet.train.rundir import read_events, read_metrics

TINY = """\
seed: 0
data: {name: synthetic, samples: 300, batch_size: 32}
model: {hidden: [3]}
optim: {name: adam, lr: 1.0e-2}
train: {epochs: 4, probe_size: 64}
policies:
  - {name: grow_every, every: 2, by: 2}
"""
# One intra-op thread: tiny models run faster, and much faster on a busy machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(folder: Path, text: str = TINY, name: str = "tiny.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def _main(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _popen(*args: str | Path, cwd: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "adaptnet", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=cwd)


def _assert_one_line_error(rc: int, err: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("adaptnet: error: "), err
    return lines[0]


# -- bad configs, through a real subprocess each (run side by side to keep the suite fast) ----
WINE = "data: {name: wine}\n"
BAD_CONFIGS: dict[str, tuple[str | None, list[str], str]] = {
    # id: (config text or None for a missing file, overrides, expected part of the message)
    "epochs": (WINE + "train: {epochs: -3}\n", [], "train.epochs: must be an integer >= 1, got -3"),
    "typo": (WINE + "model: {hiddn: [8]}\n", [], "model.hiddn: unknown key; allowed: activation, dropout, hidden"),
    "lr": (WINE + "optim: {lr: fast}\n", [], "optim.lr: must be a number > 0, got 'fast'"),
    "cnn-tabular": (WINE + "model: {type: cnn}\n", [], "model.type: cnn needs image data"),
    "policy": (WINE + "policies: [{name: grow_fast}]\n", [], "policies.0.name: must be one of deepen_on_plateau"),
    "no-data": ("model: {hidden: [4]}\n", [], "data.name: required unless data.csv is set"),
    "yaml": ("data: {name: wine\n", [], "invalid YAML at line"),
    "missing-file": (None, [], "config file not found"),
    "override": (WINE, ["train.epochs=abc"], "train.epochs: must be an integer >= 1, got 'abc'"),
    "csv-features": ("data: {csv: bad.csv, target: y}\n", [], "column 'b' has 'red'; feature columns must be numbers"),
}


@pytest.fixture(scope="module")
def bad_config_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, Path]]:
    root = tmp_path_factory.mktemp("bad")
    (root / "bad.csv").write_text("a,b,y\n1,red,0\n2,blue,1\n3,red,0\n")
    procs = {}
    for key, (text, overrides, _) in BAD_CONFIGS.items():
        config = _config(root, text, f"{key}.yaml") if text is not None else root / "absent.yaml"
        procs[key] = _popen("train", config, *overrides, "--out", root / f"out-{key}", "--quiet", cwd=root)
    results = {}
    for key, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        results[key] = (proc.returncode, err, root / f"out-{key}")
    return results


@pytest.mark.parametrize("key", list(BAD_CONFIGS))
def test_bad_config_is_one_line_exit_2(bad_config_results: dict[str, tuple[int, str, Path]], key: str) -> None:
    rc, err, out = bad_config_results[key]
    line = _assert_one_line_error(rc, err)
    assert BAD_CONFIGS[key][2] in line
    assert not out.exists()  # nothing was written


@pytest.mark.parametrize(("text", "args", "expected"), [
    (WINE + "trian: {epochs: 3}\n", [], "trian: unknown key; allowed: data, device, model"),
    (WINE + "policies: [{name: grow_on_plateau, by: 0}]\n", [], "policies.0.by: must be a positive integer, got 0"),
    (WINE, ["epochs"], "override 'epochs': expected KEY=VALUE"),
    (WINE, ["model.hidden=[8,-1]"], "model.hidden.1: must be an integer >= 1, got -1"),
    (WINE, ["--out", "{tmp}/tiny.yaml"], "is a file, not a folder"),
])
def test_more_errors_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, args: list[str],
                                expected: str) -> None:
    config = _config(tmp_path, text)
    rc, _, err = _main(capsys, "train", config, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert expected in _assert_one_line_error(rc, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _main(capsys, "train", _config(tmp_path, WINE + "device: cuda\n"), "--out", tmp_path / "run")
    assert "device: cuda is not available" in _assert_one_line_error(rc, err)
    assert not (tmp_path / "run").exists()


def test_python_m_adaptnet_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "adaptnet", "--help"], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert proc.returncode == 0
    for command in ("train", "resume", "report", "inspect"):
        assert command in proc.stdout


@pytest.mark.parametrize("command", ["train", "resume", "report", "inspect"])
def test_subcommand_help(capsys: pytest.CaptureFixture[str], command: str) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"usage: adaptnet {command}" in capsys.readouterr().out


# -- every subcommand on a tiny run ------------------------------------------------------------
def test_train_report_inspect_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, run = _config(tmp_path), tmp_path / "run"
    rc, out, err = _main(capsys, "train", config, "train.epochs=3", "--out", run)
    assert rc == 0, err
    assert "epoch 3/3" in out and "grow_every: widen layer 0" in out and "test: loss" in out
    for name in ("config.yaml", "metrics.csv", "events.jsonl", "checkpoints", "report.png"):
        assert (run / name).exists(), name
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3]
    assert "epochs: 3 (" in out and "edits: 1 (widen 1)" in out

    rc, out, _ = _main(capsys, "report", run, run, "--out", tmp_path / "both.png")
    assert rc == 0 and out.count("run: ") == 2 and (tmp_path / "both.png").stat().st_size > 0

    rc, out, _ = _main(capsys, "inspect", run)
    assert rc == 0 and "total params: 61" in out and "dense" in out and "widen layer 0" in out
    checkpoint = sorted((run / "checkpoints").iterdir())[0]
    rc, out, _ = _main(capsys, "inspect", checkpoint)
    assert rc == 0 and f"checkpoint: {checkpoint}" in out

    rc, out, err = _main(capsys, "resume", run, "--epochs", "5", "--quiet")
    assert rc == 0, err
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]
    assert "train:\n  epochs: 5" in (run / "config.yaml").read_text().replace("\r", "")
    assert [e["widths_after"] for e in read_events(run)] == [[5], [7]]

    rc, _, err = _main(capsys, "resume", run, "--epochs", "2")
    assert "already trained 5 epochs" in _assert_one_line_error(rc, err)


def test_train_refuses_an_existing_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, run = _config(tmp_path), tmp_path / "run"
    assert _main(capsys, "train", config, "train.epochs=1", "--out", run, "--quiet")[0] == 0
    before = (run / "metrics.csv").read_text()
    rc, _, err = _main(capsys, "train", config, "--out", run)
    assert "already holds a run" in _assert_one_line_error(rc, err)
    assert (run / "metrics.csv").read_text() == before


def test_file_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, run = _config(tmp_path), tmp_path / "run"
    assert _main(capsys, "train", config, "train.epochs=1", "--out", run, "--quiet")[0] == 0
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    (checkpoint / "model.safetensors").write_bytes(b"not safetensors")
    for args, expected in [
        (("inspect", checkpoint), "model.safetensors: 15 bytes, but manifest.json recorded"),
        (("resume", run, "--epochs", "3"), "its only checkpoint, step-"),
        (("resume", tmp_path), "is not a run directory"),
        (("resume", tmp_path / "nowhere"), "run directory not found"),
        (("report", tmp_path), "has no metrics.csv"),
        (("inspect", tmp_path), "neither a checkpoint folder"),
    ]:
        rc, _, err = _main(capsys, *args)
        assert expected in _assert_one_line_error(rc, err), args
    assert len(read_metrics(run)) == 1  # the failed resume lost nothing


def test_tensorboard_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, run = _config(tmp_path), tmp_path / "run"
    rc, _, err = _main(capsys, "train", config, "train.epochs=1", "train.tensorboard=true", "--out", run, "--quiet")
    if importlib.util.find_spec("tensorboard") is None:
        assert "pip install adaptnet[tensorboard]" in _assert_one_line_error(rc, err)
        assert not run.exists()
    else:
        assert rc == 0 and any((run / "tensorboard").iterdir())


class _FakeWriter:
    """Records what TensorBoardCallback writes (stands in for torch.utils.tensorboard.SummaryWriter)."""

    def __init__(self, log_dir: str):
        self.log_dir, self.scalars, self.texts, self.closed = log_dir, [], [], False
        _FakeWriter.last = self

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, step))

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.texts.append((tag, text))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_tensorboard_callback_writes_scalars_and_edits(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeWriter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    run = tmp_path / "run"
    rc, _, err = _main(capsys, "train", _config(tmp_path), "train.epochs=2", "train.tensorboard=true", "--out", run,
                       "--quiet")
    assert rc == 0, err
    writer = _FakeWriter.last
    assert writer.log_dir == str(run / "tensorboard") and writer.closed
    tags = {tag for tag, _ in writer.scalars}
    assert {"loss/train", "loss/val", "val/r2", "params", "width/layer0", "edits/widen"} <= tags
    assert ("loss/val", 2) in writer.scalars and "widths_after: [5]" in writer.texts[0][1]


# -- SIGTERM mid-run, then resume --------------------------------------------------------------
def test_sigterm_then_resume_completes_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    epochs = 40
    config = _config(tmp_path, TINY.replace("epochs: 4", f"epochs: {epochs}"))
    run = tmp_path / "run"
    proc = _popen("train", config, "--out", run, "--quiet")
    deadline = time.monotonic() + 120
    while len(read_metrics(run)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and f"adaptnet resume {run}" in err
    stopped_at = len(read_metrics(run))
    assert 2 <= stopped_at < epochs

    rc, _, err = _main(capsys, "resume", run, "--quiet")
    assert rc == 0, err
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    steps = [e["step"] for e in read_events(run)]
    assert steps == sorted(steps) and len(steps) == len(set(steps))
    assert (run / "report.png").exists()


def test_resume_from_an_epoch_boundary_is_exact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, parts, whole = _config(tmp_path), tmp_path / "parts", tmp_path / "whole"
    assert _main(capsys, "train", config, "train.epochs=2", "--out", parts, "--quiet")[0] == 0
    assert _main(capsys, "resume", parts, "--epochs", "4", "--quiet")[0] == 0
    assert _main(capsys, "train", config, "--out", whole, "--quiet")[0] == 0
    keys = ("train_loss", "val_loss", "params", "widths")
    assert [[r[k] for k in keys] for r in read_metrics(parts)] == [[r[k] for k in keys] for r in read_metrics(whole)]
