"""FARE (Schlarmann et al. 2024): the loss and its attack, the frozen original encoder f_0, resume, the linear probe.

On small timm ViTs with random weights (``test_vit``: no hub download) saved to a local weights file, as a pretrained
encoder would be given with ``model.weights``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dat_ds.core.config import build_config
from dat_ds.data.base import DataSpec
from dat_ds.evaluation.finetune import FinetuneSettings, feature_dim, finetune
from dat_ds.models import create_model
from dat_ds.objectives import ObjectiveContext, build_objective, plain_step
from dat_ds.objectives.fare import FareModel, original_features, squared_distance
from dat_ds.optim import param_groups
from dat_ds.runtime.build import make_model
from tests.helpers import join_two_rank_world, spawn_two_ranks, write_ds

SPEC = DataSpec(in_chans=3, num_classes=10, img_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
VIT = ["model.name=test_vit", "objective.name=fare", "attack.steps=2", "attack.eps=0.03"]


@pytest.fixture
def vit_weights(tmp_path):
    """A "pretrained" ImageNet-shaped test_vit (random weights, 1000 classes) in a local file."""
    torch.manual_seed(0)
    backbone = create_model("test_vit", DataSpec(in_chans=3, num_classes=1000, img_size=16, mean=SPEC.mean,
                                                 std=SPEC.std)).backbone
    path = tmp_path / "vit.pt"
    torch.save(backbone.state_dict(), path)
    return path, backbone


def _fare(weights, *overrides) -> tuple[object, FareModel]:
    cfg = build_config(overrides=[*VIT, f"model.weights={weights}", *overrides])
    torch.manual_seed(1)  # a head that starts fresh, and is then dropped
    return cfg, make_model(cfg, SPEC, cfg.model.weights)


def _batch(n=4):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def test_the_encoder_is_the_pretrained_model_without_its_head(vit_weights):
    path, pretrained = vit_weights
    _, model = _fare(path)
    x = _batch()
    features = model.eval()(x)
    assert features.shape == (4, pretrained.num_features)
    z = (x - model.encoder.mean) / model.encoder.std  # the input normalisation stays in f (and f_0)
    torch.testing.assert_close(features, pretrained.eval().forward_head(pretrained.forward_features(z), pre_logits=True))
    assert not any(k.startswith(("encoder.backbone.head.", "reference.backbone.head.")) and v.numel()
                   for k, v in model.state_dict().items())


def test_fare_loss_is_zero_at_delta_zero_while_f_is_f0(vit_weights):
    _, model = _fare(vit_weights[0])
    x = _batch()
    for mode in (model.eval(), model.train()):  # test_vit has no dropout: train mode computes the same f
        assert torch.equal(squared_distance(mode(x), original_features(model, x)), torch.zeros(4))


def test_a_training_step_moves_f_and_never_f0(vit_weights):
    cfg, model = _fare(vit_weights[0])
    f0 = {k: v.clone() for k, v in model.reference.state_dict().items()}
    encoder = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    assert not any(p.requires_grad for p in model.reference.parameters())
    groups = param_groups(model, 1e-4)
    held = {id(p) for g in groups for p in g["params"]}
    assert held == {id(p) for p in model.encoder.parameters()}  # f_0 has no optimizer state
    optimizer = torch.optim.SGD(groups, lr=0.1)
    objective = build_objective(cfg)
    ctx = ObjectiveContext(model=model, module=model, cfg=cfg, generator=torch.Generator().manual_seed(3))
    x = _batch()
    out = plain_step(objective, ctx, x, None, optimizer, model)
    assert out.loss > 0 and model.reference.training is False and model.encoder.training is True
    assert all(torch.equal(v, f0[k]) for k, v in model.reference.state_dict().items())
    assert any(not torch.equal(v, encoder[k]) for k, v in model.encoder.state_dict().items())
    with torch.no_grad():  # f moved away from f_0, so the loss at delta = 0 is now > 0
        assert squared_distance(model.eval()(x), original_features(model, x)).sum() > 0


def test_the_attack_maximises_the_feature_distance_inside_the_ball(vit_weights):
    cfg, model = _fare(vit_weights[0], "attack.steps=3")
    from dat_ds.objectives.fast import training_attack

    x = _batch()
    target = original_features(model, x)
    ctx = ObjectiveContext(model=model, module=model, cfg=cfg, generator=torch.Generator().manual_seed(4))
    x_adv = training_attack(ctx, x, target, loss_fn=squared_distance, success_fn=None)
    assert (x_adv - x).abs().max() <= cfg.attack.eps + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    random = (x + torch.empty_like(x).uniform_(-cfg.attack.eps, cfg.attack.eps)).clamp(0, 1)
    with torch.no_grad():
        reached = squared_distance(model.eval()(x_adv), target)
        assert (reached > squared_distance(model(random), target)).all()  # PGD beats a random point of the ball


def test_resume_restores_f0_from_the_checkpoint_not_from_model_weights(vit_weights, tmp_path):
    _, model = _fare(vit_weights[0])
    with torch.no_grad():
        model.encoder.backbone.patch_embed.proj.weight.add_(1.0)  # f trained away from f_0
    state = model.state_dict()  # what a checkpoint holds (DeepSpeed saves the module's state dict)
    assert any(k.startswith("reference.") for k in state)
    torch.manual_seed(5)  # model.weights replaced since: other weights in the file
    other = create_model("test_vit", DataSpec(in_chans=3, num_classes=1000, img_size=16, mean=SPEC.mean,
                                              std=SPEC.std)).backbone
    torch.save(other.state_dict(), vit_weights[0])
    _, resumed = _fare(vit_weights[0])
    assert not torch.equal(resumed.reference.state_dict()["backbone.cls_token"], state["reference.backbone.cls_token"])
    resumed.load_state_dict(state)
    assert all(torch.equal(v, state[f"reference.{k}"]) for k, v in resumed.reference.state_dict().items())


def _zero3_worker(rank: int, port: int, tmp: str) -> None:
    join_two_rank_world(rank, port, LOCAL_WORLD_SIZE="2", DAT_DS_THREADS_PER_RANK="1")
    import deepspeed

    from dat_ds.runtime.trainer import Trainer

    ds = write_ds(Path(tmp), zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 0})
    cfg = build_config(None, [f"output_dir={tmp}/runs", "name=z3", f"deepspeed_config={ds}", "model.name=tiny_cnn",
                              "objective.name=fare", f"model.weights={tmp}/w.pt", "attack.steps=1",
                              "data.train_subset=64", "train.save_every_steps=0", "dist.timeout_s=60"])
    run = Trainer(cfg).setup().run
    model = run.engine.module
    reference = list(model.reference.parameters())
    # f_0 is partitioned like the model: each rank holds its half of every tensor, and no optimizer state for it.
    held = sum(p.ds_tensor.numel() for p in reference)
    assert all(p.ds_numel > 0 and p.data.numel() == 0 for p in reference) and held < sum(p.ds_numel for p in reference)
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(rank))
    for _ in range(2):
        out = run.objective(run.ctx, x, None)
        run.engine.backward(out.loss)
        run.engine.step()
    pretrained = torch.load(f"{tmp}/w.pt")
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        f0 = {k: v.clone() for k, v in model.reference.backbone.state_dict().items()}
        f = {k: v.clone() for k, v in model.encoder.backbone.state_dict().items()}
    if rank == 0:
        Path(tmp, "result.json").write_text(json.dumps({
            "f0_unchanged": all(torch.equal(v, pretrained[k]) for k, v in f0.items()),
            "f_moved": any(not torch.equal(v, pretrained[k]) for k, v in f.items())}))


@pytest.mark.slow  # ~2 min of 2-rank start-up on 2 shared cores
@pytest.mark.dist
def test_under_zero3_f0_is_partitioned_and_never_changes(tmp_path, embedded_test_tensors):
    torch.manual_seed(0)
    torch.save(create_model("tiny_cnn", embedded_test_tensors[2]).backbone.state_dict(), tmp_path / "w.pt")
    spawn_two_ranks(_zero3_worker, str(tmp_path))
    assert json.loads((tmp_path / "result.json").read_text()) == {"f0_unchanged": True, "f_moved": True}


def test_the_linear_probe_evaluates_a_fare_encoder(tmp_path, embedded_test_tensors):
    # The embedded data (1 x 28 x 28) and a tiny_cnn encoder: a finetune in seconds.
    torch.manual_seed(0)
    spec = embedded_test_tensors[2]
    path = tmp_path / "cnn.pt"
    torch.save(create_model("tiny_cnn", spec).backbone.state_dict(), path)
    cfg = build_config(overrides=["model.name=tiny_cnn", "objective.name=fare", f"model.weights={path}",
                                  "data.train_subset=64"])
    encoder = make_model(cfg, spec, cfg.model.weights).encoder
    assert feature_dim(encoder, spec) == 128  # small_cnn's hidden layer, its head removed
    result = finetune(cfg, encoder, spec, FinetuneSettings(mode="slf", epochs=1, batch_size=32, eval_examples=32,
                                                           eval_steps=1))
    assert result["eval_count"] == 32 and 0 <= result["robust_acc"] <= result["clean_acc"] <= 1


@pytest.mark.slow  # 2-5 min: a `dat-ds pretrain` run, its resume and a finetune; the tests above cover the parts
@pytest.mark.parametrize("stage,nproc", [(0, "1"), (3, "2")])
def test_pretrain_resume_then_finetune_through_the_commands(tmp_path, embedded_test_tensors, stage, nproc):
    from dat_ds.cli import main as cli_main
    from dat_ds.evaluation.loading import load_run
    from tests.helpers import run_cli

    weights = []
    for seed in (0, 1):  # the resume is given other model.weights: f_0 must come from the checkpoint
        torch.manual_seed(seed)
        weights.append(tmp_path / f"w{seed}.pt")
        torch.save(create_model("tiny_cnn", embedded_test_tensors[2]).backbone.state_dict(), weights[-1])
    ds = write_ds(tmp_path, zero_optimization={"stage": stage})
    args = ["--nproc", nproc, "--config", "recipes/fare_embedded.yaml", "--ds-config", str(ds), "--output-dir",
            str(tmp_path), "--name", "fare", "--set", "model.name=tiny_cnn", "--set", "data.train_subset=64", "--set",
            "attack.steps=1", "--set", "eval.max_examples=16", "--set", "train.max_steps_per_epoch=2", "--set",
            "train.save_every_steps=2"]
    for epochs, more in (("1", []), ("2", ["--resume", "auto"])):
        proc = run_cli("pretrain", *args, "--epochs", epochs, "--set", f"model.weights={weights[len(more) > 0]}", *more)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "resumed from" in proc.stderr + proc.stdout
    loaded = load_run(tmp_path / "fare").model
    pretrained = torch.load(weights[0])
    assert all(torch.equal(v, pretrained[k]) for k, v in loaded.reference.backbone.state_dict().items())  # f_0
    assert any(not torch.equal(v, pretrained[k]) for k, v in loaded.encoder.backbone.state_dict().items())  # f moved
    assert cli_main(["finetune", "--mode", "slf", "--encoder", str(tmp_path / "fare"), "--epochs", "1",
                     "--train-subset", "64", "--eval-examples", "32"]) == 0
    assert json.loads((tmp_path / "fare" / "finetune_slf.json").read_text())["eval_count"] == 32
