"""Catastrophic-overfitting watch during training (Wong, Rice & Kolter, ICLR 2020).

Fast adversarial training with single-step attacks can suddenly overfit to them: within a few hundred
steps PGD accuracy collapses to ~0 while FGSM accuracy *rises*. This training callback
(``dat_ds.runtime.callbacks.Callback``) measures, every ``monitor.every_steps`` steps, FGSM and PGD-10
accuracy (eps = ``attack.eps``) on a fixed held-out batch of ``monitor.batch_size`` test examples,
writes a ``{"kind": "monitor", ...}`` JSONL record, and when ``fgsm_acc - pgd_acc > monitor.gap``
applies ``monitor.policy``:

- ``warn``: log a warning and carry on;
- ``stop``: end training cleanly (``StopTraining``); the last checkpoint is the last good state;
- ``rollback``: reload the newest complete checkpoint saved at or before the last healthy measurement,
  then continue (after ``MAX_ROLLBACKS`` relapses it stops instead); with no such checkpoint it stops.

Every rank attacks its own slice of the batch and the counts are summed over ranks, so every rank sees
the same accuracies and takes the same decision (a rollback is a collective ``load_checkpoint``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..attacks import eval_mode, fgsm, pgd
from ..core import dist
from ..runtime import checkpoint
from ..runtime.callbacks import Callback, StopTraining
from .evaluate import batch_generator

log = logging.getLogger(__name__)
MAX_ROLLBACKS = 3
PGD_STEPS = 10


class CatastrophicOverfittingMonitor(Callback):
    def __init__(self, cfg, engine, test_set, *, ckpt_root: str | Path | None,
                 write: Callable[[dict[str, Any]], None] | None = None, module: torch.nn.Module | None = None):
        """``module``: what the attacks run on, in the training precision (``Trainer.attack_module``); the
        engine's module when None. ``engine`` loads the checkpoint a rollback goes back to."""
        self.cfg = cfg
        self.engine = engine
        self._module = module
        self.every = cfg.monitor.every_steps
        self.gap = cfg.monitor.gap
        self.policy = cfg.monitor.policy
        self.eps = cfg.attack.eps
        self.norm = cfg.attack.norm
        self.ckpt_root = Path(ckpt_root) if ckpt_root is not None else None
        self.write = write or (lambda record: None)
        n = min(cfg.monitor.batch_size, len(test_set))
        # The last n test examples: held out from the evaluation subsets that take the first N.
        indices = list(range(len(test_set) - n, len(test_set)))
        world, rank = dist.world_size(), dist.rank()
        mine = indices[rank::world] if n >= world else indices  # tiny batches: every rank does all of it
        self.shared = n < world
        items = [test_set[i] for i in mine]
        self.x = torch.stack([it[0] for it in items]) if items else torch.zeros(0)
        self.y = torch.as_tensor([int(it[1]) for it in items], dtype=torch.long)
        self.count = n
        self.history: list[dict[str, Any]] = []
        self.best_pgd_acc = 0.0
        self.last_ok_step: int | None = None
        self.rollbacks = 0

    @property
    def module(self) -> torch.nn.Module:
        return self._module if self._module is not None else getattr(self.engine, "module", self.engine)

    def measure(self, step: int) -> tuple[float, float, float]:
        """(clean, FGSM, PGD-10) accuracy on the held-out batch, identical on every rank."""
        model = self.module
        device = next(model.parameters()).device
        x, y = self.x.to(device), self.y.to(device)
        counts = torch.zeros(3, dtype=torch.float64)
        if len(y):
            g = batch_generator(self.cfg.seed, step, device)
            with eval_mode(model):
                x_fgsm = fgsm(model, x, y, eps=self.eps, norm=self.norm)
                x_pgd = pgd(model, x, y, eps=self.eps, steps=PGD_STEPS, norm=self.norm, generator=g)
                with torch.no_grad():
                    for i, xs in enumerate((x, x_fgsm, x_pgd)):
                        counts[i] = float((model(xs).argmax(1) == y).sum())
        if not self.shared:
            counts = dist.all_reduce_sum(counts)
        clean, fgsm_acc, pgd_acc = (counts / self.count).tolist()
        return clean, fgsm_acc, pgd_acc

    def on_step(self, trainer, state) -> None:
        """``trainer`` is unused: the engine and the checkpoint folder came with the constructor."""
        step = state.global_step
        if self.every <= 0 or step % self.every != 0:
            return
        t0 = time.perf_counter()
        clean, fgsm_acc, pgd_acc = self.measure(step)
        overfit = fgsm_acc - pgd_acc > self.gap
        # seconds: inside the epoch's train_seconds; benchmarks that time training take it back out
        record = {"kind": "monitor", "step": step, "epoch": state.epoch + 1, "clean_acc": clean, "fgsm_acc": fgsm_acc,
                  "pgd_acc": pgd_acc, "gap": fgsm_acc - pgd_acc, "best_pgd_acc": max(self.best_pgd_acc, pgd_acc),
                  "overfit": overfit, "policy": self.policy if overfit else None,
                  "seconds": time.perf_counter() - t0}
        self.history.append(record)
        self.write(record)
        if not overfit:
            self.best_pgd_acc = max(self.best_pgd_acc, pgd_acc)
            self.last_ok_step = step
            return
        message = (f"catastrophic overfitting at step {step}: FGSM acc {fgsm_acc:.3f} vs PGD-{PGD_STEPS} acc "
                   f"{pgd_acc:.3f} (gap {fgsm_acc - pgd_acc:.3f} > monitor.gap {self.gap}; best PGD acc so far "
                   f"{self.best_pgd_acc:.3f}) at eps={self.eps:.4g}")
        log.warning("%s; policy: %s", message, self.policy)
        if self.policy == "stop":
            raise StopTraining(f"{message}. Use a smaller step size, FGSM with random start (fgsm_rs), or PGD")
        if self.policy == "rollback":
            self._rollback(step, message, trainer)

    def _rollback(self, step: int, message: str, trainer=None) -> None:
        if self.rollbacks >= MAX_ROLLBACKS:
            raise StopTraining(f"{message}; it came back after {self.rollbacks} rollbacks, so training stops. "
                               "Lower attack.step_size or switch to PGD")
        tag = self._good_tag()
        if tag is None:
            raise StopTraining(f"{message}; policy 'rollback' found no complete checkpoint saved before step "
                               f"{self.last_ok_step if self.last_ok_step is not None else step} in {self.ckpt_root}, "
                               "so training stops. Set train.save_every_steps to keep recent checkpoints")
        load_path, client = self.engine.load_checkpoint(str(self.ckpt_root), tag=tag, load_module_strict=True)
        if load_path is None:
            raise StopTraining(f"{message}; rolling back to {self.ckpt_root / tag} failed, so training stops")
        if trainer is not None:  # the weight EMA goes back too: it would keep averaging the discarded weights
            trainer.reload_ema(self.ckpt_root, tag, client)
        self.rollbacks += 1
        log.warning("rolled back the model and optimizer to checkpoint %s (rollback %d of at most %d)",
                    tag, self.rollbacks, MAX_ROLLBACKS)
        self.write({"kind": "monitor_rollback", "step": step, "tag": tag, "rollbacks": self.rollbacks})

    def _good_tag(self) -> str | None:
        """The newest complete checkpoint taken no later than the last healthy measurement."""
        if self.ckpt_root is None or self.last_ok_step is None:
            return None
        good = [tag for global_step, tag in checkpoint.complete_tags(self.ckpt_root) if global_step <= self.last_ok_step]
        return good[-1] if good else None
