"""Objective options: label smoothing, the eps warm-up, consistency regularisation (TRADES + JS) and CutMix with
soft labels."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dat_ds.attacks import training_spec
from dat_ds.core import names
from dat_ds.core.config import build_config, replace
from dat_ds.core.errors import ConfigError
from dat_ds.objectives import ObjectiveContext, build_objective
from dat_ds.objectives.eps_warmup import eps_factor, warmed_up, warmup_steps
from tests.helpers import write_ds

EPS, LS = 0.05, 0.1
BATCH_SIZE = 24  # the `batch` fixture (conftest)


# ----------------------------------------------------------------------------- label smoothing


def smoothed_ce_by_hand(logits: torch.Tensor, y: torch.Tensor, ls: float) -> torch.Tensor:
    """Szegedy et al.'s target (1 - ls) * one_hot + ls / K, written out."""
    k = logits.shape[1]
    target = (1 - ls) * F.one_hot(y, k).double() + ls / k
    return -(target * F.log_softmax(logits.double(), dim=1)).sum(dim=1).mean()


def _run(objective: str, model, x, y, *overrides: str, seed: int = 3, step: int = 0, steps_per_epoch: int = 0):
    cfg = build_config(None, [f"objective.name={objective}", "attack.name=pgd", "attack.steps=2", f"attack.eps={EPS}",
                              *overrides])
    ctx = ObjectiveContext(model=model, module=model, cfg=cfg, generator=torch.Generator().manual_seed(seed),
                           step=step, steps_per_epoch=steps_per_epoch)
    obj = build_objective(cfg)
    return obj, ctx, obj(ctx, x, y)


def test_supervised_ce_is_torchs_smoothed_ce_and_plain_ce_at_zero(batch, cnn):
    from dat_ds.objectives.base import supervised_ce

    x, y = batch
    with torch.no_grad():
        logits = cnn(x)
    assert torch.equal(supervised_ce(logits, y), F.cross_entropy(logits.float(), y))
    assert torch.equal(supervised_ce(logits, y, 0.0), F.cross_entropy(logits.float(), y))
    got = supervised_ce(logits, y, LS)
    assert got.item() == pytest.approx(smoothed_ce_by_hand(logits, y, LS).item(), rel=1e-6)
    assert torch.equal(got, F.cross_entropy(logits.float(), y, label_smoothing=LS))
    assert got.item() > F.cross_entropy(logits.float(), y).item() + 1e-3  # a real change on this batch


def _expected(objective: str, model, x, y, out, ls: float) -> float:
    """The objective's loss written out from its own adversarial logits (``out.logits``) and clean ones."""
    with torch.no_grad():
        clean = model(x).float()
    adv = out.logits.float()
    ce = (lambda logits: smoothed_ce_by_hand(logits, y, ls)) if ls else (lambda logits: F.cross_entropy(logits, y))
    if objective in ("madry", "free", "clean"):
        return ce(adv).item()
    if objective == "dat":
        return (ce(adv) + 0.5 * ce(clean)).item()
    kl = (F.softmax(clean, 1) * (F.log_softmax(clean, 1) - F.log_softmax(adv, 1))).sum(1)
    if objective == "trades":
        return (ce(clean) + 6.0 * kl.mean()).item()
    assert objective == "mart"
    probs = F.softmax(adv, 1)
    p_wrong = probs.scatter(1, y[:, None], -1.0).max(dim=1).values
    k = adv.shape[1]
    target = (1 - ls) * F.one_hot(y, k).float() + ls / k
    per_example = -(target * F.log_softmax(adv, 1)).sum(1) - torch.log(1.0001 - p_wrong)
    p_true = F.softmax(clean, 1).gather(1, y[:, None]).squeeze(1)
    return (per_example.mean() + 6.0 * (kl * (1 - p_true)).mean()).item()


@pytest.mark.parametrize("objective", names.LABEL_SMOOTHING_OBJECTIVES)
def test_each_objective_smooths_its_ce_terms_and_keeps_the_attack(objective, cnn, batch):
    x, y = batch
    _, _, plain = _run(objective, cnn, x, y)
    _, _, smooth = _run(objective, cnn, x, y, f"objective.label_smoothing={LS}")
    # Same generator, same model: the attack (plain CE / KL) found the same examples whatever the smoothing.
    assert torch.equal(plain.logits, smooth.logits)
    assert plain.loss.item() == pytest.approx(_expected(objective, cnn, x, y, plain, 0.0), rel=1e-5)
    assert smooth.loss.item() == pytest.approx(_expected(objective, cnn, x, y, smooth, LS), rel=1e-5)
    assert smooth.loss.item() != pytest.approx(plain.loss.item(), rel=1e-4)


@pytest.mark.parametrize("objective", ["madry", "dat", "clean", "free"])
def test_zero_smoothing_is_todays_loss_exactly(objective, cnn, batch):
    x, y = batch
    _, _, out = _run(objective, cnn, x, y)
    want = F.cross_entropy(out.logits.float(), y)
    if objective == "dat":
        want = want + 0.5 * F.cross_entropy(cnn(x).float(), y)
    assert torch.equal(out.loss, want)


def test_label_smoothing_is_validated_without_torch_models():
    for bad in ("1", "-0.1", "1.5"):
        with pytest.raises(ConfigError, match=r"objective.label_smoothing=.* must be in \[0, 1\)"):
            build_config(None, [f"objective.label_smoothing={bad}"])
    with pytest.raises(ConfigError, match="applies to the objectives"):
        build_config(None, ["objective.name=acl", "objective.label_smoothing=0.1"])
    assert build_config(None, ["objective.label_smoothing=0.2"]).objective.label_smoothing == 0.2


# ----------------------------------------------------------------------------- eps warm-up


def test_eps_factor_ramps_linearly_per_step():
    assert warmup_steps(0, 8) == 0 and warmup_steps(1.5, 4) == 6 and warmup_steps(0.01, 4) == 1
    assert [eps_factor(t, 1.5, 4) for t in range(8)] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1, 1, 1])
    assert [eps_factor(t, 0, 4) for t in range(3)] == [1.0, 1.0, 1.0]
    cfg = build_config(None, ["attack.eps=0.1", "attack.steps=4", "attack.eps_warmup_epochs=2"]).attack
    early = warmed_up(cfg, 1, 5)  # factor 2 / 10
    assert early.eps == pytest.approx(0.02) and early.step_size is None
    assert training_spec(early).effective_step_size == pytest.approx(0.2 * training_spec(cfg).effective_step_size)
    explicit = replace(cfg, step_size=0.03)
    assert warmed_up(explicit, 1, 5).step_size == pytest.approx(0.006)
    assert warmed_up(explicit, 9, 5) is explicit  # the ramp is over: the config as written
    with pytest.raises(ConfigError, match="eps_warmup_epochs=-1 must be >= 0"):
        build_config(None, ["attack.eps_warmup_epochs=-1"])
    with pytest.raises(ConfigError, match="applies to the objectives"):
        build_config(None, ["objective.name=clean", "attack.eps_warmup_epochs=1"])


def test_free_at_warmup_scales_its_ball_and_step(cnn, batch):
    x, y = batch
    obj, ctx, out = _run("free", cnn, x, y, "attack.eps_warmup_epochs=1", step=0, steps_per_epoch=4)
    out.loss.backward()
    obj.after_backward()
    assert obj.delta.abs().max().item() == pytest.approx(EPS / 4, rel=1e-5)  # one signed step of eps / 4


def test_training_run_attacks_at_the_ramped_eps(tmp_path, monkeypatch, caplog):
    """In process: 2 epochs x 4 steps, warm-up 1.5 epochs; the eps and step size each training attack got."""
    from dat_ds.objectives import fast
    from dat_ds.runtime.trainer import Trainer

    seen: list[tuple[float, float]] = []
    real = fast.attack_from_config

    def recording(cfg, *args, **kwargs):
        seen.append((cfg.eps, cfg.step_size))
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(fast, "attack_from_config", recording)
    cfg = build_config(None, [f"output_dir={tmp_path / 'runs'}", "name=eps-warmup", f"deepspeed_config={write_ds(tmp_path)}",
                              "model.name=tiny_cnn", "objective.name=madry", "attack.steps=1", "attack.eps=0.1",
                              "attack.step_size=0.04", "attack.eps_warmup_epochs=1.5", "data.train_subset=64",
                              "train.epochs=2", "train.log_every=1", "train.keep_last=1"])
    with caplog.at_level("INFO", logger="dat_ds"):
        trainer = Trainer(cfg).setup()
        assert trainer.steps_per_epoch == 4
        trainer.fit()
    want = [min(1.0, (t + 1) / 6) for t in range(8)]
    assert [e for e, _ in seen] == pytest.approx([0.1 * f for f in want])
    assert [s for _, s in seen] == pytest.approx([0.04 * f for f in want])
    assert trainer.cfg.attack.eps == 0.1  # evaluation reads the config: the full eps
    logged = [r.getMessage() for r in caplog.records if "eps_warmup_epochs" in r.getMessage()]
    assert len(logged) == 1 and "over the first 6 steps" in logged[0]
    steps = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "step"] == list(range(1, 9))


# ----------------------------------------------------------------------------- consistency regularisation


def test_js_divergence_is_zero_for_equal_views_symmetric_and_at_most_log2():
    from dat_ds.objectives.mixing import js_divergence

    a = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    b = torch.randn(16, 10, generator=torch.Generator().manual_seed(1))
    assert js_divergence(a, a, 0.5).item() == pytest.approx(0.0, abs=1e-7)
    assert js_divergence(a, b, 0.5).item() == pytest.approx(js_divergence(b, a, 0.5).item(), rel=1e-6)
    p, q = F.softmax(a.double() / 0.5, 1), F.softmax(b.double() / 0.5, 1)
    m = (p + q) / 2
    by_hand = 0.5 * ((p * (p / m).log()).sum(1) + (q * (q / m).log()).sum(1)).mean()
    assert js_divergence(a, b, 0.5).item() == pytest.approx(by_hand.item(), rel=1e-5)
    far = torch.zeros(4, 10)
    far[:, 0] = 100.0
    assert js_divergence(far, far.roll(1, dims=1), 1.0).item() == pytest.approx(0.6931, abs=1e-3)  # disjoint: ln 2


def test_trades_consistency_is_trades_on_two_views_plus_weighted_js(cnn, batch):
    from dat_ds.objectives.mixing import consistency_views, js_divergence

    x, y = batch
    _, _, out = _run("trades", cnn, x, y, "objective.consistency.weight=2", "objective.consistency.temperature=0.5",
                     "objective.label_smoothing=0.1", seed=5)
    gen = torch.Generator().manual_seed(5)
    views = consistency_views(x, gen)  # the objective draws the views first, then attacks with the same generator
    cfg = build_config(None, ["objective.name=trades", "attack.name=pgd", "attack.steps=2", f"attack.eps={EPS}",
                              "objective.label_smoothing=0.1"])
    ctx = ObjectiveContext(model=cnn, module=cnn, cfg=cfg, generator=gen)
    plain = build_objective(cfg)(ctx, views, torch.cat([y, y]))
    assert torch.equal(out.logits, plain.logits[: len(y)])  # view 1's adversarial predictions, one per example
    want = plain.loss + 2.0 * js_divergence(*plain.logits.chunk(2), 0.5)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert out.metrics["loss_consistency"].item() > 0
    assert out.targets is None  # ... against the batch labels: the running accuracy stays a fraction


def test_consistency_run_trains_in_process(tmp_path):
    from dat_ds.runtime.trainer import Trainer

    cfg = build_config(None, [f"output_dir={tmp_path / 'runs'}", "name=consistency", f"deepspeed_config={write_ds(tmp_path)}",
                              "model.name=tiny_cnn", "objective.name=trades", "objective.consistency={}",
                              "attack.steps=1", "data.train_subset=32", "train.epochs=1", "train.log_every=1"])
    summary = Trainer(cfg).fit()
    steps = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "step"]
    assert len(steps) == 2 and all(r["loss_consistency"] > 0 for r in steps)
    assert 0.0 <= summary["final"]["train_acc"] <= 1.0


def test_consistency_is_validated():
    cfg = build_config(None, ["objective.name=trades", "objective.consistency={}"])
    assert cfg.objective.consistency.weight == 1.0 and cfg.objective.consistency.temperature == 0.5
    assert build_config(None, ["objective.name=trades"]).objective.consistency is None
    for override, message in ((["objective.name=madry", "objective.consistency.weight=1"], "applies to the objectives"),
                              (["objective.name=trades", "objective.consistency.temperature=0"], "must be > 0"),
                              (["objective.name=trades", "objective.consistency.weight=-1"], "must be >= 0"),
                              (["objective.name=trades", "objective.consistency={}", "attack.reuse=true"],
                               "turn one of them off")):
        with pytest.raises(ConfigError, match=message):
            build_config(None, override)


# ----------------------------------------------------------------------------- CutMix with soft labels


def test_beta_sampler_has_betas_moments():
    from dat_ds.objectives.mixing import beta_sample

    gen = torch.Generator().manual_seed(0)
    for alpha in (0.4, 1.0, 3.0):
        s = torch.stack([beta_sample(alpha, gen) for _ in range(3000)])
        assert s.min() >= 0 and s.max() <= 1
        assert s.mean().item() == pytest.approx(0.5, abs=0.02)
        assert s.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)  # Var Beta(a, a) = 1 / (4(2a + 1))


def test_cutmix_pastes_one_box_and_mixes_labels_by_its_area():
    from dat_ds.objectives.mixing import cutmix

    gen = torch.Generator().manual_seed(4)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8)
    mixed, soft = cutmix(x, y, 10, alpha=1.0, generator=gen)
    changed = (mixed != x).any(dim=1)  # (B, H, W): where a partner's pixels were pasted
    box = changed.any(dim=0)
    rows, cols = box.any(dim=1).nonzero().squeeze(1), box.any(dim=0).nonzero().squeeze(1)
    area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert box.sum() == area and 0 < area < 32 * 32  # one rectangle
    kept = 1 - area.item() / 1024
    assert torch.allclose(soft.sum(dim=1), torch.ones(8))
    for i in range(8):
        if changed[i].any():  # a partner other than itself: its label holds exactly the box's share
            partner = [k for k in range(8) if torch.equal(mixed[i][:, box], x[k][:, box])][0]
            assert soft[i, i].item() == pytest.approx(kept, abs=1e-6)
            assert soft[i, partner].item() == pytest.approx(1 - kept, abs=1e-6)
    never = cutmix(x, y, 10, alpha=1.0, prob=1e-9, generator=gen)
    assert torch.equal(never[0], x) and torch.equal(never[1], F.one_hot(y, 10).float())


def test_trades_cutmix_is_soft_label_ce_plus_kl_and_attacks_the_soft_labels(cnn, batch):
    from dat_ds.objectives.fast import training_attack
    from dat_ds.objectives.mixing import cutmix
    from dat_ds.objectives.trades import kl_clean_adv, kl_to_target

    x, y = batch
    _, _, out = _run("trades", cnn, x, y, "objective.cutmix={}", "objective.label_smoothing=0.1", seed=7)
    cfg = build_config(None, ["objective.name=trades", "attack.name=pgd", "attack.steps=2", f"attack.eps={EPS}"])
    gen = torch.Generator().manual_seed(7)
    x_mixed, soft = cutmix(x, y, 10, alpha=1.0, generator=gen)
    ctx = ObjectiveContext(model=cnn, module=cnn, cfg=cfg, generator=gen)
    x_adv = training_attack(ctx, x_mixed, soft, loss_fn=kl_to_target, success_fn=None)
    with torch.no_grad():
        clean, adv = cnn(x_mixed), cnn(x_adv)
    target = 0.9 * soft + 0.1 / 10
    want = -(target * F.log_softmax(clean, 1)).sum(1).mean() + 6.0 * kl_clean_adv(clean, adv).mean()
    assert torch.equal(out.logits, adv)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.equal(out.targets, soft.argmax(dim=1))


def test_cutmix_is_validated():
    cfg = build_config(None, ["objective.name=trades", "objective.cutmix={}"])
    assert (cfg.objective.cutmix.alpha, cfg.objective.cutmix.prob) == (1.0, 1.0)
    for override, message in ((["objective.name=dat", "objective.cutmix={}"], "applies to the objectives"),
                              (["objective.name=trades", "objective.cutmix.alpha=0"], "must be > 0"),
                              (["objective.name=trades", "objective.cutmix.prob=0"], r"must be in \(0, 1\]"),
                              (["objective.name=trades", "objective.cutmix={}", "objective.consistency={}"], "use one"),
                              (["objective.name=trades", "objective.cutmix={}", "attack.reuse=true"], "turn one")):
        with pytest.raises(ConfigError, match=message):
            build_config(None, override)
