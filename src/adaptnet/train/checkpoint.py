"""Checkpoints: one folder per checkpoint, rebuilt without user code and read without unpickling objects.

A checkpoint folder holds four files::

    spec.json           {"adaptnet_checkpoint": 1, "model": model.spec()}   architecture after all edits
    model.safetensors   model.state_dict() (parameters and buffers), readable by safetensors alone
    state.pt            {"adaptnet_checkpoint": 1, "optimizer": ..., "scheduler": ..., "extra": {...}}
    manifest.json       SHA-256 and size of each file above, written last (``_integrity``)

``state.pt`` holds only tensors and plain Python values, so ``torch.load(weights_only=True)``
reads it; numpy values, modules and other objects are refused at save time, not converted.
The optimizer is stored with the parameter names of each param group (``restore_optimizer``).

Writes are atomic: the files go into a hidden sibling folder, are fsynced, and the folder
is renamed into place. Replacing an existing checkpoint renames it to ``.NAME.previous``
first; ``load`` falls back to that folder if a crash came between the two renames.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Protocol

import safetensors.torch
import torch
from torch import nn

from adaptnet.errors import CheckpointError
from adaptnet.nn import model_from_spec
from adaptnet.nn.protocols import HasSpec
from adaptnet.train import _any_model, _integrity
from adaptnet.train._state import check_plain, optimizer_state, qualname, restore_optimizer, saved_groups

logger = logging.getLogger(__name__)

FORMAT = 1
SPEC_FILE, WEIGHTS_FILE, STATE_FILE = "spec.json", "model.safetensors", "state.pt"
PathLike = str | os.PathLike[str]

__all__ = ["CheckpointError", "CheckpointManager", "load", "restore_optimizer", "save"]


class Stateful(Protocol):
    """Anything with ``state_dict()``, such as an LR scheduler."""

    def state_dict(self) -> dict[str, Any]: ...


# -- saving ---------------------------------------------------------------------------------
def save(
    path: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Stateful | None = None,
    **state: Any,
) -> Path:
    """Write a checkpoint folder atomically and return ``Path(path)``.

    Args:
        path: the checkpoint folder. An existing checkpoint there is replaced only once the
            new one is complete; an existing folder that is not a checkpoint is refused.
        model: a model with ``spec()`` whose type is registered (``adaptnet.register_model``).
        optimizer: saved with the parameter names of each param group (see ``restore_optimizer``).
        scheduler: anything with ``state_dict()``; saved as that dict.
        **state: extra state (step, epoch, RNG states, metrics...): tensors and plain Python
            values (None, bool, int, float, complex, str, bytes, list, tuple, set, dict) only.

    Raises:
        CheckpointError: nothing was written; the message names the value at fault.
    """
    target = Path(os.path.abspath(path))
    spec_text = _spec_json(model)
    weights = _weights(model)
    payload: dict[str, Any] = {
        "adaptnet_checkpoint": FORMAT,
        "optimizer": None if optimizer is None else optimizer_state(optimizer, model),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "extra": dict(state),
    }
    check_plain(payload["scheduler"], "scheduler.state_dict()")
    for key, value in state.items():
        check_plain(value, key)
    _check_replaceable(target)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        with open(tmp / SPEC_FILE, "w", encoding="utf-8") as f:
            f.write(spec_text)
            _fsync(f)
        safetensors.torch.save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        with open(tmp / WEIGHTS_FILE, "r+b") as f:
            _fsync(f)
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(payload, f)
            _fsync(f)
        _integrity.write_manifest(tmp)  # last: it hashes the files as written
        _fsync_dir(tmp)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved checkpoint %s (%s)", target, type(model).__name__)
    return Path(path)


def _spec_json(model: nn.Module) -> str:
    spec = model.spec() if isinstance(model, HasSpec) else _any_model.traced_spec(model)
    try:
        return json.dumps({"adaptnet_checkpoint": FORMAT, "model": spec}, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{type(model).__name__}.spec() is not JSON-serialisable: {err}") from err


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as contiguous CPU tensors, none sharing memory (safetensors refuses that)."""
    weights: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"model.state_dict()[{name!r}] is a {qualname(type(value))}, not a tensor")
        t = value.detach().to("cpu").contiguous()
        key = t.untyped_storage().data_ptr()
        if t.numel() and key in seen:
            t = t.clone()  # tied weights are stored twice and copied into the one tensor at load
        seen.add(key)
        weights[name] = t
    return weights


def _check_replaceable(target: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise CheckpointError(f"cannot save to {target}: it is a file, and a checkpoint is a folder")
    if any(target.iterdir()) and not any((target / f).is_file() for f in (SPEC_FILE, _integrity.MANIFEST_FILE)):
        raise CheckpointError(f"refusing to replace {target}: it is a folder with files but not a checkpoint")


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the complete ``tmp`` folder to ``target``; a previous ``target`` goes only afterwards."""
    backup = _backup(target)
    if target.exists():
        if backup.exists():
            shutil.rmtree(backup)  # stale: left by an interrupted save, and target is complete
        os.replace(target, backup)
        # A crash here leaves no ``target``, but a complete ``backup``: load() falls back to it.
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    if backup.exists():
        shutil.rmtree(backup)


def _backup(target: Path) -> Path:
    return target.with_name(f".{target.name}.previous")


def _fsync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":  # Windows cannot open a directory to fsync it
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- loading --------------------------------------------------------------------------------
def load(
    path: PathLike, map_location: str | torch.device = "cpu", model: nn.Module | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint from its spec and load its weights (and dtypes).

    The global RNG state is left as it was (building the model draws initial weights).
    The model comes back in training mode, like any freshly built module.

    Args:
        path: a checkpoint folder written by ``save``.
        map_location: device for the weights and every tensor of the state.
        model: for a checkpoint of a user's model (one without ``spec()``), a freshly built
            instance of its class: it is given the saved shapes (group sizes, depth edits) and
            returned with the saved weights. adaptnet never imports a class that a checkpoint
            names. adaptnet's own models rebuild themselves from their spec; ``model`` is then
            not needed.

    Returns:
        ``(model, state)``: ``state["optimizer"]`` (for ``restore_optimizer``) and
        ``state["scheduler"]`` (for ``scheduler.load_state_dict``), None when not saved, and
        every extra keyword given to ``save`` under its name.

    Raises:
        CheckpointError: the folder is missing, is not a checkpoint, or one of its files is
            corrupt, truncated or does not match ``spec.json``; the message names the file.
    """
    folder = _resolve(Path(path))
    _integrity.check(folder)  # a damaged file is refused before anything is read from it
    spec = _read_spec(folder)
    device = torch.device(map_location)
    if spec.get("type") == _any_model.TYPE:
        if model is None:
            raise CheckpointError(
                f"{folder / SPEC_FILE}: this checkpoint holds a {spec.get('class')}, a class of yours: pass "
                "model=YourClass(...) (built as before training) to load it; adaptnet never imports code a "
                "checkpoint names"
            )
        with torch.random.fork_rng(devices=[]):
            _any_model.reshape(model, spec, str(folder / SPEC_FILE))
    else:
        try:
            with torch.random.fork_rng(devices=[]):
                model = model_from_spec(spec)
        except Exception as err:
            raise CheckpointError(f"{folder / SPEC_FILE}: cannot rebuild the model: {err}") from err
    _load_weights(model, folder / WEIGHTS_FILE, device)
    saved = _read_state(folder / STATE_FILE, device)
    if saved["optimizer"] is not None:
        saved_groups(saved["optimizer"], model, str(folder / STATE_FILE))
    logger.info("loaded checkpoint %s (%s)", folder, spec.get("type"))
    return model, {"optimizer": saved["optimizer"], "scheduler": saved["scheduler"], **saved["extra"]}


def _resolve(path: Path) -> Path:
    backup = _backup(path)
    if not path.exists() and (backup / SPEC_FILE).is_file():
        logger.warning("%s is missing: a save was interrupted while replacing it; loading the previous one", path)
        return backup
    return path


def _read_spec(folder: Path) -> dict[str, Any]:
    if not folder.exists():
        raise CheckpointError(f"no checkpoint at {folder}: the folder does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; a checkpoint is a folder ({SPEC_FILE}, {WEIGHTS_FILE}, ...)")
    file = folder / SPEC_FILE
    if not file.is_file():
        raise CheckpointError(f"{folder} is not an adaptnet checkpoint: it has no {SPEC_FILE}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: cannot read it as JSON ({err})") from err
    if not isinstance(data, dict) or "adaptnet_checkpoint" not in data:
        raise CheckpointError(f"{file}: not an adaptnet checkpoint spec (no 'adaptnet_checkpoint' marker)")
    if data["adaptnet_checkpoint"] != FORMAT:
        raise CheckpointError(f"{file}: format {data['adaptnet_checkpoint']!r} is not supported (expected {FORMAT})")
    if not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{file}: 'model' must be the model's spec, a JSON object")
    spec: dict[str, Any] = data["model"]
    return spec


def _load_weights(model: nn.Module, file: Path, device: torch.device) -> None:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; the checkpoint is incomplete")
    try:
        tensors = safetensors.torch.load_file(str(file), device=str(device))
    except Exception as err:
        raise CheckpointError(f"{file}: cannot read the weights, the file is corrupt or truncated ({err})") from err
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    problems += [
        f"{k} has shape {tuple(tensors[k].shape)}, the spec needs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{file} does not match the model of {SPEC_FILE}: {'; '.join(problems[:5])}{more}")
    model.to(device)
    with torch.no_grad():
        for key, held in model.state_dict(keep_vars=True).items():
            if held.dtype != tensors[key].dtype:  # a float64 model comes back float64
                held.data = held.data.to(tensors[key].dtype)
    try:  # copy, not assign=True: keeps the Parameter objects, so weights the model ties stay tied
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{file}: cannot load the weights into the model of {SPEC_FILE}: {err}") from err


def _read_state(file: Path, device: torch.device) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; the checkpoint is incomplete")
    try:
        saved = torch.load(file, map_location=device, weights_only=True)
    except Exception as err:
        lines = str(err).splitlines() or [""]
        detail = next((line.strip() for line in lines if "Unsupported" in line), lines[0])
        raise CheckpointError(
            f"{file}: torch.load(weights_only=True) cannot read it: corrupt, truncated, or holding objects "
            f"other than tensors and plain values ({type(err).__name__}: {detail})"
        ) from err
    ours = isinstance(saved, dict) and saved.get("adaptnet_checkpoint") == FORMAT
    if not ours or not isinstance(saved.get("extra"), dict) or not {"optimizer", "scheduler"} <= saved.keys():
        raise CheckpointError(f"{file}: not an adaptnet checkpoint state (format {FORMAT})")
    return saved


# -- numbered checkpoints ------------------------------------------------------------------------
class CheckpointManager:
    """Numbered checkpoints ``step-00000123`` in one directory, keeping the most recent ones.

    Args:
        directory: where the checkpoint folders go (created on the first save).
        keep_last: how many checkpoints to keep (the highest steps); None keeps all.
    """

    _NAME = re.compile(r"step-(\d+)")

    def __init__(self, directory: PathLike, keep_last: int | None = None):
        if keep_last is not None and (not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1):
            raise ValueError(f"keep_last must be a positive integer or None, got {keep_last!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def path(self, step: int) -> Path:
        """The folder of the checkpoint at ``step``."""
        return self.directory / f"step-{step:08d}"

    def save(
        self,
        step: int,
        /,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Stateful | None = None,
        **state: Any,
    ) -> Path:
        """Save a checkpoint for ``step`` (also stored as ``state["step"]`` unless given), then prune.

        Pruning removes the lowest steps beyond ``keep_last``, never the checkpoint just saved.
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        state.setdefault("step", step)
        path = save(self.path(step), model, optimizer, scheduler, **state)
        self._remove_leftovers()
        if self.keep_last is not None:
            others = [p for p in self.all() if p.name != path.name]
            for old in others[: max(0, len(others) + 1 - self.keep_last)]:
                _remove(old)
        return path

    _LEFTOVER = re.compile(r"\.step-\d+\.(?:tmp-(\d+)-[0-9a-f]+|deleting-[0-9a-f]+)")

    def _remove_leftovers(self) -> None:
        """Delete what a crash left behind: half-written temp folders of processes that are gone, and
        folders renamed for deletion. ``latest()`` never picks them up; this only frees the disk."""
        for p in self.directory.iterdir():
            match = self._LEFTOVER.fullmatch(p.name)
            if match is None or not p.is_dir():
                continue
            if match.group(1) is not None and _alive(int(match.group(1))):
                continue  # another process may be writing it right now
            shutil.rmtree(p, ignore_errors=True)
            logger.info("removed %s, left by an interrupted save or prune", p)

    def all(self) -> list[Path]:
        """Every checkpoint folder in the directory, by increasing step."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := self._NAME.fullmatch(p.name))]
        return [p for _, p in sorted(found) if p.is_dir()]

    def latest(self) -> Path | None:
        """The checkpoint with the highest step, or None when there is none."""
        paths = self.all()
        return paths[-1] if paths else None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder; renamed first so that a crash never leaves half of one under its name."""
    doomed = folder.with_name(f".{folder.name}.deleting-{uuid.uuid4().hex[:8]}")
    os.replace(folder, doomed)
    shutil.rmtree(doomed)
    logger.info("removed old checkpoint %s", folder)
