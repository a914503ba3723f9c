"""What a committed checkpoint promises about its files, and the check of that promise.

A checkpoint's commit mark ``<tag>/complete.json`` records every file of the tag: its size (``files``) and,
since issue 29, its SHA-256 (``sha256``). Each rank hashes the files it wrote right after writing them and
rank 0 gathers the hashes for the commit (``runtime.checkpoint.save``), so nobody reads the whole checkpoint
back. A file whose size or hash differs from the record is damaged; a checkpoint written before hashes were
recorded is checked by size only.

Torch-free (hashlib and json): ``dat-ds verify`` checks a run with it without importing torch, and
``runtime.checkpoint`` uses the same check before a resume loads anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger(__name__)
COMPLETE = "complete.json"
TMP_PREFIX = ".tmp-"
CHUNK = 1 << 20  # bytes read at a time: a file of any size is hashed in constant memory
SLOW_HASH_S = 1.0  # hashing that took longer is logged (once per save or check) with its duration


def sha256_file(path: str | Path) -> str:
    """The file's SHA-256, read in ``CHUNK`` pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_complete(tag_dir: Path) -> dict[str, Any] | None:
    """The commit mark of ``tag_dir``, or None when it is missing or unreadable."""
    try:
        mark = json.loads((Path(tag_dir) / COMPLETE).read_text())
        int(mark["global_step"])
        return mark
    except (OSError, ValueError, KeyError, TypeError):
        return None


def complete_tags(root: Path) -> list[tuple[int, str]]:
    """Committed tags as ``(global_step, tag)``, oldest first."""
    out = []
    root = Path(root)
    for d in root.iterdir() if root.is_dir() else []:
        if not d.is_dir() or d.name.startswith(TMP_PREFIX) or not (d / COMPLETE).is_file():
            continue
        mark = read_complete(d)
        if mark is None:
            log.warning("checkpoint %s has an unreadable %s; skipping it", d, COMPLETE)
            continue
        # epoch tags sort after step tags of the same global step: they also hold the epoch's eval
        out.append((int(mark["global_step"]), int(d.name.startswith("epoch")), d.name))
    return [(step, tag) for step, _, tag in sorted(out)]


def _short(digest: str) -> str:
    return digest[:16] + "..."


@dataclass(frozen=True)
class Damage:
    """One file of a checkpoint that is not what ``complete.json`` recorded."""

    file: str  # its name inside the tag folder
    kind: str  # "missing", "size", "sha256" or "unreadable" (complete.json itself)
    expected: int | str | None = None  # bytes or hex digest
    actual: int | str | None = None

    def __str__(self) -> str:
        if self.kind == "missing":
            return f"{self.file} is missing"
        if self.kind == "unreadable":
            return f"{self.file} is missing or unreadable"
        if self.kind == "size":
            return f"{self.file} has {self.actual} bytes, {COMPLETE} recorded {self.expected}"
        return f"{self.file} has sha256 {_short(str(self.actual))}, {COMPLETE} recorded {_short(str(self.expected))}"


@dataclass(frozen=True)
class TagCheck:
    """The check of one committed checkpoint folder."""

    tag_dir: Path
    damage: tuple[Damage, ...]
    files: int  # files recorded in complete.json
    hashed: bool  # complete.json records hashes; older checkpoints are checked by size only
    seconds: float  # spent hashing

    @property
    def ok(self) -> bool:
        return not self.damage

    def line(self) -> str:
        """``<tag_dir>: ok (...)`` or ``<tag_dir>: damaged: <file> has ...``: the one line ``dat-ds verify`` prints."""
        if self.damage:
            return f"{self.tag_dir}: damaged: " + "; ".join(str(d) for d in self.damage)
        how = "sha256" if self.hashed else f"sizes only: its {COMPLETE} predates recorded hashes"
        return f"{self.tag_dir}: ok ({self.files} files, {how})"


_SAID_SIZE_ONLY = False


def check_tag(tag_dir: Path) -> TagCheck:
    """Every file ``tag_dir/complete.json`` records: there, of the recorded size and (where recorded) SHA-256.

    A file of the wrong size is not hashed (it is damaged either way)."""
    global _SAID_SIZE_ONLY
    tag_dir = Path(tag_dir)
    mark = read_complete(tag_dir)
    if mark is None:
        return TagCheck(tag_dir, (Damage(COMPLETE, "unreadable"),), 0, False, 0.0)
    sizes: dict[str, int] = {k: v for k, v in (mark.get("files") or {}).items() if k != COMPLETE}
    digests: dict[str, str] = mark.get("sha256") or {}
    hashed = "sha256" in mark
    if not hashed and not _SAID_SIZE_ONLY:
        _SAID_SIZE_ONLY = True
        log.debug("checkpoint %s was committed before dat-ds recorded file hashes; its files are checked by size",
                  tag_dir)
    damage: list[Damage] = []
    t0 = time.perf_counter()
    for name in sorted(set(sizes) | set(digests)):
        path = tag_dir / name
        if not path.is_file():
            damage.append(Damage(name, "missing"))
            continue
        size = path.stat().st_size
        if name in sizes and size != sizes[name]:
            damage.append(Damage(name, "size", sizes[name], size))
        elif name in digests and (actual := sha256_file(path)) != digests[name]:
            damage.append(Damage(name, "sha256", digests[name], actual))
    seconds = time.perf_counter() - t0
    if seconds > SLOW_HASH_S:
        log.info("checked the hashes of checkpoint %s in %.1f s", tag_dir, seconds)
    return TagCheck(tag_dir, tuple(damage), len(set(sizes) | set(digests)), hashed, seconds)


def check_run(path: str | Path) -> list[TagCheck]:
    """Every committed checkpoint of a run folder (or of its ``checkpoint/`` folder), oldest first, or the one
    checkpoint folder ``path`` is. ConfigError (one line) when ``path`` is none of these."""
    path = Path(path)
    fix = "give a run folder such as runs/demo, its checkpoint/ folder or one checkpoint folder in it"
    if not path.exists():
        raise ConfigError(f"{str(path)!r} does not exist; {fix}")
    if not path.is_dir():
        raise ConfigError(f"{str(path)!r} is not a folder; {fix}")
    if (path / COMPLETE).is_file():  # one checkpoint folder
        return [check_tag(path)]
    for root in (path / "checkpoint", path):
        # complete.json present but unreadable counts as committed here: verify reports it as damaged
        tags = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(TMP_PREFIX)
                       and (d / COMPLETE).is_file()), key=_tag_order) if root.is_dir() else []
        if tags:
            return [check_tag(d) for d in tags]
    if (path / "checkpoint").is_dir():
        raise ConfigError(f"{str(path)!r} has no committed checkpoint yet (none in checkpoint/ has its {COMPLETE}); "
                          "verify it once a save has committed")
    raise ConfigError(f"{str(path)!r} is not a run: it has no checkpoint/ folder and no {COMPLETE}; {fix}")


def _tag_order(tag_dir: Path) -> tuple[int, int, str]:
    """As ``complete_tags`` orders them; an unreadable mark sorts first."""
    mark = read_complete(tag_dir)
    step = int(mark["global_step"]) if mark is not None else -1
    return step, int(tag_dir.name.startswith("epoch")), tag_dir.name
