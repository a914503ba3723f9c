"""The static names (``core/names.py``, what the torch-free CLI validates with) equal the registries."""

from __future__ import annotations

import pytest

from dat_ds.core import names
from dat_ds.core.registry import Registry


def _registries():
    from dat_ds.attacks import ATTACK_LOSSES, ATTACKS, GEOMETRIES
    from dat_ds.data import DATASETS
    from dat_ds.models import MODELS
    from dat_ds.objectives import OBJECTIVES
    from dat_ds.optim import OPTIMIZERS

    return {"attack": ATTACKS, "objective": OBJECTIVES, "model": MODELS, "data set": DATASETS,
            "optimizer": OPTIMIZERS, "norm": GEOMETRIES, "attack loss": ATTACK_LOSSES}


@pytest.mark.parametrize("kind", sorted(names.STATIC))
def test_static_names_equal_the_registry(kind):
    registry = _registries()[kind]
    assert registry.kind == kind
    assert tuple(registry.builtin_names()) == names.STATIC[kind]  # plugins (tests, user code) excluded
    assert tuple(sorted(names.STATIC[kind])) == names.STATIC[kind]


def test_unlabeled_objectives_are_the_ones_that_need_no_labels():
    objectives = _registries()["objective"]
    assert names.UNLABELED_OBJECTIVES == tuple(n for n in names.OBJECTIVES if not objectives.get(n).needs_labels)


def test_gather_objectives_are_the_ones_whose_attacks_run_in_an_attack_phase():
    objectives = _registries()["objective"]
    assert names.GATHER_OBJECTIVES == tuple(n for n in names.OBJECTIVES if objectives.get(n).gathers_attacks)


def test_eval_only_attacks_are_attacks():
    assert set(names.EVAL_ONLY_ATTACKS) < set(names.ATTACKS)


def test_optimizer_specs_and_builders_have_the_same_names():
    from dat_ds.optim.factory import BUILDERS
    from dat_ds.optim.specs import SPECS

    assert tuple(sorted(SPECS)) == tuple(sorted(BUILDERS)) == names.OPTIMIZERS


def test_a_dat_ds_name_missing_from_the_static_list_is_refused():
    reg: Registry = Registry("objective")

    def fake():
        pass

    fake.__module__ = "dat_ds.objectives.fake"
    with pytest.raises(KeyError, match="not listed in dat_ds/core/names.py"):
        reg.register("not_listed")(fake)
    assert "not_listed" not in reg


def test_a_plugin_name_is_accepted_and_known_to_config_validation():
    from dat_ds.core.config import build_config

    reg: Registry = Registry("attack loss")

    def my_loss():
        pass

    reg.register("test_plugin_loss", plugin=True)(my_loss)
    try:
        assert "test_plugin_loss" in names.known("attack loss")
        assert reg.builtin_names() == []
    finally:
        names.PLUGINS["attack loss"].discard("test_plugin_loss")
    with pytest.raises(Exception, match="unknown objective 'nope'; choose one of: acl, clean"):
        build_config(None, ["objective.name=nope"])
