"""The run folder: written only once everything is built; ``--overwrite`` and the checkpoint's world size.

Under ``--overwrite`` the old run is moved aside with one rename (``set_aside``) and stays there until the
new run has committed its first checkpoint; if the new run stops before that, the old one is put back
(``settle_overwritten``), so the file system is as it was. ``dat-ds train`` settles what a killed rank 0
could not (``overwritten_by``). :class:`RunFolder` is the trainer's side of this.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..core import dist
from ..core.config import RunConfig
from ..core.errors import ConfigError
from ..core.io import atomic_write_json, atomic_write_text
from . import checkpoint

log = logging.getLogger(__name__)
OVERWRITTEN = ".overwritten-"  # <run>.overwritten-<time>-<pid>: the old run under --overwrite until it is replaced
COMPRESSING_OPTIMIZERS = ("onebitadam", "onebitlamb", "zerooneadam")  # per-rank state that cannot be re-sharded


def set_aside(run_dir: Path) -> Path:
    """``--overwrite``: move the old run out of the way with one rename; it is deleted once the new run has
    committed its first checkpoint, and put back (``settle_overwritten``) if the new run stops before."""
    aside = run_dir.with_name(f"{run_dir.name}{OVERWRITTEN}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.rename(run_dir, aside)
    log.info("--overwrite: moved the old run to %s until the new one has its first checkpoint", aside)
    return aside


def overwritten_by(run_dir: Path, pid: int) -> list[Path]:
    """The old runs that process ``pid`` set aside from ``run_dir`` and has not settled yet."""
    return sorted(Path(run_dir).parent.glob(f"{glob.escape(Path(run_dir).name)}{OVERWRITTEN}*-{pid}"))


def settle_overwritten(run_dir: Path, aside: Path) -> str:
    """A run under ``--overwrite`` stopped: keep it if it committed a checkpoint (the old one goes), else
    delete its partial folder and put the old run back, so the file system is as it was. Returns which."""
    run_dir = Path(run_dir)
    if checkpoint.complete_tags(run_dir / "checkpoint"):
        shutil.rmtree(aside, ignore_errors=True)
        log.info("--overwrite: the new run has a complete checkpoint; deleted the old run (%s)", aside)
        return "replaced"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    os.rename(aside, run_dir)
    log.warning("the new run stopped before its first checkpoint; the old run is back in %s", run_dir)
    return "restored"


def check_world_size(root: Path, tag: str, world: int, allow_change: bool = False) -> int | None:
    """A checkpoint resumes on the world size it was saved with (``complete.json``'s ``world_size``): per-rank
    RNG and optimizer state and the data shards are per rank. With ``allow_change`` (``--allow-world-size-change``)
    another world size is accepted where the state can be re-sharded (ZeRO-0, no compressing optimizer);
    returns the saved world size when it differs, else None."""
    mark = checkpoint.read_complete(Path(root) / tag) or {}
    saved, where = mark.get("world_size"), str(Path(root) / tag)
    if not isinstance(saved, int) or saved == world:
        return None
    if not allow_change:
        raise ConfigError(f"checkpoint {where!r} was saved with {saved} rank(s), but this run has {world}; resume "
                          f"with --nproc {saved}, or pass --allow-world-size-change (not bit-identical), or start a "
                          "new run with another --name")
    fits = mark.get("fits") or {}
    optimizer = str(fits.get("optimizer") or "").lower()
    if fits.get("zero_stage"):
        raise ConfigError(f"checkpoint {where!r} was saved with ZeRO-{fits['zero_stage']} on {saved} rank(s): its "
                          f"optimizer state is partitioned per rank and cannot be re-sharded to {world}; resume with "
                          f"--nproc {saved}")
    if optimizer in COMPRESSING_OPTIMIZERS:
        raise ConfigError(f"checkpoint {where!r} was saved with {fits['optimizer']} on {saved} rank(s): its per-rank "
                          f"compression state cannot be re-sharded to {world}; resume with --nproc {saved}")
    return saved


class RunFolder:
    """This rank's view of the run folder. Rank 0 writes; under ``--overwrite`` (a new run, not a resume) it
    holds the old run set aside until the new one replaces it or stops (:meth:`settle`)."""

    def __init__(self, path: Path, *, overwrite: bool = False, resuming: bool = False):
        self.path = Path(path)
        self.overwrite = overwrite
        self.resuming = resuming
        self.aside: Path | None = None  # the old run set aside by --overwrite (rank 0), until replaced

    def prepare(self, cfg: RunConfig, ds_json: dict[str, Any]) -> None:
        """Set the old run aside (``--overwrite``), then write ``config.yaml`` and ``ds_config.json``. Collective."""
        if dist.is_main_process():
            if self.overwrite and not self.resuming and self.path.exists():
                self.aside = set_aside(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path / "config.yaml", cfg.to_yaml())
            atomic_write_json(self.path / "ds_config.json", ds_json)
        dist.barrier()

    def settle(self) -> None:
        """After a checkpoint, or when the run stops on an exception: the old run goes if this one has a complete
        checkpoint, else it is put back (``settle_overwritten``). Nothing to do without ``--overwrite``."""
        if self.aside is not None:
            aside, self.aside = self.aside, None
            settle_overwritten(self.path, aside)

    def ended(self) -> None:
        """The run ended (stopped early) before any checkpoint: it is still the new run, the old one goes."""
        if self.aside is not None:
            aside, self.aside = self.aside, None
            shutil.rmtree(aside, ignore_errors=True)
