"""Hooks into a training run: what happens around the loop without editing it.

The trainer calls, on every rank and in order, ``on_step(trainer, state)`` after each training step
and ``on_epoch_end(trainer, state, row)`` after each epoch, before the row is logged and the epoch's
checkpoint is saved; ``row`` is the epoch's metrics dict, and a callback may add fields to it. An
``on_step`` ends the run cleanly by raising :class:`StopTraining`. Callbacks that need layers above this
one (per-epoch evaluation, the catastrophic-overfitting monitor) live there and are composed by
``dat_ds.evaluation.training.run_training``. The weight EMA (``runtime.ema.WeightEMA``, config ``ema``) is
one too: the trainer builds it with the engine and runs it first, so the others see the step's average.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from .ema import WeightEMA
    from .loop import TrainState


class StopTraining(Exception):
    """Raised by a callback (e.g. the catastrophic-overfitting monitor) to end training cleanly."""


class TrainerView(Protocol):
    """What callbacks use of the run (``runtime.trainer.Trainer`` is one), and nothing more."""

    # Read-only: a callback reads these and never sets them (the trainer's come from its BuiltRun).
    @property
    def engine(self) -> Any: ...  # deepspeed.DeepSpeedEngine: its module, and load_checkpoint for a rollback

    @property
    def ema(self) -> WeightEMA | None: ...

    @property
    def state(self) -> TrainState: ...

    @property
    def steps_per_epoch(self) -> int: ...

    @property
    def accumulation_unit(self) -> int: ...

    @property
    def ckpt_root(self) -> Path: ...

    @property
    def val_set(self) -> Any: ...

    @property
    def last_save_seconds(self) -> float | None: ...

    @property
    def last_saved_step(self) -> int | None: ...

    def save(self, end_of_epoch: bool, best: bool = False) -> Path: ...

    def eval_module(self) -> torch.nn.Module: ...

    def reload_ema(self, root: Path, tag: str, client: dict[str, Any] | None) -> None: ...

    def write(self, record: dict[str, Any]) -> None: ...


class Callback:
    """A hook into the run; both hooks do nothing unless a subclass says otherwise."""

    def on_step(self, trainer: TrainerView, state: TrainState) -> None:
        """After every training step (``state.global_step`` counts it already)."""

    def on_epoch_end(self, trainer: TrainerView, state: TrainState, row: dict[str, Any]) -> None:
        """After every epoch, before ``row`` is logged and the epoch's checkpoint is written."""


class Checkpointing(Callback):
    """Mid-epoch checkpoints every ``every_steps`` global steps (0: none); the trainer saves at epoch ends.

    A step that closes its epoch is left to the epoch-end save, which also holds the epoch's evaluation.
    """

    def __init__(self, every_steps: int):
        self.every = every_steps

    def on_step(self, trainer: TrainerView, state: TrainState) -> None:
        if self.every and state.global_step % self.every == 0 and state.step_in_epoch < trainer.steps_per_epoch:
            trainer.save(end_of_epoch=False)
