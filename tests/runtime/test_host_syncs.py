"""The training loop stays asynchronous: no host sync and no collective on a step that does not log.

A host sync is anything that makes the host wait for the accelerator (``.item()``, ``float(t)``,
``.tolist()``, ``.cpu()``, ``bool(t)``, ...); a collective is any ``torch.distributed`` call. Both are
counted when they are called from dat-ds code (the caller's file lies under ``dat_ds/``), per training
step, on a real 1-rank DeepSpeed engine built in this process by the trainer, and per ``optimizer.step()``
for every registered optimizer. On a CPU-only machine no call really waits, so the count is what stands
for the wait it would be on a GPU.
"""

from __future__ import annotations

import functools
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed

import dat_ds
from dat_ds.core.config import build_config
from dat_ds.objectives import OBJECTIVES
from dat_ds.optim import OPTIMIZERS, build_optimizer, param_groups
from dat_ds.runtime.loop import TrainState, train_one_epoch
from dat_ds.runtime.trainer import Trainer
from tests.helpers import write_ds

PKG = Path(dat_ds.__file__).resolve().parent
# __format__: f"{t:.3g}" on a tensor calls .item() inside torch, where the caller is no longer dat-ds code
SYNCS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "__format__")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "barrier", "gather",
               "scatter")
STEPS, LOG_EVERY = 9, 4  # log steps 4 and 8; step 9 is flushed at the end of the epoch
MAX_PER_LOG = 3  # the window's sums all-reduced, the non-finite flag min-reduced, one host transfer


@functools.lru_cache(maxsize=None)
def _in_dat_ds(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(PKG)


class SyncCounter:
    """Counts calls of ``SYNCS`` (tensor methods) and ``COLLECTIVES`` made from files under ``dat_ds/``."""

    def __init__(self, monkeypatch):
        self.calls: Counter[str] = Counter()
        self.where: list[str] = []
        for name in SYNCS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name))
        for name in COLLECTIVES:
            if hasattr(torch.distributed, name):
                monkeypatch.setattr(torch.distributed, name, self._wrap(getattr(torch.distributed, name), name))

    def _wrap(self, fn, name):
        def counted(*args, **kwargs):
            caller = sys._getframe(1).f_code
            if _in_dat_ds(caller.co_filename):
                self.calls[name] += 1
                self.where.append(f"{name} from {caller.co_filename}:{caller.co_name}")
            return fn(*args, **kwargs)

        return counted

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def _trainer(tmp_path, objective: str, *extra: str) -> Trainer:
    cfg = build_config(None, [f"output_dir={tmp_path / 'runs'}", f"name={objective}",
                              f"deepspeed_config={write_ds(tmp_path)}", "model.name=tiny_cnn",
                              f"objective.name={objective}", "attack.steps=1", f"data.train_subset={16 * STEPS}",
                              f"train.log_every={LOG_EVERY}", "train.save_every_steps=0", *extra])
    return Trainer(cfg).setup()


def _count_per_step(trainer: Trainer, counter: SyncCounter):
    """Train one epoch; returns ({global step: calls in that step}, calls after the last step, records)."""
    marks: list[tuple[int, Counter]] = []
    per_step: dict[int, Counter] = {}

    def batches():
        for batch in trainer.run.loaders.loader(0):  # data loading stays outside the measured step
            marks.append(counter.calls.copy())
            yield batch

    def on_step(state: TrainState) -> None:
        per_step[state.global_step] = counter.calls - marks[-1]
        marks.append(counter.calls.copy())

    records: list[dict] = []
    run = trainer.run
    train_one_epoch(run.engine, run.objective, run.ctx, batches(), trainer.state, cfg=trainer.cfg,
                    metrics=records.append, on_step=on_step, comm=run.comm, watch=run.watch)
    return per_step, counter.calls - marks[-1], records


def test_the_counter_sees_a_sync_made_from_dat_ds_code(monkeypatch):
    counter = SyncCounter(monkeypatch)
    t = torch.ones(())
    float(t), t.item()  # from this test file: not counted
    assert counter.total == 0
    exec(compile("float(t); t.tolist(); bool(t); f'{t:.3g}'", str(PKG / "probe.py"), "exec"), {"t": t})
    assert counter.calls == Counter({"__float__": 1, "tolist": 1, "__bool__": 1, "__format__": 1})


@pytest.mark.parametrize("objective", [n for n in OBJECTIVES.names() if not n.startswith("test_")])
def test_abort_policy_steps_make_no_host_sync_between_log_steps(tmp_path, monkeypatch, objective):
    trainer = _trainer(tmp_path, objective)
    counter = SyncCounter(monkeypatch)
    per_step, after, records = _count_per_step(trainer, counter)
    assert sorted(per_step) == list(range(1, STEPS + 1))
    for step, calls in per_step.items():
        if step % LOG_EVERY:
            assert not calls, f"step {step} synced: {calls}"
        else:
            assert 0 < sum(calls.values()) <= MAX_PER_LOG, f"log step {step}: {calls}"
    assert 0 < sum(after.values()) <= MAX_PER_LOG, after  # the epoch's last partial window
    assert [r["step"] for r in records] == [4, 8]
    assert all(r["loss"] == r["loss"] and 0 <= r["train_acc"] <= 1 for r in records)


def test_skip_policy_pays_one_all_reduce_and_one_sync_per_step(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "clean", "train.nan_policy=skip")
    counter = SyncCounter(monkeypatch)
    per_step, _, _ = _count_per_step(trainer, counter)
    for step, calls in per_step.items():
        if step % LOG_EVERY:
            assert calls == Counter({"all_reduce": 1, "tolist": 1}), f"step {step}: {calls}"


def test_trainer_steps_between_log_steps_make_no_host_sync(tmp_path, monkeypatch):
    """The whole trainer (its per-step callbacks included) on steps 2..9, data loading included."""
    trainer = _trainer(tmp_path, "madry", "train.epochs=1")
    counter = SyncCounter(monkeypatch)
    seen: dict[int, Counter] = {}

    class Probe:
        last = None

        def on_step(self, trainer, state):
            if self.last is not None:
                seen[state.global_step] = counter.calls - self.last
            self.last = counter.calls.copy()

        def on_epoch_end(self, trainer, state, row):
            pass

    summary = trainer.fit([Probe()])
    assert summary["final"]["epoch"] == 1 and sorted(seen) == list(range(2, STEPS + 1))
    for step, calls in seen.items():
        if step % LOG_EVERY:
            assert not calls, f"step {step} synced: {calls}"


# ----------------------------------------------------------------------------- optimizer.step()

# The 1-bit optimizers leave their fp32 warm-up after step 2 of OPTIMIZER_STEPS, so the compressed stage
# (1-bit Adam, 1-bit LAMB) or the frozen-variance stage with local steps (0/1 Adam) is counted too.
FAST_STAGES = {"onebitadam": {"freeze_step": 2}, "onebitlamb": {"freeze_step": 2},
               "zerooneadam": {"var_freeze_step": 2, "var_update_scaler": 1, "local_step_scaler": 2,
                               "local_step_clipper": 4}}
OPTIMIZER_STEPS = 7
ONCE_PER_RUN = 1  # 1-bit LAMB, at the freeze: one transfer of the per-layer scales and the coefficients it logs


def _optimizer_cases():
    """Every registered optimizer; a compressing one both as it runs on one rank (the uncompressed
    algorithm) and with its compressed maths (as on several ranks, ``compress_single_rank``)."""
    for name in OPTIMIZERS.names():
        if OPTIMIZERS.get(name).compresses:
            yield pytest.param(name, False, id=f"{name}-world1")
            yield pytest.param(name, True, id=f"{name}-compressed")
        else:
            yield pytest.param(name, False, id=name)


def _syncs_per_optimizer_step(name: str, compressed: bool, layers: int, counter: SyncCounter) -> list[int]:
    """Host syncs and collectives from dat-ds code in each ``optimizer.step()`` on ``2 * layers`` tensors."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(layers)])
    section = {"type": name, "params": {"lr": 0.01, **FAST_STAGES.get(name, {})}}
    opt = build_optimizer(section, param_groups(model, 1e-4), compress_single_rank=compressed)
    x, counts = torch.randn(16, 8), []
    for _ in range(OPTIMIZER_STEPS):
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        before = counter.total
        opt.step()
        counts.append(counter.total - before)
    if compressed:  # the counted steps reached the 1-bit stage (and 0/1 Adam's local steps)
        stats = opt.comm_stats()
        assert stats["stage"] == "compressed" and (name != "zerooneadam" or stats["local_steps"] > 0), stats
    return counts


@pytest.mark.parametrize("name,compressed", list(_optimizer_cases()))
def test_optimizer_step_host_syncs_do_not_grow_with_the_parameter_tensors(monkeypatch, name, compressed):
    """A sync per parameter tensor is a few hundred stalls per step on ResNet-50: the optimizer's per-tensor
    maths stays on the device, whatever the stage (warm-up, freeze, compressed or local steps)."""
    counter = SyncCounter(monkeypatch)
    few = _syncs_per_optimizer_step(name, compressed, 2, counter)
    many = _syncs_per_optimizer_step(name, compressed, 8, counter)
    assert few == many, f"{name}: syncs per step with 4 tensors {few}, with 16 tensors {many}: {counter.where[:6]}"
    assert max(few) <= 1 and sum(few) <= ONCE_PER_RUN, f"{name}: syncs per step {few}: {counter.where[:6]}"
