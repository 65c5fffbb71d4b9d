"""The Lightning callback under strategy="ddp": 2 gloo ranks launched by torchrun (`make test-distributed`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning.pytorch")

HERE = Path(__file__).resolve().parent


@pytest.mark.distributed
def test_ddp_ranks_grow_alike_and_resume_from_lightnings_checkpoint(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "_lightning_ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # the same edits, and DDP kept the replicas equal after them
    assert len(ranks[0]["first"]) == 2 and len(ranks[0]["resumed"]) == 3
    assert ranks[0]["resumed"][:2] == ranks[0]["first"]  # the events came back with the checkpoint
    assert sum(ranks[0]["widths"]) == 6 + 3 * 2
