"""``run_training``: the training run ``dat-ds train`` starts on every rank.

The runtime's ``Trainer`` builds the engine and runs the epochs; this module adds what needs the
evaluation layer, as callbacks: the per-epoch clean/robust evaluation (:class:`EpochEvaluation`) and,
when ``monitor.every_steps`` > 0, the catastrophic-overfitting monitor. The trainer's own
mid-epoch checkpointing runs after them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from ..attacks import eval_spec
from ..core import dist
from ..core.config import RunConfig
from ..data import build_dataset
from ..runtime.callbacks import Callback, TrainerView
from ..runtime.loop import TrainState
from ..runtime.trainer import Trainer
from .evaluate import evaluate
from .monitor import CatastrophicOverfittingMonitor
from .pictures import ADV_EXAMPLES, adversarial_grid

log = logging.getLogger(__name__)


class EpochEvaluation(Callback):
    """Clean test accuracy after every epoch, robust accuracy (``eval`` section) every ``eval.every_epochs``
    epochs and after the last; adds ``clean_acc``, ``robust_acc`` (None when not measured),
    ``robust_attack``, ``eval_count`` and ``eval_seconds`` to the epoch's row; with a weight EMA
    (``ema``) the averaged weights are evaluated the same way next to them (``ema_clean_acc``,
    ``ema_robust_acc``), swapped in and out by ``WeightEMA.applied``."""

    def __init__(self, cfg: RunConfig, test_set, classes: tuple[str, ...] = ()):
        self.cfg = cfg
        self.test_set = test_set
        self.classes = classes
        self.spec = eval_spec(cfg)

    def on_epoch_end(self, trainer: TrainerView, state: TrainState, row: dict[str, Any]) -> None:
        cfg, done = self.cfg, state.epoch + 1
        robust = done == cfg.train.epochs or done % cfg.eval.every_epochs == 0
        t_eval = time.perf_counter()
        specs = [self.spec] if robust else []

        def accuracies(prefix: str) -> None:
            result = evaluate(trainer.eval_module(), self.test_set, specs, batch_size=cfg.eval.batch_size,
                              seed=cfg.seed, max_examples=cfg.eval.max_examples)
            row.update({f"{prefix}clean_acc": result.clean_acc,
                        f"{prefix}robust_acc": result.robust_acc(self.spec.label) if robust else None})
            row["eval_count"] = result.count

        accuracies("")
        if done == cfg.train.epochs:  # what the attack does to the final model (every rank: collective under ZeRO-3)
            module = trainer.eval_module()
            if dist.is_main_process():
                adversarial_grid(module, self.test_set, self.spec, cfg.run_dir / ADV_EXAMPLES, seed=cfg.seed,
                                 classes=self.classes)
        if trainer.ema is not None:
            with trainer.ema.applied(trainer.engine.module):
                accuracies("ema_")
        row.update(robust_attack=self.spec.label, eval_seconds=time.perf_counter() - t_eval)
        log.info("epoch %d/%d: clean acc %.4f%s (%.1fs eval)", done, cfg.train.epochs, row["clean_acc"],
                 f", {self.spec.label} acc {row['robust_acc']:.4f}" if robust else "", row["eval_seconds"])
        if trainer.ema is not None:
            log.info("epoch %d/%d: EMA weights: clean acc %.4f%s", done, cfg.train.epochs, row["ema_clean_acc"],
                     f", {self.spec.label} acc {row['ema_robust_acc']:.4f}" if robust else "")


class BestCheckpoint(Callback):
    """``train.keep_best=robust`` (Rice et al. 2020, against robust overfitting): the eval attack (``eval``
    section) on the trainer's validation split -- training examples held out of training, never the test set --
    every ``eval.every_epochs`` epochs and after the last. Adds ``val_clean_acc``, ``val_robust_acc`` and
    ``val_weights`` to the epoch's row, and ``best: true`` when the robust accuracy beats every earlier epoch's
    (ties keep the earlier one): the trainer then names that epoch's checkpoint ``best``. The weights measured
    are those eval and export load by default: the weight EMA when the run has one, else the raw weights."""

    def __init__(self, cfg: RunConfig, val_set):
        if val_set is None:
            raise ValueError("BestCheckpoint needs the trainer's validation split (train.keep_best)")
        self.cfg, self.val_set, self.spec = cfg, val_set, eval_spec(cfg)

    def on_epoch_end(self, trainer: TrainerView, state: TrainState, row: dict[str, Any]) -> None:
        cfg, done = self.cfg, state.epoch + 1
        if not (done == cfg.train.epochs or done % cfg.eval.every_epochs == 0):
            return
        module = trainer.engine.module
        applied = trainer.ema.applied(module) if trainer.ema is not None else contextlib.nullcontext()
        t_eval = time.perf_counter()
        with applied:
            result = evaluate(trainer.eval_module(), self.val_set, [self.spec], batch_size=cfg.eval.batch_size,
                              seed=cfg.seed)
        robust = result.robust_acc(self.spec.label)
        earlier = [h["val_robust_acc"] for h in state.history if h.get("val_robust_acc") is not None]  # resumes too
        best = not earlier or robust > max(earlier)
        row.update(val_clean_acc=result.clean_acc, val_robust_acc=robust,
                   val_weights="ema" if trainer.ema is not None else "raw", best=best)
        log.info("epoch %d/%d: validation (%d held-out training examples): clean acc %.4f, %s acc %.4f%s (%.1fs)",
                 done, cfg.train.epochs, result.count, result.clean_acc, self.spec.label, robust,
                 " -- best so far, kept as checkpoint 'best'" if best else "", time.perf_counter() - t_eval)


def run_training(cfg: RunConfig, resume: str | None = None, overwrite: bool = False,
                 allow_world_size_change: bool = False) -> dict[str, Any]:
    """Train ``cfg`` on this rank (every rank calls it), evaluating each epoch; returns the run's summary."""
    trainer = Trainer(cfg, resume=resume, overwrite=overwrite, allow_world_size_change=allow_world_size_change).setup()
    test_set, spec = build_dataset(cfg.data, "test")
    log.info("data %s: %d test images", cfg.data.name, len(test_set))
    callbacks: list[Callback] = [EpochEvaluation(cfg, test_set, spec.classes)]
    if cfg.train.keep_best != "none":
        callbacks.append(BestCheckpoint(cfg, trainer.val_set))
    if cfg.monitor.every_steps > 0:
        callbacks.append(CatastrophicOverfittingMonitor(cfg, trainer.engine, test_set, ckpt_root=trainer.ckpt_root,
                                                        write=trainer.write, module=trainer.run.attack_module))
    return trainer.fit(callbacks)
