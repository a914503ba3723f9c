"""Catastrophic-overfitting monitor: FGSM training at a too-large step trips it; PGD-AT does not; policies."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dat_ds.attacks import fgsm
from dat_ds.core.config import DataConfig, build_config
from dat_ds.data import build_dataset
from dat_ds.evaluation import monitor as monitor_mod
from dat_ds.evaluation.monitor import CatastrophicOverfittingMonitor
from dat_ds.models import create_model
from dat_ds.runtime.callbacks import Callback, StopTraining
from dat_ds.runtime.loop import TrainState

# FGSM without random start, step = eps = 0.3 on Fashion-MNIST: within ~60-100 steps the model resists
# FGSM (its own training attack) far better than PGD-10 -- Wong et al.'s catastrophic overfitting.
CO_OVERRIDES = ["attack.name=fgsm", "attack.eps=0.3", "attack.steps=1", "monitor.every_steps=20",
                "monitor.batch_size=256", "monitor.gap=0.2"]


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_logged():
    handler = _Capture()
    monitor_mod.log.addHandler(handler)
    yield handler.messages
    monitor_mod.log.removeHandler(handler)


@pytest.fixture(scope="module")
def test_set():
    return build_dataset(DataConfig(), "test")[0]


def _cfg(*extra: str):
    return build_config(None, CO_OVERRIDES + list(extra))


@pytest.fixture(scope="module")
def fgsm_training_run(test_set):
    """Train tiny_cnn with FGSM (no random start, step eps=0.3), the monitor watching every 20 steps.

    Returns (model, monitor records). Plain torch loop, ~100 steps of batch 128.
    """
    torch.manual_seed(0)
    train, spec = build_dataset(DataConfig(), "train")
    model = create_model("tiny_cnn", spec)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    records: list[dict] = []
    mon = CatastrophicOverfittingMonitor(_cfg(), SimpleNamespace(module=model), test_set, ckpt_root=None,
                                         write=records.append)
    loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
    state = TrainState()
    while state.global_step < 100:  # one epoch is 79 steps
        for x, y in loader:
            x_adv = fgsm(model, x, y, eps=0.3)
            model.train()
            loss = F.cross_entropy(model(x_adv), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state.global_step += 1
            mon.on_step(None, state)
            if state.global_step >= 100:
                break
    model.eval()
    return model, records


def test_fgsm_training_triggers_overfitting_flag(fgsm_training_run):
    _, records = fgsm_training_run
    assert [r["step"] for r in records] == [20, 40, 60, 80, 100]
    assert all(r["kind"] == "monitor" and set(r) >= {"fgsm_acc", "pgd_acc", "overfit"} for r in records)
    flagged = [r for r in records if r["overfit"]]
    assert flagged, records
    last = records[-1]
    assert last["fgsm_acc"] - last["pgd_acc"] > 0.2 and last["pgd_acc"] < 0.2
    assert last["fgsm_acc"] > records[0]["fgsm_acc"]  # FGSM accuracy rises while PGD accuracy collapses


def test_warn_policy_logs_a_warning(fgsm_training_run, test_set, warnings_logged):
    model, _ = fgsm_training_run
    records = []
    mon = CatastrophicOverfittingMonitor(_cfg("monitor.every_steps=1"), SimpleNamespace(module=model), test_set,
                                         ckpt_root=None, write=records.append)
    assert isinstance(mon, Callback)  # the trainer calls it like any other training callback
    mon.on_step(None, TrainState(global_step=7))
    assert records[0]["overfit"] is True and records[0]["step"] == 7
    assert any("catastrophic overfitting" in m for m in warnings_logged)
    json.dumps(records)  # JSONL-ready


def test_healthy_pgd_model_is_not_flagged(trained_demo_model, test_set, warnings_logged):
    cfg = build_config(None, ["attack.eps=0.1", "monitor.every_steps=5", "monitor.batch_size=256"])
    records = []
    mon = CatastrophicOverfittingMonitor(cfg, SimpleNamespace(module=trained_demo_model), test_set, ckpt_root=None,
                                         write=records.append)
    mon.on_step(None, TrainState(global_step=3))  # not a multiple of every_steps: nothing measured
    assert records == []
    mon.on_step(None, TrainState(global_step=5))
    assert records[0]["overfit"] is False and records[0]["fgsm_acc"] >= records[0]["pgd_acc"] > 0.3
    assert not warnings_logged


def test_stop_policy_raises_stop_training(fgsm_training_run, test_set):
    model, _ = fgsm_training_run
    mon = CatastrophicOverfittingMonitor(_cfg("monitor.every_steps=1", "monitor.policy=stop"),
                                         SimpleNamespace(module=model), test_set, ckpt_root=None)
    with pytest.raises(StopTraining, match="catastrophic overfitting"):
        mon.on_step(None, TrainState(global_step=1))


class _FakeEngine:
    def __init__(self, module):
        self.module = module
        self.loaded: list[str] = []

    def load_checkpoint(self, root, tag, load_module_strict=True):
        self.loaded.append(tag)
        return f"{root}/{tag}", {}


def _fake_checkpoint(root, tag: str, step: int) -> None:
    (root / tag).mkdir(parents=True)
    (root / tag / "complete.json").write_text(json.dumps({"tag": tag, "global_step": step, "epoch": 0}))


def test_rollback_without_checkpoint_stops(fgsm_training_run, test_set, tmp_path):
    model, _ = fgsm_training_run
    mon = CatastrophicOverfittingMonitor(_cfg("monitor.every_steps=1", "monitor.policy=rollback"),
                                         _FakeEngine(model), test_set, ckpt_root=tmp_path / "checkpoint")
    with pytest.raises(StopTraining, match="no complete checkpoint"):
        mon.on_step(None, TrainState(global_step=1))


def test_rollback_reloads_last_good_checkpoint(fgsm_training_run, test_set, tmp_path):
    model, _ = fgsm_training_run
    root = tmp_path / "checkpoint"
    _fake_checkpoint(root, "step000000010", 10)
    _fake_checkpoint(root, "step000000030", 30)  # saved after the last healthy measurement: not trusted
    (root / "step000000040").mkdir()  # interrupted (no complete.json): never used
    engine = _FakeEngine(model)
    records = []
    mon = CatastrophicOverfittingMonitor(_cfg("monitor.every_steps=1", "monitor.policy=rollback"), engine, test_set,
                                         ckpt_root=root, write=records.append)
    mon.last_ok_step = 20  # the last measurement that was not overfit
    reloaded = []
    trainer = SimpleNamespace(reload_ema=lambda root_, tag, client: reloaded.append((root_, tag, client)))
    mon.on_step(trainer, TrainState(global_step=41))
    assert engine.loaded == ["step000000010"]
    assert reloaded == [(root, "step000000010", {})]  # the weight EMA goes back with the weights
    assert records[-1] == {"kind": "monitor_rollback", "step": 41, "tag": "step000000010", "rollbacks": 1}
    for step in range(42, 42 + monitor_mod.MAX_ROLLBACKS - 1):
        mon.on_step(None, TrainState(global_step=step))
    with pytest.raises(StopTraining, match="rollbacks"):
        mon.on_step(None, TrainState(global_step=99))


@pytest.mark.slow
def test_trainer_stops_fgsm_run_on_overfitting(cli, tmp_path):
    """Through `dat-ds train`: FGSM at eps=0.3 with monitor.policy=stop ends early with a monitor record."""
    cli("train", "--config", "recipes/demo.yaml", "--name", "co", "--output-dir", str(tmp_path), "--epochs", "3",
        "--set", "model.name=tiny_cnn", *[f"--set={o}" for o in CO_OVERRIDES], "--set", "monitor.policy=stop",
        "--set", "objective.clean_weight=0", "--set", "eval.max_examples=64", check=True, timeout=1200)
    rows = [json.loads(line) for line in (tmp_path / "co" / "metrics.jsonl").read_text().splitlines()]
    monitors = [r for r in rows if r["kind"] == "monitor"]
    assert monitors and monitors[-1]["overfit"] is True
    assert any(r["kind"] == "stopped" for r in rows)
    summary = json.loads((tmp_path / "co" / "summary.json").read_text())
    assert "catastrophic overfitting" in summary["stopped"]
