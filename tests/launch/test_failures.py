"""Rank failure: when one rank dies the others do not hang; the CLI names the failed rank in one line."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

from dat_ds.cli.ranks import train_rank
from dat_ds.launch import status
from dat_ds.runtime import checkpoint
from tests.helpers import hashes, launch_two_rank_train, rank_process, tiny_args, wait_for_tag, write_ds


def test_sigkill_one_rank_stops_all_within_60s(tmp_path):
    ds = write_ds(tmp_path)
    runs = tmp_path / "runs"
    proc = launch_two_rank_train(tiny_args(runs, "victim", ds, subset=640, epochs=3, save_every=3))
    parent = psutil.Process(proc.pid)
    victim = rank_process(parent, 1)
    survivor = rank_process(parent, 0)
    root = runs / "victim" / "checkpoint"
    wait_for_tag(root, proc)
    family = parent.children(recursive=True)
    victim.send_signal(signal.SIGKILL)
    t_kill = time.time()
    _, err = proc.communicate(timeout=120)
    elapsed = time.time() - t_kill
    assert proc.returncode != 0
    assert elapsed < 60, f"took {elapsed:.0f}s to stop"
    gone, alive = psutil.wait_procs(family, timeout=5)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], f"left behind: {alive}"
    assert not survivor.is_running() or survivor.status() == psutil.STATUS_ZOMBIE
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == ["error: rank 1 failed (exit code -9: killed by SIGKILL); the other ranks were stopped"]
    # the last good checkpoint is intact: committed, and its files pass verification
    tag = checkpoint.find_resume_tag(root)
    assert tag is not None and tag != "epoch0003"
    checkpoint.verify_tag(root, tag)


def _status(folder, rank, code, error, comm=False, t=0.0):
    (folder / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "code": code, "error": error, "comm": comm,
                                                         "time": t}))


def test_report_names_the_rank_that_raised_not_its_echo(tmp_path):
    _status(tmp_path, 0, 1, "DistBackendError: Connection closed by peer", comm=True, t=1.0)
    _status(tmp_path, 1, 1, "ValueError: boom", t=2.0)
    assert status.failed_rank_line(str(tmp_path), 2, 1) == (
        "rank 1 failed (exit code 1: ValueError: boom); the other ranks were stopped")


def test_report_ignores_siblings_stopped_by_the_launcher(tmp_path):
    _status(tmp_path, 0, 143, "terminated by the launcher", t=2.0)
    _status(tmp_path, 1, 1, "RuntimeError: out of memory", t=1.0)
    assert status.failed_rank_line(str(tmp_path), 2, 1).startswith("rank 1 failed (exit code 1: RuntimeError: out of memory)")


def test_report_silent_rank_was_killed(tmp_path):
    _status(tmp_path, 0, 143, "terminated by the launcher")
    assert status.failed_rank_line(str(tmp_path), 2, 247) == (
        "rank 1 failed (exit code -9: killed by SIGKILL); the other ranks were stopped")


def test_a_user_error_one_rank_met_is_named_not_its_echo(tmp_path):
    """data.on_corrupt=abort: the rank whose shard holds the file exits 2; its peer fails in a collective."""
    _status(tmp_path, 1, 2, "CorruptImageError: corrupt image 'b/05.png' (OSError: truncated)", t=1.0)
    _status(tmp_path, 0, 1, "DistBackendError: Connection closed by peer", comm=True, t=2.0)
    assert status.failed_rank_line(str(tmp_path), 2, 1) == (
        "rank 1 failed (exit code 2: CorruptImageError: corrupt image 'b/05.png' (OSError: truncated)); the other "
        "ranks were stopped")


def test_a_lost_peer_is_reported_by_its_line_on_its_node(tmp_path, monkeypatch):
    """One node's ranks of a multi-node run report here (first_rank); the rank's own line is used as it is,
    but a rank that raised stays the cause when it reported on the same node."""
    from dat_ds.core.errors import EXIT_PEER_LOST, PeerLostError

    line = ("rank 0 (node 0, 10.231.20.1) lost contact after training step 4 (epoch 1): no reply within 15 s "
            "(gloo; dist.timeout_s); last checkpoint: runs/x/checkpoint/step000000004; resume with --resume auto")
    monkeypatch.setenv(status.STATUS_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    status.write_rank_status(EXIT_PEER_LOST, PeerLostError(line))
    record = json.loads((tmp_path / "rank1.json").read_text())
    assert record["comm"] is True and record["line"] == line
    assert status.failed_rank_line(str(tmp_path), 1, EXIT_PEER_LOST, first_rank=1) == line
    _status(tmp_path, 2, 1, "ValueError: boom", t=record["time"] + 1)
    assert status.failed_rank_line(str(tmp_path), 2, 1, first_rank=1).startswith("rank 2 failed (exit code 1: ValueError")


def test_config_errors_are_not_reported_twice(tmp_path):
    _status(tmp_path, 0, 2, "ConfigError: bad")
    _status(tmp_path, 1, 2, "ConfigError: bad")
    assert status.failed_rank_line(str(tmp_path), 2, 2) is None


def test_rank_entry_point_leaves_a_status_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(status.STATUS_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert train_rank(["--set", "attack.eps=2"]) == 2
        assert signal.getsignal(signal.SIGTERM) is not previous  # a launcher's SIGTERM is recorded, too
    finally:
        signal.signal(signal.SIGTERM, previous)
    record = json.loads((tmp_path / "rank0.json").read_text())
    assert record["code"] == 2 and record["error"].startswith("ConfigError: attack.eps=2 must be in [0, 1]")
    assert capsys.readouterr().err.startswith("error: attack.eps=2 must be in [0, 1]")


@pytest.mark.slow
def test_rank0_killed_during_overwrite_start_restores_old_run(tmp_path):
    """2 ranks under --overwrite: rank 0 (the lock's owner) is SIGKILLed after moving the old run aside and
    before the first checkpoint. It cannot clean up; `dat-ds train` does: old run back byte for byte, no lock."""

    from dat_ds.launch import runlock
    from dat_ds.runtime.run_dir import OVERWRITTEN

    ds = write_ds(tmp_path)
    runs = tmp_path / "runs"
    old = runs / "ow"
    (old / "checkpoint" / "epoch0000").mkdir(parents=True)
    (old / "checkpoint" / "epoch0000" / "complete.json").write_text('{"global_step": 6, "epoch": 0}')
    (old / "metrics.jsonl").write_text('{"kind": "epoch", "epoch": 1}\n')
    before = hashes(old)
    proc = launch_two_rank_train(tiny_args(runs, "ow", ds, "--overwrite", subset=640, epochs=1, save_every=100))
    rank0 = rank_process(psutil.Process(proc.pid), 0)
    deadline = time.time() + 400
    while not [p for p in runs.iterdir() if OVERWRITTEN in p.name]:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    assert not checkpoint.complete_tags(old / "checkpoint")
    rank0.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "error: rank 0 failed (exit code -9: killed by SIGKILL)" in err, err[-2000:]
    assert hashes(old) == before
    assert sorted(p.name for p in runs.iterdir()) == ["ow"]
    assert not runlock.lock_path(old).exists()


def test_the_cli_watch_is_not_fooled_by_a_wall_clock_step(monkeypatch):
    """psutil's create_time is the wall-clock boot time plus the start ticks: a clock step moves it, and both ranks
    of a live run once took their dat-ds command for gone (exit 143). The watch compares /proc's start ticks."""
    from dat_ds.launch import status

    me = str(os.getpid())
    before = status._started(me)
    monkeypatch.setattr(psutil.Process, "create_time", lambda self: 123456789.0)  # the wall clock stepped
    assert status._started(me) == before is not None
    assert status._started("999999999") is None
