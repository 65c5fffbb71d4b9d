"""Checkpoints: grown models round-trip through a fresh process, the optimizer is restored by
parameter names, writes survive SIGKILL, and every damaged checkpoint gives one CheckpointError."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

import adaptnet as an
from adaptnet.nn._stack import StackedNet
from adaptnet.train import checkpoint as ck
from adaptnet.train.checkpoint import CheckpointError, CheckpointManager

SRC = str(Path(__file__).resolve().parents[2] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def _grown(kind: str) -> tuple[StackedNet, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    """A model widened, deepened and pruned under Adam, with optimizer state from before each edit."""
    if kind == "mlp":
        model: StackedNet = an.AdaptiveMLP(5, [8, 6], 3, norm="batch")
        x = torch.randn(16, 5)
    else:
        model = an.AdaptiveCNN(3, [4, 6], 3)
        x = torch.randn(4, 3, 8, 8)
    y = torch.randn(len(x), 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, x, y, 3)
    an.widen(model, layer=0, by=3, optimizer=opt, noise=0.1)
    _train(model, opt, x, y, 2)
    an.deepen(model, after=0, optimizer=opt)
    _train(model, opt, x, y, 2)
    an.prune(model, layer=2, amount=0.25, optimizer=opt)
    _train(model, opt, x, y, 2)
    assert len(model.widths) == 3 and model.widths[2] == 4
    # deepen appended the new block's parameters at the end of the group: not model.parameters() order.
    assert [id(p) for p in opt.param_groups[0]["params"]] != [id(p) for p in model.parameters()]
    return model, opt, x, y


def _assert_same_optimizer(a: torch.optim.Optimizer, ma: nn.Module, b: torch.optim.Optimizer, mb: nn.Module) -> None:
    names_a = {id(p): n for n, p in ma.named_parameters()}
    names_b = {id(p): n for n, p in mb.named_parameters()}
    assert len(a.param_groups) == len(b.param_groups)
    for ga, gb in zip(a.param_groups, b.param_groups, strict=True):
        assert [names_a[id(p)] for p in ga["params"]] == [names_b[id(p)] for p in gb["params"]]
        assert {k: v for k, v in ga.items() if k != "params"} == {k: v for k, v in gb.items() if k != "params"}
    params_b = dict(mb.named_parameters())
    for name, p in ma.named_parameters():
        sa, sb = a.state[p], b.state[params_b[name]]
        assert sa.keys() == sb.keys() and sa, name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (name, key)


# -- round trips ----------------------------------------------------------------------------

FRESH_PROCESS = """
import sys, torch, torch.nn.functional as F
from adaptnet.train.checkpoint import load, restore_optimizer
for path in sys.argv[1:]:
    model, state = load(path)
    opt = torch.optim.Adam(model.parameters())
    restore_optimizer(opt, model, state["optimizer"])
    x, y = state["x"], state["y"]
    model.eval()
    out = model(x).detach()
    model.train()
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()
    params = {n: p.detach() for n, p in model.named_parameters()}
    torch.save({"spec": model.spec(), "out": out, "params": params, "step": state["step"]}, path + ".out.pt")
"""
KINDS = ("mlp", "cnn")


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """For each kind: (what a fresh process rebuilt from the checkpoint, what the original gives)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("fresh")
    expected = {}
    for kind in KINDS:
        model, opt, x, y = _grown(kind)
        ck.save(folder / kind, model, opt, step=9, x=x, y=y)
        model.eval()
        out = model(x).detach()
        model.train()
        _train(model, opt, x, y, 1)  # the next step, taken by the original
        expected[kind] = {"spec": model.spec(), "out": out, "params": dict(model.named_parameters()), "step": 9}
    # One process for both models: no adaptnet code but the library's own, and one torch import.
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, *(str(folder / k) for k in KINDS)],
                   check=True, env=ENV, timeout=300)
    return {k: (torch.load(folder / f"{k}.out.pt", weights_only=True), expected[k]) for k in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_grown_model_round_trips_through_a_fresh_process(fresh_process: dict[str, Any], kind: str) -> None:
    got, expected = fresh_process[kind]
    assert got["spec"] == expected["spec"] and got["step"] == 9
    assert torch.equal(got["out"], expected["out"])  # same function
    assert got["params"].keys() == expected["params"].keys()
    for name, p in expected["params"].items():  # same next optimizer step
        assert torch.equal(got["params"][name], p), name


def test_restore_optimizer_matches_groups_by_name(tmp_path: Path) -> None:
    model = an.AdaptiveMLP(5, [8], 3)
    params = dict(model.named_parameters())
    names = list(params)
    opt = torch.optim.Adam([
        {"params": [params[n] for n in reversed(names[2:])], "lr": 3e-3},
        {"params": [params[n] for n in reversed(names[:2])], "lr": 1e-2, "betas": (0.8, 0.9)},
    ])
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    _train(model, opt, x, y, 3)
    an.deepen(model, after=0, optimizer=opt)
    _train(model, opt, x, y, 2)
    ck.save(tmp_path / "c", model, opt)
    loaded, state = ck.load(tmp_path / "c")
    fresh = torch.optim.Adam(loaded.parameters(), lr=0.5)
    ck.restore_optimizer(fresh, loaded, state["optimizer"])
    _assert_same_optimizer(opt, model, fresh, loaded)
    _train(model, opt, x, y, 1)
    _train(loaded, fresh, x, y, 1)
    for (name, p), q in zip(model.named_parameters(), loaded.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_files_are_read_by_plain_libraries(tmp_path: Path) -> None:
    model, opt, x, y = _grown("cnn")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5)
    _train(model, opt, x, y, 1)
    sched.step()
    metrics = {"loss": [0.5, 0.25], "best": None, "shape": (2, 3), "tags": {"a", "b"}}
    path = ck.save(tmp_path / "c", model, opt, sched, step=7, rng=torch.get_rng_state(), metrics=metrics)
    assert sorted(os.listdir(tmp_path)) == ["c"] and sorted(os.listdir(path)) == sorted(
        [ck.SPEC_FILE, ck.WEIGHTS_FILE, ck.STATE_FILE, "manifest.json"])

    assert json.loads((path / "spec.json").read_text()) == {"adaptnet_checkpoint": 1, "model": model.spec()}
    weights = safetensors.torch.load_file(path / "model.safetensors")
    expected = model.state_dict()
    assert weights.keys() == expected.keys() and any(k.endswith("running_var") for k in weights)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    raw = torch.load(path / "state.pt", weights_only=True)
    assert raw["extra"]["step"] == 7 and raw["extra"]["metrics"] == metrics
    assert torch.equal(raw["extra"]["rng"], torch.get_rng_state())

    _, state = ck.load(path)
    assert state.keys() == {"optimizer", "scheduler", "step", "rng", "metrics"}
    assert state["scheduler"] == sched.state_dict() and state["metrics"] == metrics


def test_load_keeps_dtype_and_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    model = an.AdaptiveMLP(3, [4], 2, norm="layer").double()
    ck.save(tmp_path / "c", model)
    rng = torch.get_rng_state()
    loaded, state = ck.load(tmp_path / "c", map_location=torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)
    assert state == {"optimizer": None, "scheduler": None}
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    x = torch.randn(5, 3, dtype=torch.float64)
    assert torch.equal(loaded(x), model(x))


@an.register_model
class _Tied(nn.Module):
    """A registered user model whose head shares the embedding's weight."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.embed, self.head = n, nn.Linear(n, n, bias=False), nn.Linear(n, n, bias=False)
        self.head.weight = self.embed.weight

    def spec(self) -> dict[str, Any]:
        return {"type": "_Tied", "n": self.n}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> _Tied:
        return cls(spec["n"])


def test_tied_weights_stay_tied(tmp_path: Path) -> None:
    model = _Tied(3)
    ck.save(tmp_path / "c", model)
    loaded, _ = ck.load(tmp_path / "c")
    assert isinstance(loaded, _Tied) and loaded.head.weight is loaded.embed.weight
    assert torch.equal(loaded.embed.weight, model.embed.weight)


# -- refusing to write --------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "message"), [
    ({"rng": {"numpy": np.zeros(3)}}, "rng['numpy'] is a numpy.ndarray"),
    ({"loss": np.float64(0.5)}, "loss is a numpy.float64"),
    ({"teacher": nn.Linear(2, 2)}, "save a module's state_dict()"),
    ({"hook": print}, "hook is a builtin_function_or_method"),
    ({"lookup": {nn.Linear: 1}}, "lookup has a key of type type"),
])
def test_save_refuses_what_weights_only_cannot_read(tmp_path: Path, extra: dict[str, Any], message: str) -> None:
    with pytest.raises(CheckpointError, match=re.escape(message)):
        ck.save(tmp_path / "c", an.AdaptiveMLP(3, [4], 2), **extra)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary folder left


def test_a_users_model_loads_only_into_an_instance_the_user_gives(tmp_path: Path) -> None:
    ck.save(tmp_path / "c", nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match=r"holds a torch.nn.modules.linear.Linear, a class of yours: pass model="):
        ck.load(tmp_path / "c")
    loaded, _ = ck.load(tmp_path / "c", model=nn.Linear(2, 2))
    assert isinstance(loaded, nn.Linear)


def test_save_refuses_foreign_optimizers_and_folders(tmp_path: Path) -> None:
    model = an.AdaptiveMLP(3, [4], 2)
    opt = torch.optim.SGD([*model.parameters(), torch.zeros(2, requires_grad=True)], lr=0.1)
    with pytest.raises(CheckpointError, match="not parameters of the model"):
        ck.save(tmp_path / "c", model, opt)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        ck.save(tmp_path / "data", model)
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        ck.save(tmp_path / "file", model)


def test_save_replaces_an_existing_checkpoint(tmp_path: Path) -> None:
    ck.save(tmp_path / "c", an.AdaptiveMLP(3, [4], 2), step=1)
    ck.save(tmp_path / "c", an.AdaptiveMLP(3, [9], 2), step=2)
    loaded, state = ck.load(tmp_path / "c")
    assert state["step"] == 2 and loaded.widths == [9]
    assert os.listdir(tmp_path) == ["c"]


# -- atomic writes ------------------------------------------------------------------------------


def test_failed_save_cleans_up_and_keeps_the_previous_checkpoint(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ck.save(tmp_path / "c", an.AdaptiveMLP(3, [4], 2), step=1)

    def disk_full(obj: Any, f: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ck.save(tmp_path / "c", an.AdaptiveMLP(3, [9], 2), step=2)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["c"]
    assert ck.load(tmp_path / "c")[1]["step"] == 1

KILLED_SAVE = """
import os, sys, time, safetensors.torch, adaptnet as an
from adaptnet.train import checkpoint as ck
path, stage = sys.argv[1], sys.argv[2]
def hang():
    print("hanging", flush=True)
    time.sleep(600)
if stage == "writing":
    real_save_file = safetensors.torch.save_file
    def save_file(*args, **kwargs):
        real_save_file(*args, **kwargs)
        hang()
    safetensors.torch.save_file = save_file
else:  # between moving the old checkpoint aside and moving the new one in
    real_replace = os.replace
    def replace(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".previous"):
            hang()
    os.replace = replace
ck.save(path, an.AdaptiveMLP(3, [9], 2), step=2)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
@pytest.mark.parametrize("stage", ["writing", "swapping"])
def test_killed_save_leaves_the_previous_checkpoint_loadable(tmp_path: Path, stage: str) -> None:
    path = tmp_path / "c"
    model = an.AdaptiveMLP(3, [4], 2)
    ck.save(path, model, step=1)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(path), stage],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    guard = threading.Timer(120, proc.kill)
    guard.start()
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "hanging", proc.communicate()[1]
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        guard.cancel()
    assert proc.returncode == -signal.SIGKILL

    loaded, state = ck.load(path)
    assert state["step"] == 1 and loaded.widths == [4]
    x = torch.randn(5, 3)
    assert torch.equal(loaded(x), model(x))
    # The next save completes and clears what the killed one left behind (but its own temporary folder).
    ck.save(path, an.AdaptiveMLP(3, [6], 2), step=3)
    assert ck.load(path)[1]["step"] == 3
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left[-1] == "c" and all(re.fullmatch(r"\.c\.tmp-\d+-[0-9a-f]{8}", n) for n in left[:-1])


# -- numbered checkpoints -----------------------------------------------------------------------


def test_manager_keeps_the_last_checkpoints(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpts", keep_last=2)
    assert manager.latest() is None and manager.all() == []
    model = an.AdaptiveMLP(3, [4], 2)
    for step in (5, 99_999_999, 123_456_789):
        assert manager.save(step, model, epoch=step % 7) == manager.path(step)
    assert [p.name for p in manager.all()] == ["step-99999999", "step-123456789"]
    assert manager.latest() == tmp_path / "ckpts" / "step-123456789"
    assert sorted(os.listdir(tmp_path / "ckpts")) == ["step-123456789", "step-99999999"]
    assert ck.load(manager.latest())[1] == {"optimizer": None, "scheduler": None, "step": 123_456_789,
                                            "epoch": 123_456_789 % 7}
    manager.save(7, model, step=70)  # an explicit step= is kept; the folder just saved is never pruned
    assert [p.name for p in manager.all()] == ["step-00000007", "step-123456789"]
    assert ck.load(manager.path(7))[1]["step"] == 70
    assert CheckpointManager(tmp_path / "ckpts").all() == manager.all()
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_manager_removes_what_a_crash_left_behind(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpts")
    model = an.AdaptiveMLP(3, [4], 2)
    manager.save(1, model)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    leftovers = [f".step-00000002.tmp-{int(dead.stdout)}-0a1b2c3d", ".step-00000000.deleting-0a1b2c3d"]
    live = f".step-00000003.tmp-{os.getpid()}-0a1b2c3d"  # a save in progress in a live process
    for name in [*leftovers, live]:
        (tmp_path / "ckpts" / name).mkdir()
        (tmp_path / "ckpts" / name / "model.safetensors").write_bytes(b"half")
    assert manager.latest() == manager.path(1)  # never picked up
    manager.save(4, model)
    assert sorted(os.listdir(tmp_path / "ckpts")) == [live, "step-00000001", "step-00000004"]


# -- damaged and foreign checkpoints -------------------------------------------------------------


def _write_state(folder: Path, obj: Any) -> None:
    torch.save(obj, folder / "state.pt")


def _other_model(folder: Path) -> None:
    """Replace spec and weights by those of a narrower model with the same parameter names."""
    other = folder.parent / "other"
    ck.save(other, an.AdaptiveMLP(3, [3], 2))
    for name in ("spec.json", "model.safetensors"):
        shutil.copy(other / name, folder / name)


def _spec(folder: Path, data: Any) -> None:
    (folder / "spec.json").write_text(json.dumps(data))


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _file_instead(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.write_text("x")


DAMAGES: dict[str, tuple[Callable[[Path], object], str]] = {
    "missing folder": (shutil.rmtree, "does not exist"),
    "a file": (_file_instead, "is a file"),
    "no spec.json": (lambda f: (f / "spec.json").unlink(), "has no spec.json"),
    "spec not JSON": (lambda f: (f / "spec.json").write_text("{"), "spec.json: cannot read it as JSON"),
    "spec of a bare model": (lambda f: _spec(f, an.AdaptiveMLP(3, [4], 2).spec()), "no 'adaptnet_checkpoint' marker"),
    "future format": (lambda f: _spec(f, {"adaptnet_checkpoint": 2, "model": {}}), "format 2 is not supported"),
    "unknown model type": (lambda f: _spec(f, {"adaptnet_checkpoint": 1, "model": {"type": "Nope"}}),
                           "spec.json: cannot rebuild the model: unknown model type 'Nope'"),
    "invalid spec": (lambda f: _spec(f, {"adaptnet_checkpoint": 1, "model": {"type": "AdaptiveMLP", "format": 1}}),
                     "spec.json: cannot rebuild the model"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "model.safetensors: missing"),
    "truncated weights": (lambda f: _truncate(f / "model.safetensors"), "model.safetensors: cannot read the weights"),
    "weights of another model": (
        lambda f: shutil.copy(f.parent / "wide" / "model.safetensors", f / "model.safetensors"),
        "model.safetensors does not match the model of spec.json: blocks.0.op.weight has shape (9, 3)"),
    "no state": (lambda f: (f / "state.pt").unlink(), "state.pt: missing"),
    "truncated state": (lambda f: _truncate(f / "state.pt"), "state.pt: torch.load(weights_only=True) cannot read it"),
    "pickled module in state": (
        lambda f: _write_state(f, {"adaptnet_checkpoint": 1, "optimizer": None, "scheduler": None,
                                   "extra": {"m": nn.Linear(2, 2)}}),
        "state.pt: torch.load(weights_only=True) cannot read it"),
    "foreign state": (lambda f: _write_state(f, {"epoch": 3}), "state.pt: not an adaptnet checkpoint state"),
    "optimizer of other shapes": (_other_model, "state.pt: the optimizer state was saved for other parameter shapes"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoint_gives_one_clear_error(tmp_path: Path, damage: str) -> None:
    model = an.AdaptiveMLP(3, [4], 2)
    opt = torch.optim.Adam(model.parameters())
    _train(model, opt, torch.randn(4, 3), torch.randn(4, 2), 1)
    ck.save(tmp_path / "wide", an.AdaptiveMLP(3, [9], 2))
    path = ck.save(tmp_path / "c", model, opt, step=1)
    # Without its manifest (as saved before checkpoints had one), so that the checks behind the SHA-256
    # check are the ones tested here; tests/train/test_integrity.py tests the manifest.
    (path / "manifest.json").unlink()
    action, message = DAMAGES[damage]
    action(path)
    with pytest.raises(CheckpointError, match=re.escape(message)) as info:
        ck.load(path)
    assert isinstance(info.value, ValueError)


def test_restore_optimizer_refuses_mismatches(tmp_path: Path) -> None:
    model = an.AdaptiveMLP(3, [4], 2)
    opt = torch.optim.Adam(model.parameters())
    _train(model, opt, torch.randn(4, 3), torch.randn(4, 2), 1)
    ck.save(tmp_path / "c", model, opt)
    loaded, state = ck.load(tmp_path / "c")
    sgd = torch.optim.SGD(loaded.parameters(), lr=0.1)
    groups = sgd.param_groups
    with pytest.raises(CheckpointError, match=r"is for torch\.optim\.adam\.Adam, not torch\.optim\.sgd\.SGD"):
        ck.restore_optimizer(sgd, loaded, state["optimizer"])
    assert sgd.param_groups is groups and not sgd.state
    with pytest.raises(CheckpointError, match="not an adaptnet optimizer state"):
        ck.restore_optimizer(torch.optim.Adam(loaded.parameters()), loaded, opt.state_dict())
    with pytest.raises(CheckpointError, match="parameters the model does not have"):
        ck.restore_optimizer(torch.optim.Adam(model.parameters()), an.AdaptiveCNN(3, [4], 2), state["optimizer"])
