"""Full disk: ENOSPC anywhere in a checkpoint save is one line (exit 2) naming the checkpoint folder, about
how much the save needs and what is free; the save's `.tmp-*` folder is gone, training stops, and the last
complete checkpoint and `latest` are as they were. The atomic run-file writes (metrics, summary, configs)
fail the same way, without leaving half a file or half a JSONL line."""

from __future__ import annotations

import builtins
import errno
import os
import re
import subprocess
import sys
import time
import uuid

import pytest

from dat_ds import cli
from dat_ds.core import dist
from dat_ds.core.errors import DiskFullError
from dat_ds.core.io import JsonlWriter, atomic_write_json, megabytes, read_jsonl
from dat_ds.runtime import checkpoint
from tests.helpers import REPO, tiny_args, write_ds

dist.setup_logging()
LINE = re.compile(r"error: disk full: checkpoint (\S+) does not fit in '(.+)' \(it needs about ([\d.,]+) MB, "
                  r"([\d.,]+) MB are free there\); (.+)\. Free some space on that file system and continue with "
                  r"--resume auto")
MODEL_STATES = "mp_rank_00_model_states.pt"


class _FullFile:
    """A file on a disk that fills up halfway through its first write (half of it lands, then ENOSPC)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        view = memoryview(data).cast("B")
        self._f.write(view[: len(view) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fill_disk_at(monkeypatch, name: str) -> None:
    """From now on, every file whose name contains ``name`` hits ENOSPC when written: opened by path
    (DeepSpeed's files, JSONL) or through ``os.fdopen`` of a ``mkstemp`` descriptor (the atomic writes)."""
    real_open, real_fdopen = builtins.open, os.fdopen

    def full(f, mode, path):
        return _FullFile(f) if ("w" in mode or "a" in mode) and name in os.path.basename(str(path)) else f

    monkeypatch.setattr(builtins, "open", lambda file, mode="r", *a, **k: full(real_open(file, mode, *a, **k), mode, file))
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: full(real_fdopen(fd, mode, *a, **k), mode,
                                                                          os.readlink(f"/proc/self/fd/{fd}")))


def train(tmp_path, name, *extra, ds=None, out=None):
    ds = ds or write_ds(tmp_path)
    return cli.main(["train", *tiny_args(out or tmp_path / "runs", name, ds, "--set", "attack.name=none", *extra,
                                         epochs=1, save_every=2)])


def fail_at_save(monkeypatch, number: int, inject) -> None:
    """``inject()`` (a disk that fills up) right before the ``number``-th checkpoint save of the run."""
    real_save, calls = checkpoint.save, []

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            inject()
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", save)


def tree_bytes(folder):
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def one_error_line(capsys) -> re.Match:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    match = LINE.fullmatch(err[0])
    assert match, err[0]
    return match


def assert_last_good_checkpoint_stands(root, tag="step000000002"):
    assert not [d.name for d in root.iterdir() if d.name.startswith(checkpoint.TMP_PREFIX)]
    assert [t for _, t in checkpoint.complete_tags(root)] == [tag]
    assert (root / "latest").read_text().strip() == tag
    checkpoint._VERIFIED.clear()
    checkpoint.verify_tag(root, tag)  # sizes as committed, every .pt opens with the restricted unpickler


@pytest.mark.parametrize("where", [
    MODEL_STATES,  # DeepSpeed's file (its checkpoint engine's torch.save)
    "rank_state_0.pt",  # our per-rank file (atomic write)
    "complete.json",  # rank 0's commit mark
    "latest",  # after the commit rename: the rename is undone
])
def test_disk_full_in_the_second_save_keeps_the_first(tmp_path, monkeypatch, capsys, where):
    fail_at_save(monkeypatch, 2, lambda: fill_disk_at(monkeypatch, where))
    assert train(tmp_path, "full") == 2
    root = tmp_path / "runs" / "full" / "checkpoint"
    tag, folder, needed, free, state = one_error_line(capsys).groups()
    assert (tag, folder, state) == ("step000000004", str(root), "the last complete checkpoint step000000002 is intact")
    assert needed == megabytes(tree_bytes(root / "step000000002"))
    assert float(free.replace(",", "")) > 0
    assert_last_good_checkpoint_stands(root)
    # training stopped at the failed save: no step after it, no summary
    steps = [r["step"] for r in read_jsonl(tmp_path / "runs" / "full" / "metrics.jsonl") if r["kind"] == "step"]
    assert max(steps) == 4 and not (tmp_path / "runs" / "full" / "summary.json").exists()


@pytest.mark.parametrize("where", ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "recovery script"])
def test_disk_full_under_zero1(tmp_path, monkeypatch, capsys, where):
    """ZeRO-1 writes a per-rank optimizer file through the checkpoint engine, and copies its recovery
    scripts outside it (the write that escapes DeepSpeed's save_checkpoint)."""
    def inject():
        if where == "recovery script":
            from deepspeed.runtime.engine import DeepSpeedEngine

            def copy(self, save_path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(save_path, "zero_to_fp32.py"))
            monkeypatch.setattr(DeepSpeedEngine, "_copy_recovery_script", copy)
        else:
            fill_disk_at(monkeypatch, where)

    fail_at_save(monkeypatch, 2, inject)
    assert train(tmp_path, "zero1", ds=write_ds(tmp_path, zero_optimization={"stage": 1})) == 2
    root = tmp_path / "runs" / "zero1" / "checkpoint"
    assert one_error_line(capsys).group(1) == "step000000004"
    assert_last_good_checkpoint_stands(root)


def test_disk_full_in_the_first_save_estimates_from_what_it_wrote(tmp_path, monkeypatch, capsys):
    """No complete checkpoint to size the need by: what the save wrote plus what it still had to write. Then
    the fix the line names works: with space again, --resume auto starts over and writes that checkpoint."""
    fail_at_save(monkeypatch, 1, lambda: fill_disk_at(monkeypatch, "rank_state_0.pt"))
    assert train(tmp_path, "first") == 2
    root = tmp_path / "runs" / "first" / "checkpoint"
    tag, _, needed, _, state = one_error_line(capsys).groups()
    assert (tag, state) == ("step000000002", "no checkpoint of this run is complete yet")
    assert not list(root.iterdir()) and not checkpoint.complete_tags(root)
    monkeypatch.undo()
    assert train(tmp_path, "first", "--resume", "auto") == 0
    real = tree_bytes(root / "step000000002")
    assert abs(float(needed) * 1e6 - real) <= 0.1 * real, (needed, real)


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"old": 1})
    fill_disk_at(monkeypatch, "summary.json")
    with pytest.raises(DiskFullError) as e:
        atomic_write_json(path, {"new": "x" * 3000})
    assert re.fullmatch(rf"disk full: could not write '{re.escape(str(path))}' \(about 0\.003 MB, [\d.,]+ MB free "
                        r"there\); free some space on that file system", str(e.value)), str(e.value)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary file left
    assert path.read_text() == '{\n  "old": 1\n}\n'


def test_jsonl_append_on_a_full_disk_leaves_no_half_line(tmp_path, monkeypatch):
    writer = JsonlWriter(tmp_path / "metrics.jsonl")
    writer.write({"kind": "step", "step": 1})
    fill_disk_at(monkeypatch, "metrics.jsonl")
    with pytest.raises(DiskFullError, match=r"^disk full: could not write '.*metrics\.jsonl'"):
        writer.write({"kind": "step", "step": 2, "pad": "x" * 200})
    monkeypatch.undo()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"kind": "step", "step": 1}]


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB file system (tmpfs), or a skip where mounting is not permitted."""
    folder = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and CAP_SYS_ADMIN): {mount.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_real_full_disk(tmp_path, small_disk, capsys):
    """tiny_cnn checkpoints are about 1.3 MB: the first one fits in 2 MB, the second does not."""
    assert train(tmp_path, "real", out=small_disk / "runs") == 2
    root = small_disk / "runs" / "real" / "checkpoint"
    tag, folder, needed, free, state = one_error_line(capsys).groups()
    assert (tag, folder, state) == ("step000000004", str(root), "the last complete checkpoint step000000002 is intact")
    assert float(needed) > float(free)
    assert_last_good_checkpoint_stands(root)


# Imported by every rank of the 2-rank run below (through PYTHONPATH): rank 1 alone finds its disk full the
# second time it writes its rank_state file, while rank 0's writes all succeed.
RANK1_FULL_DISK = """
import errno, os
if os.environ.get("RANK") == "1":
    _fdopen, _seen = os.fdopen, []

    class _Full:
        def __init__(self, f): self._f = f
        def write(self, data): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        def __getattr__(self, name): return getattr(self._f, name)
        def __enter__(self): return self
        def __exit__(self, *exc): self._f.close()

    def fdopen(fd, *args, **kwargs):
        f = _fdopen(fd, *args, **kwargs)
        if "rank_state_1.pt" in os.readlink(f"/proc/self/fd/{fd}"):
            _seen.append(1)
            if len(_seen) == 2:
                return _Full(f)
        return f
    os.fdopen = fdopen
"""


@pytest.mark.slow  # about 60 s on 2 shared cores, mostly the two ranks' start-up
def test_disk_full_on_rank_1_only_fails_both_ranks_at_once(tmp_path):
    """2 ranks: rank 1's write fails while rank 0 waits to commit. Both agree before the commit and stop
    together (well inside the 120 s collective timeout); rank 0 removes the folder and prints the line."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(RANK1_FULL_DISK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    runs = tmp_path / "runs"
    args = tiny_args(runs, "two", write_ds(tmp_path), "--set", "attack.name=none", subset=192, epochs=1, save_every=2)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "dat_ds.cli", "train", "--nproc", "2", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and LINE.fullmatch(errors[0]), errors
    assert LINE.fullmatch(errors[0]).group(1) == "step000000004"
    assert_last_good_checkpoint_stands(runs / "two" / "checkpoint")
    print(f"2-rank run to the failed save and out: {time.time() - t0:.0f}s")
