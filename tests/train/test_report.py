"""Report: a PNG overlaying runs (edits marked) and a text summary of one run."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptnet.train.report import metric_key, summarize, write_report
from adaptnet.train.rundir import RunDir

PNG = b"\x89PNG\r\n\x1a\n"


def _run(path: Path, widths: list[list[int]], metric: str = "val_accuracy", events: tuple[dict, ...] = ()) -> Path:
    run = RunDir(path)
    for i, w in enumerate(widths):
        loss = 1.0 / (i + 1)
        run.append_metrics({"epoch": i + 1, "step": 10 * (i + 1), "train_loss": loss, "val_loss": loss * 1.1,
                            metric: 0.5 + 0.1 * i, "params": 10 * sum(w), "widths": w, "lr": 0.01, "seconds": 0.1})
    for event in events:
        run.append_event(event)
    return path


def _widen(epoch: int, before: list[int], after: list[int]) -> dict:
    return {"step": 10 * epoch, "epoch": epoch, "op": "widen", "layer": 0, "widths_before": before,
            "widths_after": after, "params_before": 10 * sum(before), "params_after": 10 * sum(after),
            "policy": "grow_on_plateau", "reason": "plateau"}


def test_summary(tmp_path: Path) -> None:
    events = (_widen(2, [4], [8]), {"step": 25, "epoch": 2, "op": "rollback", "lr": 0.005},
              _widen(3, [8], [12]))  # the last edit comes after the last metrics row
    run = _run(tmp_path / "run", [[4], [4], [8]], events=events)
    text = summarize(run)
    assert "epochs: 3 (30 steps)" in text
    assert "train_loss: 1 -> 0.3333 (best 0.3333 at epoch 3)" in text
    assert "val_accuracy: 0.5 -> 0.7 (best 0.7 at epoch 3)" in text
    assert "params: 40 -> 120" in text and "widths: [4] -> [12]" in text
    assert "edits: 2 (widen 2)" in text and "rollbacks: 1" in text
    assert "no epochs recorded" in summarize(tmp_path / "empty")


def test_report_png_overlays_runs(tmp_path: Path) -> None:
    deepen = {"step": 20, "epoch": 2, "op": "deepen", "layer": 1, "widths_before": [4], "widths_after": [4, 4]}
    a = _run(tmp_path / "small", [[4], [8], [8]], events=(_widen(1, [4], [8]),))
    b = _run(tmp_path / "deep", [[4], [4], [4, 4], [4, 4]], metric="val_r2", events=(deepen,))
    out = write_report([a, b], tmp_path / "out" / "cmp.png")
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 10_000
    single = write_report([a], a / "report.png")
    assert single.read_bytes().startswith(PNG)


def test_report_needs_metrics(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no metrics to plot"):
        write_report([tmp_path / "empty"], tmp_path / "r.png")


def test_metric_choice() -> None:
    assert metric_key([{"val_loss": 1, "val_mae": 1, "val_r2": 0}]) == "val_r2"
    assert metric_key([{"val_loss": 1, "val_accuracy": 1}]) == "val_accuracy"
    assert metric_key([{"train_loss": 1}]) is None
