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
    ("attack.epss=0.1", "unknown config key 'attack.epss' in section 'attack'; allowed: eps, "),  # the list grows with the schema
    ("atack.eps=0.1", "unknown config key 'atack' in the run config"),
    ("attack.eps=-0.1", "attack.eps=-0.1 must be in [0, 1]; eps is in pixel units, e.g. 8/255"),
    ("attack.eps=abc", "config key 'attack.eps' must be a number, got 'abc'"),
    ("attack.steps=0", "attack.steps=0 must be >= 1"),
    ("attack.steps=2.5", "config key 'attack.steps' must be an integer, got 2.5"),
    ("attack.norm=l1", "config key 'attack.norm' is 'l1'; allowed: linf, l2"),
    ("data.augment=maybe", "config key 'data.augment' must be true or false, got 'maybe'"),
    ("optim.schedule=multistep", "optim.schedule=multistep needs optim.milestones, e.g. [75, 90, 95]"),
    ("name=a/b", "name='a/b' is not a valid run name; use 1-128 letters, digits, '-', '_' or '.', not starting with '.' (e.g. exp-3)"),
    ("name=.hidden", "name='.hidden' is not a valid run name; use 1-128"),
    ("name=exp 3", "name='exp 3' is not a valid run name; use 1-128"),
    ("name=2024", "config key 'name' must be a string, got 2024"),  # --set values are YAML; --name 2024 is a string
    ("eval.max_examples=0", "eval.max_examples=0 must be >= 1 (or null for the whole test set)"),
    ("eval.max_examples=-5", "eval.max_examples=-5 must be >= 1 (or null for the whole test set)"),
    ("attack.eps=1/0", "config key 'attack.eps' must be a number, got '1/0'"),
    ("monitor.gap=1.5", "monitor.gap=1.5 must be in [0, 1] (a difference of accuracies)"),
    ("optim.gamma=0", "optim.gamma=0 must be > 0 (the LR is multiplied by it)"),
    ("dist.timeout_s=0.5", "dist.timeout_s=0.5 must be in [1, 86400] seconds: how long a collective waits for a peer"),
    ("dist.timeout_s=abc", "config key 'dist.timeout_s' must be a number, got 'abc'"),
    ("output_dir=''", "output_dir is empty; give a folder for the runs, e.g. --output-dir runs"),
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


def _float_keys() -> list[str]:
    """Every float setting of the run config (``float``, ``float | None`` and tuples of floats)."""
    import typing

    from dat_ds.core.fields import Section

    keys = []
    for section, info in RunConfig.model_fields.items():
        cls = next((a for a in (info.annotation, *typing.get_args(info.annotation))
                    if isinstance(a, type) and issubclass(a, Section)), None)
        if cls is not None:
            keys += [f"{section}.{name}" for name, hint in typing.get_type_hints(cls).items()
                     if float in (hint, *typing.get_args(hint))]
    return keys


FLOAT_KEYS = _float_keys()


def test_every_float_setting_is_found():
    assert {"attack.eps", "attack.step_size", "objective.clean_weight", "objective.beta", "monitor.gap",
            "optim.warmup_epochs", "optim.milestones", "eval.eps", "data.unsup_fraction"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("text, shown", [(".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf"), ("inf", "'inf'"),
                                         ("nan", "'nan'")])
def test_non_finite_numbers_are_refused_everywhere(key, text, shown):
    value = f"[{text}]" if key == "optim.milestones" else text
    with pytest.raises(ConfigError) as e:
        build_config(None, [f"{key}={value}"])
    assert str(e.value) == f"config key {key!r} must be a finite number, got {shown}"


def test_non_finite_numbers_are_refused_in_recipes_and_dicts(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("objective: {beta: .inf}\n")
    with pytest.raises(ConfigError, match="config key 'objective.beta' must be a finite number, got inf"):
        build_config(recipe)
    with pytest.raises(ConfigError, match="config key 'optim.warmup_epochs' must be a finite number, got nan"):
        config_from_dict({"optim": {"warmup_epochs": float("nan")}})


def test_named_flags_are_typed_values_not_yaml():
    cfg = build_config(None, ["name=from-set", "train.epochs=3"],
                       flags={"name": "exp-3.v2_b", "train": {"epochs": 7}, "output_dir": "out #1/x"})
    assert cfg.name == "exp-3.v2_b" and cfg.train.epochs == 7  # flags win over --set
    assert cfg.output_dir == "out #1/x"  # used verbatim: no YAML comment cut at '#'
    assert build_config(None, flags={"name": "2024"}).name == "2024"  # digits are a name, not an int
    with pytest.raises(ConfigError) as e:
        build_config(None, flags={"name": "exp #3"})
    assert str(e.value) == ("name='exp #3' is not a valid run name; use 1-128 letters, digits, '-', '_' or '.', "
                            "not starting with '.' (e.g. exp-3)")


def test_config_from_request_keeps_flag_text_verbatim(tmp_path):
    from dat_ds.cli.args import train_args_parser, train_request
    from dat_ds.launch.validate import config_from_request

    request = train_request(train_args_parser().parse_args(["--name", "2024", "--output-dir", str(tmp_path / "a #b: c"),
                                           "--epochs", "4", "--trust-pickle", "--ds-config", "zero2_fp32",
                                           "--set", "name=ignored", "--set", "train.epochs=9"]))
    cfg = config_from_request(request)
    assert (cfg.name, cfg.train.epochs, cfg.data.trust_pickle) == ("2024", 4, True)
    assert cfg.output_dir == str(tmp_path / "a #b: c") and cfg.deepspeed_config == "zero2_fp32"
    with pytest.raises(ConfigError, match="name='exp #3' is not a valid run name"):
        config_from_request(train_request(train_args_parser().parse_args(["--name", "exp #3"])))


@pytest.mark.parametrize("text, key, line", [
    ("name: a\nattack: {eps: 0.1}\nname: b\n", "name", 3),
    ("attack:\n  eps: 0.1\n  steps: 3\n  eps: 0.2\n", "eps", 4),
    ("train: {epochs: 1, epochs: 2}\n", "epochs", 1),
])
def test_recipe_with_a_duplicate_key_is_an_error(tmp_path, text, key, line):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError) as e:
        build_config(recipe)
    assert str(e.value) == (f"recipe file {str(recipe)!r} has the key {key!r} twice (line {line}); "
                            "keep one (YAML would silently use the last)")


def test_recipe_that_is_not_utf8_is_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError) as e:
        build_config(recipe)
    assert str(e.value) == f"recipe file {str(recipe)!r} is not UTF-8 text (byte offset 9); save it as UTF-8"


def test_shipped_recipes_have_no_duplicate_keys():
    from dat_ds.core import resources
    from dat_ds.core.config import load_recipe

    for stem in resources.names(resources.RECIPES):
        load_recipe(resources.packaged(resources.RECIPES, stem))



def _bounded_keys() -> list[tuple[str, float]]:
    """Every run-config field with a lower bound, and a value just below it."""
    import annotated_types

    from dat_ds.core.fields import Section, _metadata, _section_of

    keys = []
    for section, info in RunConfig.model_fields.items():
        cls = _section_of(info.annotation)
        for name, field in (cls.model_fields.items() if cls else ()):
            for m in _metadata(field):
                if isinstance(m, (annotated_types.Ge, annotated_types.Gt)) and not _section_of(field.annotation):
                    low = m.ge if isinstance(m, annotated_types.Ge) else m.gt
                    keys.append((f"{section}.{name}", low - 1 if isinstance(m, annotated_types.Ge) else low))
                    break
    assert all(issubclass(_section_of(i.annotation) or Section, Section) for i in RunConfig.model_fields.values())
    return keys


BOUNDED = _bounded_keys()


def test_every_bounded_setting_is_found():
    assert {"attack.eps", "attack.steps", "train.epochs", "eval.max_examples", "optim.gamma", "dist.timeout_s",
            "ema.decay", "awp.gamma", "data.num_workers"} <= {k for k, _ in BOUNDED}


@pytest.mark.parametrize("key, value", BOUNDED, ids=[k for k, _ in BOUNDED])
def test_every_range_error_names_the_key_the_value_and_the_bound(key, value):
    section = key.split(".")[0]
    base = {section: {}} if section in ("ema", "awp") else {}  # optional sections: on with their defaults
    if key in ("optim.milestones", "attack.steps_schedule"):
        value = [value, value]
    with pytest.raises(ConfigError) as e:
        config_from_dict({**base, section: {key.split(".")[1]: value}})
    message = str(e.value)
    assert message.startswith(f"{key}=") and " must be " in message and "\n" not in message, message


def test_a_config_cannot_exist_unvalidated():
    from dat_ds.core.config import AttackConfig, replace

    with pytest.raises(ConfigError, match=r"attack.eps=2 must be in \[0, 1\]"):
        RunConfig(attack={"eps": 2})
    with pytest.raises(ConfigError, match=r"attack.steps=0 must be >= 1"):
        AttackConfig(steps=0)  # a section built on its own still names its full key
    cfg = RunConfig()
    with pytest.raises(ConfigError, match=r"attack.steps=0 must be >= 1"):
        replace(cfg.attack, steps=0)
    with pytest.raises(ConfigError, match=r"unknown config key 'attack.stpes'"):
        replace(cfg.attack, stpes=3)
    with pytest.raises(ConfigError, match="objective.cutmix applies to the objectives"):
        cfg.model_copy(update={"objective": {"cutmix": {}}})  # pydantic's own copy validates here too
    with pytest.raises(TypeError, match="built validated"):
        RunConfig.model_construct()
    with pytest.raises(Exception, match="frozen"):
        cfg.attack.eps = 0.5
    assert replace(cfg.attack, eps="8/255").eps == pytest.approx(8 / 255)
    assert hash(cfg.attack) == hash(AttackConfig())  # lru_cache keys (attacks.spec)


def test_attack_spec_shares_the_config_field_types():
    from dat_ds.attacks import AttackSpec

    assert AttackSpec("pgd", eps="8/255", steps=3).eps == pytest.approx(8 / 255)
    for kwargs, message in ((dict(eps=float("nan")), "config key 'eps' must be a finite number, got nan"),
                            (dict(eps=-0.1), "eps=-0.1 must be >= 0; eps is a radius"),
                            (dict(steps=1.5), "config key 'steps' must be an integer, got 1.5"),
                            (dict(step_size=0), "step_size=0 must be > 0 (or None for the standard step)"),
                            (dict(stpes=3), "unknown config key 'stpes' in the attack spec; allowed: attack, eps, ")):
        with pytest.raises(ConfigError) as e:
            AttackSpec("pgd", **{"eps": 0.1, **kwargs})
        assert str(e.value).startswith(message), str(e.value)
