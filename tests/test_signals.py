"""Signals: SIGTERM/SIGINT to ``dat-ds train --nproc 2`` stop the whole run (launcher and every rank) with
exit code 143/130 and one line naming the last complete checkpoint; a SIGKILLed ``dat-ds`` leaves nothing
running either. Every process of the run must be gone within 30 s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from dat_ds.runtime import checkpoint
from reliability_utils import tiny_args, write_ds
from test_resume import REPO, rank_process, wait_for_tag

GONE_WITHIN_S = 30
EPOCHS = 40  # 800 steps: minutes of training, so a run left behind is still running when it is looked for


def _start(tmp_path, name):
    """``dat-ds train --nproc 2`` in its own session, as a shell runs a foreground job (Ctrl-C reaches its group)."""
    ds = write_ds(tmp_path)
    runs = tmp_path / "runs"
    args = tiny_args(runs, name, ds, subset=640, epochs=EPOCHS, save_every=3)  # 20 steps per epoch on 2 ranks
    proc = subprocess.Popen([sys.executable, "-m", "dat_ds.cli", "train", "--nproc", "2", *args], cwd=REPO,
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
