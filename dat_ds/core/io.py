"""Atomic file writes: a reader never sees half a file, and a crash never leaves one behind.

A full disk (ENOSPC or EDQUOT) while writing raises ``DiskFullError`` naming the file, about how much it
needed and how much is free; the half-written temporary file (or half a JSONL line) is removed first.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from .errors import ConfigError, DiskFullError

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind ``e``: itself, or the one it was raised from (torch.save reports its file's
    OSError as a RuntimeError raised while handling it); None if there is none."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, DiskFullError):
        return True
    os_error = os_error_in(e)
    return os_error is not None and os_error.errno in DISK_FULL_ERRNOS


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent); None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def megabytes(n: int | float | None) -> str:
    """'about N MB' figures for messages: 1,234 / 12 / 1.2 / 0.031 (never 0 for a non-empty file)."""
    if n is None:
        return "?"
    mb = n / 1e6
    if mb >= 10:
        return f"{mb:,.0f}"
    return f"{max(mb, 0.001) if n > 0 else 0:.2g}"


def disk_full_message(path: str | Path, needed: int | None) -> str:
    return (f"disk full: could not write {str(path)!r} (about {megabytes(needed)} MB, "
            f"{megabytes(free_bytes(path))} MB free there); free some space on that file system")


def read_user_text(path: Path, what: str, save_as: str = "UTF-8") -> str:
    """The text of a file the user gave (``what`` names it in errors: 'recipe file 'x.yaml''); one-line errors."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} is not UTF-8 text (byte offset {e.start}); save it as {save_as}") from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} ({e.strerror or type(e).__name__}); check its permissions") from None


def read_indices(path: str | Path, what: str, n: int | None = None) -> list[int]:
    """Distinct indices in ``[0, n)`` from a text file, whitespace or comma separated (``--subset-file``); ``n``
    None: the size is not known yet, every index >= 0. ``what`` names the file in the one-line errors."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} is a folder; give a text file of test-set indices")
    text = read_user_text(path, what).replace(",", " ").split()
    try:
        idx = [int(t) for t in text]
    except ValueError:
        raise ConfigError(f"{what} holds something other than integer indices") from None
    if not idx:
        raise ConfigError(f"{what} is empty")
    bad = [i for i in idx if i < 0 or (n is not None and i >= n)]
    if bad:
        where = f"the test set's [0, {n - 1}]" if n is not None else "the test set (indices start at 0)"
        raise ConfigError(f"{what} has index {bad[0]} outside {where}")
    if len(set(idx)) != len(idx):
        raise ConfigError(f"{what} lists an index twice; RobustBench's list has distinct indices")
    return idx


_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process's umask (os.umask can only be read by setting it: set and restored under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``path`` whole or not at all, with the mode ``open()`` would give it (0644 under umask 022): run files
    on shared storage are for teammates too (``mkstemp`` alone makes them 0600)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # a file system that reports ENOSPC late (NFS) does it here or at close
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            raise DiskFullError(disk_full_message(path, len(data))) from e
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class JsonlWriter:
    """Append one JSON record per line, flushed at once so a crash loses at most the line in flight."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record) + "\n").encode()
        line = memoryview(data)
        with open(self.path, "ab", buffering=0) as f:  # unbuffered: nothing is left to fail at close
            start = f.seek(0, os.SEEK_END)
            try:
                while line:
                    line = line[f.write(line):]
            except OSError as e:
                try:
                    f.truncate(start)  # no half line for read_jsonl to choke on
                except OSError:
                    pass
                if e.errno in DISK_FULL_ERRNOS:
                    raise DiskFullError(disk_full_message(self.path, len(data))) from e
                raise


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Render a matplotlib figure to PNG atomically and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def save_bar_plot(path, labels: list[str], values: list[float], *, ylabel: str, title: str,
                  hline: float | None = None, hline_label: str | None = None) -> None:
    """A bar chart with each value written on its bar (and a dashed reference line), saved with ``save_figure``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(labels) + 2), 3.6))
    bars = ax.bar(labels, values, color="#4472c4")
    for b, v in zip(bars, values):
        ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    if hline is not None:
        ax.axhline(hline, color="#c00000", ls="--", label=hline_label)
        ax.legend()
    ax.set(ylabel=ylabel, title=title)
    plt.setp(ax.get_xticklabels(), rotation=15, ha="right")
    fig.tight_layout()
    save_figure(fig, path)
