"""Data-parallel plumbing for the Trainer under ``torchrun`` (DDP; gloo on CPU, nccl on CUDA).

Nothing here launches processes: ``torchrun`` (or any launcher that sets ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``) does. ``from_env`` returns None in a
single process, and a ``Dist`` otherwise; the Trainer uses it to

* shard tensor data (``ShardedSampler``: a ``DistributedSampler`` whose epoch can start
  after the samples already consumed, so a mid-epoch resume works with any world size),
* wrap the model in DDP again after every edit (DDP hooks the parameters that exist when it
  is built),
* agree on edit decisions before applying them (``agree``) and on stop / non-finite flags
  every step (``any``), and sum the epoch's training loss over ranks (``sum``).

See docs/distributed.md.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from adaptnet.nn.losses import LossFn, adaptive_loss

logger = logging.getLogger(__name__)

# Modules defining these may leave parameters without a gradient in a step (experts no row
# was routed to, exits or halting steps not reached): DDP then needs find_unused_parameters.
_DYNAMIC_HOOKS = ("aux_loss", "task_loss")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """True on rank 0 of a distributed run, and in a single process (for "only rank 0 prints")."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class Dist:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The process's own device: ``cuda:LOCAL_RANK`` for CUDA."""
        if device.type == "cuda":
            return torch.device("cuda", self.local_rank if device.index is None else device.index)
        return device

    # -- collectives (every rank must call them, in the same order) -------------------------
    def _tensor(self, values: Sequence[float]) -> torch.Tensor:
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        return torch.tensor(list(values), dtype=torch.float64, device=device)

    def sum(self, values: Sequence[float]) -> list[float]:
        t = self._tensor(values)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
        return [float(v) for v in t.tolist()]

    def any(self, flag: bool) -> bool:
        t = self._tensor([1.0 if flag else 0.0])
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        torch_dist.barrier()

    def agree(self, what: str, decision: Any) -> None:
        """Raise ``TrainingError`` unless every rank passes an equal ``decision`` (JSON-able).

        Ranks compare a SHA-256 digest of the decision (one small all-gather); only when
        digests differ do they gather the decisions themselves, for the message.
        """
        from adaptnet.train.trainer import TrainingError

        text = json.dumps(decision, sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).digest()
        words = self._tensor([float(int.from_bytes(digest[i:i + 6], "little")) for i in range(0, 30, 6)])
        gathered = [torch.empty_like(words) for _ in range(self.world_size)]
        torch_dist.all_gather(gathered, words)
        if all(torch.equal(g, gathered[0]) for g in gathered):
            return
        texts: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(texts, text)
        other = next(r for r in range(self.world_size) if texts[r] != texts[0])
        raise TrainingError(
            f"ranks disagree on {what}: rank 0 decided {texts[0]}, rank {other} decided {texts[other]}; "
            "policies must decide only from values every rank shares (all-reduced losses, the parameter "
            "count, the probe batch, the (seed, step) generator), never from rank-local state"
        )

    # -- the model ------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """A fresh DDP wrapper around ``WithLoss(model)`` (hooks on the parameters it has now):
        ``wrapped(x, y, loss_fn)`` returns the training loss."""
        from torch.nn.parallel import DistributedDataParallel

        find_unused = needs_find_unused(model)
        device_ids = [device] if device.type == "cuda" else None
        return DistributedDataParallel(WithLoss(model), device_ids=device_ids, find_unused_parameters=find_unused)


class WithLoss(nn.Module):
    """``model`` and its training loss as one module, so that DDP's output is the loss itself.

    With ``find_unused_parameters``, DDP marks every parameter the forward's output does not
    depend on as unused, at the end of the forward. Early exits (and any module whose
    ``task_loss`` / ``aux_loss`` uses tensors stashed in the forward) put part of the loss
    outside the output: DDP then saw the earlier exit heads "ready" twice, once as unused and
    once in backward, and failed. From the loss, the traversal finds every parameter used.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        return adaptive_loss(self.model, loss_fn, self.model(x), y)


def needs_find_unused(model: nn.Module) -> bool:
    """True when some module may leave parameters unused in a step (it defines aux/task losses)."""
    return any(callable(getattr(m, name, None)) for m in model.modules() for name in _DYNAMIC_HOOKS)


_SHUTDOWN_REGISTERED = False


def shutdown_at_exit() -> None:
    """Destroy the default process group at interpreter exit, while Python is still whole.

    Registered once (by the Trainer under DDP). Left to the interpreter's teardown, the
    process group is destroyed with the C++ statics, after Python is gone; with gloo that
    sometimes aborted a finished rank ("terminate called without an active exception").
    A group the script destroyed itself is left alone, and so is the group of a process that
    dies of an uncaught exception. See docs/distributed.md.
    """
    global _SHUTDOWN_REGISTERED
    if not _SHUTDOWN_REGISTERED:
        atexit.register(_shutdown)
        _SHUTDOWN_REGISTERED = True


def _shutdown() -> None:
    if getattr(sys, "last_value", None) is not None:
        # Dying of an uncaught exception: other ranks may be inside a collective, and destroying
        # a group under them can block (nccl). torchrun stops them; leave the group as it is.
        return
    if torch_dist.is_available() and torch_dist.is_initialized():
        try:
            torch_dist.destroy_process_group()
        except Exception as err:  # exiting anyway: say why, never mask the exit status
            logger.warning("could not destroy the process group at exit: %s", err)


def exit_process(status: int) -> NoReturn:
    """End the command with ``status``. A rank of a process group runs the exit handlers (the
    destroy of the group above among them) and then leaves with ``os._exit``, before the C++ static
    destructors: gloo's threads, torn down there, still aborted a rank that had finished its work
    now and then ("terminate called without an active exception", exit -6, and torchrun calls the
    whole run failed; see docs/distributed.md). Any other process exits as usual."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        sys.exit(status)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def from_env(device: torch.device) -> Dist | None:
    """The process group of a ``torchrun`` launch (initialised here if needed), or None.

    None when ``WORLD_SIZE`` is unset or 1 and no process group is initialised. The backend
    is nccl when ``device`` is CUDA, gloo otherwise (an existing group is used as it is).
    """
    if not torch_dist.is_available():
        return None
    if not torch_dist.is_initialized():
        if world_size_from_env() <= 1:
            return None
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch_dist.init_process_group(backend=backend, **_store_of_this_attempt())
        logger.info("initialised process group: %s, rank %d of %d", backend, torch_dist.get_rank(),
                    torch_dist.get_world_size())
    if torch_dist.get_world_size() <= 1:
        return None
    backend = str(torch_dist.get_backend())
    return Dist(rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")), backend=backend)


def _store_of_this_attempt() -> dict[str, Any]:
    """After a restart by torchrun's agent (one node): the store, under a prefix of this attempt.

    The workers' store is the agent's, and it outlives a restart (torch 2.13, static and c10d
    rendezvous alike): the keys where gloo publishes each rank's address are still there from
    the attempt that failed, and a new rank that reads one before its peer has rewritten it
    connects to a dead process ("Connection refused", the restarted group fails). One agent
    restarts all its workers together with one ``TORCHELASTIC_RESTART_COUNT``, so on one node
    it names the attempt; across nodes agents count restarts differently, and nothing is done.
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart == 0 or os.environ.get("LOCAL_WORLD_SIZE") != os.environ.get("WORLD_SIZE"):
        return {}
    store, rank, world_size = next(torch_dist.rendezvous("env://"))
    return {"store": torch_dist.PrefixStore(f"adaptnet/attempt-{restart}", store), "rank": rank,
            "world_size": world_size}


class ShardedSampler(DistributedSampler):
    """A ``DistributedSampler`` whose epoch may start at global sample ``start``.

    The epoch's order is one permutation of the dataset, seeded from ``(seed, epoch)`` and the
    same for every world size. The samples still to go, ``perm[start:]``, are padded to a
    multiple of the world size with the first samples of the permutation (as
    ``DistributedSampler`` pads) and dealt out round-robin: rank ``r`` gets positions ``r,
    r + W, ...``. After ``k`` batches of ``B`` on each of ``W`` ranks the samples consumed are
    exactly ``perm[:k * B * W]``, so ``start = k * B * W`` continues the epoch under any world
    size; with the same world size it reproduces the interrupted epoch exactly.
    ``num_replicas=1`` makes it a plain seeded shuffle (a single process continuing a
    distributed run).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        self.start = 0

    def _order(self) -> list[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            return torch.randperm(n, generator=g).tolist()
        return list(range(n))

    def __iter__(self) -> Iterator[int]:
        perm = self._order()
        rest = perm[self.start:]
        pad = (-len(rest)) % self.num_replicas
        rest += (perm * math.ceil(pad / max(1, len(perm))))[:pad] if pad else []
        return iter(rest[self.rank::self.num_replicas])

    def __len__(self) -> int:
        n = len(self.dataset) - self.start  # type: ignore[arg-type]
        return math.ceil(max(0, n) / self.num_replicas)
