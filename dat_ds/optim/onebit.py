"""1-bit Adam, 0/1 Adam and 1-bit LAMB on ``torch.distributed`` (gloo or NCCL), CPU or GPU.

DeepSpeed shipped these CUDA-only (cupy + NCCL/MPI) and removed them in 0.19. Ours read the same
JSON parameters as DeepSpeed 0.18, keep the maths here and leave the transport to
``dat_ds.comm`` (compressed all-reduce with worker + server error feedback).

They average gradients themselves: the trainer switches DeepSpeed's gradient all-reduce off
(``engine.enable_backward_allreduce = False``) for every optimizer registered with
``compresses=True``; ``param.grad`` is the *local* gradient when ``step()`` runs. With
``gradient_accumulation_steps`` > 1 DeepSpeed divides each micro-batch's loss by the accumulation
count, lets the gradients add up in ``param.grad`` and calls ``step()`` only at the accumulation
boundary: ``param.grad`` is then this rank's mean over its micro-batches, each step communicates
once, and every counter here (``freeze_step``, ``var_freeze_step``, local steps, ``compressed_steps``,
the byte meter) counts optimizer steps, as :class:`dat_ds.optim.schedule.StepPlan` does.

* ``OneBitAdam`` (Tang et al., ICML 2021): Adam with an fp32 gradient all-reduce for ``freeze_step``
  steps, then the variance is frozen and only the momentum is communicated, 1 bit per element.
* ``ZeroOneAdam`` (Lu et al., ICLR 2023): the variance is refreshed (fp32 gradient average) at
  intervals that double every ``var_update_scaler`` refreshes and never after ``var_freeze_step``;
  the other steps synchronise the 1-bit compressed *update* and rebuild the momentum from it; after
  ``var_freeze_step`` ranks take local steps between synchronisations, the interval doubling every
  ``local_step_scaler`` steps up to ``local_step_clipper``.
* ``OneBitLamb`` (Li et al., HiPC 2022): LAMB with fp32 all-reduce during warm-up while tracking an
  EMA (``coeff_beta``) of each layer's trust ratio clipped to [``min_coeff``, ``max_coeff``]; then the
  1-bit momentum is communicated (per-layer rescaled so one scale fits all) and each layer moves by
  its frozen coefficient times a factor (fresh vs frozen variance) kept in [``factor_min``,
  ``factor_max``] and changing by at most ``factor_threshold`` per step.

Adam's bias corrections are kept (the warm-up stage equals ``torch.optim.AdamW``); weight decay is
decoupled, as in DeepSpeed's versions.

On one rank there is nothing to communicate, and the lossy 1-bit stage would only move the result away
from the algorithm it approximates (8-19 % in parameters after 300 steps): at world size 1 compression
is skipped, as DeepSpeed did, and each optimizer runs as its uncompressed algorithm (``uncompressed``):
1-bit Adam and 0/1 Adam as Adam (``torch.optim.AdamW``), 1-bit LAMB as its LAMB warm-up stage, for
every step. ``compress_single_rank=True`` keeps the compressed maths on one process (for its tests). Each is a ``dat_ds.comm.CommunicatingOptimizer``: it reports
``comm_stats()``, says what it compresses (``label``, ``scheme``, ``warmup_steps``) and hands its per-rank
state (error feedback, 0/1 Adam's local steps) to the checkpoint through ``rank_local_state()``; the
error-feedback buffers, step counters and byte counts also live in ``state_dict()["comm"]``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..comm.allreduce import compressed_allreduce, error_buffers
from ..comm.backend import ByteMeter, TorchBackend
from ..comm.compressors import SignCompressor
from ..comm.protocol import SKIPPED_NOTE, CommunicatingOptimizer
from ..core.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_BLOCK = 256  # elements per 1-bit scale: 32 sign bytes + 4 scale bytes -> 28x less than fp32


class CompressedOptimizer(torch.optim.Optimizer):
    """Shared plumbing: lazy comm backend, flat views of all parameters, stats and checkpoint state.

    Subclasses implement :class:`~dat_ds.comm.protocol.CommunicatingOptimizer`: ``label``, ``scheme``,
    ``warmup_steps`` here, ``comm_stats`` / ``rank_local_state`` / ``load_rank_local_state`` below.
    """

    label = "compressed optimizer"
    scheme = "1-bit compressed communication"
    uncompressed = "Adam"  # the algorithm it approximates, and runs as at world size 1

    @property
    def warmup_steps(self) -> int:
        """Steps of fp32 communication before the first compressed one (from the configuration)."""
        raise NotImplementedError

    def __init__(self, params, defaults: dict[str, Any], *, cuda_aware: bool = False, comm_backend_name: str = "nccl",
                 process_group=None, block: int = DEFAULT_BLOCK, compress_single_rank: bool = False):
        for key in ("lr", "eps"):
            if defaults[key] <= 0:
                raise ConfigError(f"{self.label}: {key}={defaults[key]} must be > 0")
        b1, b2 = defaults["betas"]
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ConfigError(f"{self.label}: betas={defaults['betas']} must lie in [0, 1)")
        super().__init__(params, defaults)
        self.cuda_aware = cuda_aware  # accepted for DeepSpeed 0.18 JSONs; torch.distributed decides itself
        self.comm_backend_name = comm_backend_name
        self.process_group = process_group
        self.compress_single_rank = compress_single_rank
        self.compressor = SignCompressor(block=block)
        self.meter = ByteMeter()
        self._backend: TorchBackend | None = None
        self.global_step = 0
        self.stage = "warmup"
        self.compressed_steps = 0  # steps that used the 1-bit all-reduce
        self.local_steps = 0  # steps with no communication at all (0/1 Adam)
        self.worker_error: torch.Tensor | None = None
        self.server_error: torch.Tensor | None = None
        self._loaded_errors: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ plumbing
    @property
    def backend(self) -> TorchBackend:
        if self._backend is None:  # built at the first step: torch.distributed is up by then
            self._backend = TorchBackend(self.process_group, name=self.comm_backend_name, meter=self.meter)
        return self._backend

    @property
    def skips_compression(self) -> bool:
        """World size 1: nothing to communicate, so every step is the uncompressed algorithm's."""
        return self.backend.world == 1 and not self.compress_single_rank

    def _rank_world(self) -> tuple[int, int]:
        if self._backend is not None:
            return self._backend.rank, self._backend.world
        from ..core import dist

        return dist.rank(), dist.world_size()

    def _begin_step(self, closure):
        """The prologue of every step: evaluate the closure, start the byte meter, advance the step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.meter.start_step()
        self.global_step += 1
        return loss, self.global_step, self._params()

    def _params(self) -> list[tuple[dict, torch.nn.Parameter]]:
        return [(g, p) for g in self.param_groups for p in g["params"]]

    def _numel(self) -> int:
        return sum(p.numel() for _, p in self._params())

    def _grad(self, p: torch.nn.Parameter) -> torch.Tensor:
        return p.grad.detach().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)

    def _averaged_grads(self) -> list[torch.Tensor]:
        """fp32 all-reduce of every gradient (one flat buffer), the uncompressed path."""
        params = self._params()
        flat = torch.cat([self._grad(p).reshape(-1) for _, p in params])
        self.backend.all_reduce_mean_(flat)
        return [g.view_as(p) for g, (_, p) in zip(torch.split(flat, [p.numel() for _, p in params]), params)]

    def _compressed_average(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """1-bit all-reduce with worker and server error feedback of one flat buffer of ``tensors``."""
        backend = self.backend
        if self.worker_error is None:
            self.worker_error, self.server_error = error_buffers(self._numel(), backend.world, self.compressor.block,
                                                                 device=tensors[0].device)
            if self._loaded_errors is not None and self._loaded_errors["worker"].shape == self.worker_error.shape:
                self.worker_error.copy_(self._loaded_errors["worker"])
                self.server_error.copy_(self._loaded_errors["server"])
            self._loaded_errors = None
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        out = compressed_allreduce(flat, self.compressor, backend, self.worker_error, self.server_error)
        self.compressed_steps += 1
        if self.stage != "compressed":
            self.stage = "compressed"
            log.info("%s: compression stage engaged at step %d on %d rank(s); this step sent %d bytes vs %d for "
                     "an fp32 all-reduce (%.1fx less)", self.label, self.global_step, backend.world,
                     self.meter.step_bytes_sent, self.meter.step_bytes_fp32_equiv,
                     self.meter.step_bytes_fp32_equiv / max(1, self.meter.step_bytes_sent))
        return [o.view_as(t) for o, t in zip(torch.split(out, [t.numel() for t in tensors]), tensors)]

    # ------------------------------------------------------------------ reporting
    def comm_stats(self) -> dict[str, Any]:
        """Stage, bytes this rank sent (cumulative and last step) and the fp32 all-reduce equivalent."""
        world = self.backend.world
        stats: dict[str, Any] = {"stage": "skipped" if self.skips_compression else self.stage, "world_size": world,
                                 **self.meter.as_dict(), "compressed_steps": self.compressed_steps,
                                 "local_steps": self.local_steps}
        if world == 1:
            stats["note"] = SKIPPED_NOTE if self.skips_compression else "world size 1: nothing to communicate"
        return stats

    # ------------------------------------------------------------------ checkpoints
    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _error_state(self) -> dict[str, Any]:
        """This rank's error-feedback residuals (also those loaded but not yet used), tagged with the rank."""
        rank, world = self._rank_world()
        worker, server = self.worker_error, self.server_error
        if worker is None and self._loaded_errors is not None:  # resumed, not yet stepped
            worker, server = self._loaded_errors["worker"], self._loaded_errors["server"]
        return {"rank": rank, "world": world,
                "worker_error": None if worker is None else worker.detach().clone(),
                "server_error": None if server is None else server.detach().clone()}

    def _adopt_errors(self, state: dict[str, Any]) -> bool:
        """Take the residuals of an :meth:`_error_state` if this rank saved them; False if another did."""
        self.worker_error = self.server_error = self._loaded_errors = None
        if (state["rank"], state["world"]) != self._rank_world():
            return False
        if state["worker_error"] is not None:  # installed at the first compressed step
            self._loaded_errors = {"worker": state["worker_error"], "server": state["server_error"]}
        return True

    def rank_local_state(self) -> dict[str, Any]:
        """This rank's own state: DeepSpeed (ZeRO 0) saves rank 0's optimizer state for every rank.

        The error-feedback residuals differ per rank; ``dat_ds.engine.checkpoint`` writes this into the
        rank's own file, so a resumed run continues each rank's residuals exactly.
        """
        return self._error_state()

    def load_rank_local_state(self, state: dict[str, Any]) -> bool:
        """Restore :meth:`rank_local_state`, after DeepSpeed loaded rank 0's optimizer state.

        Returns whether the state was this rank's (another world size restarts error feedback from zero).
        """
        if self._adopt_errors(state):
            return True
        log.warning("%s: the checkpoint's per-rank state is from rank %d of %d, this is rank %d of %d; "
                    "error feedback restarts from zero", self.label, state["rank"], state["world"],
                    *self._rank_world())
        return False

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["comm"] = {
            "global_step": self.global_step,
            "stage": self.stage, "compressed_steps": self.compressed_steps, "local_steps": self.local_steps,
            "meter": self.meter.state_dict(), **self._error_state(), **self._extra_state(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        comm = state_dict.pop("comm", None)
        super().load_state_dict(state_dict)
        if comm is None:
            return
        self.global_step = comm["global_step"]
        self.stage = comm["stage"]
        self.compressed_steps = comm["compressed_steps"]
        self.local_steps = comm["local_steps"]
        self.meter.load_state_dict(comm["meter"])
        self._load_extra_state(comm)
        # Error feedback is per rank, and DeepSpeed (ZeRO 0) hands every rank rank 0's optimizer state:
        # keep the residuals only if they are this rank's. The checkpoint's per-rank files restore the
        # others' (load_rank_local_state, called after this).
        self._adopt_errors(comm)


VARIANCE_FLOOR = 1e-2  # frozen v is clamped below at this fraction of its layer's mean (see frozen_denom)


def frozen_denom(v: torch.Tensor, bias_correction: float, eps: float) -> torch.Tensor:
    """``sqrt(v_hat) + eps`` for a variance that stops tracking the gradient.

    Adam normalises each step by a variance that keeps up with the gradient; a frozen one does not, so a
    coordinate whose gradient was ~0 during warm-up (a ReLU unit that was dead then) would later move by
    ``g / eps``. Clamping ``v_hat`` below at ``VARIANCE_FLOOR`` x the layer's mean bounds such a step to
    about 10x the layer's typical one (without it, 1-bit Adam diverged on our CNN within a few steps).
    """
    v_hat = v / bias_correction
    return v_hat.clamp_min(VARIANCE_FLOOR * v_hat.mean()).sqrt_().add_(eps)


def _adam_moments(state: dict, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
    return state["exp_avg"], state["exp_avg_sq"]


class OneBitAdam(CompressedOptimizer):
    label = "1-bit Adam"
    scheme = "1-bit compressed momentum"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 freeze_step: int = 100000, cuda_aware: bool = False, comm_backend_name: str = "nccl", **runtime):
        if not isinstance(freeze_step, int) or freeze_step < 1:
            raise ConfigError(f"1-bit Adam freeze_step={freeze_step!r} must be an integer >= 1 (the variance is "
                              "estimated during the warm-up; 15-25% of the steps is typical)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay),
                         cuda_aware=cuda_aware, comm_backend_name=comm_backend_name, **runtime)
        self.freeze_step = freeze_step

    @property
    def warmup_steps(self) -> int:
        return self.freeze_step

    @torch.no_grad()
    def step(self, closure=None):
        loss, t, params = self._begin_step(closure)
        compress = t > self.freeze_step and not self.skips_compression
        if not compress:
            for (group, p), g in zip(params, self._averaged_grads()):
                b1, b2 = group["betas"]
                m, v = _adam_moments(self.state[p], p)
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
        var_steps = self.freeze_step if compress else t  # the variance stops changing at freeze_step
        denoms = []
        for group, p in params:
            _, v = _adam_moments(self.state[p], p)
            bc2 = 1 - group["betas"][1] ** max(1, var_steps)
            denoms.append(frozen_denom(v, bc2, group["eps"]) if compress else (v / bc2).sqrt_().add_(group["eps"]))
        if compress:
            preconditioned = []
            for (group, p), denom in zip(params, denoms):
                b1 = group["betas"][0]
                m, _ = _adam_moments(self.state[p], p)
                m.mul_(b1).add_(self._grad(p), alpha=1 - b1)  # local momentum, then averaged in 1 bit
                preconditioned.append(m / denom)
            # The frozen variance is identical on every rank, so averaging m / denom is averaging m; in
            # these coordinates the 1-bit error can never be amplified by a near-zero variance.
            for (_, p), denom, avg in zip(params, denoms, self._compressed_average(preconditioned)):
                self.state[p]["exp_avg"].copy_(avg * denom)
        for (group, p), denom in zip(params, denoms):
            b1 = group["betas"][0]
            m, _ = _adam_moments(self.state[p], p)
            update = m / (1 - b1 ** t) / denom
            if group["weight_decay"]:
                update.add_(p, alpha=group["weight_decay"])
            p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss

    def _extra_state(self):
        return {"freeze_step": self.freeze_step}


class ZeroOneAdam(CompressedOptimizer):
    label = "0/1 Adam"
    scheme = "1-bit compressed updates (fp32 variance refreshes until var_freeze_step, then local steps)"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 var_freeze_step: int = 100000, var_update_scaler: int = 16, local_step_scaler: int = 32678,
                 local_step_clipper: int = 16, cuda_aware: bool = False, comm_backend_name: str = "nccl", **runtime):
        for name, value in (("var_freeze_step", var_freeze_step), ("var_update_scaler", var_update_scaler),
                            ("local_step_scaler", local_step_scaler), ("local_step_clipper", local_step_clipper)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"0/1 Adam {name}={value!r} must be a positive integer")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay),
                         cuda_aware=cuda_aware, comm_backend_name=comm_backend_name, **runtime)
        self.var_freeze_step = var_freeze_step
        self.var_update_scaler = var_update_scaler
        self.local_step_scaler = local_step_scaler
        self.local_step_clipper = local_step_clipper
        self.var_interval = 1  # steps between variance refreshes; doubles every var_update_scaler refreshes
        self.var_refreshes_at_interval = 0
        self.var_updates = 0
        self.next_var_step = 1
        self.local_interval = 1  # steps between synchronisations once the variance is frozen
        self.next_sync_step = 1

    @property
    def warmup_steps(self) -> int:
        # Every step refreshes the variance (fp32) until the refresh interval first doubles, after
        # var_update_scaler refreshes; the step after that is the first 1-bit synchronisation.
        return min(self.var_update_scaler, self.var_freeze_step)

    def _state(self, p):
        st = self.state[p]
        m, v = _adam_moments(st, p)
        if "anchor" not in st:
            st["anchor"] = p.detach().float().clone()  # parameters at the last synchronisation
            st["update_acc"] = torch.zeros_like(p, dtype=torch.float32)  # decayed sum of lr * update since then
            st["decay_acc"] = torch.ones((), dtype=torch.float32)  # product of (1 - lr wd) since then
            st["lr_acc"] = 0.0  # sum of the learning rates since then
        return st, m, v

    def _denom(self, group, v):
        # The variance lags between refreshes: floor it like a frozen one.
        return frozen_denom(v, 1 - group["betas"][1] ** max(1, self.var_updates), group["eps"])

    def _adam_step(self, params, t: int) -> None:
        """Plain Adam (decoupled weight decay, ``torch.optim.AdamW``): the algorithm 0/1 Adam approximates."""
        for group, p in params:
            b1, b2 = group["betas"]
            g = self._grad(p)
            m, v = _adam_moments(self.state[p], p)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / (1 - b2 ** t)).sqrt_().add_(group["eps"])
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_((m / (1 - b1 ** t) / denom).to(p.dtype), alpha=-group["lr"])

    @torch.no_grad()
    def step(self, closure=None):
        loss, t, params = self._begin_step(closure)
        if self.skips_compression:  # no variance freeze, no local steps: nothing to save on one rank
            self._adam_step(params, t)
            return loss
        refresh_variance = t <= self.var_freeze_step and t >= self.next_var_step
        if refresh_variance:
            # Everything is in sync here (local steps only start after var_freeze_step): fp32 gradient
            # average, fresh variance, plain Adam step, and the new parameters become the anchor.
            for (group, p), g in zip(params, self._averaged_grads()):
                st, m, v = self._state(p)
                b1, b2 = group["betas"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
            self.var_updates += 1
            self.var_refreshes_at_interval += 1
            if self.var_refreshes_at_interval >= self.var_update_scaler:
                self.var_interval *= 2
                self.var_refreshes_at_interval = 0
            self.next_var_step = t + self.var_interval
            for group, p in params:
                st, m, v = self._state(p)
                update = m / (1 - group["betas"][0] ** t) / self._denom(group, v)
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update.to(p.dtype), alpha=-group["lr"])
                st["anchor"].copy_(p)
            self.next_sync_step = max(self.next_sync_step, t + 1)
            return loss
        # Local Adam step on the local gradient with the (shared) variance; remember what it moved.
        for group, p in params:
            st, m, v = self._state(p)
            b1 = group["betas"][0]
            m.mul_(b1).add_(self._grad(p), alpha=1 - b1)
            update = m / (1 - b1 ** t) / self._denom(group, v)
            decay = 1 - group["lr"] * group["weight_decay"]
            st["update_acc"].mul_(decay).add_(update, alpha=group["lr"])
            st["decay_acc"].mul_(decay)
            st["lr_acc"] += group["lr"]
            p.mul_(decay).add_(update.to(p.dtype), alpha=-group["lr"])
        if t < self.next_sync_step:
            self.local_steps += 1
            self.backend.account_reference(self._numel())  # plain data parallel would all-reduce here
            return loss
        # Synchronise: 1-bit average of the accumulated updates; every rank lands on the same point.
        accs = [self.state[p]["update_acc"] for _, p in params]
        averaged = self._compressed_average(accs)
        for (group, p), avg in zip(params, averaged):
            st, m, v = self._state(p)
            lr_sum = max(st["lr_acc"], 1e-12)
            avg = avg.view_as(p)
            p.copy_((st["anchor"] * st["decay_acc"] - avg).to(p.dtype))
            st["anchor"].copy_(p)
            # The momentum that would have produced the averaged update (0/1 Adam's momentum rebuild).
            m.copy_(avg / lr_sum * self._denom(group, v) * (1 - group["betas"][0] ** t))
            st["update_acc"].zero_()
            st["decay_acc"].fill_(1.0)
            st["lr_acc"] = 0.0
        if t > self.var_freeze_step:
            # Local-step interval doubles every local_step_scaler steps past the freeze, clipped.
            doublings = (t - self.var_freeze_step) // self.local_step_scaler
            self.local_interval = min(self.local_step_clipper, 2 ** min(doublings, 30))
        self.next_sync_step = t + self.local_interval
        return loss

    def comm_stats(self) -> dict[str, Any]:
        stats = super().comm_stats()
        stats.update(var_updates=self.var_updates, var_frozen=int(self.global_step > self.var_freeze_step),
                     local_interval=self.local_interval)
        return stats

    _COUNTERS = ("var_interval", "var_refreshes_at_interval", "var_updates", "next_var_step", "local_interval",
                 "next_sync_step")

    def _extra_state(self):
        return {k: getattr(self, k) for k in self._COUNTERS}

    def _load_extra_state(self, state):
        for k in self._COUNTERS:
            if k in state:
                setattr(self, k, state[k])

    _LOCAL = ("exp_avg", "update_acc", "decay_acc")  # what local steps change on each rank on its own

    def rank_local_state(self) -> dict[str, Any]:
        """Also, between synchronisations, this rank's parameters and the momentum and update sums of its
        local steps (they differ per rank until the next 1-bit average)."""
        out = super().rank_local_state()
        params = self._params()
        if any(self.state[p].get("lr_acc", 0.0) > 0 for _, p in params):
            out["local"] = [{"param": p.detach().clone(), "lr_acc": float(self.state[p]["lr_acc"]),
                             **{k: self.state[p][k].clone() for k in self._LOCAL}} for _, p in params]
        return out

    @torch.no_grad()
    def load_rank_local_state(self, state: dict[str, Any]) -> bool:
        adopted = super().load_rank_local_state(state)
        local = state.get("local")
        if not adopted or local is None:
            return adopted
        params = self._params()
        if len(local) != len(params) or any(e["param"].shape != p.shape for e, (_, p) in zip(local, params)):
            raise ConfigError("0/1 Adam: the checkpoint's per-rank state does not fit this model; resume with the "
                              "model it was saved with")
        for entry, (_, p) in zip(local, params):
            st, _, _ = self._state(p)
            p.copy_(entry["param"])
            for k in self._LOCAL:
                st[k].copy_(entry[k])
            st["lr_acc"] = entry["lr_acc"]
        return True


def _clamp(x: torch.Tensor, low, high) -> torch.Tensor:
    """``min(max(x, low), high)`` element-wise, as Python evaluates it, on the device.

    ``torch.clamp`` agrees except where a *bound* is NaN (it returns NaN, Python returns x); the bounds here
    may be tensors (1-bit LAMB's factor band around the previous factor).
    """
    x = torch.where(low > x, low, x)
    return torch.where(high < x, high, x)


def _stack_scalars(values: list, device: torch.device) -> torch.Tensor:
    """Per-tensor scalars as one float64 vector on ``device``: 0-d device tensors, or the Python floats a
    checkpoint holds (filled on the device: no host-to-device copy, which would wait for the stream)."""
    return torch.stack([v if isinstance(v, torch.Tensor) else torch.full((), v, dtype=torch.float64, device=device)
                        for v in values])


def _add_scaled_(p: torch.Tensor, update: torch.Tensor, alpha64: torch.Tensor, alpha32: torch.Tensor) -> None:
    """``p.add_(update.to(p.dtype), alpha=a)`` for an ``a`` that stays on the device (0-d, in float64 and
    float32): ``addcmul_`` by ``a`` in p's compute precision rounds as ``add_`` with a Python ``a`` does, bit
    for bit for float32 and float64 parameters."""
    if p.dtype == torch.float64:
        p.addcmul_(update.to(p.dtype), alpha64)
    elif p.dtype == torch.float32:
        p.addcmul_(update, alpha32)
    else:  # fp16/bf16: a 0-d float32 factor would be rounded to p's dtype first; compute in float32
        p.copy_(p.float().addcmul_(update.to(p.dtype).float(), alpha32))


class OneBitLamb(CompressedOptimizer):
    label = "1-bit LAMB"
    scheme = "1-bit compressed momentum"
    uncompressed = "LAMB"

    # Per-tensor scalars kept on the device between steps (0-d float64 tensors): reading them on the host
    # would stall a GPU once per tensor per step. A checkpoint holds them as Python floats (state_dict).
    DEVICE_SCALARS = ("lamb_coeff_freeze", "last_factor")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 freeze_step: int = 100000, max_coeff: float = 10.0, min_coeff: float = 0.01,
                 coeff_beta: float = 0.9, factor_max: float = 4.0, factor_min: float = 0.5,
                 factor_threshold: float = 0.1, cuda_aware: bool = False, comm_backend_name: str = "nccl", **runtime):
        if not 0 < min_coeff <= max_coeff:
            raise ConfigError(f"1-bit LAMB needs 0 < min_coeff <= max_coeff (got {min_coeff}, {max_coeff})")
        if not 0 < factor_min <= 1 <= factor_max:
            raise ConfigError(f"1-bit LAMB needs 0 < factor_min <= 1 <= factor_max (got {factor_min}, {factor_max})")
        if not 0 <= coeff_beta < 1 or factor_threshold < 0 or not isinstance(freeze_step, int) or freeze_step < 1:
            raise ConfigError("1-bit LAMB needs coeff_beta in [0, 1), factor_threshold >= 0 and an integer "
                              "freeze_step >= 1")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      max_coeff=max_coeff, min_coeff=min_coeff, coeff_beta=coeff_beta,
                                      factor_max=factor_max, factor_min=factor_min, factor_threshold=factor_threshold),
                         cuda_aware=cuda_aware, comm_backend_name=comm_backend_name, **runtime)
        self.freeze_step = freeze_step

    @property
    def warmup_steps(self) -> int:
        return self.freeze_step

    def _by_group(self, params: list) -> list[tuple[dict, slice]]:
        """Each non-empty group with its slice of ``params`` (``_params()`` lists them group by group)."""
        out, start = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            if n:
                out.append((group, slice(start, start + n)))
            start += n
        assert start == len(params)
        return out

    @staticmethod
    def _trust_ratios(group, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``||w|| / ||update||`` per tensor in float64 (1 where either norm is 0, or NaN), clamped to
        [min_coeff, max_coeff]."""
        w, u = w.double(), u.double()  # float32 norms, their ratio in float64 (as Python floats were)
        return _clamp(torch.where((w > 0) & (u > 0), w / u, 1.0), group["min_coeff"], group["max_coeff"])

    @torch.no_grad()
    def step(self, closure=None):
        loss, t, params = self._begin_step(closure)
        if t <= self.freeze_step or self.skips_compression:  # LAMB (fp32 gradient average); track the trust ratios
            updates, w_norms, u_norms = [], [], []  # the updates wait (one fp32 copy) for their group's ratios
            for (group, p), g in zip(params, self._averaged_grads()):
                b1, b2 = group["betas"]
                m, v = _adam_moments(self.state[p], p)
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                update = (m / (1 - b1 ** t)) / (v / (1 - b2 ** t)).sqrt().add_(group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                updates.append(update)
                w_norms.append(p.detach().float().norm())
                u_norms.append(update.norm())
            # The trust ratios of a group as one vector: a handful of kernels, no host sync.
            for group, part in self._by_group(params):
                coeffs = self._trust_ratios(group, torch.stack(w_norms[part]), torch.stack(u_norms[part]))
                prevs = [self.state[p].get("lamb_coeff_freeze") for _, p in params[part]]
                emas = coeffs.unbind()
                if any(prev is not None for prev in prevs):
                    beta = group["coeff_beta"]
                    prev = _stack_scalars([c if x is None else x for c, x in zip(emas, prevs)], coeffs.device)
                    ema = prev * beta + coeffs * (1 - beta)  # two products, then the sum: no fused multiply-add
                    emas = [c if x is None else e for c, e, x in zip(emas, ema.unbind(), prevs)]
                alphas = coeffs * -group["lr"]
                for (_, p), update, ema, a64, a32 in zip(params[part], updates[part], emas, alphas.unbind(),
                                                         alphas.float().unbind()):
                    self.state[p]["lamb_coeff_freeze"] = ema
                    _add_scaled_(p, update, a64, a32)
            return loss
        if "scaling_coeff" not in self.state[params[0][1]]:
            self._freeze(params)
        previous, preconditioned, denoms = [], [], []
        bc2s = [1 - group["betas"][1] ** self.freeze_step if self.freeze_step else 1.0 for group, _ in params]
        for (group, p), bc2 in zip(params, bc2s):
            st = self.state[p]
            m, v = _adam_moments(st, p)
            previous.append(m.clone())
            m.mul_(group["betas"][0]).add_(self._grad(p), alpha=1 - group["betas"][0])
            denoms.append(frozen_denom(v, bc2, group["eps"]))
            # Frozen variance: compress m / denom (same average, bounded error, as in 1-bit Adam), rescaled
            # per layer so that one 1-bit scale fits every layer.
            preconditioned.append(m / denoms[-1] * st["scaling_coeff"])
        averaged = self._compressed_average(preconditioned)
        variance_ratios = []
        for (group, p), m_prev, avg, denom, bc2 in zip(params, previous, averaged, denoms, bc2s):
            st = self.state[p]
            b1, b2 = group["betas"]
            m = st["exp_avg"]
            m.copy_(avg / st["scaling_coeff"] * denom)
            grad_estimate = (m - b1 * m_prev) / (1 - b1)
            fresh = st["exp_avg_sq_fresh"]
            fresh.mul_(b2).addcmul_(grad_estimate, grad_estimate, value=1 - b2)
            variance_ratios.append((denom / frozen_denom(fresh, bc2, group["eps"])).max())
        del previous, preconditioned, averaged
        device = variance_ratios[0].device
        for group, part in self._by_group(params):
            # How far the frozen variance is from a fresh estimate, bounded in size and in change per step.
            factor = _clamp(torch.stack(variance_ratios[part]).double(), group["factor_min"], group["factor_max"])
            last = _stack_scalars([self.state[p]["last_factor"] for _, p in params[part]], device)
            threshold = group["factor_threshold"]
            factor = _clamp(factor, last * (1 - threshold), last * (1 + threshold))
            coeffs = _stack_scalars([self.state[p]["lamb_coeff_freeze"] for _, p in params[part]], device)
            alphas = coeffs * -group["lr"] * factor
            for (_, p), denom, f, a64, a32 in zip(params[part], denoms[part], factor.unbind(), alphas.unbind(),
                                                  alphas.float().unbind()):
                st = self.state[p]
                b1 = group["betas"][0]
                update = st["exp_avg"] / (1 - b1 ** t) / denom
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                st["last_factor"] = f
                _add_scaled_(p, update, a64, a32)
        return loss

    def _freeze(self, params) -> None:
        """Freeze variances and trust ratios; fix each layer's momentum rescaling for the 1-bit stage.

        The rescaling is host data from here on (a Python float per tensor, as in the checkpoint): it takes
        one transfer, once per run, which also brings the coefficients this logs.
        """
        norms, numels = [], []
        for group, p in params:
            st = self.state[p]
            m, v = _adam_moments(st, p)
            st.setdefault("lamb_coeff_freeze", 1.0)
            st["exp_avg_sq_fresh"] = v.clone()
            st["last_factor"] = 1.0
            bc2 = 1 - group["betas"][1] ** self.freeze_step if self.freeze_step else 1.0
            u = m / frozen_denom(v, bc2, group["eps"])
            norms.append(u.norm().double())
            numels.append(u.numel())
        shown = [self.state[p]["lamb_coeff_freeze"] for _, p in params[:6]]
        host = torch.cat([torch.stack(norms), _stack_scalars(shown, norms[0].device)]).tolist()
        rms = [norm / math.sqrt(max(1, numel)) for norm, numel in zip(host, numels)]
        positive = [r for r in rms if r > 0]
        united = sum(positive) / len(positive) if positive else 1.0
        for (_, p), r in zip(params, rms):
            self.state[p]["scaling_coeff"] = united / r if r > 0 else 1.0
        log.info("%s: variance and trust ratios frozen at step %d (coefficients %s)", self.label, self.global_step,
                 ", ".join(f"{c:.3g}" for c in host[len(norms):]))

    def state_dict(self) -> dict[str, Any]:
        """The device scalars as Python floats, as checkpoints always held them: one transfer per save."""
        sd = super().state_dict()
        where = [(index, key) for index, st in sd["state"].items() for key in self.DEVICE_SCALARS
                 if isinstance(st.get(key), torch.Tensor)]
        if where:
            values = torch.stack([sd["state"][index][key] for index, key in where]).tolist()
            sd["state"] = {index: dict(st) for index, st in sd["state"].items()}  # self.state keeps its tensors
            for (index, key), value in zip(where, values):
                sd["state"][index][key] = value
        return sd

    def _extra_state(self):
        return {"freeze_step": self.freeze_step}


def describe_comm(comm: CommunicatingOptimizer) -> str:
    """One line for the log: stage and bytes this rank sent vs an fp32 all-reduce."""
    stats = comm.comm_stats()
    if comm.skips_compression:
        return f"{SKIPPED_NOTE}; {comm.label} ran as {comm.uncompressed}"
    if stats.get("world_size", 1) <= 1:
        return f"communication stage {stats['stage']} (world size 1: nothing sent)"
    return (f"communication stage {stats['stage']}: this rank sent {stats['bytes_sent'] / 2**20:.2f} MiB vs "
            f"{stats['bytes_fp32_equiv'] / 2**20:.2f} MiB for fp32 all-reduce ({stats['ratio']:.1f}x less); "
            f"last step {stats['step_bytes_sent']} vs {stats['step_bytes_fp32_equiv']} bytes")


def check_compression_plan(comm: CommunicatingOptimizer, total_steps: int, world: int) -> None:
    """Say up front what compression this run will really do, and warn when it never starts."""
    if world == 1 and comm.skips_compression:
        log.info("%s; %s runs as %s", SKIPPED_NOTE, comm.label, comm.uncompressed)
        return
    warmup = comm.warmup_steps
    if warmup >= total_steps:
        log.warning("%s: %d fp32 warm-up steps >= the %d optimizer steps of this run, so it will NEVER compress "
                    "(plain fp32 all-reduce throughout); shorten the warm-up (freeze_step: 15-25%% of the steps "
                    "is typical)", comm.label, warmup, total_steps)
    elif warmup:
        log.info("%s: fp32 warm-up for %d of %d steps, then %s on %d rank(s)", comm.label, warmup, total_steps,
                 comm.scheme, world)
    else:
        log.info("%s: %s on %d rank(s) from the first of %d steps", comm.label, comm.scheme, world, total_steps)
