"""Self-supervised adversarial training: augmentation, NT-Xent, the contrastive attack, pretrain -> finetune."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from dat_ds.attacks import pgd
from dat_ds.core.config import build_config
from dat_ds.core.errors import ConfigError
from dat_ds.evaluation.finetune import FinetuneSettings, finetune, random_encoder
from dat_ds.objectives.augment import two_views
from dat_ds.objectives.nt_xent import nt_xent, nt_xent_to_target
from dat_ds.objectives.ssl_model import ContrastiveModel, LinearProbe, build_contrastive_model
from tests.helpers import run_cli


def test_augment_keeps_shape_and_range_and_follows_the_generator(embedded_test_tensors):
    x = embedded_test_tensors[0][:16]
    v1, v2 = two_views(x, torch.Generator().manual_seed(0))
    assert v1.shape == x.shape and v1.min() >= 0 and v1.max() <= 1
    assert not torch.allclose(v1, v2)  # two different views
    again, _ = two_views(x, torch.Generator().manual_seed(0))
    assert torch.equal(v1, again)  # randomness only from the generator: resume is exact
    rgb = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out, _ = two_views(rgb, torch.Generator().manual_seed(2))
    assert out.shape == rgb.shape and out.min() >= 0 and out.max() <= 1


def test_nt_xent_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    tau = 0.5
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    losses = []
    for i in range(8):
        pos = (i + 4) % 8
        num = torch.exp(z[i] @ z[pos] / tau)
        den = sum(torch.exp(z[i] @ z[j] / tau) for j in range(8) if j != i)
        losses.append(-torch.log(num / den))
    assert torch.allclose(nt_xent(z1, z2, tau), torch.stack(losses).mean(), atol=1e-5)
    assert nt_xent(z1, z1.clone(), tau) < nt_xent(z1, z2, tau)  # identical views are the easy case
    per = nt_xent_to_target(z1, z2, tau)
    assert per.shape == (4,) and torch.allclose(per, F.cross_entropy(F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).t() / tau,
                                                                   torch.arange(4), reduction="none"))


def test_contrastive_attack_raises_the_nt_xent_loss(embedded_test_tensors):
    x = embedded_test_tensors[0][:64]
    cfg = build_config("recipes/acl_pretrain_embedded.yaml", ["model.name=tiny_cnn"])
    torch.manual_seed(0)
    model = build_contrastive_model(cfg, embedded_test_tensors[2]).eval()
    v1, v2 = two_views(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = model(v2)
        before = nt_xent_to_target(model(v1), target).mean()
        pair_before = nt_xent(model(v1), target)
    loss_fn = partial(nt_xent_to_target, temperature=cfg.objective.temperature)
    x_adv = pgd(model, v1, target, eps=0.1, steps=5, loss_fn=loss_fn, success_fn=None,
                generator=torch.Generator().manual_seed(1))
    assert (x_adv - v1).abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        after = nt_xent_to_target(model(x_adv), target).mean()
        noise = (v1 + (torch.rand(v1.shape, generator=torch.Generator().manual_seed(2)) * 2 - 1) * 0.1).clamp(0, 1)
        assert after > nt_xent_to_target(model(noise), target).mean()
        assert nt_xent(model(x_adv), target) > pair_before
    assert after > before


def test_linear_probe_freezes_the_encoder_only_for_slf_and_alf(embedded_test_tensors):
    cfg = build_config("recipes/acl_pretrain_embedded.yaml", ["model.name=tiny_cnn", "data.train_subset=256",
                                                             "attack.steps=1"])
    results = {}
    for mode in ("alf", "aff"):
        encoder, spec = random_encoder(cfg, seed=0)
        before = [p.detach().clone() for p in encoder.parameters()]
        results[mode] = finetune(cfg, encoder, spec, FinetuneSettings(mode=mode, epochs=1, batch_size=64,
                                                                      eval_examples=64, eval_steps=2))
        changed = any(not torch.equal(b, p) for b, p in zip(before, encoder.parameters()))
        assert changed == (mode == "aff")
    for r in results.values():
        assert 0 <= r["robust_acc"] <= r["clean_acc"] <= 1 and r["eval_count"] == 64 and r["train_examples"] == 256
        assert r["train_attack"] == "PGD-1@0.1"
    probe = LinearProbe(torch.nn.Linear(4, 128), 10, frozen=True).train()
    assert not probe.encoder.training and probe.fc.training


@pytest.mark.slow  # ~45 s of 2-rank runs; the in-process tests above cover both objectives
@pytest.mark.dist
def test_pretrain_on_two_ranks_then_finetune(tmp_path):
    proc = run_cli("pretrain", "--nproc", "2", "--config", "recipes/acl_pretrain_embedded.yaml", "--epochs", "1",
                   "--set", "train.max_steps_per_epoch=3", "--set", "model.name=tiny_cnn", "--set", "attack.steps=1",
                   "--set", "eval.max_examples=64", "--set", "train.log_every=1", "--output-dir", str(tmp_path),
                   "--name", "acl")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run = tmp_path / "acl"
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "step"] == [1, 2, 3]
    assert all(0 <= r["train_acc"] <= 1 for r in steps if r["kind"] == "step")  # contrastive top-1
    from dat_ds.cli import main as cli_main  # in-process: a subprocess costs ~10 s of imports each

    assert cli_main(["finetune", "--mode", "slf", "--encoder", str(run), "--epochs", "1", "--train-subset", "256",
                     "--eval-examples", "64"]) == 0
    result = json.loads((run / "finetune_slf.json").read_text())
    assert result["mode"] == "slf" and result["eval_count"] == 64 and 0 <= result["robust_acc"] <= result["clean_acc"]
    from dat_ds.evaluation.loading import load_classifier, load_run

    loaded = load_run(run)  # the one run loader builds what the objective trained
    assert isinstance(loaded.model, ContrastiveModel) and loaded.source["objective"] == "acl"
    with pytest.raises(ConfigError, match="self-supervised encoder"):
        load_classifier(run)  # `dat-ds eval --run` / `pseudo-label --run` refuse an encoder


@pytest.mark.parametrize("argv,message", [
    (["pretrain", "--config", "recipes/demo.yaml"], "self-supervised"),
    (["finetune", "--mode", "alf", "--random-init", "--config", "recipes/acl_pretrain_embedded.yaml"], "--out"),
    (["finetune", "--mode", "alf", "--encoder", "recipes"], "not a run folder"),
])
def test_ssl_commands_refuse_mistakes_in_one_line(argv, message, capsys, tmp_path):
    from dat_ds.cli import main as cli_main

    assert cli_main([*argv, *(["--output-dir", str(tmp_path)] if argv[0] == "pretrain" else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
