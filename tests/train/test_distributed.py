"""The Trainer under torchrun: 2 gloo processes on 127.0.0.1, edits on every rank, agreement, resume.

Each test launches ``python -m torch.distributed.run --nproc_per_node=2 _ddp_worker.py`` (see
that file: a float64 AdaptiveMLP with widen, deepen and prune events).
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


def _torchrun(out: Path, **options: Any) -> dict[int, Any]:
    """Run the worker on 2 ranks; {rank: saved result dict, or the TrainingError message}."""
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER),
           json.dumps({"out": str(out), **options})]
    stdout, stderr, returncode = _run(cmd, env)
    assert returncode == 0, stdout[-3000:] + stderr[-6000:]
    results: dict[int, Any] = {}
    for rank in range(2):
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
    stdout, stderr, returncode = _run(cmd, env)
    assert returncode == 0, stdout[-3000:] + stderr[-6000:]
    assert stdout.count("training wine") == 1
    assert stdout.count("epoch 2/2") == 1
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]


def test_a_non_finite_loss_on_one_rank_rolls_back_every_rank(tmp_path: Path) -> None:
    results = _torchrun(tmp_path, run_dir=str(tmp_path / "run"), epochs=2, nan_step=10)
    assert results[0]["step"] == results[1]["step"] == 16
    assert results[0]["lr"] == results[1]["lr"] == 0.005  # lr_backoff 0.5, once
    assert _max_diff(results[0]["state"], results[1]["state"]) == 0
    assert [e["op"] for e in read_events(tmp_path / "run") if e["op"] == "rollback"] == ["rollback"]
