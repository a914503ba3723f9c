"""Attacks: the contract every registered attack keeps, the maths of each geometry, and agreement with
torchattacks on a trained model."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from dat_ds.attacks import (
    ATTACKS,
    GEOMETRIES,
    AttackSpec,
    attack_from_config,
    ce_loss,
    default_step_size,
    fgsm,
    fgsm_rs,
    margin_loss,
    pgd,
)
from dat_ds.core.config import AttackConfig, DataConfig, build_config
from dat_ds.core.errors import ConfigError
from dat_ds.data import build_dataset
from dat_ds.models import create_model

# Cheap settings per attack so the registry-wide contract test stays fast.
QUICK = {"pgd": dict(steps=3), "fgsm": {}, "fgsm_rs": {}, "nfgsm": {}, "apgd-ce": dict(apgd_steps=3),
         "apgd-dlr": dict(apgd_steps=3), "apgd-ce-dlr": dict(steps=3), "square": dict(n_queries=20), "autoattack": dict(aa_steps=1, n_queries=10)}
L2_ATTACKS = ("pgd", "fgsm", "fgsm_rs", "nfgsm", "apgd-ce", "apgd-dlr", "apgd-ce-dlr", "square", "autoattack")
# How far from x an attack may go, in units of eps: N-FGSM is not projected (noise 2 eps + step eps).
REACH = {"nfgsm": 3.0}


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    _, spec = build_dataset(DataConfig(), "test")
    return create_model("tiny_cnn", spec).eval()


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _correct(model, x, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


def test_registry_lists_every_attack():
    assert {"fgsm", "fgsm_rs", "pgd", "autoattack", "apgd-ce", "apgd-dlr", "apgd-ce-dlr", "square", "none"} <= set(
        ATTACKS.names())
    assert set(QUICK) == set(ATTACKS.names()) - {"none"}, "add QUICK settings for a new attack"


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", sorted(QUICK))
def test_attack_contract(name, norm, random_model, embedded_test_tensors):
    """Output in [0, 1], inside the eps-ball (N-FGSM: its 3 eps reach), same shape, model flags restored, no
    parameter gradients."""
    if norm == "l2" and name not in L2_ATTACKS:
        pytest.skip(f"{name} is L-inf only here")
    x, y, _ = embedded_test_tensors
    x, y = x[:16], y[:16]
    eps = 0.1 if norm == "linf" else 1.0
    random_model.train()
    x_adv = ATTACKS.get(name)(random_model, x, y, eps=eps, norm=norm, generator=torch.Generator().manual_seed(0),
                              **QUICK[name])
    assert random_model.training, "the attack must restore the model's train flag"
    random_model.eval()
    assert all(p.grad is None for p in random_model.parameters())
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    reach = eps * REACH.get(name, 1.0)
    if norm == "linf":
        assert delta.abs().max() <= reach + 1e-6
    else:
        assert delta.norm(dim=1).max() <= reach + 1e-5


@pytest.mark.parametrize("name", ["pgd", "fgsm", "fgsm_rs", "apgd-ce"])
def test_attack_raises_loss(name, trained_demo_model, embedded_test_tensors):
    x, y, _ = embedded_test_tensors
    x, y = x[:64], y[:64]
    x_adv = ATTACKS.get(name)(trained_demo_model, x, y, eps=0.1, generator=torch.Generator().manual_seed(0),
                              **QUICK[name])
    with torch.no_grad():
        assert ce_loss(trained_demo_model(x_adv), y).mean() > ce_loss(trained_demo_model(x), y).mean()


@pytest.mark.parametrize("name", ["square", "autoattack", "apgd-dlr"])
def test_torchattacks_wrappers_are_seeded_by_the_generator(name, trained_demo_model, embedded_test_tensors):
    """Same generator seed -> same output (what makes N-rank eval exact); the global RNG is left alone."""
    x, y, _ = embedded_test_tensors
    x, y = x[:6], y[:6]
    fn = ATTACKS.get(name)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = fn(trained_demo_model, x, y, eps=0.1, generator=torch.Generator().manual_seed(5), **QUICK[name])
    assert torch.equal(torch.get_rng_state(), before)
    b = fn(trained_demo_model, x, y, eps=0.1, generator=torch.Generator().manual_seed(5), **QUICK[name])
    assert torch.equal(a, b)


def test_geometry_projection_stays_in_ball():
    x = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    far = x + 5 * torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    for norm, eps in (("linf", 0.1), ("l2", 0.5)):
        geometry = GEOMETRIES.get(norm)(eps)
        p = geometry.project(far, x)
        assert p.min() >= 0 and p.max() <= 1
        d = (p - x).flatten(1)
        assert (d.abs().amax(1) if norm == "linf" else d.norm(dim=1)).max() <= eps + 1e-6
        start = geometry.random_start(x, torch.Generator().manual_seed(2))
        d = (start - x).flatten(1)
        assert (d.abs().amax(1) if norm == "linf" else d.norm(dim=1)).max() <= eps + 1e-6
        # A point already inside the ball is left where it is.
        assert torch.allclose(geometry.project(x, x), x)


def test_l2_pgd_keeps_delta_in_ball(trained_demo_model, embedded_test_tensors):
    x, y, _ = embedded_test_tensors
    x, y = x[:64], y[:64]
    eps = 1.5
    x_adv = pgd(trained_demo_model, x, y, eps=eps, steps=10, norm="l2", generator=torch.Generator().manual_seed(0))
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert norms.max() <= eps + 1e-5
    assert norms.mean() > 0.5 * eps  # it actually moved
    assert _acc(trained_demo_model, x_adv, y) < _acc(trained_demo_model, x, y)


def test_margin_loss_sign():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 0])
    m = margin_loss(logits, y)
    assert m[0] == -2.0 and m[1] == 2.0  # negative when correct, positive when misclassified


def test_default_step_size_is_the_single_source(trained_demo_model, embedded_test_tensors):
    """pgd 2.5*eps/steps (Madry), fgsm_rs 1.25*eps (Wong), fgsm eps: step_size=None gives exactly these."""
    x, y, _ = embedded_test_tensors
    x, y = x[:32], y[:32]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert default_step_size("pgd", 0.1, 4) == 2.5 * 0.1 / 4
    assert default_step_size("fgsm_rs", 0.1) == 1.25 * 0.1 and default_step_size("fgsm", 0.1) == 0.1
    a = pgd(trained_demo_model, x, y, eps=0.1, steps=4, generator=g())
    b = pgd(trained_demo_model, x, y, eps=0.1, steps=4, step_size=2.5 * 0.1 / 4, generator=g())
    assert torch.equal(a, b)
    assert not torch.equal(a, pgd(trained_demo_model, x, y, eps=0.1, steps=4, step_size=0.02, generator=g()))
    assert torch.equal(fgsm_rs(trained_demo_model, x, y, eps=0.1, generator=g()),
                       fgsm_rs(trained_demo_model, x, y, eps=0.1, step_size=1.25 * 0.1, generator=g()))
    assert torch.equal(fgsm(trained_demo_model, x, y, eps=0.1), fgsm(trained_demo_model, x, y, eps=0.1, step_size=0.1))
    # The spec reports the same step it runs with.
    assert AttackSpec("pgd", eps=0.1, steps=4).effective_step_size == 2.5 * 0.1 / 4
    assert AttackSpec("square", eps=0.1).effective_step_size is None
    with pytest.raises(ValueError, match="takes no step size"):
        default_step_size("autoattack", 0.1)


@pytest.mark.parametrize("name", sorted(ATTACKS.names()))
def test_attacks_have_explicit_keyword_signatures(name):
    """No ``**kwargs`` to swallow a misspelt argument; every attack takes eps, norm and generator."""
    params = inspect.signature(ATTACKS.get(name)).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert {"eps", "norm", "generator"} <= {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


@pytest.mark.parametrize("name", sorted(ATTACKS.names()))
def test_unknown_attack_keyword_is_a_type_error(name, random_model, embedded_test_tensors):
    x, y, _ = embedded_test_tensors
    with pytest.raises(TypeError, match="stpes"):
        ATTACKS.get(name)(random_model, x[:2], y[:2], eps=0.1, stpes=1000)
    with pytest.raises(TypeError):
        pgd(random_model, x[:2], y[:2], eps=0.1, stpes=1000, restart=5)


@pytest.mark.parametrize("spec,message", [
    (dict(attack="square", restarts=5), "attack 'square' does not take restarts=5; it takes eps, norm, n_queries"),
    (dict(attack="autoattack", steps=10), "attack 'autoattack' does not take steps=10; it takes eps, norm, n_classes"),
    (dict(attack="fgsm", steps=3), "attack 'fgsm' does not take steps=3; it takes eps, step_size, norm, loss"),
    (dict(attack="none", step_size=0.1), "attack 'none' does not take step_size=0.1; it takes eps, norm"),
    (dict(attack="pgd", extra={"stpes": 3}), "attack 'pgd' does not take stpes=3 as an extra argument"),
    (dict(attack="pgd", extra={"steps": 3}), "attack 'pgd' does not take steps=3 as an extra argument"),
    (dict(attack="pgdd"), "unknown attack 'pgdd'"),
    (dict(attack="pgd", restarts=0), "restarts=0 must be >= 1"),
    (dict(attack="pgd", loss="hinge"), "unknown attack loss 'hinge'"),
])
def test_spec_refuses_what_the_attack_does_not_take(spec, message):
    with pytest.raises(ConfigError) as e:
        AttackSpec(**{"eps": 0.1, **spec})
    assert str(e.value).startswith(message), str(e.value)


def test_spec_passes_only_what_the_attack_declares(trained_demo_model, embedded_test_tensors):
    x, y, _ = embedded_test_tensors
    x, y = x[:32], y[:32]
    square = AttackSpec("square", eps=0.1, extra={"n_queries": 5})
    assert square.kwargs(None).keys() == {"eps", "generator", "n_queries"}
    spec = AttackSpec("pgd", eps=0.1, steps=3, restarts=2, loss="margin")
    assert spec.kwargs(None).keys() == {"eps", "generator", "steps", "restarts", "loss_fn"}
    direct = pgd(trained_demo_model, x, y, eps=0.1, steps=3, restarts=2, loss_fn=margin_loss,
                 generator=torch.Generator().manual_seed(1))
    assert torch.equal(spec.run(trained_demo_model, x, y, torch.Generator().manual_seed(1)), direct)


def test_attack_from_config_passes_each_attack_its_own_parameters(trained_demo_model, embedded_test_tensors):
    """The config's steps are PGD's (fgsm and none ignore them); the objective's loss reaches the attacks that
    take one; restarts or a step size for an attack without them are refused when the spec is built."""
    x, y, _ = embedded_test_tensors
    x, y = x[:32], y[:32]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cfg = AttackConfig(name="pgd", eps=0.1, steps=3)
    assert torch.equal(attack_from_config(cfg, trained_demo_model, x, y, generator=g()),
                       pgd(trained_demo_model, x, y, eps=0.1, steps=3, generator=g()))
    assert torch.equal(attack_from_config(cfg, trained_demo_model, x, y, generator=g(), loss_fn=margin_loss),
                       pgd(trained_demo_model, x, y, eps=0.1, steps=3, loss_fn=margin_loss, generator=g()))
    fast = AttackConfig(name="fgsm", eps=0.1, steps=7)
    assert torch.equal(attack_from_config(fast, trained_demo_model, x, y, generator=g(), success_fn=None),
                       fgsm(trained_demo_model, x, y, eps=0.1))
    clean = AttackConfig(name="none", eps=0.1)
    assert attack_from_config(clean, trained_demo_model, x, y, generator=g(), loss_fn=margin_loss) is x
    with pytest.raises(ConfigError, match="attack.restarts=3 does not apply to attack.name=fgsm; 'fgsm' takes eps"):
        attack_from_config(AttackConfig(name="fgsm", restarts=3), trained_demo_model, x, y, generator=g())


def test_config_attack_sections_are_checked_against_the_attack():
    """What ``launch.preflight`` runs before any rank starts (and the trainer's eval spec)."""
    from dat_ds.attacks import eval_spec, training_spec

    cfg = build_config(None, ["eval.attack=none", "eval.steps=5", "attack.name=fgsm", "attack.steps=1"])
    assert training_spec(cfg.attack) == AttackSpec("fgsm", eps=cfg.attack.eps)
    assert eval_spec(cfg).label == f"clean@{cfg.attack.eps:.4g}"
    assert eval_spec(build_config(None, ["eval.attack=pgd", "eval.steps=7", "eval.restarts=2"])).label == "PGD-7x2@0.1"
    with pytest.raises(ConfigError, match="eval.restarts=2 does not apply to eval.attack=apgd-ce-dlr"):  # the default
        eval_spec(build_config(None, ["eval.restarts=2"]))
    with pytest.raises(ConfigError, match="eval.restarts=2 does not apply to eval.attack=fgsm"):
        eval_spec(build_config(None, ["eval.attack=fgsm", "eval.restarts=2"]))
    with pytest.raises(ConfigError, match="eval.step_size=0.01 does not apply to eval.attack=autoattack"):
        eval_spec(build_config(None, ["eval.attack=autoattack", "eval.step_size=0.01"]))


def test_pgd20_matches_torchattacks(trained_demo_model, embedded_test_tensors):
    """Our PGD-20 L-inf accuracy is within 1 pp of torchattacks.PGD with the same eps/alpha/steps."""
    import torchattacks

    x, y, _ = embedded_test_tensors
    x, y = x[:256], y[:256]
    eps, steps = 0.1, 20
    alpha = 2.5 * eps / steps
    ours = pgd(trained_demo_model, x, y, eps=eps, steps=steps, step_size=alpha, random_start=False)
    theirs = torchattacks.PGD(trained_demo_model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    acc_ours, acc_theirs = _acc(trained_demo_model, ours, y), _acc(trained_demo_model, theirs, y)
    assert abs(acc_ours - acc_theirs) <= 0.01, (acc_ours, acc_theirs)
    assert acc_ours < _acc(trained_demo_model, x, y) - 0.05  # the attack does something


@pytest.mark.slow
def test_pgd20_random_start_matches_torchattacks_on_full_test_set(trained_demo_model):
    import torchattacks

    ds, _ = build_dataset(DataConfig(), "test")
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    eps, steps = 0.1, 20
    alpha = 2.5 * eps / steps
    ours = pgd(trained_demo_model, x, y, eps=eps, steps=steps, step_size=alpha, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    theirs = torchattacks.PGD(trained_demo_model, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y)
    assert abs(_acc(trained_demo_model, ours, y) - _acc(trained_demo_model, theirs, y)) <= 0.01


def test_restarts_never_raise_accuracy(trained_demo_model, embedded_test_tensors):
    """Worst case per example: every example one restart breaks, three restarts break too."""
    x, y, _ = embedded_test_tensors
    x, y = x[:128], y[:128]
    for loss_fn in (ce_loss, margin_loss):
        one = pgd(trained_demo_model, x, y, eps=0.1, steps=5, loss_fn=loss_fn, generator=torch.Generator().manual_seed(3))
        three = pgd(trained_demo_model, x, y, eps=0.1, steps=5, restarts=3, loss_fn=loss_fn,
                    generator=torch.Generator().manual_seed(3))
        c1, c3 = _correct(trained_demo_model, one, y), _correct(trained_demo_model, three, y)
        assert not (c3 & ~c1).any(), "an example broken by 1 restart survived 3"
        assert c3.sum() <= c1.sum()


def test_accuracy_order_on_trained_model(trained_demo_model, embedded_test_tensors):
    """PGD-20 <= FGSM <= clean, and robust accuracy falls as eps grows."""
    x, y, _ = embedded_test_tensors
    x, y = x[:256], y[:256]
    clean = _acc(trained_demo_model, x, y)
    acc_fgsm = _acc(trained_demo_model, fgsm(trained_demo_model, x, y, eps=0.1), y)
    acc_pgd = _acc(trained_demo_model, pgd(trained_demo_model, x, y, eps=0.1, steps=20,
                                           generator=torch.Generator().manual_seed(0)), y)
    assert acc_pgd <= acc_fgsm <= clean
    curve = [_acc(trained_demo_model, pgd(trained_demo_model, x, y, eps=e, steps=10,
                                          generator=torch.Generator().manual_seed(0)), y) for e in (0.05, 0.15, 0.3)]
    assert curve[0] >= curve[1] >= curve[2]
    assert curve[0] > curve[2] + 0.1


def _aa_vs_pgd20(model, x, y, **aa_kwargs) -> tuple[float, float]:
    x_aa = ATTACKS.get("autoattack")(model, x, y, eps=0.1, generator=torch.Generator().manual_seed(0), **aa_kwargs)
    x_pgd = pgd(model, x, y, eps=0.1, steps=20, generator=torch.Generator().manual_seed(0))
    clean = _correct(model, x, y)
    return (float((_correct(model, x_aa, y) & clean).float().mean()),
            float((_correct(model, x_pgd, y) & clean).float().mean()))


def test_autoattack_not_weaker_than_pgd20(trained_demo_model, embedded_test_tensors):
    """Small subset and a shortened ensemble (reference AutoAttack is slow on CPU): AutoAttack acc <= PGD-20 acc."""
    x, y, _ = embedded_test_tensors
    acc_aa, acc_pgd = _aa_vs_pgd20(trained_demo_model, x[:32], y[:32], aa_steps=20, n_queries=200)
    assert acc_aa <= acc_pgd, (acc_aa, acc_pgd)


@pytest.mark.slow
def test_reference_autoattack_not_weaker_than_pgd20(trained_demo_model, embedded_test_tensors):
    """Reference settings (100 iterations, 5,000 Square queries) on 256 examples."""
    x, y, _ = embedded_test_tensors
    acc_aa, acc_pgd = _aa_vs_pgd20(trained_demo_model, x[:256], y[:256])
    assert acc_aa <= acc_pgd, (acc_aa, acc_pgd)


def test_attacks_use_input_gradients_only(trained_demo_model, embedded_test_tensors):
    """An attack between backward and step must not change parameter gradients."""
    x, y, _ = embedded_test_tensors
    x, y = x[:16], y[:16]
    model = trained_demo_model
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    pgd(model, x, y, eps=0.1, steps=2, generator=torch.Generator().manual_seed(0))
    ATTACKS.get("apgd-ce")(model, x, y, eps=0.1, apgd_steps=2, generator=torch.Generator().manual_seed(0))
    for g, p in zip(grads, model.parameters()):
        assert torch.equal(g, p.grad)
    model.zero_grad(set_to_none=True)
