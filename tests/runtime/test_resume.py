"""Exact resume: a run interrupted mid-epoch and resumed ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from dat_ds import cli
from dat_ds.runtime import checkpoint
from tests.helpers import (
    REPO,
    Crash,
    assert_identical,
    crash_after_save,
    hashes,
    launch_two_rank_train,
    model_state,
    rank_process,
    tiny_args,
    wait_for_tag,
    write_ds,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 1-rank run: 6 steps per epoch, 2 epochs, mid-epoch saves every 4 steps."""
    folder = tmp_path_factory.mktemp("resume")
    ds = write_ds(folder)
    assert cli.main(["train", *tiny_args(folder / "runs", "ref", ds)]) == 0
    return folder, ds


def test_tags_and_commit_marks(reference):
    folder, _ = reference
    root = folder / "runs" / "ref" / "checkpoint"
    # steps 4 and 8 mid-epoch (step 12 closes epoch 2, so it is the epoch tag), plus one tag per epoch, numbered
    # from 1 as the metrics rows and the table number epochs (they were 0-based: epoch0001 held epoch 2)
    assert [t for _, t in checkpoint.complete_tags(root)] == ["step000000004", "epoch0001", "step000000008", "epoch0002"]
    assert (root / "latest").read_text().strip() == "epoch0002"
    assert not [d for d in root.iterdir() if d.name.startswith(checkpoint.TMP_PREFIX)]
    mark = checkpoint.read_complete(root / "step000000004")
    assert mark["fits"] == {"model.name": "tiny_cnn", "model.normalization": "auto", "data.name": "fashion-mnist",
                            "optimizer": "AdamW", "zero_stage": 0}
    assert mark["step_in_epoch"] == 4 and mark["epoch"] == 1
    last = checkpoint.read_complete(root / "epoch0002")  # epoch 2, all of its 6 steps: complete
    assert (last["epoch"], last["step_in_epoch"], last["global_step"]) == (2, 6, 12)
    rows = [json.loads(ln) for ln in (folder / "runs" / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2]
    for _, tag in checkpoint.complete_tags(root):  # every file's SHA-256, as the ranks hashed it while saving
        mark = checkpoint.read_complete(root / tag)
        assert mark["sha256"] == {k: v for k, v in hashes(root / tag).items() if k != checkpoint.COMPLETE}
        assert mark["sha256"].keys() == mark["files"].keys()


def test_a_run_saved_with_0_based_epoch_tags_still_resumes_from_its_newest(reference, tmp_path):
    """Runs saved before the tags were 1-based (epoch0000 held epoch 1): tags are found through complete.json
    and ordered by global step, never by the number in their name."""
    folder, _ = reference
    old = tmp_path / "old" / "checkpoint"
    shutil.copytree(folder / "runs" / "ref" / "checkpoint", old)
    for new_name, old_name in (("epoch0001", "epoch0000"), ("epoch0002", "epoch0001")):  # lowest first
        (old / new_name).rename(old / old_name)
    (old / "latest").write_text("epoch0001\n")
    assert [t for _, t in checkpoint.complete_tags(old)] == ["step000000004", "epoch0000", "step000000008", "epoch0001"]
    assert checkpoint.resolve_resume("auto", old.parent) == (old, "epoch0001")


def test_crash_mid_epoch_then_resume_auto_is_bit_identical(reference, caplog):
    folder, ds = reference
    with crash_after_save("step000000004"), pytest.raises(Crash):
        cli.main(["train", *tiny_args(folder / "runs", "crash", ds)])
    root = folder / "runs" / "crash" / "checkpoint"
    assert [t for _, t in checkpoint.complete_tags(root)] == ["step000000004"]

    # A newer checkpoint whose model file got truncated, and a save interrupted before its commit:
    # --resume auto must skip both (with warnings) and take step 4.
    shutil.copytree(root / "step000000004", root / "step000000005")
    mark = checkpoint.read_complete(root / "step000000005")
    (root / "step000000005" / "complete.json").write_text(
        (root / "step000000005" / "complete.json").read_text().replace('"global_step": 4', '"global_step": 5'))
    model_file = root / "step000000005" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[: mark["files"]["mp_rank_00_model_states.pt"] // 2])
    shutil.copytree(root / "step000000004", root / ".tmp-step000000006")
    (root / "latest").write_text("step000000005\n")
    with caplog.at_level(logging.WARNING, logger="dat_ds"):
        assert checkpoint.resolve_resume("auto", root.parent) == (root, "step000000004")
    assert "skipping corrupt checkpoint" in caplog.text and "step000000005" in caplog.text
    assert "skipping incomplete checkpoint" in caplog.text and ".tmp-step000000006" in caplog.text
    shutil.rmtree(root / "step000000005")  # a real crash would not leave it behind twice

    assert cli.main(["train", *tiny_args(folder / "runs", "crash", ds), "--resume", "auto"]) == 0
    ref_root = folder / "runs" / "ref" / "checkpoint"
    for tag in ("step000000008", "epoch0002"):
        assert_identical(model_state(ref_root / tag), model_state(root / tag))


MODEL_STATES = "mp_rank_00_model_states.pt"


def test_a_flipped_byte_is_skipped_by_resume_auto_and_named_by_verify(reference, dat_ds_log, capsys):
    """One byte flipped in the newest checkpoint's model file: its size is as recorded and it still unpickles,
    so only the SHA-256 in complete.json tells. ``dat-ds verify`` names the file (exit 1); ``--resume auto``
    warns once, naming it, and resumes from the tag before, ending bit-identical to the uninterrupted run."""
    folder, ds = reference
    run = folder / "runs" / "flip"
    shutil.copytree(folder / "runs" / "ref", run)
    root = run / "checkpoint"
    damaged = root / "epoch0002" / MODEL_STATES
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(data)
    recorded = checkpoint.read_complete(root / "epoch0002")["sha256"][MODEL_STATES]

    capsys.readouterr()
    assert cli.main(["verify", str(run)]) == 1
    tags = [t for _, t in checkpoint.complete_tags(root)]
    files = {t: len(checkpoint.read_complete(root / t)["files"]) for t in tags}
    assert capsys.readouterr().out.splitlines() == [
        f"{root / t}: ok ({files[t]} files, sha256)" if t != "epoch0002" else
        f"{root / t}: damaged: {MODEL_STATES} has sha256 {hashlib.sha256(data).hexdigest()[:16]}..., "
        f"complete.json recorded {recorded[:16]}..." for t in tags]

    dat_ds_log.set_level(logging.INFO)
    assert cli.main(["train", *tiny_args(folder / "runs", "flip", ds), "--resume", "auto"]) == 0
    warnings = [r.getMessage() for r in dat_ds_log.records if r.levelno >= logging.WARNING]
    assert [w for w in warnings if "checkpoint" in w] == [  # the preflight and the trainer both checked it
        f"skipping corrupt checkpoint {root / 'epoch0002'}: {MODEL_STATES} has sha256 "
        f"{hashlib.sha256(data).hexdigest()[:16]}..., complete.json recorded {recorded[:16]}...; trying the one before it"]
    assert f"resumed from {root / 'step000000008'}: epoch 2, step 2 of the epoch, global step 8" in dat_ds_log.text
    ref_root = folder / "runs" / "ref" / "checkpoint"
    assert_identical(model_state(ref_root / "epoch0002"), model_state(root / "epoch0002"))  # saved again, whole
    assert cli.main(["verify", str(run)]) == 0


def test_a_checkpoint_without_hashes_is_checked_by_size(reference, capsys, monkeypatch, dat_ds_log):
    """A complete.json written before hashes were recorded: still resumable (sizes checked, one debug line)."""
    from dat_ds.core import integrity

    folder, _ = reference
    root = folder / "runs" / "old" / "checkpoint"
    shutil.copytree(folder / "runs" / "ref" / "checkpoint" / "step000000004", root / "step000000004")
    mark = checkpoint.read_complete(root / "step000000004")
    del mark["sha256"]
    (root / "step000000004" / checkpoint.COMPLETE).write_text(json.dumps(mark))
    monkeypatch.setattr(integrity, "_SAID_SIZE_ONLY", False)
    dat_ds_log.set_level(logging.DEBUG)
    assert checkpoint.resolve_resume("auto", root.parent) == (root, "step000000004")
    assert checkpoint.resolve_resume("auto", root.parent) == (root, "step000000004")
    said = [r for r in dat_ds_log.records if "checked by size" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.DEBUG]
    assert not [r for r in dat_ds_log.records if r.levelno >= logging.WARNING]
    assert cli.main(["verify", str(root.parent)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{root / 'step000000004'}: ok ({len(mark['files'])} files, sizes only: its complete.json predates "
        "recorded hashes)"]


@pytest.mark.parametrize("key, saved, other", [("model.name", "tiny_cnn", "small_cnn"),
                                               ("model.normalization", "auto", "data")])  # what the weights expect
def test_resume_with_another_model_is_one_line(reference, capsys, key, saved, other):
    folder, ds = reference
    args = tiny_args(folder / "runs", "ref", ds, "--set", f"{key}={other}", "--resume", "auto")
    before = sorted(p.name for p in (folder / "runs" / "ref" / "checkpoint").iterdir())
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("error: checkpoint ") and f"was saved with {key}='{saved}', but this run has '{other}'" in err
    assert f"--set {key}={saved}" in err
    assert sorted(p.name for p in (folder / "runs" / "ref" / "checkpoint").iterdir()) == before


def test_resume_on_another_world_size_is_refused_before_any_rank_starts(reference, capsys, monkeypatch):
    """A 1-rank checkpoint resumed by a 2-rank command: one line from the CLI, exit 2, nothing started or written."""
    folder, ds = reference
    from dat_ds.launch import launcher

    started = []
    monkeypatch.setattr(launcher, "_run", lambda *a, **kw: started.append(a) or 0)  # a rank start would show here
    args = tiny_args(folder / "runs", "ref", ds, "--resume", "auto", "--nproc", "2")
    run_dir = folder / "runs" / "ref"
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    assert checkpoint.read_complete(run_dir / "checkpoint" / "epoch0002")["world_size"] == 1
    assert cli.main(["train", *args]) == 2
    tag = run_dir / "checkpoint" / "epoch0002"
    assert capsys.readouterr().err.splitlines() == [
        f"error: checkpoint '{tag}' was saved with 1 rank(s), but this run has 2; resume with --nproc 1, or pass "
        "--allow-world-size-change (not bit-identical), or start a new run with another --name"]
    assert started == []
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_trainer_refuses_another_world_size_on_its_own(reference):
    """The ranks' copy of the check (a run started with `deepspeed` directly skips the CLI's)."""
    from dat_ds.core.errors import ConfigError
    from dat_ds.runtime.run_dir import check_world_size

    folder, _ = reference
    root = folder / "runs" / "ref" / "checkpoint"
    check_world_size(root, "epoch0002", 1)
    with pytest.raises(ConfigError, match=r"saved with 1 rank\(s\), but this run has 4; resume with --nproc 1"):
        check_world_size(root, "epoch0002", 4)


def test_a_checkpoints_model_states_are_weights_the_preflight_accepts(reference):
    """DeepSpeed's ``mp_rank_00_model_states.pt`` keeps the state dict under "module": model.weights takes it."""
    from dat_ds.core.config import build_config
    from dat_ds.data.embedded import FASHION_SPEC
    from dat_ds.launch.preflight import check_weights
    from dat_ds.models import create_model

    folder, ds = reference
    states = folder / "runs" / "ref" / "checkpoint" / "epoch0002" / "mp_rank_00_model_states.pt"
    cfg = build_config(None, ["model.name=tiny_cnn", f"model.weights={states}", f"deepspeed_config={ds}"])
    check_weights(cfg, FASHION_SPEC)
    loaded = create_model("tiny_cnn", FASHION_SPEC, str(states))
    assert_identical(loaded.state_dict(), model_state(states.parent))


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dat_ds"):
        assert checkpoint.resolve_resume("auto", tmp_path / "nothing") is None
    assert "starting from scratch" in caplog.text
    with pytest.raises(Exception, match="no complete checkpoint found for --resume"):
        checkpoint.resolve_resume(str(tmp_path / "nothing"), tmp_path / "other")


def test_rng_roundtrip_restores_every_stream():
    import random

    import numpy as np
    import torch

    g = torch.Generator().manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()
    state = checkpoint.capture_rng(g)
    want = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal(),
            torch.rand(3, generator=g))
    torch.manual_seed(99), random.seed(99), np.random.seed(99), g.manual_seed(99)
    checkpoint.restore_rng(state, g)
    got = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal(),
           torch.rand(3, generator=g))
    assert torch.equal(want[0], got[0]) and want[1:5] == got[1:5] and torch.equal(want[5], got[5])


@pytest.mark.slow
def test_sigkill_two_ranks_then_resume_is_bit_identical(tmp_path):
    """2 CPU ranks: SIGKILL rank 1 after the first mid-epoch checkpoint, resume, compare with a clean run."""
    ds = write_ds(tmp_path)
    runs = tmp_path / "runs"
    common = dict(subset=640, epochs=2, save_every=3)  # 20 steps per epoch on 2 ranks
    ref = subprocess.run([sys.executable, "-m", "dat_ds.cli", "train", "--nproc", "2",
                          *tiny_args(runs, "ref", ds, **common)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]

    proc = launch_two_rank_train(tiny_args(runs, "killed", ds, **common))
    victim = rank_process(psutil.Process(proc.pid), 1)
    root = runs / "killed" / "checkpoint"
    first = wait_for_tag(root, proc)
    assert first.startswith("step")
    victim.send_signal(signal.SIGKILL)
    t_kill = time.time()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - t_kill < 60
    assert "error: rank 1 failed (exit code -9: killed by SIGKILL)" in err
    tags = [t for _, t in checkpoint.complete_tags(root)]
    assert "epoch0002" not in tags  # it really was interrupted

    res = subprocess.run([sys.executable, "-m", "dat_ds.cli", "train", "--nproc", "2",
                          *tiny_args(runs, "killed", ds, **common), "--resume", "auto"],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_identical(model_state(runs / "ref" / "checkpoint" / "epoch0002"), model_state(root / "epoch0002"))


def test_world_size_change_is_refused_unless_allowed_then_reshards(tmp_path, capsys, dat_ds_log):
    """2 ranks train one epoch; a 1-rank resume is one line without --allow-world-size-change (exit 2, nothing
    written), and with it continues: the epoch checkpoint starts epoch 2 at its beginning, the step counter
    goes on (20 + 40 steps); a mid-epoch checkpoint (step 14 of 20 on 2 ranks: 448 examples) goes on at step 28
    of 40 on one rank."""
    ds = write_ds(tmp_path)
    runs = tmp_path / "runs"
    common = dict(subset=640, save_every=7)  # 20 steps per epoch on 2 ranks, 40 on one
    two = subprocess.run([sys.executable, "-m", "dat_ds.cli", "train", "--nproc", "2",
                          *tiny_args(runs, "two", ds, epochs=1, **common)], cwd=REPO, capture_output=True, text=True,
                         timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    root = runs / "two" / "checkpoint"
    assert [t for _, t in checkpoint.complete_tags(root)] == ["step000000007", "step000000014", "epoch0001"]
    before = {str(p): p.stat().st_mtime_ns for p in (runs / "two").rglob("*")}
    capsys.readouterr()
    assert cli.main(["train", *tiny_args(runs, "two", ds, epochs=2, **common), "--resume", "auto"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: checkpoint '{root / 'epoch0001'}' was saved with 2 rank(s), but this run has 1; resume with --nproc 2, "
        "or pass --allow-world-size-change (not bit-identical), or start a new run with another --name"]
    assert {str(p): p.stat().st_mtime_ns for p in (runs / "two").rglob("*")} == before

    dat_ds_log.clear()
    assert cli.main(["train", *tiny_args(runs, "two", ds, epochs=2, **common), "--resume", "auto",
                     "--allow-world-size-change"]) == 0
    assert ("world size 2 -> 1: epoch 2 starts at its beginning; per-rank RNG re-seeded; the global step counter "
            "continues at 20; results will not be bit-identical to an uninterrupted run") in dat_ds_log.text
    mark = checkpoint.read_complete(root / "epoch0002")
    assert mark["global_step"] == 60 and mark["world_size"] == 1
    epochs = [json.loads(ln) for ln in (runs / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1, 2]

    dat_ds_log.clear()
    assert cli.main(["train", *tiny_args(runs, "mid", ds, epochs=1, **common), "--resume",
                     str(root / "step000000014"), "--allow-world-size-change"]) == 0
    assert ("world size 2 -> 1: data position re-sharded at global example 448 of epoch 1 (step 28 of 40; 0 "
            "example(s) seen again); per-rank RNG re-seeded") in dat_ds_log.text
    assert checkpoint.read_complete(runs / "mid" / "checkpoint" / "epoch0001")["global_step"] == 14 + 12
