"""Free adversarial training (Shafahi et al., NeurIPS 2019): adversarial training "for free".

Each minibatch is replayed ``m = objective.replays`` times (the loop does the replaying). Every replay
trains on ``x + delta`` and the *same* backward pass that produces the parameter gradient also
produces the input gradient; ``after_backward`` moves ``delta`` one signed step of size eps along it
(``attack.step_size`` if set) and projects it back into the eps-ball. ``delta`` persists across
replays and minibatches, as in the paper. With m replays an epoch costs about m plain epochs, so
divide the epoch count by m: E / m epochs of Free-AT cost about as much as E epochs of standard training.

Each rank keeps its own ``delta`` (its own data shard); ``state_dict`` gathers all of them so a resumed
run with the same world size continues bit for bit.

``objective.label_smoothing`` smooths the training CE; the input gradient that moves ``delta`` comes from the
same backward, so here (unlike the PGD objectives) the perturbation also follows the smoothed loss.
``attack.eps_warmup_epochs`` scales the ball and the step of ``delta`` by the warm-up factor of the batch's step.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..attacks import GEOMETRIES
from ..core import dist
from .base import OBJECTIVES, Objective, ObjectiveOutput, supervised_ce
from .eps_warmup import eps_factor

log = logging.getLogger(__name__)


@OBJECTIVES.register("free")
class FreeAT(Objective):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.replays = cfg.objective.replays
        self.geometry = GEOMETRIES.get(cfg.attack.norm)(cfg.attack.eps)
        self.step_size = cfg.attack.step_size if cfg.attack.step_size is not None else cfg.attack.eps
        self.delta: torch.Tensor | None = None
        self._x: torch.Tensor | None = None  # this step's clean batch and perturbed input, until after_backward
        self._x_adv: torch.Tensor | None = None
        self._factor = 1.0  # attack.eps_warmup_epochs: this step's fraction of eps and of the step size

    def __call__(self, ctx, x, y):
        if self.delta is None or self.delta.shape != x.shape:
            self.delta = torch.zeros_like(x)
        self.delta = self.delta.to(device=x.device, dtype=x.dtype)
        # A leaf that requires grad: engine.backward fills x_adv.grad along with the parameter gradients.
        x_adv = (x + self.delta).clamp(0, 1).detach().requires_grad_(True)
        self._x, self._x_adv = x, x_adv
        self._factor = eps_factor(ctx.step, ctx.cfg.attack.eps_warmup_epochs, ctx.steps_per_epoch)
        logits = ctx.model(x_adv)
        loss = supervised_ce(logits, y, ctx.cfg.objective.label_smoothing)
        return ObjectiveOutput(loss=loss, logits=logits, metrics={"loss_adv": loss.detach()})

    def after_backward(self) -> None:
        """One signed step of ``delta`` along the input gradient this step's backward produced, projected."""
        x, x_adv = self._x, self._x_adv
        self._x = self._x_adv = None
        if x_adv is None or x_adv.grad is None:  # no backward through this step: keep the perturbation as it was
            return
        geometry = self.geometry if self._factor >= 1.0 else GEOMETRIES.get(self.cfg.attack.norm)(
            self.cfg.attack.eps * self._factor)
        stepped = geometry.step(x_adv.detach(), x_adv.grad, self.step_size * self._factor)
        self.delta = (geometry.project(stepped, x) - x).detach()

    def state_dict(self) -> dict[str, Any]:
        # Collective: every rank calls state_dict() when a checkpoint is saved, and rank 0 writes it.
        mine = None if self.delta is None else self.delta.detach().cpu()
        return {"delta_by_rank": dist.all_gather_object(mine)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        deltas = state.get("delta_by_rank") or []
        if len(deltas) != dist.world_size():
            log.warning("Free-AT state was saved with %d rank(s), this run has %d: perturbations restart at zero",
                        len(deltas), dist.world_size())
            self.delta = None
            return
        self.delta = deltas[dist.rank()]
