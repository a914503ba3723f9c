"""Every recipe validates (``dat-ds train --config R --dry-run``); the benchmark recipes say how to run
them and what to expect; ``dat-ds demo`` trains the fast demo.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from dat_ds import cli as dat_cli
from dat_ds.core.config import build_config
from dat_ds.runtime import ds_config
from tests.helpers import REPO

RECIPE_DIR = REPO / "dat_ds" / "recipes"
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


# The standard benchmarks of docs/benchmarks.md (issue 6); other recipes belong to other features.
BENCHMARKS = ("cifar10_prn18_dat_pgd", "cifar10_prn18_dat_fgsm", "cifar10_prn18_dat_pgd_500k", "cifar100_prn18_dat_pgd",
              "cifar10_wrn34_pgd_at", "imagenet_r50_dat_pgd", "imagenet_r50_dat_fgsm")


def inputs_in(tmp: Path, recipe: Path) -> list[str]:
    """``--set`` overrides that point the recipe's data folder, unlabeled pool and weights at ones that exist (--dry-run
    checks that they do; their contents are the preflight's business)."""
    cfg, out = build_config(recipe), []
    if cfg.data.root is not None:
        (tmp / "data").mkdir(exist_ok=True)
        out += ["--set", f"data.root={tmp / 'data'}"]
    if cfg.data.unlabeled is not None:
        (tmp / "pool.npz").touch()
        out += ["--set", f"data.unlabeled={tmp / 'pool.npz'}"]
    if cfg.model.weights is not None:  # the user's pretrained checkpoint (transfer recipes, fare's encoder)
        (tmp / "weights.safetensors").touch()
        out += ["--set", f"model.weights={tmp / 'weights.safetensors'}"]
    return out


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates_with_dry_run(path, capsys, tmp_path):
    assert dat_cli.main(["train", "--config", str(path), *inputs_in(tmp_path, path), "--dry-run"]) == 0
    cfg = build_config(path)
    assert ds_config.resolve_path(cfg.deepspeed_config).is_file()
    if cfg.data.root is not None:  # and without its data, --dry-run says so
        assert dat_cli.main(["train", "--config", str(path), "--set", f"data.root={tmp_path / 'absent'}",
                             "--dry-run"]) == 2


def test_dry_run_through_the_installed_command(cli, tmp_path):
    # A bare recipe name, validated for 8 ranks without starting any: resolved config + per-rank batch.
    proc = cli("train", "--recipe", "cifar10_prn18_dat_pgd", "--nproc", "8", "--set", f"data.root={tmp_path}",
               "--dry-run", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stderr + proc.stdout
    assert '"world_size": 8, "global_batch": 2048, "micro_batch_per_rank": 256' in out
    assert "name: preactresnet18" in out  # the resolved config is printed


def test_dry_run_rejects_a_world_size_that_does_not_divide_the_batch(capfd, tmp_path):
    assert dat_cli.main(["train", "--recipe", "cifar10_prn18_dat_pgd", "--nproc", "3", "--set", f"data.root={tmp_path}",
                         "--dry-run"]) == 2
    assert "not divisible" in capfd.readouterr().err  # 2048 over 3 ranks


def test_recipes_command_lists_every_recipe_with_paper_numbers():
    rows = {r[0]: r for r in dat_cli.recipe_rows()}
    assert set(rows) == {p.stem for p in RECIPES}
    assert rows["cifar10_prn18_dat_pgd_500k"][3] == "89.4% / 52.5% PGD-10"
    assert rows["imagenet_r50_dat_fgsm"][3] == "60.9% / 43.5%"
    assert rows["cifar10_wrn34_pgd_at"][1] == "wideresnet34_10 / cifar10"
    assert dat_cli.main(["recipes"]) == 0


def test_transfer_recipe_states_its_anchor_and_the_authors_fine_tuning():
    """Hendrycks et al. 2019's transfer setting: RobustBench's Hendrycks2019Using entry (model_info/cifar10/Linf),
    and the fine-tuning of their robustness/adversarial/tune.py."""
    path = RECIPE_DIR / "cifar10_wrn28_10_transfer.yaml"
    text = path.read_text()
    raw = yaml.safe_load(text)
    assert {k: raw["paper"][k] for k in ("clean_acc", "robust_acc", "robust_attack")} == {
        "clean_acc": 0.8711, "robust_acc": 0.5492, "robust_attack": "AutoAttack"}
    assert "Hendrycks2019Using" in raw["paper"]["source"] and "87.11% clean / 54.92% AutoAttack" in text
    cfg = build_config(path)
    assert cfg.model.name == "wideresnet28_10" and cfg.model.weights and cfg.model.strict_head is False
    assert cfg.model.normalization == "data"  # the wideresnets declare no pretrained statistics
    assert (cfg.attack.name, cfg.attack.steps) == ("pgd", 10)
    assert (cfg.attack.eps, cfg.attack.step_size) == pytest.approx((8 / 255, 2 / 255))
    assert cfg.train.epochs == 5 and cfg.optim.schedule == "cosine" and cfg.data.augment
    for world in (1, 8):
        settings = ds_config.prepare(cfg.deepspeed_config, world)
        assert settings.global_batch == 128 and settings.optimizer["type"] == "SGD"
        assert settings.optimizer["params"] == {"lr": 0.001, "momentum": 0.9, "weight_decay": 0.0005, "nesterov": True}
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "--config recipes/cifar10_wrn28_10_transfer.yaml" in header and "--set model.weights=" in header


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_recipe_documents_commands_and_numbers(name):
    path = REPO / "recipes" / f"{name}.yaml"
    text = path.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert f"deepspeed --num_gpus 8 --module dat_ds.train --config recipes/{name}.yaml" in header
    assert "deepspeed --hostfile hostfile --num_nodes" in header and f"--config recipes/{name}.yaml" in header
    raw = yaml.safe_load(text)
    assert raw["paper"]["source"] and raw["expected"]["ours"]
    assert raw["name"] == name
    cfg = build_config(path)
    # The global batch is fixed by the JSON, whatever the GPU count: 8 GPUs and 4 nodes x 8 GPUs.
    for world in (8, 32):
        settings = ds_config.prepare(cfg.deepspeed_config, world)
        assert settings.micro_batch * settings.grad_accum * world == settings.global_batch


def test_dat_recipes_follow_the_paper():
    pgd = build_config(REPO / "recipes" / "cifar10_prn18_dat_pgd.yaml")
    assert pgd.attack.eps == pytest.approx(8 / 255) and pgd.attack.steps == 10 and pgd.train.epochs == 100
    assert pgd.optim.milestones == (75, 90, 95) and pgd.optim.warmup_epochs == 5
    settings = ds_config.prepare(pgd.deepspeed_config, 8)
    assert settings.global_batch == 2048 and settings.optimizer["type"].lower() == "lamb"
    assert settings.optimizer["params"]["weight_decay"] == pytest.approx(1e-4)
    imnet = build_config(REPO / "recipes" / "imagenet_r50_dat_pgd.yaml")
    assert imnet.attack.eps == pytest.approx(2 / 255) and imnet.attack.steps == 4 and imnet.train.epochs == 30
    assert imnet.optim.milestones == (20, 25, 28) and imnet.model.name == "resnet50"
    assert ds_config.prepare(imnet.deepspeed_config, 8).optimizer["params"]["lr"] == pytest.approx(0.01)
    fast = build_config(REPO / "recipes" / "imagenet_r50_dat_fgsm.yaml")
    assert fast.attack.name == "fgsm_rs" and fast.attack.eps == pytest.approx(2 / 255)
    rst = build_config(REPO / "recipes" / "cifar10_prn18_dat_pgd_500k.yaml")
    assert rst.data.unlabeled and rst.data.unsup_fraction == 0.5


# ----------------------------------------------------------------------------- the fast recipes


def test_dat_ds_demo_trains_the_fast_demo():
    from dat_ds.cli import DEMO_RECIPE
    from dat_ds.launch.validate import recipe_path

    assert Path(recipe_path(DEMO_RECIPE)).resolve() == (RECIPE_DIR / "demo_fast.yaml").resolve()


@pytest.mark.parametrize("name, anchor", [
    ("cifar10_prn18_fast", {"clean_acc": 0.861, "robust_acc": 0.461, "robust_attack": "PGD-50", "minutes": 12,
                            "gpus": 1}),
    ("imagenet_r50_fast", {"clean_acc": 0.609, "robust_acc": 0.435, "hours": 12, "gpus": 4}),
])
def test_fast_benchmark_recipes_state_their_published_anchor(name, anchor):
    from dat_ds.runtime import ds_config

    text = (RECIPE_DIR / f"{name}.yaml").read_text()
    raw = yaml.safe_load(text)
    assert {k: raw["paper"][k] for k in anchor} == anchor and "Wong" in raw["paper"]["source"]
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert f"--module dat_ds.train --config recipes/{name}.yaml" in header and "deepspeed --hostfile" in header
    cfg = build_config(RECIPE_DIR / f"{name}.yaml")
    assert cfg.attack.name == "nfgsm" and cfg.optim.schedule == "onecycle" and cfg.train.epochs == 15
    assert cfg.monitor.every_steps > 0
    for world in (1, 4, 8):
        settings = ds_config.prepare(cfg.deepspeed_config, world)
        assert settings.micro_batch * settings.grad_accum * world == settings.global_batch
    if name == "cifar10_prn18_fast":  # Wong et al.: SGD, peak LR 0.2 at batch 128, eps 8/255
        assert cfg.attack.eps == pytest.approx(8 / 255)
        settings = ds_config.prepare(cfg.deepspeed_config, 1)
        from dat_ds.optim.schedule import lr_scale

        assert settings.optimizer["params"]["lr"] * lr_scale(cfg.optim, settings.global_batch) == pytest.approx(0.2)
    else:
        assert cfg.attack.eps == pytest.approx(2 / 255)


LARGE_MODEL_RECIPES = ("imagenet_convnext_l_zero3", "imagenet_swin_l_zero3", "imagenet_vit_b16_fare")


@pytest.mark.parametrize("nproc, global_batch", [(8, 1), (64, 8)])
@pytest.mark.parametrize("name", LARGE_MODEL_RECIPES)
def test_large_model_recipes_validate_for_8_and_64_gpus(name, nproc, global_batch, tmp_path, dat_ds_log):
    """Issue 30's recipes: ZeRO-3, bf16, gathered attacks and activation checkpointing, on one node and on eight."""
    path = RECIPE_DIR / f"{name}.yaml"
    cfg = build_config(path)
    assert cfg.attack.zero3_gather == "always" and cfg.model.grad_checkpointing
    dat_ds_log.set_level(logging.INFO)
    assert dat_cli.main(["train", "--config", str(path), "--nproc", str(nproc), *inputs_in(tmp_path, path),
                         "--dry-run"]) == 0
    micro = 16 if name.endswith("fare") else 32
    said = dat_ds_log.text  # the "config OK: {...}" line
    assert f'"world_size": {nproc}, "global_batch": {micro * 8 * global_batch}, "micro_batch_per_rank": {micro}' in said
    assert '"zero_stage": 3, "precision": "bf16"' in said
