"""A run directory: config.yaml, metrics.csv, events.jsonl, checkpoints/, report.png.

Only the Trainer (rank 0 in a distributed run) writes here. Files are appended as training
goes; a resume first cuts them back to the checkpoint it resumes from, so a run that was
killed and resumed reads exactly like one that never stopped.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

CONFIG, METRICS, EVENTS, CHECKPOINTS, REPORT = "config.yaml", "metrics.csv", "events.jsonl", "checkpoints", "report.png"


def _plain(value: Any) -> Any:
    """JSON/CSV-friendly: non-finite floats become None, tuples lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def write_config(self, config: Mapping[str, Any]) -> None:
        (self.path / CONFIG).write_text(yaml.safe_dump(_plain(dict(config)), sort_keys=False))

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        file = self.path / METRICS
        new = not file.exists() or file.stat().st_size == 0
        with file.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, tuple)) else v for k, v in row.items()})

    def append_event(self, event: Mapping[str, Any]) -> None:
        with (self.path / EVENTS).open("a") as f:
            f.write(json.dumps(_plain(dict(event))) + "\n")

    def truncate(self, epochs: int, step: int) -> None:
        """Keep the metrics of the first ``epochs`` epochs and the events up to ``step``."""
        metrics = self.path / METRICS
        if metrics.exists():
            lines = metrics.read_text().splitlines(keepends=True)
            metrics.write_text("".join(lines[: 1 + epochs]) if lines else "")
        events = self.path / EVENTS
        if events.exists():
            kept = [line for line in events.read_text().splitlines(keepends=True)
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            events.write_text("".join(kept))


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """Rows of metrics.csv with numbers parsed (``widths`` as a list)."""
    file = Path(run) / METRICS
    if not file.exists():
        return []
    rows = []
    with file.open(newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for key, text in raw.items():
                try:
                    row[key] = json.loads(text) if text not in ("", None) else None
                except json.JSONDecodeError:
                    row[key] = text
            rows.append(row)
    return rows


def read_events(run: str | Path) -> list[dict[str, Any]]:
    file = Path(run) / EVENTS
    if not file.exists():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
