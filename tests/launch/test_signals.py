"""Signals: SIGTERM/SIGINT to ``dat-ds train --nproc 2`` stop the whole run (launcher and every rank) with
exit code 143/130 and one line naming the last complete checkpoint (so does SIGUSR1 listed in
``train.stop_signals``: 138); a SIGKILLed ``dat-ds`` leaves nothing
running either. Every process of the run must be gone within 30 s."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from dat_ds.runtime import checkpoint
from dat_ds.runtime.signal_stop import save_fits
from tests.helpers import (
    REPO,
    assert_identical,
    command_env,
    model_state,
    rank_process,
    tiny_args,
    wait_for_tag,
    write_ds,
)

GONE_WITHIN_S = 30
IN_PROCESS = frozenset({signal.SIGTERM, signal.SIGINT})  # what a run in the dat-ds process stops on
EPOCHS = 40  # 800 steps: minutes of training, so a run left behind is still running when it is looked for


def _start(tmp_path, name, *extra):
    """``dat-ds train --nproc 2`` in its own session, as a shell runs a foreground job (Ctrl-C reaches its group)."""
    ds = write_ds(tmp_path)
    runs = tmp_path / "runs"
    args = tiny_args(runs, name, ds, *extra, subset=640, epochs=EPOCHS, save_every=3)  # 20 steps per epoch on 2 ranks
    proc = subprocess.Popen([sys.executable, "-m", "dat_ds.cli", "train", "--nproc", "2", *args], cwd=REPO, env=command_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    parent = psutil.Process(proc.pid)
    for r in (0, 1):
        rank_process(parent, r)
    root = runs / name / "checkpoint"
    wait_for_tag(root, proc)
    family = parent.children(recursive=True)  # the DeepSpeed runner, its per-node launcher, both ranks
    assert len(family) >= 3, family
    return proc, family, root


def _assert_all_gone(family, t_signal):
    left = max(0.0, t_signal + GONE_WITHIN_S - time.time())
    _, alive = psutil.wait_procs(family, timeout=left)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"still running {GONE_WITHIN_S}s after the signal: {[p.cmdline()[:4] for p in alive]}"


def _interrupt(tmp_path, name, send, code):
    proc, family, root = _start(tmp_path, name)
    t_signal = time.time()
    send(proc)
    _, err = proc.communicate(timeout=GONE_WITHIN_S)
    assert proc.returncode == code, err[-3000:]
    _assert_all_gone(family, t_signal)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    tag = checkpoint.find_resume_tag(root)
    assert tag is not None
    assert lines[-1] == f"interrupted: last complete checkpoint {tag}; continue with --resume auto", err[-3000:]
    assert not [ln for ln in lines if ln.startswith("error:") or "Traceback" in ln], err[-3000:]
    checkpoint.verify_tag(root, tag)
    _assert_stopped_early(root)
    assert not list(root.glob(checkpoint.TMP_PREFIX + "*")), "a half-written checkpoint was left behind"


def _assert_stopped_early(root):
    assert not (root / checkpoint.tag_for(EPOCHS, 0, True)).exists(), "the run trained to its end"
    assert not (root.parent / "summary.json").exists(), "the run trained to its end"


def test_sigterm_stops_every_process_and_names_the_last_checkpoint(tmp_path):
    _interrupt(tmp_path, "term", lambda proc: proc.send_signal(signal.SIGTERM), 143)


@pytest.mark.slow
def test_ctrl_c_stops_every_process_and_names_the_last_checkpoint(tmp_path):
    # a terminal's Ctrl-C goes to the foreground process group: the CLI's, not the ranks' own session
    _interrupt(tmp_path, "int", lambda proc: os.killpg(proc.pid, signal.SIGINT), 130)


@pytest.mark.slow
def test_sigkill_of_the_cli_leaves_no_process_of_the_run(tmp_path):
    proc, family, root = _start(tmp_path, "killed")
    t_signal = time.time()
    proc.kill()
    proc.wait(timeout=10)
    _assert_all_gone(family, t_signal)
    _assert_stopped_early(root)
    tag = checkpoint.find_resume_tag(root)
    assert tag is not None
    checkpoint.verify_tag(root, tag)


def test_a_rank_exits_once_its_cli_is_gone(tmp_path):
    """``status.watch_cli`` on its own: the watched process dies, the watcher exits 143 and says why."""
    cli_stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    env = dict(os.environ, DAT_DS_CLI_PID=str(cli_stand_in.pid), DAT_DS_STATUS_DIR=str(tmp_path), RANK="1")
    rank = subprocess.Popen([sys.executable, "-c", "import time\nfrom dat_ds.launch import status\n"
                             "status.watch_cli()\nprint('watching', flush=True)\ntime.sleep(60)"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert rank.stdout.readline().strip() == "watching"
        time.sleep(1.5)
        assert rank.poll() is None, "the watcher exited while its CLI was alive"
        cli_stand_in.kill()
        cli_stand_in.wait()  # reaped: the PID is gone
        assert rank.wait(timeout=10) == 143
    finally:
        for p in (rank, cli_stand_in):
            if p.poll() is None:
                p.kill()
    record = json.loads((tmp_path / "rank1.json").read_text())
    assert record["code"] == 143 and record["error"] == "the dat-ds command that started this run is gone"


@pytest.mark.parametrize("elapsed, last_save, grace, fits", [
    (0.5, None, 20.0, True),  # no save timed yet: tried (a save cut short is never committed)
    (18.0, None, 20.0, False),  # no time left even to exit
    (1.0, 2.0, 20.0, True),  # 1 + 1.5 * 2 + 3 = 7 s
    (10.0, 4.0, 20.0, True),  # 10 + 6 + 3 = 19 s
    (12.0, 4.0, 20.0, False),  # 21 s: past the SIGKILL
    (0.0, 12.0, 20.0, False),  # a save slower than the grace period is never started
])
def test_a_final_save_is_started_only_if_it_fits_the_grace_period(elapsed, last_save, grace, fits):
    assert save_fits(elapsed, last_save, grace) is fits


SAVE_ON_SIGNAL = ("--set", "train.save_on_signal=true")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 2-rank run the interrupted ones must equal: 2 epochs of 20 steps, no mid-epoch checkpoint."""
    folder = tmp_path_factory.mktemp("sig-ref")
    ds = write_ds(folder)
    ref = subprocess.run([sys.executable, "-m", "dat_ds.cli", "train", "--nproc", "2",
                          *tiny_args(folder / "runs", "ref", ds, subset=640, epochs=2, save_every=0)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]
    return model_state(folder / "runs" / "ref" / "checkpoint" / "epoch0002")


@pytest.mark.parametrize("sig, extra, code", [
    # the same path as SIGUSR1's below, which stays in the default suite
    pytest.param(signal.SIGTERM, SAVE_ON_SIGNAL, 143, id="save_on_signal", marks=pytest.mark.slow),
    # SLURM's `sbatch --signal=B:USR1@120`, passed on to dat-ds: the launcher passes SIGUSR1 on to the ranks
    pytest.param(signal.SIGUSR1, (*SAVE_ON_SIGNAL, "--set", "train.stop_signals=[SIGUSR1]"), 138, id="sigusr1"),
    pytest.param(signal.SIGTERM, (), 143, id="last_periodic", marks=pytest.mark.slow)])
def test_signal_then_resume_auto_is_bit_identical(tmp_path, uninterrupted, sig, extra, code):
    """2 ranks: a signal mid-epoch; with ``train.save_on_signal`` (SIGTERM, or SIGUSR1 listed in
    ``train.stop_signals``) the ranks end the step and commit a checkpoint of it, which the ``interrupted:``
    line names, and exit 128 + the signal (143, 138: what a requeue wrapper tests); ``--resume auto`` (to 2
    epochs) then ends bit-identical to the uninterrupted run. Without it the run resumes from its last periodic
    checkpoint, also bit-identical."""
    save_on_signal = bool(extra)
    proc, family, root = _start(tmp_path, "term", *extra)
    t_signal = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=GONE_WITHIN_S)
    assert proc.returncode == code, err[-3000:]
    _assert_all_gone(family, t_signal)
    tag = checkpoint.find_resume_tag(root)
    assert err.splitlines()[-1] == f"interrupted: last complete checkpoint {tag}; continue with --resume auto"
    assert not list(root.glob(checkpoint.TMP_PREFIX + "*"))
    stopped = re.search(rf"signal {int(sig)}: stopped after epoch \d+ step \d+ \(global step (\d+)\)", err)
    if save_on_signal:  # the step in progress was finished and is the checkpoint the line names
        assert stopped, err[-3000:]
        assert checkpoint.read_complete(root / tag)["global_step"] == int(stopped.group(1))
        assert "final checkpoint" in err or "checkpointed already" in err
    else:
        assert stopped is None
    step = checkpoint.read_complete(root / tag)["global_step"]
    assert 3 <= step < 40, f"stopped at global step {step}: not inside the 2 epochs compared"
    res = subprocess.run([sys.executable, "-m", "dat_ds.cli", "train", "--nproc", "2",
                          *tiny_args(tmp_path / "runs", "term", tmp_path / "ds.json", *extra,
                                     subset=640, epochs=2, save_every=3), "--resume", "auto"],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {root / tag}" in res.stderr
    assert_identical(uninterrupted, model_state(root / "epoch0002"))


def test_sigterm_of_an_in_process_run_names_the_last_checkpoint(tmp_path):
    """``dat-ds train`` on one rank trains in the command's own process: SIGTERM there ends it with the same
    line and exit code 143 (not Python's silent default), the lock released, no ``.tmp-*`` left."""
    from dat_ds.launch import runlock

    ds = write_ds(tmp_path)
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "dat_ds.cli", "train",
                             *tiny_args(runs, "one", ds, subset=640, epochs=EPOCHS, save_every=3)], cwd=REPO,
                            env=command_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = runs / "one" / "checkpoint"
    wait_for_tag(root, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=GONE_WITHIN_S)
    assert proc.returncode == 143, err[-3000:]
    tag = checkpoint.find_resume_tag(root)
    assert err.splitlines()[-1] == f"interrupted: last complete checkpoint {tag}; continue with --resume auto", \
        err[-3000:]
    assert not [ln for ln in err.splitlines() if ln.startswith("error:") or "Traceback" in ln], err[-3000:]
    assert not runlock.lock_path(runs / "one").exists()
    assert not list(root.glob(checkpoint.TMP_PREFIX + "*"))
    _assert_stopped_early(root)


def test_only_the_listed_signals_wait_for_the_step_end():
    """``train.stop_signals=[SIGUSR1]`` in the ``dat-ds`` process: SIGUSR1 is recorded for the trainer, SIGTERM
    (not listed) still stops the run at once."""
    from dat_ds.core import stop
    from dat_ds.launch.train import _stop_on_signals

    listed = stop.signal_numbers(["SIGUSR1"])
    with _stop_on_signals(IN_PROCESS | listed):
        stop.defer(listed)  # what the trainer does under train.save_on_signal
        signal.raise_signal(signal.SIGUSR1)
        assert stop.received()[0] == signal.SIGUSR1
        with pytest.raises(stop.Stopped) as stopped:
            signal.raise_signal(signal.SIGTERM)
        assert stopped.value.code == 143
    assert stop.received() is None and not stop.deferred(signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # unlisted again: the default


def test_a_signal_during_a_commit_that_the_trainer_does_not_defer_is_raised_after_it():
    """``core.stop.held`` records any signal; at its end one the trainer does not defer (SIGTERM, with only
    SIGUSR1 listed) is raised again and stops the run, one it defers stays recorded for the step's end."""
    from dat_ds.core import stop
    from dat_ds.launch.train import _stop_on_signals

    listed = stop.signal_numbers(["SIGUSR1"])
    with _stop_on_signals(IN_PROCESS | listed):
        stop.defer(listed)
        with stop.held():
            signal.raise_signal(signal.SIGUSR1)
        assert stop.received()[0] == signal.SIGUSR1
    with _stop_on_signals(IN_PROCESS | listed):
        stop.defer(listed)
        with pytest.raises(stop.Stopped) as stopped:
            with stop.held():
                signal.raise_signal(signal.SIGTERM)
                committed = True  # the held section ran to its end before the stop
        assert committed and stopped.value.signum == signal.SIGTERM


@pytest.mark.parametrize("when", ["after the rename", "writing latest"])
def test_a_signal_during_a_commit_stops_after_it_and_keeps_the_checkpoint(tmp_path, monkeypatch, when):
    """A SIGTERM that lands between the commit's rename and ``latest`` (seen as a CI flake: the run had
    written the checkpoint, the signal undid the rename) now waits for the commit, then stops the run."""
    from dat_ds.core import stop
    from dat_ds.launch.train import _stop_on_signals

    root = tmp_path / "checkpoint"
    (root / (checkpoint.TMP_PREFIX + "step0003")).mkdir(parents=True)
    (root / (checkpoint.TMP_PREFIX + "step0003") / "model.pt").write_bytes(b"weights")
    target = "_fsync_dir" if when == "after the rename" else "atomic_write_text"
    real = getattr(checkpoint, target)

    def signalled(*a, **kw):
        signal.raise_signal(signal.SIGTERM)  # its handler runs as soon as this C call returns, i.e. here
        return real(*a, **kw)

    monkeypatch.setattr(checkpoint, target, signalled)
    with _stop_on_signals(IN_PROCESS):  # launch.train's in-process handlers; no trainer deferring signals
        with pytest.raises(stop.Stopped):
            checkpoint._commit(root, "step0003", {"global_step": 3})
    assert (root / "latest").read_text() == "step0003\n"
    assert checkpoint.complete_tags(root) == [(3, "step0003")]
    assert (root / "step0003" / "model.pt").read_bytes() == b"weights"
    assert not list(root.glob(checkpoint.TMP_PREFIX + "*"))
