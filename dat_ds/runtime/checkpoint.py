"""Checkpoints: DeepSpeed's engine state plus what an exact resume needs.

Layout of ``<run>/checkpoint/``::

    <tag>/                   DeepSpeed files (model, optimizer incl. error feedback, scheduler, client state)
    <tag>/rank_state_<r>.pt  per-rank RNG states (torch, accelerator, numpy, python, attack generator) and
                             the compressing optimizer's per-rank state (error feedback, 0/1 Adam local
                             steps, the quantizer's step counter): DeepSpeed keeps rank 0's optimizer only
    <tag>/complete.json      the commit mark: step, epoch, world size, what the weights fit, file sizes
    latest                   the newest complete tag, replaced atomically after the tag is committed
    best                     ``train.keep_best``: the tag with the best validation robust accuracy; pruning
                             (``train.keep_last``) never removes it, eval and export load it by default

A save writes into ``.tmp-<tag>/``; once every rank has written its files, rank 0 adds
``complete.json`` and renames the folder to ``<tag>`` (one atomic rename), then updates ``latest``.
A crash mid-save therefore leaves only a ``.tmp-*`` folder, which is never resumed from. A write that
fails (a full disk: ``DiskFullError``) fails the save on every rank together, removes ``.tmp-<tag>/``
and leaves the committed tags and ``latest`` as they were.

Loading is guarded: DeepSpeed unpickles its files with ``weights_only=False``, so before it does,
every ``.pt`` file of the tag is opened with ``torch.load(weights_only=True)`` (a restricted
unpickler that cannot call arbitrary code); a file that needs anything else is refused.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..comm.protocol import CommunicatingOptimizer
from ..core import dist, stop
from ..core.errors import ConfigError, DiskFullError
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
COMPLETE = "complete.json"
BEST = "best"  # pointer file: the tag train.keep_best selected
TMP_PREFIX = ".tmp-"
# Config keys whose change makes the saved tensors unusable: checked before DeepSpeed sees the files.
MUST_MATCH = (("model", "name"), ("data", "name"))
OPTIMIZER_LOCAL = "optimizer_local"  # key of comm.rank_local_state() in rank_state_<r>.pt


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
    return f"epoch{epoch:04d}" if end_of_epoch else f"step{global_step:09d}"


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
    writes.run(lambda: atomic_write_bytes(rank_file, buf.getvalue()), size=lambda: buf.getbuffer().nbytes)
    _agree(writes, root, tag)  # every rank's files are on disk before the commit
    if dist.is_main_process():
        mark = {"tag": tag, "global_step": client_state["global_step"], "epoch": client_state["epoch"],
                "step_in_epoch": client_state.get("step_in_epoch"), "world_size": dist.world_size(),
                "fits": checkpoint_meta(client_state.get("config"), client_state.get("ds_config"))}
        writes.run(lambda: _commit(root, tag, mark, best), size=lambda: 1024)  # complete.json, latest: about 1 KB
        if writes.error is None:
            _prune(root, keep_last, keep=tag)
    _agree(writes, root, tag)  # the other ranks go on once the commit stands (or all raise)
    return root / tag


def _commit(root: Path, tag: str, mark: dict[str, Any], best: bool = False) -> None:
    """Rank 0: ``complete.json``, the rename (the commit), then ``latest`` (and ``best``). If any of it fails the
    rename is undone, so the committed tags and ``latest`` are what they were before the save."""
    tmp_dir, tag_dir, old = root / (TMP_PREFIX + tag), root / tag, root / f"{TMP_PREFIX}old-{tag}"
    files = {str(p.relative_to(tmp_dir)): p.stat().st_size for p in sorted(tmp_dir.rglob("*")) if p.is_file()}
    atomic_write_json(tmp_dir / COMPLETE, {**mark, "files": files})
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
        self._writes.run(lambda: self._save(state_dict, path), path, lambda: _tensor_bytes(state_dict))

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


def read_complete(tag_dir: Path) -> dict[str, Any] | None:
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
    """A file of the checkpoint is truncated or unreadable (as opposed to unsafe)."""


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
    """Check a committed tag's files (sizes recorded at commit time, then the restricted unpickler)."""
    tag_dir = Path(root) / tag
    mark = read_complete(tag_dir)
    if mark is None:
        raise CorruptCheckpoint(f"{tag_dir} has no readable {COMPLETE}")
    for name, size in (mark.get("files") or {}).items():
        p = tag_dir / name
        if name == COMPLETE:
            continue
        if not p.is_file() or p.stat().st_size != size:
            raise CorruptCheckpoint(f"{p} is missing or has the wrong size (want {size} bytes)")
    files = sorted(tag_dir.rglob("*.pt"))
    key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key in _VERIFIED:  # preflight, then the trainer: unpickle each file once per process
        return
    for p in files:
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
            log.warning("skipping corrupt checkpoint %s: %s", root / tag, e)
    return None


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
