"""Helpers shared by the reliability tests: tiny run configs and checkpoint comparisons."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

TINY_DS = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": 0.002, "weight_decay": 0.0001}},
           "zero_optimization": {"stage": 0}}


# What torch.distributed reads from the environment (tests/conftest.py strips the same for run_cli): the
# in-process world of earlier tests sets them, and a command started with them would reuse its port.
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def command_env(**extra: str) -> dict[str, str]:
    """The environment for a ``dat-ds`` command a test starts itself: a fresh command, not a rank."""
    return {**{k: v for k, v in os.environ.items() if k not in DIST_ENV}, **extra}


def write_ds(folder: Path, **changes) -> Path:
    cfg = json.loads(json.dumps(TINY_DS))
    cfg.update(changes)
    path = Path(folder) / "ds.json"
    path.write_text(json.dumps(cfg))
    return path


def tiny_args(out: Path, name: str, ds: Path, *extra: str, subset: int = 96, epochs: int = 2,
              save_every: int = 4) -> list[str]:
    """A run that takes seconds: tiny_cnn, PGD-1, a few steps per epoch, eval on 16 images."""
    return ["--name", name, "--output-dir", str(out), "--ds-config", str(ds), "--epochs", str(epochs),
            "--set", "model.name=tiny_cnn", "--set", f"data.train_subset={subset}", "--set", "attack.steps=1",
            "--set", "eval.steps=1", "--set", "eval.max_examples=16", "--set", "eval.batch_size=16",
            "--set", f"train.save_every_steps={save_every}", "--set", "train.keep_last=20", "--set", "train.log_every=1",
            *extra]


def model_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(tag_dir) / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"tensor {k} differs (max abs diff {(a[k] - b[k]).abs().max().item()})"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under ``folder``: proves nothing was written."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


class Crash(Exception):
    """Stands in for a node dying right after a checkpoint was committed."""


@contextlib.contextmanager
def crash_after_save(tag: str):
    """Inside the block ``checkpoint.save`` raises :class:`Crash` right after committing ``tag``; the real
    save is back on exit."""
    from dat_ds.runtime import checkpoint

    real_save = checkpoint.save

    def save_then_crash(engine, root, saved_tag, **kw):
        out = real_save(engine, root, saved_tag, **kw)
        if saved_tag == tag:
            raise Crash(saved_tag)
        return out

    checkpoint.save = save_then_crash
    try:
        yield
    finally:
        checkpoint.save = real_save
