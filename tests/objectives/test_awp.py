"""AWP (Wu et al. 2020): the per-layer perturbation, its removal before the optimizer step (one SGD step
against a hand-computed reference), the config, and short in-process runs with ZeRO 0 and ZeRO 2."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from dat_ds.core.config import AWPConfig, build_config, check_engine
from dat_ds.core.errors import ConfigError
from dat_ds.objectives import ObjectiveContext, build_objective
from dat_ds.objectives.awp import AWP, perturbed_weights
from tests.helpers import write_ds

GAMMA = 0.01
BATCH_SIZE = 16  # the `batch` fixture (conftest)


class BNNet(nn.Module):
    """Conv + BatchNorm + linear on 1x28x28: weights of 4 and 2 dimensions, biases and BatchNorm (not perturbed)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 13 * 13, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _cfg(objective: str, *extra: str):
    return build_config(None, [f"objective.name={objective}", "attack.name=pgd", "attack.steps=2", "attack.eps=0.1",
                               f"awp.gamma={GAMMA}", *extra])


def _ctx(cfg, model, seed=0, step=0):
    return ObjectiveContext(model=model, module=model, cfg=cfg, generator=torch.Generator().manual_seed(seed),
                            step=step, steps_per_epoch=10)


# ----------------------------------------------------------------------------- config


def test_awp_is_off_unless_given_and_validated():
    assert build_config(None, []).awp is None
    assert build_config(None, ["awp={}"]).awp == AWPConfig(gamma=0.005, warmup_epochs=0.0)
    cfg = build_config(None, ["objective.name=trades", "awp.gamma=0.005", "awp.warmup_epochs=10"])
    assert cfg.awp == AWPConfig(gamma=0.005, warmup_epochs=10.0)
    assert isinstance(build_objective(cfg), AWP)
    assert not isinstance(build_objective(build_config(None, [])), AWP)
    for overrides, message in ((["awp.gamma=0"], r"awp.gamma=0 must be in \(0, 1\]"),
                               (["awp.warmup_epochs=-1"], "must be >= 0"),
                               (["awp={}", "objective.name=clean"], "awp applies to the objectives dat, madry, trades"),
                               (["awp={}", "objective.name=free"], "not objective.name='free'"),
                               (["awp={}", "objective.grad_align=0.2"], "do not combine"),
                               (["awp={}", "train.nan_policy=skip"], "nan_policy=abort"),
                               (["awp.gamm=0.1"], "unknown config key 'awp.gamm'")):
        with pytest.raises(ConfigError, match=message):
            build_config(None, overrides)
    for stage in (0, 1, 2):
        check_engine(cfg, stage)
    with pytest.raises(ConfigError, match="ZeRO-3 partitions"):
        check_engine(cfg, 3)


# ----------------------------------------------------------------------------- maths


@pytest.mark.parametrize("objective", ["madry", "dat", "trades"])
def test_perturbation_is_gamma_times_each_weight_norm_along_the_loss_gradient(objective, batch):
    x, y = batch
    torch.manual_seed(0)
    model = BNNet().train()
    cfg = _cfg(objective)
    awp = build_objective(cfg)
    ctx = _ctx(cfg, model)
    adv = awp.inner.adversarial_batch(ctx, x, y)
    bn_before = {k: v.clone() for k, v in model.bn.state_dict().items()}
    v = awp.perturbation(ctx, adv)
    assert sorted(v) == ["conv.weight", "fc.weight"]  # no biases, no BatchNorm (1-D), as the authors do
    assert [n for n, _ in perturbed_weights(model)] == ["conv.weight", "fc.weight"]
    for k, value in model.bn.state_dict().items():  # the ascent forward left the running statistics alone
        assert torch.equal(value, bn_before[k]), k
    loss = awp.inner.loss(ctx, model, adv).loss
    grads = dict(zip(["conv.weight", "fc.weight"], torch.autograd.grad(loss, [model.conv.weight, model.fc.weight])))
    for name, p in perturbed_weights(model):
        assert v[name].norm().item() == pytest.approx(GAMMA * p.norm().item(), rel=1e-5)
        cos = torch.nn.functional.cosine_similarity(v[name].flatten(), grads[name].flatten(), dim=0)
        assert cos.item() == pytest.approx(1.0, abs=1e-5)  # ascent: along the gradient of the objective's loss


@pytest.mark.parametrize("objective", ["madry", "trades"])
def test_one_sgd_step_is_w_minus_lr_times_the_gradient_at_w_plus_v(objective, batch):
    """The loop's contract: objective -> backward -> after_backward -> step. The weights after the step equal
    w - lr * grad L(w + v) computed by hand: v was removed before the optimizer saw the weights."""
    x, y = batch
    lr, seed = 0.5, 3
    torch.manual_seed(0)
    model = BNNet().train()
    ref = copy.deepcopy(model)
    cfg = _cfg(objective)
    awp = build_objective(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    ctx = _ctx(cfg, model, seed)
    out = awp(ctx, x, y)
    perturbed = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    out.loss.backward()
    awp.after_backward()
    restored = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()

    # by hand, on the copy: the same adversarial batch, v from the loss at w, the gradient at w + v
    ref_ctx = _ctx(cfg, ref, seed)
    adv = awp.inner.adversarial_batch(ref_ctx, x, y)
    ascent_model = copy.deepcopy(ref)  # the ascent forward must not move ref's BatchNorm statistics
    named = [(n, p) for n, p in ascent_model.named_parameters() if n in ("conv.weight", "fc.weight")]
    g = torch.autograd.grad(awp.inner.loss(ref_ctx, ascent_model, adv).loss, [p for _, p in named])
    with torch.no_grad():
        w0 = {n: p.clone() for n, p in ref.named_parameters()}
        for (n, p), gn in zip(named, g):
            dict(ref.named_parameters())[n].add_(GAMMA * p.norm() * gn / gn.norm())
    grads = torch.autograd.grad(awp.inner.loss(ref_ctx, ref, adv).loss, list(ref.parameters()))
    for (n, p), gn in zip(ref.named_parameters(), grads):
        assert torch.allclose(perturbed[n], p.detach(), rtol=1e-6, atol=1e-9), n  # the training forward ran at w + v
        assert torch.equal(restored[n], w0[n]), n  # removed bit-exactly before the step
        want = w0[n] - lr * gn
        assert torch.allclose(dict(model.named_parameters())[n].detach(), want, rtol=1e-5, atol=1e-7), n
    assert any(not torch.equal(perturbed[n], w0[n]) for n in w0)  # it did perturb
    ref_buffers = dict(ref.bn.named_buffers())
    for k, value in model.bn.named_buffers():  # one BatchNorm update per step, as without AWP
        assert torch.equal(value, ref_buffers[k]), k
    assert model.bn.num_batches_tracked.item() == (2 if objective == "trades" else 1)  # its training forwards only


def test_no_perturbation_before_warmup_epochs(batch):
    x, y = batch
    torch.manual_seed(0)
    model = BNNet().train()
    cfg = _cfg("madry", "awp.warmup_epochs=2")
    awp = build_objective(cfg)
    w0 = [p.detach().clone() for p in model.parameters()]
    awp(_ctx(cfg, model, step=19), x, y)  # epoch 2 of 10-step epochs: still plain madry
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    awp(_ctx(cfg, model, step=20), x, y)
    assert any(not torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    awp.after_backward()
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))


# ----------------------------------------------------------------------------- runs (1 rank, DeepSpeed engine)


@pytest.mark.parametrize("zero", [0, 2])
@pytest.mark.parametrize("objective", ["madry", "trades"])
def test_in_process_run_restores_weights_before_every_engine_step(objective, zero, tmp_path):
    from dat_ds.runtime.trainer import Trainer

    ds = write_ds(tmp_path, zero_optimization={"stage": zero})
    cfg = build_config(None, [f"output_dir={tmp_path / 'runs'}", f"name=awp-{objective}-{zero}", f"deepspeed_config={ds}",
                              "model.name=tiny_cnn", f"objective.name={objective}", "attack.steps=1",
                              f"awp.gamma={GAMMA}", "data.train_subset=64", "train.epochs=1", "train.log_every=1"])
    trainer = Trainer(cfg).setup()
    awp, engine = trainer.run.objective, trainer.engine
    assert isinstance(awp, AWP)
    seen = {"applied": 0, "restored": 0, "stepped": 0}
    state = {}
    real_apply, real_restore, real_step = awp.apply, awp.restore, engine.step

    def apply(ctx, v):
        state["w"] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        real_apply(ctx, v)
        for name, p in perturbed_weights(engine.module):
            rel = (p.detach() - state["w"][name]).norm() / state["w"][name].norm()
            assert rel.item() == pytest.approx(GAMMA, rel=1e-3), name
        seen["applied"] += 1

    def restore():
        perturbed = bool(awp._originals)
        real_restore()
        if perturbed:
            for n, p in engine.module.named_parameters():
                assert torch.equal(p.detach(), state["w"][n]), n
            seen["restored"] += 1

    def step(*a, **k):
        w = state.pop("w")
        real_step(*a, **k)
        assert any(not torch.equal(p.detach(), w[n]) for n, p in engine.module.named_parameters())
        seen["stepped"] += 1

    awp.apply, awp.restore, engine.step = apply, restore, step
    summary = trainer.fit()
    assert seen == {"applied": 4, "restored": 4, "stepped": 4}  # 64 examples / micro batch 16
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if r["kind"] == "step")
    assert summary["final"]["optimizer_steps"] == 4
