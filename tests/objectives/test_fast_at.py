"""Fast adversarial training: N-FGSM, GradAlign, perturbation reuse (ATTA) and the attack-step schedule."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dat_ds import cli
from dat_ds.attacks import ATTACKS, attack_from_config, fgsm, nfgsm, pgd, training_spec
from dat_ds.core.config import build_config
from dat_ds.core.errors import ConfigError
from dat_ds.data.loaders import TrainLoaderFactory
from dat_ds.data.sampler import ShardSampler
from dat_ds.models import create_model
from dat_ds.objectives import ObjectiveContext, build_objective
from dat_ds.objectives.fast import grad_align, scheduled_steps, training_attack
from dat_ds.objectives.reuse import PerturbationStore, check_reuse_budget
from tests.helpers import Crash, assert_identical, crash_after_save, model_state, tiny_args, write_ds

EPS = 0.05


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- N-FGSM


def test_nfgsm_reaches_three_eps_unprojected_and_stays_in_the_image_box(cnn):
    x = 0.3 + 0.4 * torch.rand(64, 1, 28, 28, generator=_g(1))  # far from 0 and 1: the box never clips
    y = torch.randint(0, 10, (64,), generator=_g(2))
    x_adv = nfgsm(cnn, x, y, eps=EPS, generator=_g())
    delta = (x_adv - x).abs()
    assert delta.max() <= 3 * EPS + 1e-6  # noise 2 eps + step eps
    assert delta.max() > 2.5 * EPS  # not projected back to the eps-ball ...
    assert (delta > EPS + 1e-6).float().mean() > 0.3  # ... and not for a few coordinates only
    # Without noise it is plain FGSM with step eps (which never leaves the ball either).
    assert torch.allclose(nfgsm(cnn, x, y, eps=EPS, noise_multiplier=0.0, generator=_g()), fgsm(cnn, x, y, eps=EPS))
    # Anywhere in [0, 1], the result is an image.
    x01 = torch.rand(64, 1, 28, 28, generator=_g(3))
    out = nfgsm(cnn, x01, y, eps=0.3, generator=_g())
    assert out.min() >= 0 and out.max() <= 1 and ((out == 0) | (out == 1)).any()


def test_nfgsm_is_a_training_attack_with_a_named_noise_multiplier(cnn, batch):
    x, y = batch
    cfg = build_config(None, ["attack.name=nfgsm", f"attack.eps={EPS}", "attack.noise_multiplier=1"])
    spec = training_spec(cfg.attack)
    assert spec.extra == {"noise_multiplier": 1.0} and spec.effective_step_size == EPS
    x_adv = attack_from_config(cfg.attack, cnn, x, y, generator=_g())
    assert (x_adv - x).abs().max() <= 2 * EPS + 1e-6  # k = 1: noise eps + step eps
    assert torch.equal(x_adv, nfgsm(cnn, x, y, eps=EPS, noise_multiplier=1.0, generator=_g()))
    with pytest.raises(ConfigError, match=r"attack.noise_multiplier=2 applies to attack.name=nfgsm only, not 'pgd'"):
        build_config(None, ["attack.noise_multiplier=2"])
    with pytest.raises(ConfigError, match=r"attack.noise_multiplier=-1 must be >= 0"):
        build_config(None, ["attack.name=nfgsm", "attack.noise_multiplier=-1"])
    assert "nfgsm" in ATTACKS.names()


# ----------------------------------------------------------------------------- GradAlign


def test_grad_align_is_zero_for_aligned_gradients_and_positive_otherwise(cnn, batch):
    x, y = batch
    # Two classes, linear logits: grad_x CE = (p_1 - [y = 1]) (w_1 - w_0) points the same way at every x.
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 2))
    y2 = y % 2
    penalty, cos = grad_align(linear, x, y2, eps=0.3, generator=_g())
    assert abs(float(penalty.detach())) < 1e-5 and float(cos) > 1 - 1e-5
    penalty, cos = grad_align(cnn, x, y, eps=0.3, generator=_g())
    assert float(penalty.detach()) > 1e-3 and float(cos) < 1 - 1e-3
    # Double backprop: the penalty has a gradient in the parameters.
    cnn.zero_grad(set_to_none=True)
    penalty.backward()
    grads = [p.grad for p in cnn.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    cnn.zero_grad(set_to_none=True)


def test_grad_align_is_an_objective_option(embedded_test_tensors, batch):
    x, y = batch
    _, _, spec = embedded_test_tensors
    losses = {}
    for lam in (0.0, 2.0):
        cfg = build_config(None, ["model.name=tiny_cnn", "attack.name=fgsm_rs", f"attack.eps={EPS}",
                                  f"objective.grad_align={lam}", "objective.name=madry"])
        torch.manual_seed(0)
        model = create_model("tiny_cnn", spec).train()
        ctx = ObjectiveContext(model=model, module=model, cfg=cfg, generator=_g())
        out = build_objective(cfg)(ctx, x, y)
        out.loss.backward()
        losses[lam] = out
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert "grad_align" not in losses[0.0].metrics
    reg = losses[2.0].metrics["grad_align"]
    assert 0 < float(reg) <= 2
    assert torch.allclose(losses[2.0].loss, losses[0.0].loss + 2.0 * reg, atol=1e-5)
    with pytest.raises(ConfigError, match="objective.grad_align applies to the objectives dat, madry"):
        build_config(None, ["objective.name=trades", "objective.grad_align=0.2"])


# ----------------------------------------------------------------------------- reuse


def test_store_quantisation_error_is_at_most_eps_over_255():
    store = PerturbationStore(range(10, 30), 30, (3, 4, 4), EPS)
    delta = (2 * torch.rand(10, 3, 4, 4, generator=_g()) - 1) * EPS
    delta[0] = EPS
    delta[1] = -EPS
    index = torch.arange(10, 20)
    store.update(index, delta)
    back = store.initial_delta(index, torch.full_like(delta, 7.0))
    err = (back - delta).abs().max()
    assert err <= EPS / 255 + 1e-7 and err > 0
    assert back.abs().max() <= EPS + 1e-7 and store.nbytes == 20 * 3 * 4 * 4
    assert torch.equal(back[:2], delta[:2])  # the ends of the interval are codes 0 and 255
    # Examples not seen yet get the random start they were given.
    fresh = store.initial_delta(torch.tensor([12, 25]), torch.full((2, 3, 4, 4), 7.0))
    assert torch.equal(fresh[1], torch.full((3, 4, 4), 7.0)) and not torch.equal(fresh[0], fresh[1])


def test_reused_perturbations_start_the_attack_and_stay_in_the_ball(cnn, batch):
    x, y = batch
    far = 5 * EPS * torch.randn(x.shape, generator=_g(4))
    for attack in (pgd, fgsm):
        x_adv = attack(cnn, x, y, eps=EPS, init_delta=far, generator=_g())
        assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    # PGD-1 with a tiny step from a stored start ends next to that start, not next to a random one.
    start = (2 * torch.rand(x.shape, generator=_g(5)) - 1) * EPS
    x_adv = pgd(cnn, x, y, eps=EPS, steps=1, step_size=1e-4, init_delta=start, generator=_g())
    expected = (x + start).clamp(0, 1)
    assert (x_adv - expected).abs().max() <= 1e-4 + 1e-6

    cfg = build_config(None, ["model.name=tiny_cnn", "attack.reuse=true", "attack.steps=1", f"attack.eps={EPS}"])
    store = PerturbationStore(range(100), 100, tuple(x.shape[1:]), EPS)
    ctx = ObjectiveContext(model=cnn, module=cnn, cfg=cfg, generator=_g(), index=torch.arange(40, 72),
                           perturbations=store)
    first = training_attack(ctx, x, y)
    assert bool(store.filled[40:72].all()) and not bool(store.filled[:40].any())
    kept = store.initial_delta(ctx.index, torch.zeros_like(x))
    assert (kept - (first - x)).abs().max() <= EPS / 255 + 1e-6
    second = training_attack(ctx, x, y)
    assert (second - x).abs().max() <= EPS + 1e-6 and second.min() >= 0 and second.max() <= 1
    assert not torch.equal(first, second)


def test_reuse_sampler_gives_each_rank_its_own_examples_every_epoch():
    n, world, batch = 103, 2, 8
    per_epoch = {}
    for rank in range(world):
        sampler = ShardSampler(n, rank=rank, world_size=world, seed=3, multiple_of=batch, fixed_shards=True)
        shard = set(sampler.shard())
        orders = []
        for epoch in range(4):
            sampler.set_epoch(epoch)
            order = list(sampler)
            assert len(order) == 48 and set(order) <= shard  # 51 // 8 * 8 of the rank's own examples
            orders.append(order)
        assert len({tuple(o) for o in orders}) == 4  # shuffled within the shard each epoch
        sampler.set_epoch(2, start=16)
        assert list(sampler) == orders[2][16:]  # resumable mid-epoch
        per_epoch[rank] = shard
    assert not per_epoch[0] & per_epoch[1] and per_epoch[0] | per_epoch[1] == set(range(n))
    # Without reuse an example moves between ranks from one epoch to the next.
    plain = ShardSampler(n, rank=0, world_size=world, seed=3, multiple_of=batch)
    seen = []
    for epoch in range(2):
        plain.set_epoch(epoch)
        seen.append(set(plain))
    assert seen[0] != seen[1]


def test_reuse_loader_yields_example_ids():
    from dat_ds.data import build_dataset

    cfg = build_config(None, ["attack.reuse=true", "data.train_subset=64"])
    train, _ = build_dataset(cfg.data, "train")
    factory = TrainLoaderFactory(cfg, train, micro_batch=16, rank=1, world_size=2)
    x, y, index = next(iter(factory.loader(0)))
    assert index.shape == (16,) and set(index.tolist()) <= set(factory.shard())
    assert torch.equal(x[0], train[int(index[0])][0]) and int(y[0]) == train[int(index[0])][1]


def test_too_small_reuse_budget_is_one_line_before_training(tmp_path, capsys):
    assert check_reuse_budget(10_000, 2, (3, 32, 32), 5000 * 3072) == 5000 * 3072
    with pytest.raises(ConfigError) as e:
        check_reuse_budget(10_001, 2, (3, 32, 32), 5000 * 3072)
    assert str(e.value).startswith("attack.reuse_max_bytes=15360000 is too small: perturbation reuse needs 15363072 bytes")
    ds = write_ds(tmp_path)
    args = tiny_args(tmp_path / "runs", "budget", ds, "--set", "attack.reuse=true", "--set", "attack.reuse_max_bytes=1000")
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "attack.reuse_max_bytes=1000 is too small" in err and "needs 75264 bytes" in err  # 96 x 1x28x28
    assert not (tmp_path / "runs" / "budget" / "checkpoint").exists()


def test_reuse_refuses_what_it_cannot_follow():
    for override, message in ((["attack.name=nfgsm"], "attack.reuse needs an attack that starts from a perturbation"),
                              (["objective.name=free"], "attack.reuse applies to the objectives"),
                              (["data.unlabeled=x.npz"], "cannot follow the pseudo-labelled pool")):
        with pytest.raises(ConfigError, match=message):
            build_config(None, ["attack.reuse=true", *override])


# ----------------------------------------------------------------------------- steps schedule


def test_steps_schedule_ramps_linearly_over_the_run(cnn, batch):
    assert [scheduled_steps(1, 5, t, 9) for t in range(9)] == [1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert scheduled_steps(1, 5, 0, 1) == 5 and scheduled_steps(5, 1, 8, 9) == 1
    x, y = batch
    calls = []

    class Counting(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            calls.append(1)
            return self.inner(t)

    cfg = build_config(None, ["attack.steps_schedule=[1, 4]", f"attack.eps={EPS}"])
    counting = Counting(cnn)
    for step, want in ((0, 1), (5, 3), (9, 4)):
        calls.clear()
        ctx = ObjectiveContext(model=counting, module=counting, cfg=cfg, generator=_g(), step=step, total_steps=10)
        training_attack(ctx, x, y)
        assert len(calls) == want  # one forward per PGD step
    with pytest.raises(ConfigError, match="attack.steps_schedule applies to attacks with steps"):
        build_config(None, ["attack.name=fgsm_rs", "attack.steps_schedule=[1, 2]"])


# ----------------------------------------------------------------------------- 2 ranks, resume


def _rank_store(tag_dir, rank):
    return torch.load(tag_dir / f"rank_state_{rank}.pt", map_location="cpu", weights_only=True)["perturbations"]


def test_reuse_crash_mid_epoch_then_resume_is_bit_identical(tmp_path):
    """1 rank, in process: PGD-1 + reuse + a 1 -> 3 step schedule, killed after the mid-epoch checkpoint of epoch 2
    and resumed: the same weights and stored perturbations as an uninterrupted run."""
    ds = write_ds(tmp_path)
    runs = tmp_path / "runs"
    extra = ("--set", "attack.reuse=true", "--set", "attack.steps_schedule=[1, 3]")
    assert cli.main(["train", *tiny_args(runs, "ref", ds, *extra)]) == 0
    # step 8 = epoch 2, step 2 of 6: the store holds epoch 1's deltas and 2 new batches
    with crash_after_save("step000000008"), pytest.raises(Crash):
        cli.main(["train", *tiny_args(runs, "crash", ds, *extra)])
    assert cli.main(["train", *tiny_args(runs, "crash", ds, *extra), "--resume", "auto"]) == 0
    a, b = runs / "ref" / "checkpoint" / "epoch0002", runs / "crash" / "checkpoint" / "epoch0002"
    assert_identical(model_state(a), model_state(b))
    store = _rank_store(a, 0)
    assert_identical(store, _rank_store(b, 0))
    assert bool(store["filled"].all()) and store["codes"].shape == (96, 1, 28, 28)
    assert len(set(store["codes"].flatten().tolist())) > 100  # real perturbations, not a constant


@pytest.mark.dist
@pytest.mark.slow
def test_two_rank_reuse_resume_is_bit_identical(tmp_path):
    """FGSM-RS + reuse + GradAlign on 2 ranks: 2 epochs straight vs 1 epoch, then resumed for the second: the
    same weights and the same stored perturbations, each rank's own."""
    from tests.helpers import run_cli

    ds = write_ds(tmp_path)
    runs = tmp_path / "runs"
    common = ["--set", "attack.reuse=true", "--set", "objective.grad_align=0.5", "--set", "attack.name=fgsm_rs"]

    def train(name, epochs, *extra):
        args = tiny_args(runs, name, ds, *common, *extra, subset=128, epochs=epochs, save_every=0)
        run_cli("train", "--nproc", "2", *args, check=True)

    train("straight", 2)
    train("split", 1)
    train("split", 2, "--resume", "auto")
    a, b = runs / "straight" / "checkpoint" / "epoch0002", runs / "split" / "checkpoint" / "epoch0002"
    assert_identical(model_state(a), model_state(b))
    stores = []
    for rank in range(2):
        sa, sb = _rank_store(a, rank), _rank_store(b, rank)
        assert_identical(sa, sb)
        assert bool(sa["filled"].all())  # 64 examples per rank, 4 batches of 16: all attacked
        stores.append(sa)
    assert not set(stores[0]["ids"].tolist()) & set(stores[1]["ids"].tolist())
    history = json.loads((runs / "split" / "summary.json").read_text())["history"]
    assert len(history) == 2
