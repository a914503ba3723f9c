"""The trainer's shape (issue 27, "a narrow Trainer"): what is built once is one frozen ``BuiltRun``; every
attribute the trainer has is created in ``__init__``; and it is what callbacks see, a ``TrainerView``."""

from __future__ import annotations

import ast
import dataclasses
import inspect

import pytest

from dat_ds.runtime.build import BuiltRun
from dat_ds.runtime.callbacks import TrainerView
from dat_ds.runtime.trainer import Trainer


def _self_assignments(cls: type) -> dict[str, set[str]]:
    """method name -> the ``self.<name>`` attributes it assigns."""
    tree = ast.parse(inspect.getsource(cls))
    out: dict[str, set[str]] = {}
    for method in tree.body[0].body:
        if not isinstance(method, ast.FunctionDef):
            continue
        names = out.setdefault(method.name, set())
        for node in ast.walk(method):
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
            for target in targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        names.add(t.attr)
    return out


def test_the_trainer_creates_every_attribute_in_init():
    assigned = _self_assignments(Trainer)
    created = assigned.pop("__init__")
    late = {f"{method}: self.{name}" for method, names in assigned.items() for name in names - created}
    assert not late, f"attributes first created outside Trainer.__init__: {sorted(late)}"


def test_the_built_run_is_frozen():
    assert BuiltRun.__dataclass_params__.frozen
    run = object.__new__(BuiltRun)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.steps_per_epoch = 3


def test_the_trainer_has_what_callbacks_use():
    """Every member of ``TrainerView``: a method or property of the class, or an attribute ``__init__`` creates."""
    members = {name for name in vars(TrainerView) if not name.startswith("_")}
    assert {"engine", "state", "save", "write"} <= members
    created = _self_assignments(Trainer)["__init__"]
    missing = {name for name in members if not hasattr(Trainer, name) and name not in created}
    assert not missing, f"Trainer lacks TrainerView members {sorted(missing)}"
