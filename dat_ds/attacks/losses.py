"""Per-example attack losses: ``loss_fn(output, target) -> Tensor[B]``.

Attacks maximise the loss. A classification loss also defines success (the prediction is wrong), which
restarts use to keep the worst case per example.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.registry import Registry

ATTACK_LOSSES: Registry = Registry("attack loss")


@ATTACK_LOSSES.register("ce")
def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none")


@ATTACK_LOSSES.register("margin")
def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin: best wrong logit minus the true logit (positive = misclassified)."""
    logits = logits.float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.amax(dim=1) - true


def misclassified(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=1) != y
