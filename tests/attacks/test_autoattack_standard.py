"""``autoattack`` is the reference "standard" AutoAttack (fra31/auto-attack, ``set_version("standard")``).

The reference, for L-inf and L2: APGD-CE (100 it., 1 restart, rho 0.75, eot 1) -> APGD-T (100 it., 1 restart,
9 target classes) -> FAB-T (100 it., 1 restart, 9 target classes) -> Square (5,000 queries, p_init 0.8,
1 restart, resc_schedule=False); only clean-correct points are attacked, each later attack only on the points
still robust. The tests watch the torchattacks objects ``autoattack`` really calls, so they check the
public function, not a helper.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchattacks

from dat_ds.attacks import ATTACKS, GEOMETRIES, STANDARD_STAGES, AttackSpec, pgd, takes
from dat_ds.core.errors import ConfigError

STAGES = {"APGD": "apgd-ce", "APGDT": "apgd-t", "FAB": "fab-t", "Square": "square"}


@pytest.fixture
def calls(monkeypatch):
    """Every torchattacks stage ``autoattack`` calls: (stage, attack object, x given, y given, x returned)."""
    seen = []
    original = torchattacks.attack.Attack.__call__

    def spy(self, images, labels, *args, **kwargs):
        out = original(self, images, labels, *args, **kwargs)
        if type(self).__name__ in STAGES:
            seen.append((STAGES[type(self).__name__], self, images.clone(), labels.clone(), out.detach().clone()))
        return out

    monkeypatch.setattr(torchattacks.attack.Attack, "__call__", spy)
    return seen


def _linear_model(n_classes: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, n_classes)).eval()


def _reference_settings(stage: str, attack, norm: str) -> None:
    assert attack.norm == norm and attack.n_restarts == 1
    if stage in ("apgd-ce", "apgd-t"):
        assert attack.eot_iter == 1 and attack.thr_decr == 0.75
    if stage == "apgd-ce":
        assert attack.loss == "ce"
    if stage in ("apgd-t", "fab-t"):
        assert attack.n_target_classes == 9  # not n_classes - 1 = 99
    if stage == "fab-t":
        assert attack.multi_targeted and (attack.alpha_max, attack.eta, attack.beta) == (0.1, 1.05, 0.9)
    if stage == "square":
        assert attack.rescale_schedule is False and attack.p_init == 0.8 and attack.loss == "margin"


@pytest.mark.parametrize("norm,ta_norm", [("linf", "Linf"), ("l2", "L2")])
def test_autoattack_runs_the_reference_standard_attacks_in_order(calls, norm, ta_norm):
    """100 classes (CIFAR-100-like): APGD-T and FAB-T still target 9 classes; Square without rescaling."""
    model = _linear_model(100)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)  # every point clean-correct
    # An eps this small breaks nothing, so all four stages run on all four points.
    ATTACKS.get("autoattack")(model, x, y, eps=1e-6, norm=norm, aa_steps=1, n_queries=2,
                              generator=torch.Generator().manual_seed(0))
    assert [c[0] for c in calls] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    for stage, attack, x_in, _, _ in calls:
        _reference_settings(stage, attack, ta_norm)
        assert x_in.shape[0] == 4


def test_default_settings_are_the_reference_iterations_and_queries():
    from dat_ds.attacks.external import standard_autoattack

    model = _linear_model(100)
    attacks = dict(standard_autoattack(model, eps=8 / 255, norm="linf", n_classes=100))
    assert list(attacks) == ["apgd-ce", "apgd-t", "fab-t", "square"] == list(STANDARD_STAGES)
    assert attacks["apgd-ce"].steps == attacks["apgd-t"].steps == attacks["fab-t"].steps == 100
    assert attacks["square"].n_queries == 5000
    for stage, attack in attacks.items():
        _reference_settings(stage, attack, "Linf")
    # Fewer than 10 classes: every wrong class, as many as there are.
    few = dict(standard_autoattack(model, eps=8 / 255, norm="linf", n_classes=5))
    assert few["apgd-t"].n_target_classes == few["fab-t"].n_target_classes == 4


def _trained_mlp(x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_autoattack_attacks_only_points_still_robust_and_beats_pgd(calls, embedded_test_tensors):
    """On a small trained MLP: the first stage sees only clean-correct points, each later stage only the
    points every earlier stage left correct, and AutoAttack accuracy <= PGD-20 accuracy < clean accuracy."""
    x_all, y_all, _ = embedded_test_tensors
    model = _trained_mlp(x_all[64:512], y_all[64:512])
    x, y = x_all[:64], y_all[:64]
    eps = 0.03
    stages = []
    x_aa = ATTACKS.get("autoattack")(model, x, y, eps=eps, aa_steps=10, n_queries=50,
                                     generator=torch.Generator().manual_seed(0),
                                     on_stage=lambda name, robust: stages.append((name, robust)))
    x_pgd = pgd(model, x, y, eps=eps, steps=20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        acc_aa = float((model(x_aa).argmax(1) == y).float().mean())
        acc_pgd = float((model(x_pgd).argmax(1) == y).float().mean())
    assert (x_aa - x).abs().max() <= eps + 1e-6
    assert acc_aa <= acc_pgd < float(clean.float().mean()), (acc_aa, acc_pgd)

    # Replay the reference's bookkeeping on what each stage was given and returned (projected, as ours is).
    ball = GEOMETRIES.get("linf")(eps)
    idx = clean.nonzero().flatten()
    assert [c[0] for c in calls] == ["apgd-ce", "apgd-t", "fab-t", "square"][:len(calls)]
    for (stage, _, x_in, y_in, x_out), (reported, robust) in zip(calls, stages):
        assert torch.equal(x_in, x[idx]) and torch.equal(y_in, y[idx]), stage  # from the clean images
        with torch.no_grad():
            idx = idx[model(ball.project(x_out, x_in)).argmax(1) == y_in]
        # on_stage reports, after each stage, exactly the points the next stage attacks.
        assert reported == stage and torch.equal(robust.nonzero().flatten(), idx), stage
    assert idx.numel() == round(acc_aa * 64)
    assert [name for name, _ in stages] == list(STANDARD_STAGES)
    with torch.no_grad():
        assert torch.equal(stages[-1][1], model(x_aa).argmax(1) == y)
    assert stages[0][1].sum() < clean.sum()  # APGD-CE broke points: the report can tell stages apart


def test_a_stage_with_no_point_left_reports_the_previous_mask(calls):
    """The reference prints every stage's accuracy even when an earlier one broke everything: a stage with
    nothing left to attack runs no attack and reports the mask it was given."""
    model = _linear_model(10)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    stages = []
    ATTACKS.get("autoattack")(model, x, y, eps=1.0, aa_steps=2, n_queries=2, generator=torch.Generator().manual_seed(0),
                              on_stage=lambda name, robust: stages.append((name, robust)))
    assert [name for name, _ in stages] == list(STANDARD_STAGES)
    assert not stages[0][1].any()  # eps 1: APGD-CE breaks all four points
    assert all(not robust.any() for _, robust in stages)
    assert [c[0] for c in calls] == ["apgd-ce"]  # and the later stages never ran


def test_on_stage_is_runtime_only():
    """Like ``init_delta``, ``on_stage`` is the caller's, never a spec value; a spec passes it only to an attack
    that runs in stages."""
    with pytest.raises(ConfigError, match="does not take on_stage"):
        AttackSpec("autoattack", eps=0.1, extra={"on_stage": print})
    assert "on_stage" not in takes("autoattack")
    assert AttackSpec("autoattack", eps=0.1).has_stages and not AttackSpec("pgd", eps=0.1).has_stages
    model = _linear_model(10)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    seen = []
    AttackSpec("pgd", eps=0.1, steps=1).run(model, x, torch.zeros(2, dtype=torch.long), None,
                                            on_stage=lambda *a: seen.append(a))
    assert seen == []
