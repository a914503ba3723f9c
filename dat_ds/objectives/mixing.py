"""Consistency regularisation (Tack et al., "Consistency Regularization for Adversarial Robustness", AAAI 2022).

Each batch is seen as two random views; the adversarial examples of the two views should get the same
prediction. ``js_divergence`` is the Jensen-Shannon divergence between the two views' tempered predictions,
0.5 * (KL(p1 || m) + KL(p2 || m)), m = (p1 + p2) / 2, batch mean, as in the authors' and DM-Improves-AT's code.
``consistency_views`` makes the views on the device with the batched ops of ``augment.py`` (random resized crop
+ flip + mild brightness/contrast); Tack et al. use AutoAugment views, which dat-ds does not have.
Randomness comes only from the trainer's per-rank generator, so a resumed run draws the same views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .augment import simclr_augment


def js_divergence(logits1: torch.Tensor, logits2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Batch mean of JS(softmax(l1 / T) || softmax(l2 / T)), differentiable in both."""
    p1 = F.softmax(logits1.float() / temperature, dim=1)
    p2 = F.softmax(logits2.float() / temperature, dim=1)
    log_m = (0.5 * (p1 + p2)).clamp_min(1e-8).log()
    return 0.5 * (F.kl_div(log_m, p1, reduction="batchmean") + F.kl_div(log_m, p2, reduction="batchmean"))


def consistency_views(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Two random views of each image of ``x`` (B, C, H, W), stacked: (2B, C, H, W), view 1 first."""
    kwargs = dict(scale=(0.6, 1.0), brightness=0.2, contrast=0.2, gray_p=0.0)
    return torch.cat([simclr_augment(x, generator, **kwargs), simclr_augment(x, generator, **kwargs)])


# ----------------------------------------------------------------------------- CutMix with soft labels
# (Yun et al., ICCV 2019; with TRADES as in Gowal et al. 2021 and DM-Improves-AT.) One box and one partner
# permutation per batch, all drawn on the device from the trainer's generator: no host sync per step.


def _gamma(alpha: float, shape: tuple[int, ...], generator, device, candidates: int = 16) -> torch.Tensor:
    """Gamma(alpha, 1) samples by Marsaglia & Tsang's method, vectorised: the first accepted of ``candidates``
    proposals (each is accepted with probability > 0.95, so all 16 failing has probability < 1e-20)."""
    boost = alpha < 1.0  # Gamma(a) = Gamma(a + 1) * U^(1/a)
    a = alpha + 1.0 if boost else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    z = torch.randn((candidates, *shape), generator=generator, device=device)
    u = torch.rand((candidates, *shape), generator=generator, device=device)
    v = (1.0 + c * z) ** 3
    ok = (v > 0) & (u.clamp_min(1e-30).log() < 0.5 * z * z + d - d * v + d * v.clamp_min(1e-30).log())
    first = torch.argmax(ok.to(torch.int8), dim=0, keepdim=True)  # the first accepted proposal (0 if none)
    sample = (d * v).gather(0, first).squeeze(0)
    if boost:
        sample = sample * torch.rand(shape, generator=generator, device=device) ** (1.0 / alpha)
    return sample


def beta_sample(alpha: float, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """One Beta(alpha, alpha) sample, a 0-d device tensor: G1 / (G1 + G2)."""
    g = _gamma(alpha, (2,), generator, device)
    return g[0] / g.sum()


def cutmix(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, alpha: float, prob: float = 1.0,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_mixed, soft_labels)``: with probability ``prob`` every image gets the same box, of area about
    1 - lam (lam ~ Beta(alpha, alpha)), pasted from its partner in a random permutation of the batch; its label is
    lam' * one_hot(y) + (1 - lam') * one_hot(y_partner), lam' the share of the image outside the box that fits."""
    b, _, h, w = x.shape
    dev = x.device
    lam = beta_sample(alpha, generator, dev)
    centre = torch.rand(2, generator=generator, device=dev)
    apply = torch.rand((), generator=generator, device=dev) < prob
    perm = torch.randperm(b, generator=generator, device=dev)
    cut = (1.0 - lam).sqrt()
    rows = torch.arange(h, device=dev, dtype=torch.float32)
    cols = torch.arange(w, device=dev, dtype=torch.float32)
    cy, cx = centre[0] * h, centre[1] * w
    in_rows = (rows >= (cy - cut * h / 2).floor()) & (rows < (cy + cut * h / 2).floor())
    in_cols = (cols >= (cx - cut * w / 2).floor()) & (cols < (cx + cut * w / 2).floor())
    box = (in_rows[:, None] & in_cols[None, :]) & apply  # (H, W); empty when this batch is not mixed
    mixed = torch.where(box, x[perm], x)
    kept = 1.0 - box.to(torch.float32).mean()
    one_hot = F.one_hot(y, num_classes).to(torch.float32)
    return mixed, kept * one_hot + (1.0 - kept) * one_hot[perm]
