"""The run config: precedence, types, one-line errors."""

from __future__ import annotations

import pytest

from dat_ds.core.config import RunConfig, build_config, config_from_dict
from dat_ds.core.errors import ConfigError


def test_defaults_validate():
    cfg = build_config()
    assert cfg == RunConfig()
    assert cfg.attack.eps == 0.1 and cfg.objective.name == "dat"


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nattack: {eps: 0.2, steps: 7}\ntrain: {epochs: 3}\npaper: {clean: 0.9}\n")
    cfg = build_config(recipe, ["attack.eps=8/255", "train.epochs=5", "optim.milestones=[1, 2]"])
    assert cfg.name == "r"
    assert cfg.attack.eps == pytest.approx(8 / 255)  # CLI beats recipe
    assert cfg.attack.steps == 7  # recipe beats default
    assert cfg.train.epochs == 5
    assert cfg.optim.milestones == (1.0, 2.0)


def test_round_trip_through_yaml(tmp_path):
    import yaml

    cfg = build_config(None, ["attack.name=fgsm_rs", "data.train_subset=100"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize("override, message", [
    ("attack.epss=0.1", "unknown config key 'attack.epss' in section 'attack'; allowed: eps, name, norm, restarts, step_size, steps"),
    ("atack.eps=0.1", "unknown config key 'atack' in the run config"),
    ("attack.eps=-0.1", "attack.eps=-0.1 is outside [0, 1]; eps is in pixel units, e.g. 8/255"),
    ("attack.eps=abc", "config key 'attack.eps' must be a number, got 'abc'"),
    ("attack.steps=0", "attack.steps=0 must be >= 1"),
    ("attack.steps=2.5", "config key 'attack.steps' must be an integer, got 2.5"),
    ("attack.norm=l1", "config key 'attack.norm' is 'l1'; allowed: linf, l2"),
    ("data.augment=maybe", "config key 'data.augment' must be true or false, got 'maybe'"),
    ("optim.schedule=multistep", "optim.schedule=multistep needs optim.milestones, e.g. [75, 90, 95]"),
    ("name=a/b", "name='a/b' must be a plain folder name (no '/')"),
    ("noequals", "bad override 'noequals'; expected KEY=VALUE, e.g. --set attack.eps=0.1"),
])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        build_config(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe file .* not found"):
        build_config(tmp_path / "nope.yaml")


def test_standard_step_sizes():
    from dat_ds.attacks import default_step_size

    assert default_step_size("pgd", 0.1, 10) == pytest.approx(0.025)  # 2.5 eps / k (Madry)
    assert default_step_size("fgsm_rs", 0.1) == pytest.approx(0.125)  # 1.25 eps (Wong)


def test_layerwise_optimizers_refuse_flattening_engines():
    from dat_ds.runtime import ds_config

    base = {"train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "Lamb", "params": {"lr": 0.01}}}
    ok = ds_config.prepare("inline.json", 2, data={**base, "torch_autocast": {"enabled": True, "dtype": "bfloat16"}})
    assert ok.precision == "bf16-autocast"
    for extra in ({"zero_optimization": {"stage": 2}}, {"bf16": {"enabled": True}}):
        with pytest.raises(ConfigError, match="needs per-layer tensors"):
            ds_config.prepare("inline.json", 2, data={**base, **extra})
