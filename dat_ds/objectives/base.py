"""The objective interface: what one training step minimises.

An objective is called as ``objective(ctx, x, y)`` and returns an :class:`ObjectiveOutput`. The
training loop then runs ``engine.backward(out.loss)``, ``objective.after_backward()`` and
``engine.step()``; it never changes when an objective is added. An objective that trains another
model than the classifier (``acl``: encoder + projection head) overrides :meth:`Objective.prepare_model`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import RunConfig
from ..core.registry import Registry

if TYPE_CHECKING:
    from .reuse import PerturbationStore


@dataclass
class ObjectiveContext:
    model: Callable[[torch.Tensor], torch.Tensor]  # training forward (the DeepSpeed engine)
    module: nn.Module  # the bare model: attacks outside ``attack_phase``, GradAlign's and AWP's train-mode forwards
    cfg: RunConfig
    generator: torch.Generator  # this rank's attack randomness
    step: int = 0  # global optimizer step, for schedules inside objectives
    total_steps: int = 0  # steps of the whole run (epochs x steps per epoch), for attack.steps_schedule
    index: torch.Tensor | None = None  # data-set positions of the batch's examples, when the loader yields them
    perturbations: PerturbationStore | None = None  # attack.reuse: this rank's stored perturbations
    steps_per_epoch: int = 0  # training steps (batches) per epoch, for attack.eps_warmup_epochs
    # attack.zero3_gather: a copy of the full weights, gathered on entry and freed on exit (runtime.replica)
    gather: Callable[[], ContextManager[nn.Module]] | None = None
    gathered: nn.Module | None = None  # that copy while an attack_phase holds it

    @property
    def attack_module(self) -> nn.Module:
        """What attacks run on (eval mode, input gradients only): the gathered copy inside an ``attack_phase`` that
        gathered one, else ``module``."""
        return self.gathered if self.gathered is not None else self.module


@contextlib.contextmanager
def attack_phase(ctx: ObjectiveContext) -> Iterator[None]:
    """The part of a step before the training forward in which the objective attacks (and takes eval-mode targets).

    Under ZeRO-3 with gathered attacks (``ctx.gather``) the weights are gathered once on entry -- one all-gather
    instead of one or two per attack step -- and ``ctx.attack_module`` is that copy until the exit frees it, before the
    training forward needs the memory. Elsewhere, and nested in another phase, it does nothing.
    """
    if ctx.gather is None or ctx.gathered is not None:
        yield
        return
    with ctx.gather() as copy:
        ctx.gathered = copy
        try:
            yield
        finally:
            ctx.gathered = None


@dataclass
class ObjectiveOutput:
    """What one step of an objective produced. Every tensor stays on the device: the loop reads them
    at log time only, so a step never waits for the accelerator."""

    loss: torch.Tensor  # scalar, what engine.backward gets
    logits: torch.Tensor | None = None  # predictions on what it trained on (for the running train accuracy)
    targets: torch.Tensor | None = None  # what ``logits`` should predict; None: the batch labels
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars, averaged and logged at log time


class Objective:
    """Base class; subclasses implement ``__call__``. ``replays`` > 1 feeds each batch several times."""

    replays: int = 1
    needs_labels: bool = True
    # Its attacks run in an ``attack_phase`` on ``ctx.attack_module``, apart from the training pass: ZeRO-3 may
    # gather their weights once per step (attack.zero3_gather; ``core.names.GATHER_OBJECTIVES`` lists these).
    gathers_attacks: bool = False

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    @staticmethod
    def prepare_model(cfg: RunConfig, spec, model: nn.Module) -> nn.Module:
        """The model this objective trains, given the classifier built from ``cfg.model``: the classifier itself."""
        return model

    def __call__(self, ctx: ObjectiveContext, x: torch.Tensor, y: torch.Tensor) -> ObjectiveOutput:
        raise NotImplementedError

    def after_backward(self) -> None:
        """Runs between ``engine.backward`` and ``engine.step`` of every step that is taken (Free-AT reads the
        input gradient here). Not called for a step that ``train.nan_policy=skip`` drops."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class AdversarialBatch:
    """What a :class:`SplitObjective`'s attack made of a batch: everything its loss needs but the weights."""

    x: torch.Tensor  # the clean inputs the loss trains on (two views or CutMix-mixed where the objective does that)
    y: torch.Tensor  # their labels
    x_adv: torch.Tensor | None  # the attack's result; None where the objective runs no attack (trades, beta = 0)
    soft: torch.Tensor | None = None  # soft labels (CutMix), else None


class SplitObjective(Objective):
    """An objective whose step is ``loss(ctx, model, adversarial_batch(ctx, x, y))``.

    The split lets a wrapper take the loss again at other weights without a second attack: AWP
    (``objectives/awp.py``) evaluates it on the bare module to find its weight perturbation, then through the
    engine at the perturbed weights. ``model`` is the forward the loss uses (``ctx.model`` when training);
    everything random or attack-made happens in ``adversarial_batch``.
    """

    def adversarial_batch(self, ctx: ObjectiveContext, x: torch.Tensor, y: torch.Tensor) -> AdversarialBatch:
        raise NotImplementedError

    def loss(self, ctx: ObjectiveContext, model: Callable[[torch.Tensor], torch.Tensor],
             batch: AdversarialBatch) -> ObjectiveOutput:
        raise NotImplementedError

    def __call__(self, ctx: ObjectiveContext, x: torch.Tensor, y: torch.Tensor) -> ObjectiveOutput:
        return self.loss(ctx, ctx.model, self.adversarial_batch(ctx, x, y))


def supervised_ce(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0,
                  reduction: str = "mean") -> torch.Tensor:
    """The cross-entropy every supervised objective trains on, with ``objective.label_smoothing``.

    One place for every training CE term (madry/dat clean and adversarial, trades' natural term, mart's CE,
    free, clean), so a smoothed run smooths them all. The attacks' inner maximisation keeps plain CE
    (``attacks.ce_loss``), as DM-Improves-AT and Gowal et al. do. ``label_smoothing=0`` is plain CE exactly.
    """
    return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing, reduction=reduction)


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


def plain_step(objective: Objective, ctx: ObjectiveContext, x: torch.Tensor, y: torch.Tensor,
               optimizer: torch.optim.Optimizer, model: nn.Module) -> ObjectiveOutput:
    """One step of ``objective`` in a plain PyTorch loop (no DeepSpeed engine): the contract ``train_one_epoch``
    keeps with its engine -- the objective (attack and loss), backward, ``after_backward`` (AWP restores its
    weights), optimizer step. For your own loop, and for ``bench`` arms that compare with the engine."""
    model.train()
    out = objective(ctx, x, y)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    objective.after_backward()
    optimizer.step()
    return out
