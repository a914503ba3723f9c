"""``train.save_on_signal``: on a signal of ``train.stop_signals``, end the step in progress, save if it fits, stop.

While the trainer runs with this callback, the signal handlers only record the signal (``core.stop``).
After every step (and after every epoch end) the ranks agree, in one all-reduce of three numbers on a
CPU (gloo) group, whether any of them got one, how long ago the first came and how long this run's last
save took. If one did, they all stop after the same step: they write a final checkpoint (an ordinary,
atomically committed save: tag ``step<N>``) when it fits in the grace period the launcher leaves before
its SIGKILL, and raise ``core.stop.Stopped``. A save that would not fit is not started; one that is
killed all the same leaves only a ``.tmp-*`` folder, never a committed tag (the command removes it).

Cost: one small CPU all-reduce per step (no device sync), only with ``train.save_on_signal=true``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from ..core import dist, stop
from .callbacks import Callback, TrainerView

if TYPE_CHECKING:
    from .loop import TrainState

log = logging.getLogger(__name__)

SAFETY = 1.5  # a save may take this much longer than the last one did
EXIT_MARGIN_S = 3.0  # after the save: leaving the process group, exit, the command's clean-up


def save_fits(elapsed_s: float, last_save_s: float | None, grace_s: float) -> bool:
    """Can a final save that starts ``elapsed_s`` after the signal end before the grace is over?

    ``last_save_s``: how long the run's last save took (None: none yet in this process; then it is
    tried, since a save cut short leaves no committed checkpoint behind)."""
    if last_save_s is None:
        return elapsed_s + EXIT_MARGIN_S <= grace_s
    return elapsed_s + SAFETY * last_save_s + EXIT_MARGIN_S <= grace_s


class SignalStop(Callback):
    """The callback; built on every rank alike (it may create a gloo group: collective)."""

    def __init__(self, grace_s: float | None = None):
        self.grace_s = stop.grace_s() if grace_s is None else grace_s
        self.group = None
        if dist.world_size() > 1:
            import torch.distributed as tdist

            if tdist.get_backend() != "gloo":  # NCCL & co.: agree on host tensors, without a device sync
                self.group = tdist.new_group(backend="gloo")

    def on_step(self, trainer: TrainerView, state: TrainState) -> None:
        # the epoch's last step: checked after its end; under gradient accumulation only on optimizer steps,
        # where a final checkpoint resumes exactly (the stop waits at most the accumulation's other batches)
        if state.step_in_epoch < trainer.steps_per_epoch and state.global_step % trainer.accumulation_unit == 0:
            self.check(trainer)

    def _agree(self, trainer: TrainerView) -> tuple[int, float, float | None]:
        got = stop.received()
        last = trainer.last_save_seconds
        flags = torch.tensor([got[0] if got else 0, time.monotonic() - got[1] if got else 0.0,
                              -1.0 if last is None else last], dtype=torch.float64)
        if dist.world_size() > 1:
            import torch.distributed as tdist

            tdist.all_reduce(flags, op=tdist.ReduceOp.MAX, group=self.group)
        signum, elapsed, last_save = flags.tolist()
        return int(signum), elapsed, None if last_save < 0 else last_save

    def check(self, trainer: TrainerView) -> None:
        """Collective. If any rank got a signal: the final save when it fits, then ``Stopped`` on every rank."""
        signum, elapsed, last_save = self._agree(trainer)
        if not signum:
            return
        state = trainer.state
        where = f"epoch {state.epoch + 1} step {state.step_in_epoch} (global step {state.global_step})"
        if trainer.last_saved_step == state.global_step:
            log.warning("signal %d: stopped after %s, which is checkpointed already", signum, where)
        elif save_fits(elapsed, last_save, self.grace_s):
            t0 = time.monotonic()
            path = trainer.save(end_of_epoch=False)
            log.warning("signal %d: stopped after %s; final checkpoint %s written in %.1fs (%.1fs after the signal)",
                        signum, where, path.name, time.monotonic() - t0, elapsed + time.monotonic() - t0)
        else:
            log.warning("signal %d: stopped after %s without a final checkpoint: %.1fs after the signal, a save "
                        "(last one %.1fs) would not end within the %.0fs grace period", signum, where, elapsed,
                        last_save or 0.0, self.grace_s)
        raise stop.Stopped(signum)
