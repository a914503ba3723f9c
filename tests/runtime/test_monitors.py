"""The DeepSpeed JSON's monitor blocks receive dat-ds's metrics: robust accuracy curves where users look."""

from __future__ import annotations

import csv
import json

import pytest

from dat_ds import cli
from dat_ds.runtime.trainer import monitor_events
from tests.helpers import tiny_args, write_ds


def _train(tmp_path, name: str, *ds_set: str) -> dict:
    argv = ["train", *tiny_args(tmp_path, name, write_ds(tmp_path), epochs=2, subset=64)]
    for item in ds_set:
        argv += ["--ds-set", item]
    assert cli.main(argv) == 0
    return json.loads((tmp_path / name / "summary.json").read_text())


def test_csv_monitor_holds_the_robust_accuracy_of_every_evaluation(tmp_path):
    summary = _train(tmp_path, "csv", "csv_monitor.enabled=true")
    folder = tmp_path / "csv" / "monitor" / "dat-ds"  # no output_path in the JSON: inside the run folder
    with open(folder / "dat_ds_epoch_robust_acc.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "robust_acc"]
    assert [float(r[1]) for r in rows[1:]] == [h["robust_acc"] for h in summary["history"]]
    assert (folder / "dat_ds_epoch_clean_acc.csv").is_file() and (folder / "dat_ds_step_loss.csv").is_file()
    saved = json.loads((tmp_path / "csv" / "ds_config.json").read_text())
    assert saved["csv_monitor"]["output_path"] == str(tmp_path / "csv" / "monitor")


def test_tensorboard_event_files_hold_clean_and_robust_accuracy(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    summary = _train(tmp_path, "run", "tensorboard.enabled=true", f"tensorboard.output_path={out}",
                     "tensorboard.job_name=job")
    events = EventAccumulator(str(out / "job")).Reload()
    robust = [e.value for e in events.Scalars("dat_ds/epoch/robust_acc")]
    clean = [e.value for e in events.Scalars("dat_ds/epoch/clean_acc")]
    assert robust == pytest.approx([h["robust_acc"] for h in summary["history"]])
    assert clean == pytest.approx([h["clean_acc"] for h in summary["history"]])


def test_a_monitor_whose_package_is_missing_is_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert cli.main(["train", "--output-dir", str(tmp_path), "--ds-set", "tensorboard.enabled=true", "--dry-run"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: DeepSpeed config enables 'tensorboard', but the tensorboard package is not installed; pip install "
        "'dat-ds[tensorboard]', or set tensorboard.enabled=false"]


def test_monitor_events_are_the_records_numbers_at_the_global_step():
    record = {"kind": "epoch", "epoch": 2, "robust_acc": 0.5, "clean_acc": 0.75, "lr": 1e-3, "note": "x",
              "stopped": False, "nan": float("nan")}
    assert monitor_events(record, 40) == [("dat_ds/epoch/robust_acc", 0.5, 40), ("dat_ds/epoch/clean_acc", 0.75, 40),
                                          ("dat_ds/epoch/lr", 1e-3, 40)]


def test_step_and_epoch_records_number_epochs_alike(tmp_path):
    """Step records said "epoch": 0 where the epoch's row (and the table) said 1."""
    _train(tmp_path, "n")
    records = [json.loads(line) for line in (tmp_path / "n" / "metrics.jsonl").read_text().splitlines()]
    steps = {r["epoch"] for r in records if r["kind"] == "step"}
    epochs = [r["epoch"] for r in records if r["kind"] == "epoch"]
    assert epochs == [1, 2] and steps == {1, 2}
    assert (tmp_path / "n" / "adv_examples.png").stat().st_size > 5000  # the final model under its eval attack
