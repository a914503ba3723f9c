"""AutoAttack, APGD and Square through ``torchattacks``, behind our pure-function signature.

``fn(model, x, y, *, eps, norm, generator, ...) -> x_adv`` like every other attack: the model runs in eval
mode (our context manager; torchattacks then sees an eval model and leaves it alone), inputs and outputs
are [0, 1] images (``NormalizedModel`` normalises inside), and the randomness comes from ``generator``.

torchattacks seeds the *global* torch RNG itself (``torch.random.manual_seed(self.seed)`` inside APGD,
APGD-T, FAB and Square), so each call draws its seed from ``generator`` and runs inside
``torch.random.fork_rng``: the caller's global RNG stream is untouched, and a batch seeded the same way
gives the same adversarial examples on any rank.

``torchattacks.AutoAttack(version="standard")`` is APGD-CE, APGD-T, FAB-T and Square (5,000 queries),
each attack run only on the points the previous ones did not break, but with 10 iterations for
APGD/APGD-T/FAB-T where Croce & Hein's reference uses 100. ``autoattack`` below builds the same ensemble
from torchattacks' components with the reference settings (``aa_steps=100``), adjustable for quick runs.
"""

from __future__ import annotations

import torch
from torch import nn

from .core import eval_mode

_NORMS = {"linf": "Linf", "l2": "L2"}


def _ta_norm(norm: str) -> str:
    try:
        return _NORMS[norm.lower()]
    except KeyError:
        raise ValueError(f"norm={norm!r}; torchattacks attacks take linf or l2") from None


def _seed_from(generator: torch.Generator | None) -> int:
    if generator is None:
        return 0
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device).item())


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


def _run(make_attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> torch.Tensor:
    if x.numel() == 0:
        return x.clone()
    seed = _seed_from(generator)
    devices = [x.device] if x.device.type == "cuda" else []
    # FAB calls .backward(), which would add into parameter .grad: freeze the parameters meanwhile.
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        with eval_mode(model), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            attack = make_attack(seed)
            x_adv = attack(x.detach(), y.detach())
    finally:
        for p in params:
            p.requires_grad_(True)
    return x_adv.detach().to(x.dtype)


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
               n_classes: int | None = None, aa_steps: int = 100, n_queries: int = 5000,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard AutoAttack (Croce & Hein, ICML 2020) from torchattacks' parts: APGD-CE, APGD-T, FAB-T, Square.

    Each stage attacks only the points the previous stages left correct. ``aa_steps`` iterations for
    APGD/APGD-T/FAB-T (reference: 100; ``torchattacks.AutoAttack`` hard-codes 10, which on our demo model
    left more points standing than PGD-20) and ``n_queries`` for Square (reference: 5,000).
    """
    import torchattacks

    classes = n_classes or _num_classes(model, x)
    ta_norm = _ta_norm(norm)

    def make(seed: int):
        return torchattacks.MultiAttack([
            torchattacks.APGD(model, norm=ta_norm, eps=eps, steps=aa_steps, seed=seed, loss="ce", n_restarts=1),
            torchattacks.APGDT(model, norm=ta_norm, eps=eps, steps=aa_steps, seed=seed, n_classes=classes,
                               n_restarts=1),
            torchattacks.FAB(model, norm=ta_norm, eps=eps, steps=aa_steps, seed=seed, multi_targeted=True,
                             n_classes=classes, n_restarts=1),
            torchattacks.Square(model, norm=ta_norm, eps=eps, seed=seed, n_queries=n_queries, n_restarts=1),
        ])

    return _clip_to_ball(_run(make, model, x, y, generator), x, eps, norm)


def _apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: str, eps: float, norm: str, apgd_steps: int,
          restarts: int, generator: torch.Generator | None) -> torch.Tensor:
    import torchattacks

    def make(seed: int):
        return torchattacks.APGD(model, norm=_ta_norm(norm), eps=eps, steps=apgd_steps, n_restarts=restarts,
                                 seed=seed, loss=loss)

    return _clip_to_ball(_run(make, model, x, y, generator), x, eps, norm)


def apgd_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
            apgd_steps: int = 100, restarts: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """APGD with the cross-entropy loss (the first AutoAttack stage), ``apgd_steps`` iterations."""
    return _apgd(model, x, y, loss="ce", eps=eps, norm=norm, apgd_steps=apgd_steps, restarts=restarts,
                 generator=generator)


def apgd_dlr(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
             apgd_steps: int = 100, restarts: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """APGD with the scale-invariant DLR loss (needs >= 3 classes)."""
    return _apgd(model, x, y, loss="dlr", eps=eps, norm=norm, apgd_steps=apgd_steps, restarts=restarts,
                 generator=generator)


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
           n_queries: int = 1000, generator: torch.Generator | None = None) -> torch.Tensor:
    """Square attack (Andriushchenko et al., 2020): score-based black box, no gradients at all.

    One run of ``n_queries``: more queries, not restarts, is how Square gets stronger.
    """
    import torchattacks

    def make(seed: int):
        return torchattacks.Square(model, norm=_ta_norm(norm), eps=eps, n_queries=n_queries, n_restarts=1,
                                   seed=seed, loss="margin")

    return _clip_to_ball(_run(make, model, x, y, generator), x, eps, norm)


def _clip_to_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """torchattacks stays in the ball up to float error; one projection makes our contract exact."""
    from .geometry import GEOMETRIES

    return GEOMETRIES.get(norm.lower())(eps).project(x_adv, x).detach()
