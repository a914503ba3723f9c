"""AutoAttack, APGD and Square through ``torchattacks``, behind our pure-function signature.

``fn(model, x, y, *, eps, norm, generator, ...) -> x_adv`` like every other attack: the model runs in eval
mode (our context manager; torchattacks then sees an eval model and leaves it alone), inputs and outputs
are [0, 1] images (``NormalizedModel`` normalises inside), and the randomness comes from ``generator``.

torchattacks seeds the *global* torch RNG itself (``torch.random.manual_seed(self.seed)`` inside APGD,
APGD-T, FAB and Square), so each call draws its seed from ``generator`` and runs inside
``torch.random.fork_rng``: the caller's global RNG stream is untouched, and a batch seeded the same way
gives the same adversarial examples on any rank.

``autoattack`` is Croce & Hein's AutoAttack, version "standard" (``fra31/auto-attack``, ``autoattack.py``:
``AutoAttack.__init__`` + ``set_version("standard")``), for L-inf and L2, built from torchattacks' parts with
every setting of the reference: APGD-CE (100 iterations, 1 restart, rho 0.75) -> APGD-T (DLR-targeted, 100
iterations, 1 restart, 9 target classes) -> FAB-T (100 iterations, 1 restart, 9 target classes) -> Square
(5,000 queries, p_init 0.8, 1 restart, no rescaled p schedule). Only the points the clean model classifies
correctly are attacked, and each attack runs only on the points still robust after the previous ones.
Like the reference's "robust accuracy after APGD-CE" lines, ``on_stage`` (a runtime keyword that only
``evaluate`` passes) reports after each stage which points are still robust.
``torchattacks.AutoAttack(version="standard")`` differs from it in three ways: 10 iterations instead of 100,
``n_classes - 1`` target classes instead of 9 (99 on CIFAR-100), and Square's ``resc_schedule=True``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from .core import eval_mode
from .precision import AttackPrecision

log = logging.getLogger(__name__)

_NORMS = {"linf": "Linf", "l2": "L2"}

# ``on_stage(stage, robust)``: after each stage of an ensemble, the stage's name and the batch's mask of
# points still robust (clean-correct and unbroken by this stage and every earlier one).
StageHook = Callable[[str, torch.Tensor], None]


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
    """``make_attack(seed)`` gets the model as torchattacks must see it: fp32 logits (it reads losses with
    ``.numpy()``, which has no bf16) and, for fp16 weights, scaled input gradients (``AttackPrecision``)."""
    if x.numel() == 0:
        return x.clone()
    model = model if isinstance(model, AttackPrecision) else AttackPrecision(model)
    seed = _seed_from(generator)
    devices = [x.device] if x.device.type == "cuda" else []
    # FAB calls .backward(), which would add into parameter .grad: freeze the parameters meanwhile.
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        with eval_mode(model), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            attack = make_attack(model, seed)
            x_adv = attack(x.detach(), y.detach())
    finally:
        for p in params:
            p.requires_grad_(True)
    return x_adv.detach().to(x.dtype)


# The reference "standard" AutoAttack (L-inf and L2) targets the 9 highest-scoring wrong classes in
# APGD-T and FAB-T, whatever the number of classes.
STANDARD_TARGET_CLASSES = 9
# The stages of the "standard" ensemble, in order, as the reference names them in its progress lines.
STANDARD_STAGES = {"apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T", "square": "Square"}


def standard_autoattack(model: nn.Module, *, eps: float, norm: str, n_classes: int, aa_steps: int = 100,
                        n_queries: int = 5000, seed: int = 0) -> list[tuple[str, Any]]:
    """The four torchattacks attacks of the reference "standard" AutoAttack, in order, as ``(name, attack)``.

    Every setting is spelled out rather than left to torchattacks' defaults. torchattacks derives the
    number of target classes of APGD-T and FAB-T as ``n_classes - 1`` and uses ``n_classes`` for nothing
    else, so ``n_classes=targets + 1`` is how its constructors take the reference's 9 targets; fewer
    classes than 10 leave ``n_classes - 1`` targets (the reference would index past the logits).
    """
    import torchattacks

    ta_norm = _ta_norm(norm)
    targets = min(STANDARD_TARGET_CLASSES, n_classes - 1)
    attacks = [
        ("apgd-ce", torchattacks.APGD(model, norm=ta_norm, eps=eps, steps=aa_steps, n_restarts=1, seed=seed,
                                      loss="ce", eot_iter=1, rho=0.75)),
        ("apgd-t", torchattacks.APGDT(model, norm=ta_norm, eps=eps, steps=aa_steps, n_restarts=1, seed=seed,
                                      eot_iter=1, rho=0.75, n_classes=targets + 1)),
        ("fab-t", torchattacks.FAB(model, norm=ta_norm, eps=eps, steps=aa_steps, n_restarts=1, alpha_max=0.1,
                                   eta=1.05, beta=0.9, seed=seed, multi_targeted=True, n_classes=targets + 1)),
        ("square", torchattacks.Square(model, norm=ta_norm, eps=eps, n_queries=n_queries, n_restarts=1, p_init=0.8,
                                       loss="margin", resc_schedule=False, seed=seed)),
    ]
    return attacks


def _worst_case_of(attacks: list[tuple[str, Any]], model: nn.Module, eps: float, norm: str,
                   on_stage: StageHook | None = None):
    """The reference's ensemble loop: attack the clean-correct points, then each later attack only the
    points every earlier one left correct. Each stage's output is projected into the ball before it
    counts, so a point is broken only by an example our contract would return. A stage with no point
    left to attack is skipped and reports the mask it was given, as the reference prints the same
    accuracy again."""
    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = x.clone()
        with torch.no_grad():
            robust = model(x).argmax(1) == y
        for name, attack in attacks:
            idx = robust.nonzero().flatten()
            if idx.numel():
                x_stage = _clip_to_ball(attack(x[idx], y[idx]), x[idx], eps, norm)
                with torch.no_grad():
                    broken = model(x_stage).argmax(1) != y[idx]
                x_adv[idx[broken]] = x_stage[broken]
                robust[idx[broken]] = False
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("autoattack %s broke %d of %d points", name, int(broken.sum()), idx.numel())
            if on_stage is not None:
                on_stage(name, robust.clone())
        return x_adv

    return run


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
               n_classes: int | None = None, aa_steps: int = 100, n_queries: int = 5000,
               generator: torch.Generator | None = None, on_stage: StageHook | None = None) -> torch.Tensor:
    """Standard AutoAttack (Croce & Hein, ICML 2020): APGD-CE, APGD-T, FAB-T, Square (``standard_autoattack``).

    ``aa_steps`` iterations for APGD/APGD-T/FAB-T and ``n_queries`` for Square; the defaults (100, 5,000)
    are the reference's, smaller values are for quick looks only and are no longer "standard".
    ``on_stage(stage, robust)`` is called after each of ``STANDARD_STAGES``, in order, with the mask (over
    ``x``) of the points still robust; it is runtime state, never a spec value (``evaluate`` passes it).
    """
    classes = n_classes or _num_classes(model, x)

    def make(model: nn.Module, seed: int):
        attacks = standard_autoattack(model, eps=eps, norm=norm, n_classes=classes, aa_steps=aa_steps,
                                      n_queries=n_queries, seed=seed)
        return _worst_case_of(attacks, model, eps, norm, on_stage)

    return _clip_to_ball(_run(make, model, x, y, generator), x, eps, norm)


def _apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: str, eps: float, norm: str, apgd_steps: int,
          restarts: int, generator: torch.Generator | None) -> torch.Tensor:
    import torchattacks

    def make(model: nn.Module, seed: int):
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


def apgd_ce_dlr(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
                steps: int = 20, generator: torch.Generator | None = None) -> torch.Tensor:
    """APGD-CE, then APGD-DLR on the points it left correct: AutoAttack's two white-box losses, untargeted,
    ``steps`` iterations each, one restart (needs >= 3 classes).

    The cheap headline attack of the in-training evaluation: on every model docs/evaluation.md measures it on,
    within 1 pp of standard AutoAttack on the same images, where PGD-20 (CE) was up to a few pp above it. The
    DLR loss is invariant to the scale of the logits, so it does not stall where a confident model's CE
    gradient vanishes, and APGD's step size adapts to the landscape instead of PGD's fixed 2.5 eps / k.
    """
    import torchattacks

    def make(model: nn.Module, seed: int):
        attacks = [(loss, torchattacks.APGD(model, norm=_ta_norm(norm), eps=eps, steps=steps, n_restarts=1, seed=seed,
                                            loss=loss, eot_iter=1, rho=0.75)) for loss in ("ce", "dlr")]
        return _worst_case_of(attacks, model, eps, norm)

    return _clip_to_ball(_run(make, model, x, y, generator), x, eps, norm)


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
           n_queries: int = 1000, generator: torch.Generator | None = None) -> torch.Tensor:
    """Square attack (Andriushchenko et al., 2020): score-based black box, no gradients at all.

    One run of ``n_queries``: more queries, not restarts, is how Square gets stronger.
    """
    import torchattacks

    def make(model: nn.Module, seed: int):
        return torchattacks.Square(model, norm=_ta_norm(norm), eps=eps, n_queries=n_queries, n_restarts=1,
                                   seed=seed, loss="margin")

    return _clip_to_ball(_run(make, model, x, y, generator), x, eps, norm)


def _clip_to_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """torchattacks stays in the ball up to float error; one projection makes our contract exact."""
    from .geometry import GEOMETRIES

    return GEOMETRIES.get(norm.lower())(eps).project(x_adv, x).detach()
