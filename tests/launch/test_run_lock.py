"""One run, one writer; nothing written or deleted before everything is validated.

The run folder's lock (``launch.runlock``): a second run is refused in one line naming the holder, a
stale lock of a dead process is taken over with a warning, another host's lock is refused, the lock goes
away when the run ends (also by an exception). ``--overwrite``: the old run is moved aside, deleted only
after the new run's first complete checkpoint, and put back byte for byte when the start fails.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dat_ds import cli
from dat_ds.core import dist
from dat_ds.core.errors import ConfigError
from dat_ds.launch import runlock, train
from dat_ds.runtime import checkpoint
from dat_ds.runtime.run_dir import OVERWRITTEN
from tests.helpers import Crash, hashes, tiny_args, write_ds

dist.setup_logging()  # bind the log handler outside capsys: stderr then holds only the error line


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(run_dir: Path, **record) -> Path:
    path = runlock.lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "started": time.time(), "command": "dat-ds train",
                                "token": "theirs", **record}))
    return path


@pytest.fixture
def sleeper():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    time.sleep(0.2)
    yield p
    p.kill()
    p.wait()


# ----------------------------------------------------------------------------- the lock itself


def test_lock_records_holder_refuses_second_and_is_released(tmp_path):
    run = tmp_path / "runs" / "r"
    lock = runlock.acquire(run)
    record = json.loads(runlock.lock_path(run).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert abs(record["started"] - time.time()) < 60 and record["command"]
    assert not run.exists()  # the lock is a sibling: --overwrite can move the folder without it
    with pytest.raises(ConfigError, match=r"is in use by PID \d+ on host .* since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d; "
                                          r"wait for that run to finish or stop it \(kill \d+\)"):
        runlock.acquire(run)
    lock.release()
    assert not runlock.lock_path(run).exists()
    runlock.acquire(run).release()


def test_live_holder_line_names_host_pid_and_time(tmp_path, sleeper):
    run = tmp_path / "r"
    started = time.time()
    write_lock(run, pid=sleeper.pid, started=started)
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    with pytest.raises(ConfigError) as e:
        runlock.check_free(run)
    assert str(e.value) == (f"run folder {str(run)!r} is in use by PID {sleeper.pid} on host {socket.gethostname()!r} "
                            f"since {since}; wait for that run to finish or stop it (kill {sleeper.pid}), or start "
                            "this one with another --name")


def test_stale_lock_of_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    run = tmp_path / "r"
    pid = dead_pid()
    write_lock(run, pid=pid)
    runlock.check_free(run)  # stale: not a refusal
    with caplog.at_level(logging.WARNING, logger="dat_ds"):
        lock = runlock.acquire(run)
    assert f"taking over the lock of run folder {run}: PID {pid}" in caplog.text and "is gone" in caplog.text
    assert json.loads(runlock.lock_path(run).read_text())["token"] == lock.record["token"]
    assert [p.name for p in tmp_path.iterdir()] == ["r.lock"]  # no private copies left behind
    lock.release()


def test_reused_pid_is_stale(tmp_path, caplog):
    """Our own PID is alive, but this process started long after the lock: the holder is gone."""
    run = tmp_path / "r"
    write_lock(run, pid=os.getpid(), started=1_000_000.0)
    with caplog.at_level(logging.WARNING, logger="dat_ds"):
        runlock.acquire(run).release()
    assert "taking over" in caplog.text


def test_lock_of_another_host_is_refused_with_how_to_remove_it(tmp_path):
    run = tmp_path / "r"
    path = write_lock(run, pid=dead_pid(), host="node-17")
    with pytest.raises(ConfigError, match=rf"in use by PID \d+ on host 'node-17' since .*; if that job is really gone, "
                                          rf"delete {str(path)!r} and start again"):
        runlock.acquire(run)
    assert json.loads(path.read_text())["host"] == "node-17"  # untouched


def test_unreadable_lock_is_refused(tmp_path):
    run = tmp_path / "r"
    runlock.lock_path(run).write_text("{not json")
    with pytest.raises(ConfigError, match="has an unreadable lock file .*delete that file"):
        runlock.acquire(run)


def test_clear_dead_after_a_failed_launch_puts_the_old_run_back(tmp_path):
    """What `dat-ds train --nproc N` does when rank 0 was killed holding the lock with the old run aside."""
    run = tmp_path / "r"
    (run / "checkpoint" / "epoch0000").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("old\n")
    before = hashes(run)
    started = time.time()
    pid = dead_pid()
    aside = run.with_name(f"r{OVERWRITTEN}20260101-000000-{pid}")
    run.rename(aside)
    (run / "checkpoint" / ".tmp-step000000004").mkdir(parents=True)  # the new run's partial start
    write_lock(run, pid=pid, started=started + 0.1)
    assert runlock.clear_dead(run, started - 5) == pid
    train.settle_leftovers(run, pid)
    assert hashes(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


# ----------------------------------------------------------------------------- through the command line


def test_second_train_on_a_locked_folder_is_one_line_and_writes_nothing(tmp_path, sleeper, capsys):
    ds = write_ds(tmp_path)
    run = tmp_path / "runs" / "busy"
    write_lock(run, pid=sleeper.pid)
    rc = cli.main(["train", *tiny_args(tmp_path / "runs", "busy", ds)])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: run folder {str(run)!r} is in use by PID {sleeper.pid} on host ")
    assert not run.exists()
    assert json.loads(runlock.lock_path(run).read_text())["pid"] == sleeper.pid  # not ours to remove


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """A finished 1-epoch run (6 steps, tags step4 + epoch0), plus an eval file a later command wrote."""
    folder = tmp_path_factory.mktemp("overwrite")
    ds = write_ds(folder)
    assert cli.main(["train", *tiny_args(folder / "runs", "old", ds, epochs=1)]) == 0
    run = folder / "runs" / "old"
    (run / "eval.json").write_text('{"clean_acc": 0.5}\n')
    assert not runlock.lock_path(run).exists()  # released at the end of the run
    return folder, ds, run


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def test_overwrite_start_failing_in_the_engine_build_touches_nothing(old_run, capsys):
    folder, ds, run = old_run
    target = _copy(run, folder / "runs" / "a")
    before = hashes(target)
    # 8 examples < one global batch of 16: found while building the loaders, after the validation pass
    rc = cli.main(["train", *tiny_args(folder / "runs", "a", ds, "--overwrite", subset=8, epochs=1)])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and err == ["error: the training set (8 examples) is smaller than one global batch (16); "
                               "lower train_micro_batch_size_per_gpu"], err
    assert hashes(target) == before
    assert sorted(p.name for p in target.parent.iterdir() if p.name.startswith("a")) == ["a"]  # no lock, no aside


def test_overwrite_start_failing_before_the_first_checkpoint_restores_the_old_run(old_run, monkeypatch):
    folder, ds, run = old_run
    target = _copy(run, folder / "runs" / "b")
    before = hashes(target)
    seen = {}

    def crash(engine, root, tag, **kw):  # the new run dies where its first checkpoint would be written
        seen["old run set aside"] = [p.name for p in target.parent.iterdir() if OVERWRITTEN in p.name]
        seen["new folder"] = sorted(p.name for p in target.iterdir())
        raise Crash(tag)

    monkeypatch.setattr(checkpoint, "save", crash)
    with pytest.raises(Crash):
        cli.main(["train", *tiny_args(folder / "runs", "b", ds, "--overwrite", "--set", "seed=5", epochs=1)])
    assert len(seen["old run set aside"]) == 1 and "config.yaml" in seen["new folder"]
    assert "eval.json" not in seen["new folder"]  # it really was a fresh folder while it ran
    assert hashes(target) == before
    assert sorted(p.name for p in target.parent.iterdir() if p.name.startswith("b")) == ["b"]


def test_successful_overwrite_ends_with_only_the_new_run(old_run, monkeypatch):
    folder, ds, run = old_run
    target = _copy(run, folder / "runs" / "c")
    real_save = checkpoint.save
    asides = []

    def save(engine, root, tag, **kw):
        asides.append(len([p for p in target.parent.iterdir() if OVERWRITTEN in p.name]))
        return real_save(engine, root, tag, **kw)

    monkeypatch.setattr(checkpoint, "save", save)
    assert cli.main(["train", *tiny_args(folder / "runs", "c", ds, "--overwrite", "--set", "seed=5",
                                         epochs=1, save_every=2)]) == 0
    # the old run is kept until the first checkpoint is committed, and gone right after it
    assert asides[0] == 1 and asides[1:] == [0] * (len(asides) - 1)
    assert sorted(p.name for p in target.parent.iterdir() if p.name.startswith("c")) == ["c"]
    assert not (target / "eval.json").exists()
    assert "seed: 5" in (target / "config.yaml").read_text()
    assert [t for _, t in checkpoint.complete_tags(target / "checkpoint")] == [
        "step000000002", "step000000004", "epoch0001"]
    assert len([ln for ln in (target / "metrics.jsonl").read_text().splitlines()
                if json.loads(ln)["kind"] == "epoch"]) == 1


def test_lock_is_released_when_the_run_raises(old_run, monkeypatch):
    folder, ds, _ = old_run

    def crash(engine, root, tag, **kw):
        assert runlock.holder(root.parent)["pid"] == os.getpid()  # held while it runs
        raise Crash(tag)

    monkeypatch.setattr(checkpoint, "save", crash)
    with pytest.raises(Crash):
        cli.main(["train", *tiny_args(folder / "runs", "d", ds, epochs=1)])
    assert not runlock.lock_path(folder / "runs" / "d").exists()


def test_launcher_refuses_a_locked_folder_before_any_rank_starts(tmp_path, sleeper, capsys):
    ds = write_ds(tmp_path)
    run = tmp_path / "runs" / "busy"
    write_lock(run, pid=sleeper.pid)
    t0 = time.time()
    rc = cli.main(["train", "--nproc", "2", *tiny_args(tmp_path / "runs", "busy", ds)])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and f"is in use by PID {sleeper.pid}" in err[0], err
    assert time.time() - t0 < 30 and not run.exists()  # no rank was started (that takes longer), nothing written


EVAL_ARGS = ["--steps", "1", "--max-examples", "16", "--batch-size", "16"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_eval_into_a_locked_run_folder_is_one_line_and_writes_nothing(old_run, sleeper, capsys, monkeypatch, nproc):
    """``dat-ds eval --run R`` writes R/eval.json: refused while a training run (or another eval) holds R."""
    from dat_ds.launch import launcher

    folder, _, run = old_run
    target = _copy(run, folder / "runs" / f"e{nproc}")
    write_lock(target, pid=sleeper.pid)
    before = hashes(target)
    started = []
    monkeypatch.setattr(launcher, "_run", lambda *a, **kw: started.append(a) or 0)
    rc = cli.main(["eval", "--run", str(target), "--nproc", str(nproc), *EVAL_ARGS])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: run folder {str(target)!r} is in use by PID {sleeper.pid} on host ")
    assert err[0].endswith(f"; wait for that run to finish or stop it (kill {sleeper.pid}), or write this "
                           "evaluation elsewhere with --out DIR"), err[0]
    assert hashes(target) == before and started == []
    assert json.loads(runlock.lock_path(target).read_text())["pid"] == sleeper.pid


def test_eval_holds_the_run_folder_lock_while_it_runs(old_run, monkeypatch, tmp_path):
    from dat_ds.evaluation import run as eval_run

    folder, _, run = old_run
    target = _copy(run, folder / "runs" / "held")
    real, seen = eval_run.main, []

    def spy(args):
        seen.append(runlock.holder(target))
        return real(args)

    monkeypatch.setattr(eval_run, "main", spy)
    assert cli.main(["eval", "--run", str(target), *EVAL_ARGS]) == 0
    assert seen[0]["pid"] == os.getpid()
    assert not runlock.lock_path(target).exists()  # released
    assert json.loads((target / "eval.json").read_text())["count"] == 16
    # --out elsewhere writes nothing into the run folder: no lock, so it may run beside a training run
    assert cli.main(["eval", "--run", str(target), "--out", str(tmp_path / "out"), *EVAL_ARGS]) == 0
    assert seen[1] is None and (tmp_path / "out" / "eval.json").is_file()
