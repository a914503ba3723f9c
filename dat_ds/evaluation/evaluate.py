"""Robust evaluation: clean accuracy plus accuracy under attacks, exact across any number of ranks.

The test set is cut into fixed batches; batch ``b`` goes to rank ``b % world`` and its attack noise
comes from a generator seeded by ``(seed, b)``. Each example therefore sees the same batch and the same
random start whatever the world size, and per-example results gathered on rank 0 equal a 1-rank run.
The model is always in eval mode; attacks never touch parameter gradients. An attack that runs in stages
(AutoAttack) also reports, per example, whether it was still robust after each stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..attacks import AttackSpec, eval_mode
from ..core import dist

__all__ = ["AttackSpec", "EvalResult", "batch_generator", "evaluate"]  # AttackSpec lives in dat_ds.attacks


def batch_generator(seed: int, batch: int, device) -> torch.Generator:
    """The attack noise of test batch ``batch``: the same on any rank and for every attack spec.

    Sharing it across specs makes comparisons exact: PGD-20 with 5 restarts starts its first restart
    where plain PGD-20 starts, so (worst case over restarts) it can only break more examples.
    """
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch * 101)


@dataclass
class EvalResult:
    """Per-example correctness, in test-set order, on every rank."""

    indices: torch.Tensor
    clean_correct: torch.Tensor
    robust_correct: dict[str, torch.Tensor]  # label -> correct after that attack
    seconds: dict[str, float]
    targets: torch.Tensor  # each example's class
    # label -> stage -> correct after that stage and every earlier one, for attacks that run in stages
    # (AutoAttack): non-increasing along the stages, and the last stage's is ``robust_correct[label]``.
    stage_correct: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def per_class(self) -> dict[int, dict[str, Any]]:
        """Clean and robust accuracy of each class present: ``{class: {count, clean_acc, robust_acc: {label: acc}}}``."""
        out: dict[int, dict[str, Any]] = {}
        for c in sorted(set(self.targets.tolist())):
            mask = self.targets == c
            out[c] = {"count": int(mask.sum()), "clean_acc": float(self.clean_correct[mask].float().mean()),
                      "robust_acc": {k: float(v[mask].float().mean()) for k, v in self.robust_correct.items()}}
        return out

    @property
    def count(self) -> int:
        return int(self.indices.numel())

    @property
    def clean_acc(self) -> float:
        return float(self.clean_correct.float().mean()) if self.count else float("nan")

    def robust_acc(self, label: str) -> float:
        return float(self.robust_correct[label].float().mean()) if self.count else float("nan")

    def stage_acc(self, label: str) -> dict[str, float] | None:
        """Robust accuracy after each stage of attack ``label``, in order (None: it has no stages)."""
        stages = self.stage_correct.get(label)
        if stages is None:
            return None
        return {name: float(c.float().mean()) if self.count else float("nan") for name, c in stages.items()}

    def summary(self) -> dict[str, Any]:
        return {"count": self.count, "clean_acc": self.clean_acc,
                **{label: {"robust_acc": self.robust_acc(label), "seconds": self.seconds[label]}
                   for label in self.robust_correct}}


def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]


def _rank_loader(dataset, batches: list[tuple[int, int]], mine: list[int], batch_size: int,
                 device: torch.device) -> DataLoader:
    """This rank's batches, in order, from a DataLoader over its Subset of the test set.

    Every global batch but the last is full, and the last one (if short) comes last on its rank, so
    batching the concatenated indices by ``batch_size`` gives back exactly the batches ``mine`` names.
    """
    indices = [i for b in mine for i in range(*batches[b])]
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                      pin_memory=device.type != "cpu")


def evaluate(model: nn.Module, dataset, specs: list[AttackSpec], *, batch_size: int = 256, seed: int = 0,
             max_examples: int | None = None, on_batch: Callable[[int], None] | None = None) -> EvalResult:
    """Clean + robust accuracy of ``model`` on ``dataset``, sharded over ranks, gathered everywhere.

    Ranks make different numbers of forwards (attacks stop early or skip examples, the last batch is short):
    ``model`` must run no collective in its forward -- under ZeRO-3, ``Trainer.eval_module()``'s gathered copy.
    """
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate attack specs in {labels}")
    device = next(model.parameters()).device
    n = len(dataset) if max_examples is None else min(max_examples, len(dataset))
    batches = _batches(n, batch_size)
    world, rank = dist.world_size(), dist.rank()
    mine: list[int] = list(range(rank, len(batches), world))
    # Results stay on the device until the end: no host sync per batch except the attack timer's.
    sync = dist.accelerator().synchronize if device.type != "cpu" else (lambda: None)
    local_idx, local_clean, local_targets = [], [], []
    local_robust: dict[str, list[torch.Tensor]] = {s.label: [] for s in specs}
    local_stages: dict[str, dict[str, list[torch.Tensor]]] = {s.label: {} for s in specs if s.has_stages}
    seconds = {s.label: 0.0 for s in specs}
    loader = _rank_loader(dataset, batches, mine, batch_size, device)
    with eval_mode(model):
        for b, (x, y) in zip(mine, loader):
            lo, hi = batches[b]
            x = x.to(device, non_blocking=True)
            y = torch.as_tensor(y).to(device, non_blocking=True).long()
            with torch.no_grad():
                clean = model(x).argmax(1) == y
            robust = {}
            for spec in specs:
                g = batch_generator(seed, b, device)
                stages: dict[str, torch.Tensor] = {}
                sync()
                t0 = time.perf_counter()
                x_adv = spec.run(model, x, y, g, on_stage=stages.__setitem__ if spec.has_stages else None)
                with torch.no_grad():
                    robust[spec.label] = (model(x_adv).argmax(1) == y) & clean
                sync()
                seconds[spec.label] += time.perf_counter() - t0
                if stages:
                    _add_stages(local_stages[spec.label], stages, clean, robust[spec.label])
            local_idx.append(torch.arange(lo, hi))
            local_clean.append(clean)
            local_targets.append(y)
            for label, r in robust.items():
                local_robust[label].append(r)
            if on_batch is not None:
                on_batch(hi - lo)
    cat = lambda xs, dtype: torch.cat(xs).cpu() if xs else torch.zeros(0, dtype=dtype)  # noqa: E731
    payload = (cat(local_idx, torch.long), cat(local_clean, torch.bool),
               {k: cat(v, torch.bool) for k, v in local_robust.items()}, seconds, cat(local_targets, torch.long),
               {k: {name: cat(v, torch.bool) for name, v in stages.items()} for k, stages in local_stages.items()})
    gathered = dist.all_gather_object(payload)
    idx = torch.cat([g[0] for g in gathered])
    order = torch.argsort(idx)
    clean_all = torch.cat([g[1] for g in gathered])[order]
    robust_all = {k: torch.cat([g[2][k] for g in gathered])[order] for k in local_robust}
    # Wall time of the slowest rank is what the user waits for.
    secs = {k: max(g[3][k] for g in gathered) for k in seconds}
    targets = torch.cat([g[4] for g in gathered])[order]
    stages_all = {}
    for label in local_stages:
        # A rank without batches has no stage names; every other rank has all of them, for every example.
        names = next((list(g[5][label]) for g in gathered if g[5][label]), [])
        stages_all[label] = {name: torch.cat([g[5][label].get(name, torch.zeros(0, dtype=torch.bool))
                                              for g in gathered])[order] for name in names}
    return EvalResult(indices=idx[order], clean_correct=clean_all, robust_correct=robust_all, seconds=secs,
                      targets=targets, stage_correct=stages_all)


def _add_stages(into: dict[str, list[torch.Tensor]], stages: dict[str, torch.Tensor], clean: torch.Tensor,
                robust: torch.Tensor) -> None:
    """Append one batch's per-stage robust masks, made consistent with the evaluation's own verdict ``robust``.

    The attack judged each stage with its own forwards (on the subset it attacked); those agree with the
    evaluation's forward on ``x_adv`` up to float ties between batch shapes. So a point robust at the end counts
    as robust after every stage, and the last stage is the evaluation's verdict: the stages' accuracies never
    rise, and the last one is the attack's robust accuracy.
    """
    names = list(stages)
    for name in names[:-1]:
        into.setdefault(name, []).append((stages[name].to(clean.device) & clean) | robust)
    into.setdefault(names[-1], []).append(robust)
