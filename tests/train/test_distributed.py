"""The Trainer under torchrun: gloo processes on 127.0.0.1, edits on every rank, agreement, resume.

Most tests launch ``python -m torch.distributed.run --nproc_per_node=2 _ddp_worker.py`` (see that
file: a float64 AdaptiveMLP with widen, deepen and prune events); a rank killed with SIGKILL is
restarted by torchrun's agent. ``_ddp_worker_modules.py`` trains early exits, halting and MoE.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed
from torch.utils.data import DataLoader, TensorDataset

from adaptnet.train import _rng
from adaptnet.train.checkpoint import CheckpointManager, load
from adaptnet.train.distributed import ShardedSampler
from adaptnet.train.rundir import read_events, read_metrics

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="needs torch.distributed with gloo"),
]

WORKER = Path(__file__).with_name("_ddp_worker.py")
_spec = importlib.util.spec_from_file_location("_ddp_worker", WORKER)
assert _spec is not None and _spec.loader is not None
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], env: dict[str, str], timeout: float = 120) -> tuple[str, str, int]:
    """Run ``cmd`` in its own process group; on a timeout kill the whole group (no orphaned ranks)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {cmd[-1]}\n{stdout[-3000:]}\n{stderr[-6000:]}") from None
    return stdout, stderr, proc.returncode


def _launch(script: Path, args: list[str], nproc: int = 2, launcher: tuple[str, ...] = (),
            expect_ok: bool = True) -> tuple[str, str]:
    """``torchrun --nproc_per_node=nproc [launcher options] script args``; its stdout and stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # --standalone: a c10d rendezvous on a free local port instead of the static one on master_port.
    where = [] if "--standalone" in launcher else ["--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}", *where,
           *launcher, str(script), *args]
    stdout, stderr, returncode = _run(cmd, env, timeout=300)
    assert (returncode == 0) == expect_ok, f"exit status {returncode}\n{stdout[-3000:]}\n{stderr[-6000:]}"
    # The process group is destroyed at exit (distributed.shutdown_at_exit): no gloo abort.
    assert "terminate called" not in stderr, stderr[-6000:]
    return stdout, stderr


def _torchrun(out: Path, nproc: int = 2, launcher: tuple[str, ...] = (), expect_ok: bool = True,
              **options: Any) -> dict[int, Any]:
    """Run the worker on ``nproc`` ranks; {rank: saved result dict, or the TrainingError message}."""
    out.mkdir(parents=True, exist_ok=True)
    _launch(WORKER, [json.dumps({"out": str(out), **options})], nproc, launcher, expect_ok)
    results: dict[int, Any] = {}
    for rank in range(nproc if expect_ok else 0):
        error = out / f"rank{rank}.error"
        results[rank] = error.read_text() if error.exists() else torch.load(out / f"rank{rank}.pt")
    return results


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, Any]]:
    """An uninterrupted 2-rank run of 5 epochs (widen at 2 and 4, deepen at 3, prune at 4)."""
    out = tmp_path_factory.mktemp("ddp_full")
    return out, _torchrun(out, run_dir=str(out / "run"), epochs=5)


def test_ranks_stay_identical_and_match_one_process_over_the_same_global_batches(
        full_run: tuple[Path, dict[int, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    out, results = full_run
    assert _max_diff(results[0]["state"], results[1]["state"]) == 0
    ops = [e["op"] for e in read_events(out / "run")]
    assert {"widen", "deepen", "prune"} <= set(ops)
    assert [r["epoch"] for r in read_metrics(out / "run")] == [1, 2, 3, 4, 5]  # rank 0 wrote each row once

    # One process, batches of 2 x 8 rows: each step's batch is the union of the two ranks' batches.
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ref = worker.build(None, batch_size=2 * worker.BATCH)
    x, y, xv, yv = worker.data()
    dataset = TensorDataset(x, y)
    sampler = ShardedSampler(dataset, 1, 0, seed=_rng.derive_seed(ref.seed, 2) % 2**62)
    ref.fit(DataLoader(dataset, batch_size=2 * worker.BATCH, sampler=sampler), (xv, yv), epochs=5)
    assert ref.step == results[0]["step"] == 40
    assert _max_diff(ref.model.state_dict(), results[0]["state"]) <= 1e-5
    assert ref.history["train_loss"] == pytest.approx(results[0]["history"]["train_loss"], abs=1e-9)


def test_a_decision_that_differs_between_ranks_raises_a_clear_error(tmp_path: Path) -> None:
    results = _torchrun(tmp_path, epochs=2, mismatch=True)
    for message in results.values():
        assert isinstance(message, str), "expected a TrainingError on every rank"
        assert "ranks disagree" in message and "rank 0 decided" in message and "rank 1 decided" in message
        assert '"by": 3' in message  # rank 1's decision is named


def test_a_stop_on_one_rank_stops_both_and_resume_equals_the_uninterrupted_run(
        full_run: tuple[Path, dict[int, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    stopped = _torchrun(tmp_path / "a", run_dir=str(run), epochs=5, stop_step=13, stop_rank=1)
    assert stopped[0]["step"] == stopped[1]["step"] == 13
    assert (run / "checkpoints" / "step-00000013").is_dir()
    saved = tmp_path / "copy"
    shutil.copytree(run, saved)  # for the single-process resume below

    resumed = _torchrun(tmp_path / "b", run_dir=str(run), epochs=5, resume=True)
    assert resumed[0]["step"] == 40
    assert _max_diff(resumed[0]["state"], resumed[1]["state"]) == 0
    assert _max_diff(resumed[0]["state"], full_run[1][0]["state"]) <= 1e-12
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]

    # Another world size (1 process, 8 rows a step): the epoch goes on after the 13 x 8 x 2 = 208
    # samples consumed, i.e. 80 of epoch 2's 120: 5 more steps end it, then 15 an epoch.
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    single = worker.build(str(saved))
    x, y, xv, yv = worker.data()
    single.fit((x, y), (xv, yv), epochs=3, resume=True)
    assert single.epoch == 3 and single.step == 13 + 5 + 15


def test_a_killed_rank_is_restarted_by_torchrun_and_the_run_equals_the_uninterrupted_one(
        full_run: tuple[Path, dict[int, Any]], tmp_path: Path) -> None:
    # Checkpoints at steps 8 and 16 (epoch ends), a widen at step 16; rank 1 dies at step 20.
    # The agent tears rank 0 down and starts the group again (--max-restarts=1), which resumes.
    run = tmp_path / "run"
    results = _torchrun(tmp_path, launcher=("--max-restarts=1",), run_dir=str(run), epochs=5, resume=True,
                        kill_step=20, kill_rank=1)
    assert (tmp_path / "killed-rank1").read_text() == "killed after step 20"
    for rank in results.values():
        assert (rank["restart"], rank["started_at"], rank["step"]) == (1, 16, 40)
    assert _max_diff(results[0]["state"], results[1]["state"]) == 0
    assert _max_diff(results[0]["state"], full_run[1][0]["state"]) == 0  # bit for bit
    assert results[0]["history"] == full_run[1][0]["history"]
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]
    assert [e["op"] for e in read_events(run)] == [e["op"] for e in read_events(full_run[0] / "run")]


def test_a_rank_killed_inside_a_checkpoint_save_leaves_the_last_complete_one_to_resume(tmp_path: Path) -> None:
    # Rank 0 dies inside the save of step 24, after the weights were written to the hidden
    # temporary folder. No restarts: torchrun fails, and a second launch, with 3 processes, resumes.
    run = tmp_path / "run"
    _torchrun(tmp_path / "a", expect_ok=False, run_dir=str(run), epochs=5, kill_save_step=24)
    assert (tmp_path / "a" / "killed-rank0").read_text().startswith("killed while saving")
    checkpoints = run / "checkpoints"
    partial = [p.name for p in checkpoints.iterdir() if p.name.startswith(".step-00000024.tmp-")]
    assert len(partial) == 1 and not (checkpoints / partial[0] / "state.pt").exists()
    assert CheckpointManager(checkpoints).latest() == checkpoints / "step-00000016"
    load(checkpoints / "step-00000016")  # complete and readable

    results = _torchrun(tmp_path / "b", nproc=3, run_dir=str(run), epochs=5, resume=True)
    # 3 ranks x 8 rows: 5 steps an epoch from the epoch boundary at step 16, for epochs 3 to 5.
    for rank in results.values():
        assert (rank["world"], rank["started_at"], rank["step"], rank["epoch"]) == (3, 16, 31, 5)
    assert _max_diff(results[0]["state"], results[1]["state"]) == 0
    assert _max_diff(results[0]["state"], results[2]["state"]) == 0
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]
    assert [p.name for p in CheckpointManager(checkpoints).all()] == [f"step-{s:08d}" for s in (21, 26, 31)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_sampler_deals_one_permutation_and_continues_after_consumed_samples(world: int) -> None:
    dataset = TensorDataset(torch.arange(10.0))
    samplers = [ShardedSampler(dataset, world, r, seed=5) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    shards = [list(s) for s in samplers]
    assert len({len(s) for s in shards}) == 1 and all(len(s) == len(samplers[0]) for s in shards)
    perm = samplers[0]._order()
    assert sorted(perm) == list(range(10))
    dealt = [shards[i % world][i // world] for i in range(10)]
    assert dealt == perm  # rank r holds positions r, r + W, ...
    # After one batch of 1 row on each of 2 ranks, 2 samples are consumed: any world size goes on from there.
    for s in samplers:
        s.start = 2
    rest = [list(s) for s in samplers]
    assert {i for shard in rest for i in shard} <= set(perm)  # the padding repeats perm's first samples
    assert [rest[i % world][i // world] for i in range(8)] == perm[2:]


def test_cli_under_torchrun_prints_and_writes_once(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1")
    config = Path(__file__).resolve().parents[2] / "examples" / "configs" / "wine.yaml"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "adaptnet", "train", str(config),
           "train.epochs=2", "--out", str(out)]
    stdout, stderr, returncode = _run(cmd, env, timeout=300)
    assert returncode == 0, stdout[-3000:] + stderr[-6000:]
    assert "terminate called" not in stderr  # the process group is destroyed at exit
    assert stdout.count("training wine") == 1
    assert stdout.count("epoch 2/2") == 1
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]


def test_a_non_finite_loss_on_one_rank_rolls_back_every_rank(tmp_path: Path) -> None:
    results = _torchrun(tmp_path, run_dir=str(tmp_path / "run"), epochs=2, nan_step=10)
    assert results[0]["step"] == results[1]["step"] == 16
    assert results[0]["lr"] == results[1]["lr"] == 0.005  # lr_backoff 0.5, once
    assert _max_diff(results[0]["state"], results[1]["state"]) == 0
    assert [e["op"] for e in read_events(tmp_path / "run") if e["op"] == "rollback"] == ["rollback"]


# -- input-adaptive modules -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def modules_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One launch of _ddp_worker_modules.py: early exits, PonderNet, MoE (+ grow_experts), refusals."""
    out = tmp_path_factory.mktemp("ddp_modules")
    _launch(Path(__file__).with_name("_ddp_worker_modules.py"), [str(out)])
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("kind", ["early_exit", "ponder", "moe"])
def test_input_adaptive_modules_train_under_ddp_with_identical_ranks(modules_run: list[dict[str, Any]],
                                                                     kind: str) -> None:
    a, b = modules_run[0][kind], modules_run[1][kind]
    assert a["find_unused"] and b["find_unused"]  # the Trainer switched it on for these modules
    assert a["step"] == b["step"] == 18  # 3 epochs of 96 rows, 8 per rank and step
    assert _max_diff(a["state"], b["state"]) == 0
    assert a["history"]["val_loss"] == b["history"]["val_loss"]
    assert a["history"]["val_loss"][-1] < a["history"]["val_loss"][0]  # it learned something


def test_grow_experts_mid_run_under_ddp(modules_run: list[dict[str, Any]]) -> None:
    for rank in modules_run:
        moe = rank["moe"]
        assert [(e["op"], e["step"], e["units_added"]) for e in moe["events"]] == [("grow_experts", 8, [2, 3])]
        assert moe["events"][0]["max_output_change"] <= 1e-12  # copies preserve the function
        assert moe["state"]["1.w1"].shape[0] == 4
        assert moe["exp_avg_w1"] == (4, 8, 8)  # the optimizer state followed the new experts
        assert len(moe["losses"]) == 18  # 10 steps after the edit, with DDP re-wrapped around 4 experts


def test_ranks_that_edit_differently_raise_before_ddp_sees_the_shapes(modules_run: list[dict[str, Any]]) -> None:
    for rank in modules_run:
        message = rank["mismatch"]
        assert message.startswith("TrainingError: ranks disagree on the edit 'grow_experts'")
        assert '"units_added": [2]' in message and '"units_added": [2, 3]' in message


def test_compile_with_edits_under_ddp_is_refused_with_one_message(modules_run: list[dict[str, Any]]) -> None:
    for rank in modules_run:
        for case in ("compile_policies", "compile_apply_edit"):
            assert rank[case].startswith("ValueError: compile=True cannot be combined with edits under DDP")
            assert "swap_tensors" in rank[case]
