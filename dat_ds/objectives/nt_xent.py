"""NT-Xent (SimCLR's normalised temperature-scaled cross-entropy), batch and per-example forms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Mean NT-Xent over the 2B anchors: each view's positive is its twin, the other 2B-2 are negatives."""
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    self_pair = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    sim = (z @ z.t() / temperature).masked_fill(self_pair, float("-inf"))  # an anchor is not its own negative
    twin = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, twin)


def nt_xent_to_target(z: torch.Tensor, target: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Per-example NT-Xent of anchors ``z`` against fixed embeddings ``target`` of the other view.

    Example i's positive is ``target[i]``, its negatives the other rows of ``target``. Loss i depends on
    ``z[i]`` only, so its input gradient is per example: this is the attack loss of ACL
    (``loss_fn(output, target)`` with the other view's detached embeddings as the target).
    """
    logits = F.normalize(z.float(), dim=1) @ F.normalize(target.float(), dim=1).t() / temperature
    return F.cross_entropy(logits, torch.arange(z.shape[0], device=z.device), reduction="none")
