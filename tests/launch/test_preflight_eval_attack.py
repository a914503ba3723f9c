"""The in-training evaluation's default attack (APGD-CE then APGD-DLR) needs 3 classes: a 2-class data set is
refused in one line before any rank starts, naming the setting that works."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dat_ds.core.config import RunConfig, replace
from dat_ds.core.errors import ConfigError
from dat_ds.launch import preflight


@pytest.mark.parametrize("classes, attack, refused", [(2, "apgd-ce-dlr", True), (2, "autoattack", True),
                                                      (2, "pgd", False), (3, "apgd-ce-dlr", False)])
def test_dlr_attacks_need_three_classes(monkeypatch, classes, attack, refused):
    monkeypatch.setattr(preflight, "load_and_check_split", lambda *a, **k: SimpleNamespace(num_classes=classes))
    cfg = RunConfig()
    cfg = replace(cfg, eval=replace(cfg.eval, attack=attack))
    if refused:
        with pytest.raises(ConfigError, match=f"eval.attack={attack} needs 3 classes or more .* the data has 2; "
                                              "use --set eval.attack=pgd"):
            preflight.check_data(cfg)
    else:
        assert preflight.check_data(cfg).num_classes == classes


def test_the_default_in_training_attack_is_the_one_autoattack_confirms():
    assert RunConfig().eval.attack == "apgd-ce-dlr"
