"""Checkpoints: DeepSpeed's engine state plus what an exact resume needs.

Layout of ``<run>/checkpoint/``::

    <tag>/                 DeepSpeed files (model, optimizer, ZeRO partitions, client state)
    <tag>/rank_state_<r>.pt  per-rank RNG states (torch, accelerator, numpy, python, attack generator)
    <tag>/complete.json    written by rank 0 after every rank has finished writing: the commit mark
    latest                 the newest complete tag, replaced atomically after complete.json

A tag without ``complete.json`` was interrupted mid-write and is never resumed from.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import dist
from ..errors import ConfigError
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)
COMPLETE = "complete.json"


def capture_rng(generator: torch.Generator | None) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[2] or -1],
        "python_version": random.getstate()[0],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    acc = dist.accelerator()
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((state["python_version"], tuple(py[:-1]), None if py[-1] == -1 else py[-1]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "accelerator" in state:
        dist.accelerator().set_rng_state(state["accelerator"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def tag_for(epoch: int, global_step: int, end_of_epoch: bool) -> str:
    return f"epoch{epoch:04d}" if end_of_epoch else f"step{global_step:09d}"


def save(engine, root: Path, tag: str, *, client_state: dict[str, Any], rank_state: dict[str, Any],
         keep_last: int) -> Path:
    root = Path(root)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    import io

    buf = io.BytesIO()
    torch.save(rank_state, buf)
    atomic_write_bytes(root / tag / f"rank_state_{dist.rank()}.pt", buf.getvalue())
    dist.barrier()  # every rank's files are on disk before the commit mark
    if dist.is_main_process():
        atomic_write_json(root / tag / COMPLETE, {"tag": tag, "global_step": client_state["global_step"],
                                                  "epoch": client_state["epoch"], "world_size": dist.world_size()})
        atomic_write_text(root / "latest", tag + "\n")
        _prune(root, keep_last, keep=tag)
    dist.barrier()
    return root / tag


def complete_tags(root: Path) -> list[tuple[int, str]]:
    import json

    out = []
    for d in Path(root).iterdir() if Path(root).is_dir() else []:
        mark = d / COMPLETE
        if d.is_dir() and mark.is_file():
            try:
                out.append((int(json.loads(mark.read_text())["global_step"]), d.name))
            except (ValueError, KeyError, json.JSONDecodeError):
                log.warning("checkpoint %s has an unreadable %s; skipping it", d, COMPLETE)
    return sorted(out)


def _prune(root: Path, keep_last: int, keep: str) -> None:
    tags = complete_tags(root)
    for _, tag in tags[:-keep_last]:
        if tag != keep:
            shutil.rmtree(root / tag, ignore_errors=True)


def find_resume_tag(root: Path) -> str | None:
    """The newest complete checkpoint; interrupted ones are skipped with a warning."""
    root = Path(root)
    if not root.is_dir():
        return None
    tags = complete_tags(root)
    complete = {t for _, t in tags}
    for d in sorted(root.iterdir()):
        if d.is_dir() and d.name not in complete:
            log.warning("skipping incomplete checkpoint %s (no %s: it was interrupted while being written)", d, COMPLETE)
    latest = root / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag in complete and tags and tags[-1][1] == tag:
            return tag
    return tags[-1][1] if tags else None


def resolve_resume(resume: str, run_dir: Path) -> tuple[Path, str]:
    """``--resume auto`` (this run's folder), a run folder, a checkpoint folder or one tag folder."""
    candidates = [run_dir / "checkpoint"] if resume == "auto" else [Path(resume) / "checkpoint", Path(resume)]
    for root in candidates:
        if (root / COMPLETE).is_file():  # a tag folder itself
            return root.parent, root.name
        tag = find_resume_tag(root)
        if tag is not None:
            return root, tag
    raise ConfigError(
        f"no complete checkpoint found for --resume {resume}; give a run folder with a checkpoint/ inside, "
        "or start without --resume"
    )


def load(engine, root: Path, tag: str, generator: torch.Generator | None) -> dict[str, Any]:
    load_path, client_state = engine.load_checkpoint(str(root), tag=tag, load_module_strict=True)
    if load_path is None:
        raise ConfigError(f"DeepSpeed could not load checkpoint {root / tag}; it is incomplete or from another setup")
    rank_file = Path(root) / tag / f"rank_state_{dist.rank()}.pt"
    if rank_file.is_file():
        restore_rng(torch.load(rank_file, map_location="cpu", weights_only=True), generator)
    else:
        log.warning("checkpoint %s has no RNG state for rank %d (saved with another world size?); "
                    "training continues but will not be bit-identical", tag, dist.rank())
    return client_state
