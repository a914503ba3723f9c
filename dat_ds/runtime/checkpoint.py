"""Checkpoints: DeepSpeed's engine state plus what an exact resume needs.

Layout of ``<run>/checkpoint/``::

    <tag>/                   DeepSpeed files (model, optimizer incl. error feedback, scheduler, client state)
    <tag>/rank_state_<r>.pt  per-rank RNG states (torch, accelerator, numpy, python, attack generator) and
                             the compressing optimizer's per-rank state (error feedback, 0/1 Adam local
                             steps, the quantizer's step counter): DeepSpeed keeps rank 0's optimizer only
    <tag>/complete.json      the commit mark: step, epoch (from 1), world size, what the weights fit, every file's size
                             and SHA-256 (``core.integrity``)
    latest                   the newest complete tag, replaced atomically after the tag is committed
    best                     ``train.keep_best``: the tag with the best validation robust accuracy; pruning
                             (``train.keep_last``) never removes it, eval and export load it by default

A save writes into ``.tmp-<tag>/``; once every rank has written its files, rank 0 adds
``complete.json`` and renames the folder to ``<tag>`` (one atomic rename), then updates ``latest``.
A crash mid-save therefore leaves only a ``.tmp-*`` folder, which is never resumed from. A write that
fails (a full disk: ``DiskFullError``) fails the save on every rank together, removes ``.tmp-<tag>/``
and leaves the committed tags and ``latest`` as they were.

Each rank hashes (SHA-256) the files it wrote right after writing them; rank 0 gathers the hashes into
``complete.json`` (it reads back only the few small files written outside DeepSpeed's checkpoint engine).
Before a resume loads a tag, its files are checked against those sizes and hashes: a damaged one (a flipped
byte, a truncated file) is skipped by ``--resume auto`` with one warning naming the file, and the previous
intact tag is used. ``dat-ds verify RUN`` runs the same check over a whole run without torch.

Loading is guarded: DeepSpeed unpickles its files with ``weights_only=False``, so before it does,
every ``.pt`` file of the tag is opened with ``torch.load(weights_only=True)`` (a restricted
unpickler that cannot call arbitrary code); a file that needs anything else is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..comm.protocol import CommunicatingOptimizer
from ..core import dist, integrity, stop
from ..core.errors import ConfigError, DiskFullError
from ..core.integrity import COMPLETE, TMP_PREFIX, complete_tags, read_complete
from ..core.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    free_bytes,
    is_disk_full,
    megabytes,
    os_error_in,
)
from . import ds_adapter

log = logging.getLogger(__name__)
BEST = "best"  # pointer file: the tag train.keep_best selected
# Config keys whose change makes the saved tensors unusable: checked before DeepSpeed sees the files.
MUST_MATCH = (("model", "name"), ("model", "normalization"), ("data", "name"))  # what the tensors mean
OPTIMIZER_LOCAL = "optimizer_local"  # key of comm.rank_local_state() in rank_state_<r>.pt
# The damaged tags a launching ``dat-ds`` process has warned about (JSON list of paths): its ranks, which check
# the same checkpoints again, say it at debug level only, so a damaged checkpoint gets one warning per command.
DAMAGE_NAMED_ENV = "DAT_DS_DAMAGE_NAMED"


# ----------------------------------------------------------------------------- RNG


def capture_rng(generator: torch.Generator | None) -> dict[str, Any]:
    """Every random stream this rank draws from (tensors and ints only: loadable with weights_only)."""
    py_version, py_state, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(py_state),
        "python_version": py_version,
        "python_gauss": py_gauss,  # None or a float
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
    }
    acc = dist.accelerator()
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    py = list(state["python"])
    if "python_gauss" in state:
        random.setstate((state["python_version"], tuple(py), state["python_gauss"]))
    else:  # files written before python_gauss existed appended it to the list (-1 for None)
        random.setstate((state["python_version"], tuple(py[:-1]), None if py[-1] == -1 else py[-1]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state.get("numpy_has_gauss", 0), state.get("numpy_gauss", 0.0)))
    if "accelerator" in state:
        dist.accelerator().set_rng_state(state["accelerator"])
    if generator is not None:
        if "generator" not in state:
            raise ConfigError("the checkpoint has no attack-generator state; it was not written by dat-ds train")
        generator.set_state(state["generator"])


def reseed_rank(seed: int, global_step: int, rank: int, generator: torch.Generator | None) -> None:
    """New random streams for ``rank`` when a run resumes on another world size (``--allow-world-size-change``):
    the old ranks' streams do not map onto the new ranks, so every stream is derived from (seed, step, rank)."""
    base = (seed * 1_000_003 + global_step * 7919 + rank * 104_729) % 2**31
    torch.manual_seed(base)
    random.seed(base)
    np.random.seed(base)
    acc = dist.accelerator()
    if acc.device_name() != "cpu":
        acc.manual_seed(base)
    if generator is not None:
        generator.manual_seed(base + 1)


# ----------------------------------------------------------------------------- save


def tag_for(epoch: int, global_step: int, end_of_epoch: bool) -> str:
    """The tag of a save: ``epoch<N>`` closes epoch N, numbered from 1 as metrics rows and the table number it
    (``epoch`` is ``TrainState.epoch``, the 0-based index), ``step<global step>`` a save mid-epoch. Nothing reads
    the number back: tags are found through ``complete.json`` and ordered by global step, so runs saved before
    the tags were 1-based (``epoch0000`` for epoch 1) resume and evaluate as they are."""
    return f"epoch{epoch + 1:04d}" if end_of_epoch else f"step{global_step:09d}"


def checkpoint_meta(config: dict[str, Any] | None, ds: dict[str, Any] | None) -> dict[str, Any]:
    """What the saved tensors fit: compared against the new run before DeepSpeed loads anything."""
    config, ds = config or {}, ds or {}
    meta = {f"{s}.{k}": (config.get(s) or {}).get(k) for s, k in MUST_MATCH}
    meta["optimizer"] = (ds.get("optimizer") or {}).get("type")
    meta["zero_stage"] = (ds.get("zero_optimization") or {}).get("stage", 0)
    return meta


def save(engine, root: Path, tag: str, *, client_state: dict[str, Any], rank_state: dict[str, Any],
         keep_last: int, comm: CommunicatingOptimizer | None = None, best: bool = False) -> Path:
    """Write one checkpoint on every rank; committed by rank 0 with one rename after all ranks wrote.

    ``best``: once committed, the tag is named in ``best`` (written after ``latest``), and kept by pruning.

    ``comm`` (``BuiltEngine.comm``): the optimizer that communicates itself; its per-rank state (error
    feedback, 0/1 Adam's local steps, the quantizer's step counter) goes into this rank's own file.

    A write that fails on any rank (a full disk above all) fails the save on every rank, never leaves the
    others waiting in a barrier: each rank keeps its first failed write (``_RankWrites``) and goes on
    through the save's collectives; two all-reduces (``_agree``, one before the commit, one after it) are
    the save's barriers and tell every rank whether any rank failed. Then rank 0 removes ``.tmp-<tag>/``
    and every rank raises (``DiskFullError`` for ENOSPC/EDQUOT); the committed tags and ``latest`` are as
    they were before the save.
    """
    root = Path(root)
    tmp_dir = root / (TMP_PREFIX + tag)
    if dist.is_main_process() and tmp_dir.exists():
        shutil.rmtree(tmp_dir)  # left over from a save that crashed
    dist.barrier()
    writes = _RankWrites()
    with ds_adapter.checkpoint_engine_swapped(engine, lambda inner: _GuardedCheckpointEngine(inner, writes)):
        if writes.run(lambda: engine.save_checkpoint(str(root), tag=tmp_dir.name, client_state=client_state,
                                                     save_latest=False)):
            # What escapes DeepSpeed is a write outside its checkpoint engine (ZeRO's recovery scripts): done
            # after its last collective but its closing barrier, where the other ranks wait for this one.
            dist.barrier()
    if comm is not None:  # DeepSpeed (ZeRO 0) saves rank 0's optimizer state only
        rank_state = {**rank_state, OPTIMIZER_LOCAL: comm.rank_local_state()}
    buf = io.BytesIO()
    torch.save(rank_state, buf)
    rank_file = tmp_dir / f"rank_state_{dist.rank()}.pt"
    if not writes.run(lambda: atomic_write_bytes(rank_file, buf.getvalue()), size=lambda: buf.getbuffer().nbytes):
        writes.hashed(rank_file, buf.getbuffer())  # the bytes just written, still in memory
    _agree(writes, root, tag)  # every rank's files are on disk before the commit
    # each rank's hashes of the files it wrote, relative to the tag folder (small: a name and 64 hex per file)
    hashed = dist.all_gather_object((writes.relative_sha256(tmp_dir), writes.hash_seconds))
    if dist.is_main_process():
        # "epoch" numbered from 1, as the tag; step_in_epoch == steps per epoch: that epoch is complete
        mark = {"tag": tag, "global_step": client_state["global_step"], "epoch": client_state["epoch"] + 1,
                "step_in_epoch": client_state.get("step_in_epoch"), "world_size": dist.world_size(),
                "fits": checkpoint_meta(client_state.get("config"), client_state.get("ds_config"))}
        sha256 = {name: digest for rank_hashes, _ in hashed for name, digest in rank_hashes.items()}
        slowest = max(seconds for _, seconds in hashed)
        writes.run(lambda: _commit(root, tag, mark, best, sha256, slowest), size=lambda: 1024)  # complete.json, latest: ~1 KB
        if writes.error is None:
            _prune(root, keep_last, keep=tag)
    _agree(writes, root, tag)  # the other ranks go on once the commit stands (or all raise)
    return root / tag


def _commit(root: Path, tag: str, mark: dict[str, Any], best: bool = False,
            sha256: dict[str, str] | None = None, hash_seconds: float = 0.0) -> None:
    """Rank 0: ``complete.json``, the rename (the commit), then ``latest`` (and ``best``). If any of it fails the
    rename is undone, so the committed tags and ``latest`` are what they were before the save.

    ``sha256``: the ranks' hashes of the files they wrote (by name in the tag folder); a file without one (written
    outside DeepSpeed's checkpoint engine, e.g. ZeRO's recovery script) is hashed here. ``hash_seconds``: the
    slowest rank's hashing time, logged with rank 0's own when the two exceed ``integrity.SLOW_HASH_S``."""
    tmp_dir, tag_dir, old = root / (TMP_PREFIX + tag), root / tag, root / f"{TMP_PREFIX}old-{tag}"
    files = {str(p.relative_to(tmp_dir)): p.stat().st_size for p in sorted(tmp_dir.rglob("*")) if p.is_file()}
    t0 = time.perf_counter()
    digests = {name: (sha256 or {}).get(name) or integrity.sha256_file(tmp_dir / name) for name in files}
    hash_seconds += time.perf_counter() - t0
    if hash_seconds > integrity.SLOW_HASH_S:
        log.info("checkpoint %s: hashing its %d files (%s MB) took %.1f s", tag, len(files),
                 megabytes(sum(files.values())), hash_seconds)
    atomic_write_json(tmp_dir / COMPLETE, {**mark, "files": files, "sha256": digests})
    moved_old = renamed = False
    # A signal waits for the end (stop.held): one that came after the rename would otherwise undo a commit
    # that was complete, and a run stopped there would lose the checkpoint it had just written.
    with stop.held():
        try:
            if tag_dir.exists():  # the same tag again (e.g. re-run after resuming an older one)
                os.replace(tag_dir, old)
                moved_old = True
            os.replace(tmp_dir, tag_dir)  # the commit
            renamed = True
            _fsync_dir(root)
            atomic_write_text(root / "latest", tag + "\n")
            if best:
                atomic_write_text(root / BEST, tag + "\n")
        except BaseException:
            if renamed:
                os.replace(tag_dir, tmp_dir)
            if moved_old:
                os.replace(old, tag_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)


class _RankWrites:
    """This rank's writes of one save. The first one that fails with an OSError (torch.save reports its
    file's OSError as a RuntimeError raised while handling it) is kept, not raised; later writes are
    skipped and only sized, so the rank still reaches every collective of the save."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.unwritten = 0  # bytes the failed and skipped writes still needed
        self.sha256: dict[str, str] = {}  # path -> SHA-256 of each file this rank wrote
        self.hash_seconds = 0.0

    def hashed(self, path: str | Path, data: memoryview | None = None) -> None:
        """Record the SHA-256 of ``path``, which this rank has just written: of ``data`` (its bytes, where they
        are still in memory), else read back in 1 MiB chunks while the file is in the page cache. Skipped once
        a write failed (the save fails anyway); a file that cannot be read back fails the save like a write."""
        if self.error is not None:
            return

        def record() -> None:
            self.sha256[str(path)] = hashlib.sha256(data).hexdigest() if data is not None else integrity.sha256_file(path)

        t0 = time.perf_counter()
        self.run(record)
        self.hash_seconds += time.perf_counter() - t0

    def relative_sha256(self, folder: Path) -> dict[str, str]:
        """The hashes of the files under ``folder``, by their name relative to it."""
        out = {}
        for path, digest in self.sha256.items():
            rel = os.path.relpath(path, folder)
            if not rel.startswith(os.pardir):
                out[Path(rel).as_posix()] = digest
        return out

    def run(self, write: Callable[[], Any], path: str | Path | None = None,
            size: Callable[[], int] = lambda: 0) -> bool:
        """``write()`` unless an earlier write failed; True if this one raised. ``path``: the file it writes
        (a half-written one counts as written), ``size``: about how many bytes it writes."""
        if self.error is not None:
            self.unwritten += size()
            return False
        try:
            write()
            return False
        except Exception as e:
            if not isinstance(e, DiskFullError) and os_error_in(e) is None:
                raise  # a programming error keeps its traceback
            if self.error is None:  # a guarded write inside DeepSpeed may have failed first
                self.error = e
            partial = os.path.getsize(path) if path is not None and os.path.isfile(path) else 0
            self.unwritten += max(0, size() - partial)
            return True


class _GuardedCheckpointEngine:
    """DeepSpeed's checkpoint engine (its writer of every checkpoint file) for one save, each write run
    through ``_RankWrites``; everything else is the engine's own."""

    def __init__(self, inner, writes: _RankWrites):
        self._inner, self._writes = inner, writes

    def save(self, state_dict, path: str) -> None:
        failed = self._writes.run(lambda: self._save(state_dict, path), path, lambda: _tensor_bytes(state_dict))
        if not failed and ds_adapter.is_torch_checkpoint_engine(self._inner):
            # written and fsynced above; another engine may still be writing it (async): rank 0 hashes those
            self._writes.hashed(path)

    def _save(self, state_dict, path: str) -> None:
        if not ds_adapter.is_torch_checkpoint_engine(self._inner):
            self._inner.save(state_dict, path)
            return
        # torch.save(obj, path) reports a full disk as 'enforce fail ... unexpected pos' with the errno
        # lost; into a Python file the OSError of the failed write survives as the RuntimeError's context.
        with open(path, "wb") as f:
            self._inner.save(state_dict, f)
            f.flush()
            os.fsync(f.fileno())  # a file system that reports ENOSPC late (NFS) does it here or at close

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._writes.run(lambda: self._inner.makedirs(path, exist_ok=exist_ok))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _tensor_bytes(obj: Any) -> int:
    """About what torch.save writes for ``obj``: the bytes of its tensors' storages, each counted once."""
    storages: dict[tuple, int] = {}
    seen: set[int] = set()
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            storages[(st.data_ptr(), str(o.device))] = st.nbytes()
        elif isinstance(o, (dict, list, tuple)) and id(o) not in seen:
            seen.add(id(o))
            stack.extend(o.values() if isinstance(o, dict) else o)
    return sum(storages.values())


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).is_dir() else 0


def _agree(writes: _RankWrites, root: Path, tag: str) -> None:
    """One all-reduce that every rank reaches (the save's barrier): did a write fail on any rank? If one
    did, rank 0 removes the temporary folder, once every rank has stopped writing, and every rank raises."""
    failed = writes.error is not None
    totals = dist.all_reduce_sum(torch.tensor([failed and is_disk_full(writes.error), failed, writes.unwritten],
                                              dtype=torch.float64)).tolist()
    disk_full, failed_ranks, unwritten = totals
    if not failed_ranks:
        return
    tmp_dir = root / (TMP_PREFIX + tag)
    written = 0.0
    if dist.is_main_process():
        written = float(_tree_bytes(tmp_dir))
        shutil.rmtree(tmp_dir, ignore_errors=True)
    # the second all-reduce: no rank raises (and reads the free space) before the folder is gone
    written = dist.all_reduce_sum(torch.tensor([written], dtype=torch.float64)).tolist()[0]
    if disk_full:
        raise DiskFullError(_disk_full_line(root, tag, int(written + unwritten))) from writes.error
    if writes.error is not None:
        raise writes.error
    raise RuntimeError(f"checkpoint {tag} was not saved: another rank could not write its files (see its error)")


def _disk_full_line(root: Path, tag: str, written_and_unwritten: int) -> str:
    """The one line of a save that did not fit. How much it needs: the last complete checkpoint's size,
    else what the failed save had written plus what it still had to write."""
    tags = complete_tags(root)
    if tags:
        last = tags[-1][1]
        needed, state = _tree_bytes(root / last), f"the last complete checkpoint {last} is intact"
    else:
        needed, state = written_and_unwritten, "no checkpoint of this run is complete yet"
    return (f"disk full: checkpoint {tag} does not fit in {str(root)!r} (it needs about {megabytes(needed)} MB, "
            f"{megabytes(free_bytes(root))} MB are free there); {state}. Free some space on that file system "
            "and continue with --resume auto")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def best_tag(root: Path) -> str | None:
    """The tag ``best`` names (``train.keep_best``) if that checkpoint is complete, else None."""
    try:
        tag = (Path(root) / BEST).read_text().strip()
    except OSError:
        return None
    return tag if tag and (Path(root) / tag / COMPLETE).is_file() else None


def _prune(root: Path, keep_last: int, keep: str) -> None:
    best = best_tag(root)
    for _, tag in complete_tags(root)[:-keep_last]:
        if tag not in (keep, best):
            shutil.rmtree(root / tag, ignore_errors=True)
    for d in root.iterdir():  # folders of saves that crashed before their commit
        if d.is_dir() and d.name.startswith(TMP_PREFIX):
            shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------- verify


# Plain-data types DeepSpeed writes into its checkpoints besides tensors and builtins (ZeRO stage enum,
# partition addresses, loss-scaler records). The restricted unpickler rebuilds them field by field;
# it never calls their code.
_DEEPSPEED_DATA_TYPES = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
)


def _deepspeed_safe_globals() -> list[Any]:
    import importlib

    out: list[Any] = []
    for module, name in _DEEPSPEED_DATA_TYPES:
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return out


class CorruptCheckpoint(Exception):
    """A file of the checkpoint is damaged (size or SHA-256 not as committed), truncated or unreadable (as
    opposed to unsafe); the message names the file."""


def verify_file(path: Path) -> None:
    """Open ``path`` with the restricted unpickler; ConfigError if it needs code, CorruptCheckpoint if broken."""
    import pickle
    import zipfile

    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # noqa: BLE001 - a file we cannot even list is corrupt
        raise CorruptCheckpoint(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _deepspeed_safe_globals()}
    bad = sorted(set(unsafe) - allowed)
    if bad:
        raise ConfigError(
            f"refusing to load {str(path)!r}: it references {', '.join(bad[:3])}, which could run code when "
            "unpickled; only load checkpoints you wrote yourself, or export the weights to safetensors"
        )
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"refusing to load {str(path)!r}: the restricted unpickler rejects it ({str(e).splitlines()[0]}); "
                          "only load checkpoints written by dat-ds") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CorruptCheckpoint(f"{path} is corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def verify_tag(root: Path, tag: str) -> None:
    """Check a committed tag's files: the sizes and SHA-256 hashes recorded at commit time (sizes only for a
    tag committed before hashes were recorded; ``core.integrity.check_tag``), then the restricted unpickler."""
    tag_dir = Path(root) / tag
    if read_complete(tag_dir) is None:
        raise CorruptCheckpoint(f"{tag_dir} has no readable {COMPLETE}")
    files = sorted(p for p in tag_dir.rglob("*") if p.is_file())
    key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key in _VERIFIED:  # preflight, then the trainer, then load: hash and unpickle each file once per process
        return
    damage = integrity.check_tag(tag_dir).damage
    if damage:
        raise CorruptCheckpoint("; ".join(str(d) for d in damage))
    for p in files:
        if p.suffix == ".pt":
            verify_file(p)
    _VERIFIED.add(key)


_VERIFIED: set[tuple] = set()


def check_compatible(root: Path, tag: str, cfg, ds: dict[str, Any] | None = None) -> None:
    """ConfigError when the checkpoint's tensors cannot fit this run (other model, data set, optimizer, ZeRO)."""
    mark = read_complete(Path(root) / tag) or {}
    fits = mark.get("fits")
    if not fits:
        return  # written before dat-ds recorded it; DeepSpeed's strict load still checks the shapes
    if ds is None:
        from .ds_config import apply_overrides, load_ds_json

        ds = apply_overrides(load_ds_json(cfg.deepspeed_config), cfg.deepspeed_overrides)
    want = checkpoint_meta(cfg.to_dict(), ds)
    for key, saved in fits.items():
        if saved is None or want.get(key) is None or saved == want[key]:
            continue
        hint = f"--set {key}={saved}" if "." in key else f"a DeepSpeed config with {key} {saved!r}"
        raise ConfigError(
            f"checkpoint {str(Path(root) / tag)!r} was saved with {key}={saved!r}, but this run has {want[key]!r}; "
            f"resume with {hint}, or start a new run with another --name"
        )


# ----------------------------------------------------------------------------- resume


def find_resume_tag(root: Path, verify: bool = True) -> str | None:
    """The newest complete checkpoint whose files are intact; interrupted or corrupt ones are skipped
    with a warning. Unsafe files raise ConfigError (they are never skipped silently)."""
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
        pointed = latest.read_text().strip()
        if pointed not in complete:
            log.warning("checkpoint/latest names %r, which is not a complete checkpoint; using the newest complete one",
                        pointed)
    for _, tag in reversed(tags):
        if not verify:
            return tag
        try:
            verify_tag(root, tag)
            return tag
        except CorruptCheckpoint as e:
            _warn_damaged(root / tag, e)
    return None


_NAMED: set[str] = set()  # damaged tag folders this process has warned about


def _warn_damaged(tag_dir: Path, error: CorruptCheckpoint) -> None:
    """One warning per damaged tag and command: the preflight, the trainer and every rank check it again."""
    name = str(Path(tag_dir).resolve())
    said = name in _NAMED or name in json.loads(os.environ.get(DAMAGE_NAMED_ENV) or "[]")
    (log.debug if said else log.warning)("skipping corrupt checkpoint %s: %s; trying the one before it", tag_dir, error)
    _NAMED.add(name)


def damage_named_env() -> dict[str, str]:
    """For the ranks a launching process starts: the damaged tags it has warned about (``DAMAGE_NAMED_ENV``)."""
    return {DAMAGE_NAMED_ENV: json.dumps(sorted(_NAMED))} if _NAMED else {}


def resolve_resume(resume: str, run_dir: Path) -> tuple[Path, str] | None:
    """``--resume auto`` (this run's folder), a run folder, a checkpoint folder or one tag folder.

    ``auto`` with no usable checkpoint returns None (start from scratch: a pre-empted job can always be
    restarted with the same command); an explicit path with none is a ConfigError.
    """
    run_dir = Path(run_dir)
    candidates = [run_dir / "checkpoint"] if resume == "auto" else [Path(resume) / "checkpoint", Path(resume)]
    for root in candidates:
        if (root / COMPLETE).is_file():  # a tag folder itself
            try:
                verify_tag(root.parent, root.name)
            except CorruptCheckpoint as e:
                raise ConfigError(f"checkpoint {str(root)!r} is corrupt ({e}); resume from another one") from None
            return root.parent, root.name
        tag = find_resume_tag(root)
        if tag is not None:
            return root, tag
    if resume == "auto":
        log.warning("--resume auto: no complete checkpoint in %s; starting from scratch", run_dir / "checkpoint")
        return None
    raise ConfigError(
        f"no complete checkpoint found for --resume {resume}; give a run folder with a checkpoint/ inside, "
        "or start without --resume"
    )


def read_rank_state(root: Path, tag: str) -> dict[str, Any] | None:
    """This rank's ``rank_state_<r>.pt`` of ``tag``, or None when the checkpoint has none for this rank."""
    rank_file = Path(root) / tag / f"rank_state_{dist.rank()}.pt"
    return torch.load(rank_file, map_location="cpu", weights_only=True) if rank_file.is_file() else None


def load(engine, root: Path, tag: str, generator: torch.Generator | None,
         comm: CommunicatingOptimizer | None = None,
         on_rank_state: Callable[[dict[str, Any]], None] | None = None, rank_state: bool = True) -> dict[str, Any]:
    """Restore engine + RNG from a tag that ``verify_tag`` accepted (call ``check_compatible`` first).

    ``comm`` gets back the per-rank state :func:`save` took from it, after DeepSpeed restored rank 0's
    optimizer state on every rank. ``on_rank_state`` gets this rank's whole ``rank_state`` dict (what the
    caller added to it at save time, e.g. the stored perturbations of ``attack.reuse``). ``rank_state=False``
    (resuming on another world size) leaves the per-rank files alone: the caller re-seeds (``reseed_rank``).
    """
    try:
        verify_tag(root, tag)  # cheap next to training, and the files may have changed since the preflight
    except CorruptCheckpoint as e:
        raise ConfigError(f"checkpoint {str(Path(root) / tag)!r} is corrupt ({e}); resume from another one") from None
    try:
        load_path, client_state = engine.load_checkpoint(str(root), tag=tag, load_module_strict=True)
    except RuntimeError as e:  # shape mismatches etc. from torch's load_state_dict
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"checkpoint {str(Path(root) / tag)!r} does not fit this model ({first}); "
                          "resume with the model and data set it was saved with") from None
    if load_path is None:
        raise ConfigError(f"DeepSpeed could not load checkpoint {root / tag}; it is incomplete or from another setup")
    if not rank_state:
        return client_state
    rank_state = read_rank_state(root, tag)
    if rank_state is not None:
        restore_rng(rank_state, generator)
        if on_rank_state is not None:
            on_rank_state(rank_state)
        if comm is not None and OPTIMIZER_LOCAL in rank_state:
            comm.load_rank_local_state(rank_state[OPTIMIZER_LOCAL])
        elif comm is not None:
            log.warning("checkpoint %s has no per-rank %s state for rank %d; it restarts from the shared "
                        "optimizer state", tag, comm.label, dist.rank())
    else:
        log.warning("checkpoint %s has no RNG state for rank %d (saved with another world size?); "
                    "training continues but will not be bit-identical", tag, dist.rank())
    return client_state
