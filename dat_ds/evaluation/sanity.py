"""Gradient-masking checks (Athalye et al. 2018; Carlini et al. 2019): is this robust accuracy believable?

Each check compares accuracies that a sound evaluation must order in a known way:

- robust accuracy falls (weakly) as eps grows, and reaches ~0 at a large eps (0.5 for 1-channel
  Fashion-MNIST, 64/255 for RGB images): an unbounded attack must win;
- more PGD steps, or more restarts, never raise accuracy;
- a black-box attack (Square) does not beat the white-box attacks: if it does, the gradients lie;
- FGSM accuracy far above PGD accuracy is catastrophic overfitting (Wong et al. 2020), and FGSM below
  PGD means the multi-step attack is not working.

``sanity_specs`` lists the extra attacks the checks need; ``run_checks`` reads every accuracy from one
``EvalResult`` summary and returns pass/warn lines.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..attacks import AttackSpec

TOL = 0.01  # accuracy differences below 1 pp are noise on a few hundred examples
NEAR_ZERO = 0.05  # "robust accuracy reaches ~0" at the large eps
FGSM_GAP = 0.2  # FGSM acc - PGD acc above this flags catastrophic overfitting


@dataclass(frozen=True)
class Check:
    check: str
    status: str  # pass | warn
    detail: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def large_eps(in_chans: int, norm: str = "linf") -> float:
    """An eps at which no model can stay robust: 0.5 on grayscale, 64/255 on RGB (L-inf); L2 scales up."""
    if norm == "l2":
        return 10.0 if in_chans == 1 else 16.0
    return 0.5 if in_chans == 1 else 64 / 255


@dataclass(frozen=True)
class SanityPlan:
    eps: float  # the eps the step/restart/black-box/FGSM checks use
    big_eps: float
    base: AttackSpec  # PGD at eps
    more_steps: AttackSpec
    more_restarts: AttackSpec
    fgsm: AttackSpec
    black_box: AttackSpec
    big: AttackSpec  # PGD at big_eps

    def specs(self) -> list[AttackSpec]:
        return [self.base, self.more_steps, self.more_restarts, self.fgsm, self.black_box, self.big]


def sanity_specs(eps: float, *, in_chans: int, steps: int = 20, norm: str = "linf",
                 square_queries: int | None = None) -> SanityPlan:
    """``square_queries``: None for Square's own default."""
    big = large_eps(in_chans, norm)
    return SanityPlan(
        eps=eps, big_eps=big,
        base=AttackSpec("pgd", eps=eps, steps=steps, norm=norm),
        more_steps=AttackSpec("pgd", eps=eps, steps=steps * 5, norm=norm),
        more_restarts=AttackSpec("pgd", eps=eps, steps=steps, restarts=5, norm=norm),
        fgsm=AttackSpec("fgsm", eps=eps, norm=norm),
        black_box=AttackSpec("square", eps=eps, norm=norm,
                             extra={} if square_queries is None else {"n_queries": square_queries}),
        big=AttackSpec("pgd", eps=big, steps=steps, norm=norm),
    )


def _acc(summary: dict[str, Any], spec: AttackSpec) -> float:
    return float(summary[spec.label]["robust_acc"])


def run_checks(summary: dict[str, Any], plan: SanityPlan, curves: dict[str, list[tuple[float, float]]],
               white_box_at_eps: dict[str, float]) -> list[Check]:
    """``summary`` holds every plan spec; ``curves`` maps an attack to (eps, robust acc) points;
    ``white_box_at_eps`` maps each white-box attack label at ``plan.eps`` to its accuracy."""
    checks: list[Check] = []
    # 1. monotone in eps, and ~0 at a large eps
    for attack, points in curves.items():
        points = sorted(points)
        rises = [(a, b) for a, b in zip(points, points[1:]) if b[1] > a[1] + TOL]
        if len(points) < 2:
            continue
        if rises:
            (e0, a0), (e1, a1) = rises[0]
            checks.append(Check(f"{attack}: falls with eps", "warn",
                                f"accuracy rises from {a0:.4f} at eps={e0:.4g} to {a1:.4f} at eps={e1:.4g}: "
                                "the attack is failing (gradient masking or too few steps)"))
        else:
            checks.append(Check(f"{attack}: falls with eps", "pass",
                                " > ".join(f"{a:.4f}@{e:.4g}" for e, a in points)))
    big = _acc(summary, plan.big)
    checks.append(Check(f"~0 at large eps ({plan.big.label})", "pass" if big <= NEAR_ZERO else "warn",
                        f"robust acc {big:.4f}" + ("" if big <= NEAR_ZERO else
                        f" > {NEAR_ZERO}: an unbounded attack must win; gradients are likely masked")))
    # 2. more steps / restarts never help the model
    base = _acc(summary, plan.base)
    for spec, what in ((plan.more_steps, "more steps"), (plan.more_restarts, "more restarts")):
        acc = _acc(summary, spec)
        ok = acc <= base + TOL
        checks.append(Check(f"{what} do not raise acc", "pass" if ok else "warn",
                            f"{spec.label} {acc:.4f} vs {plan.base.label} {base:.4f}"
                            + ("" if ok else ": the stronger attack did worse; the loss surface is masked")))
    # 3. black box must not beat white box
    best_white_label = min(white_box_at_eps, key=white_box_at_eps.get)
    best_white = white_box_at_eps[best_white_label]
    bb = _acc(summary, plan.black_box)
    ok = bb >= best_white - TOL
    checks.append(Check("black box does not beat white box", "pass" if ok else "warn",
                        f"{plan.black_box.label} {bb:.4f} vs {best_white_label} {best_white:.4f}"
                        + ("" if ok else ": gradient-based attacks are being fooled (masked gradients)")))
    # 4. single step vs multi step
    fgsm = _acc(summary, plan.fgsm)
    if fgsm - base > FGSM_GAP:
        checks.append(Check("FGSM vs PGD", "warn",
                            f"FGSM {fgsm:.4f} is {fgsm - base:.2f} above {plan.base.label} {base:.4f}: "
                            "catastrophic overfitting (the model only resists single-step attacks)"))
    elif fgsm < base - TOL:
        checks.append(Check("FGSM vs PGD", "warn",
                            f"FGSM {fgsm:.4f} below {plan.base.label} {base:.4f}: the multi-step attack underperforms"))
    else:
        checks.append(Check("FGSM vs PGD", "pass", f"FGSM {fgsm:.4f} >= {plan.base.label} {base:.4f}, gap "
                            f"{fgsm - base:.2f} <= {FGSM_GAP}"))
    return checks
