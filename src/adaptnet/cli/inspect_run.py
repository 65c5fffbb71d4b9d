"""``adaptnet inspect PATH``: the architecture in a checkpoint (or a run's latest) and its edit history.

It also says whether the checkpoint's files match the SHA-256 of its ``manifest.json``. A checkpoint
folder that fails the check is refused (exit status 2, the file named); for a run directory the
newest checkpoint that loads is shown, as ``adaptnet resume`` would resume it, and each newer one
skipped is listed with the reason.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from adaptnet.cli._common import CLIError, newest_loadable
from adaptnet.groups import unit_groups
from adaptnet.nn.protocols import HasSpec
from adaptnet.train import _integrity
from adaptnet.train._any_model import TYPE as TRACED
from adaptnet.train.build import fresh_model
from adaptnet.train.checkpoint import SPEC_FILE, CheckpointManager, load
from adaptnet.train.config import load_config
from adaptnet.train.rundir import CHECKPOINTS, CONFIG, read_events

HELP = "show the architecture of a checkpoint (or a run's latest) and the run's edit history"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("inspect", help=HELP, description=HELP + ".")
    parser.add_argument("path", metavar="PATH", help="a checkpoint folder (with spec.json) or a run directory")
    parser.add_argument("--trust-code", action="store_true",
                        help="import the model.target that the run's config.yaml names (it runs that code)")
    return parser


def _fresh(run_dir: Path | None, trusted: bool) -> Callable[[], nn.Module] | None:
    """The run's starting model, for checkpoints of a user's or a transformers model (see fresh_model)."""
    if run_dir is None or not (run_dir / CONFIG).is_file():
        return None
    return fresh_model(load_config(run_dir / CONFIG), str(run_dir / CONFIG), trusted)


def _traced(checkpoint: Path) -> bool:
    try:
        return json.loads((checkpoint / SPEC_FILE).read_text(encoding="utf-8"))["model"]["type"] == TRACED
    except (OSError, ValueError, KeyError, TypeError):
        return False  # load() reports what is wrong with the file


def locate(path: Path, trusted: bool = False) -> tuple[Path, Path | None, nn.Module, dict[str, Any],
                                                       list[tuple[Path, str]]]:
    """(checkpoint folder, run directory or None, model, state, newer checkpoints skipped with why)."""
    if not path.exists():
        raise CLIError(f"not found: {path}")
    if (path / SPEC_FILE).is_file() or (path / _integrity.MANIFEST_FILE).is_file():
        run_dir = path.parent.parent if path.parent.name == CHECKPOINTS else None
        fresh = _fresh(run_dir, trusted) if _traced(path) else None
        if fresh is None and _traced(path):
            raise CLIError(f"{path} holds a model of the user's own class; adaptnet rebuilds it only from its run "
                           f"directory's {CONFIG} (inspect the checkpoint inside its run, or load it in Python with "
                           "adaptnet.load(path, model=YourClass(...)))")
        model, state = load(path, model=fresh() if fresh is not None else None)
        return path, run_dir, model, state, []
    if (path / CONFIG).is_file() or (path / CHECKPOINTS).is_dir():
        # Only a run of a user's or a transformers model needs its config (a recipe's config.yaml is not one).
        newest = CheckpointManager(path / CHECKPOINTS).latest()
        fresh = _fresh(path, trusted) if newest is not None and _traced(newest) else None
        latest, model, state, skipped = newest_loadable(path, f"{path} has no checkpoint yet (nothing in "
                                                              f"{path / CHECKPOINTS})", fresh)
        return latest, path, model, state, skipped
    raise CLIError(f"{path} is neither a checkpoint folder (with {SPEC_FILE}) nor a run directory (with {CONFIG})")


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layer_table(model: nn.Module) -> list[tuple[str, str, str, str, int]]:
    """Rows ``(layer, group, kind, width, params)``: the model's unit groups in order (``params``:
    the tensors that compute each group's units). ``kind`` is the block kind of adaptnet's own
    models (``dense``/``residual``), else ``group``."""
    specs = model.spec().get("blocks", []) if isinstance(model, HasSpec) else []
    rows = []
    for i, group in enumerate(unit_groups(model).values()):
        kind = specs[i]["kind"] if i < len(specs) else "group"
        computing = {id(s.tensor): s.tensor.numel() for s in group.slices if s.role != "in"}
        rows.append((str(i), group.name, kind, str(group.size), sum(computing.values())))
    return rows


def _event_line(e: dict[str, Any]) -> str:
    if e.get("op") == "rollback":
        return f"  epoch {e.get('epoch')}  step {e.get('step')}  rollback  lr -> {e.get('lr')}"
    return (f"  epoch {e.get('epoch')}  step {e.get('step')}  {e.get('op')} layer {e.get('layer')}  "
            f"widths {e.get('widths_before')} -> {e.get('widths_after')}  "
            f"params {e.get('params_before')} -> {e.get('params_after')}  "
            f"{e.get('policy', '')}: {e.get('reason', '')}")


def run(args: argparse.Namespace) -> int:
    checkpoint, run_dir, model, state, skipped = locate(Path(args.path), args.trust_code)
    integrity = _integrity.verify(checkpoint)
    options = ", ".join(f"{k} {v}" for k, v in getattr(model, "options", {}).items())
    print(f"checkpoint: {checkpoint} (epoch {state.get('epoch', '?')}, step {state.get('step', '?')})")
    print("integrity: " + (integrity.describe() if integrity is not None else "?"))
    for path, reason in skipped:
        print(f"  skipped {path.name}, newer but it does not load: {reason}")
    print(f"model: {type(model).__name__}" + (f" ({options})" if options else ""))
    table = layer_table(model)
    name_width = max([5, *(len(row[1]) for row in table)])
    print(f"{'layer':<6} {'group':<{name_width}} {'kind':<10} {'width':>6} {'params':>10}")
    for layer, name, kind, width, params in table:
        print(f"{layer:<6} {name:<{name_width}} {kind:<10} {width:>6} {params:>10}")
    print(f"total params: {_count(model)}")
    if run_dir is not None:
        step = state.get("step")
        events = [e for e in read_events(run_dir) if not isinstance(step, int) or e.get("step", 0) <= step]
        print(f"edit history ({run_dir / 'events.jsonl'}): " + (f"{len(events)} events" if events else "none"))
        for e in events:
            print(_event_line(e))
    return 0
