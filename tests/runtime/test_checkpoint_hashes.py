"""Checkpoint hashes: each rank hashes the files it wrote, rank 0 commits them in complete.json without reading
the other ranks' files back; the check that finds a damaged file (``core.integrity``) on fabricated folders.
The end-to-end cases (a flipped byte, resume, ``dat-ds verify``) are in ``test_resume.py``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

from dat_ds.core import integrity
from dat_ds.runtime import checkpoint
from tests.helpers import hashes, join_two_rank_world, spawn_two_ranks, write_committed_tag

TAG = "step000000001"


def _recording_reads(monkeypatch) -> list[str]:
    """The files ``integrity.sha256_file`` reads from now on, by name."""
    read, real = [], integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda path: read.append(Path(path).name) or real(path))
    return read


def test_commit_takes_the_ranks_hashes_and_hashes_only_the_rest(tmp_path, monkeypatch, dat_ds_log):
    """Rank 0 reads back only a file no rank hashed (written outside DeepSpeed's checkpoint engine), and logs
    the hashing time once when it exceeds a second."""
    tmp_dir = tmp_path / (checkpoint.TMP_PREFIX + TAG)
    tmp_dir.mkdir()
    (tmp_dir / "shard.pt").write_bytes(b"weights" * 1000)
    (tmp_dir / "zero_to_fp32.py").write_text("# recovery script\n")
    read = _recording_reads(monkeypatch)
    dat_ds_log.set_level(logging.INFO)
    gathered = {"shard.pt": hashlib.sha256(b"weights" * 1000).hexdigest()}
    checkpoint._commit(tmp_path, TAG, {"tag": TAG, "global_step": 1, "epoch": 0}, sha256=gathered, hash_seconds=1.5)
    assert read == ["zero_to_fp32.py"]
    mark = checkpoint.read_complete(tmp_path / TAG)
    assert mark["sha256"] == {k: v for k, v in hashes(tmp_path / TAG).items() if k != checkpoint.COMPLETE}
    assert mark["files"] == {"shard.pt": 7000, "zero_to_fp32.py": 18}
    slow = [r.getMessage() for r in dat_ds_log.records if "hashing" in r.getMessage()]
    assert len(slow) == 1 and slow[0].startswith(f"checkpoint {TAG}: hashing its 2 files") and "took 1.5 s" in slow[0]


@pytest.mark.parametrize("damage,expected", [
    (lambda d: (d / "a.pt").write_bytes(b"A" * 99 + b"B"), "a.pt has sha256 {actual}, complete.json recorded {recorded}"),
    (lambda d: (d / "a.pt").write_bytes(b"A" * 50), "a.pt has 50 bytes, complete.json recorded 100"),
    (lambda d: (d / "a.pt").unlink(), "a.pt is missing"),
    (lambda d: (d / "complete.json").write_text("{"), "complete.json is missing or unreadable"),
], ids=["flipped-byte", "truncated", "missing", "unreadable-mark"])
def test_check_tag_names_the_damaged_file(tmp_path, damage, expected):
    tag_dir = write_committed_tag(tmp_path / "checkpoint", {"a.pt": b"A" * 100, "b.pt": b"B" * 10})
    assert integrity.check_tag(tag_dir).line() == f"{tag_dir}: ok (2 files, sha256)"
    damage(tag_dir)
    check = integrity.check_tag(tag_dir)
    short = lambda data: hashlib.sha256(data).hexdigest()[:16] + "..."  # noqa: E731
    assert not check.ok
    assert check.line() == f"{tag_dir}: damaged: " + expected.format(actual=short(b"A" * 99 + b"B"),
                                                                     recorded=short(b"A" * 100))


def test_a_flipped_byte_in_a_mark_without_hashes_goes_unnoticed_by_design(tmp_path):
    """Older checkpoints: sizes only, which a flipped byte keeps (why complete.json now records hashes)."""
    tag_dir = write_committed_tag(tmp_path / "checkpoint", {"a.pt": b"A" * 100}, hashed=False)
    (tag_dir / "a.pt").write_bytes(b"A" * 99 + b"B")
    check = integrity.check_tag(tag_dir)
    assert check.ok and not check.hashed


def test_a_damaged_checkpoint_is_warned_about_once_per_command(tmp_path, monkeypatch, dat_ds_log):
    """The preflight, the trainer and each rank a command launches check the checkpoint again: one warning, the
    later checks say it at debug level (the launching process hands its ranks ``DAMAGE_NAMED_ENV``)."""
    root = tmp_path / "checkpoint"
    tag_dir = write_committed_tag(root, {"a.pt": b"A" * 100})
    (tag_dir / "a.pt").write_bytes(b"B" * 100)
    monkeypatch.setattr(checkpoint, "_NAMED", set())
    monkeypatch.delenv(checkpoint.DAMAGE_NAMED_ENV, raising=False)
    dat_ds_log.set_level(logging.DEBUG)
    assert checkpoint.find_resume_tag(root) is None
    assert checkpoint.find_resume_tag(root) is None  # the same process again: the trainer after the preflight
    env = checkpoint.damage_named_env()
    monkeypatch.setattr(checkpoint, "_NAMED", set())  # a rank the command started: a new process, with env
    monkeypatch.setenv(checkpoint.DAMAGE_NAMED_ENV, env[checkpoint.DAMAGE_NAMED_ENV])
    assert checkpoint.find_resume_tag(root) is None
    said = [r for r in dat_ds_log.records if r.getMessage().startswith("skipping corrupt checkpoint")]
    assert [r.levelno for r in said] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert said[0].getMessage().startswith(f"skipping corrupt checkpoint {tag_dir}: a.pt has sha256 ")


def _two_rank_save(rank: int, port: int, tmp: str) -> None:
    join_two_rank_world(rank, port, LOCAL_WORLD_SIZE="2", DAT_DS_THREADS_PER_RANK="1")
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from dat_ds.core import dist

    class Engine:  # what checkpoint.save uses of a DeepSpeed engine: each rank writes its own shard
        checkpoint_engine = TorchCheckpointEngine()

        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            folder = os.path.join(save_dir, tag)
            self.checkpoint_engine.makedirs(folder, exist_ok=True)
            self.checkpoint_engine.save({"w": torch.full((4096,), float(rank))}, os.path.join(folder, f"shard_{rank}.pt"))
            dist.barrier()

    dist.init_distributed(timeout_s=60)
    read, real = [], integrity.sha256_file
    integrity.sha256_file = lambda path: read.append(Path(path).name) or real(path)
    checkpoint.save(Engine(), Path(tmp), TAG, client_state={"global_step": 1, "epoch": 0}, rank_state={}, keep_last=3)
    Path(tmp, f"read_{rank}.json").write_text(json.dumps(read))
    dist.barrier()
    torch.distributed.destroy_process_group()  # gloo's threads alive at interpreter exit abort it (SIGABRT)


@pytest.mark.dist
def test_each_rank_hashes_the_files_it_wrote_and_rank_0_commits_them(tmp_path):
    """2 ranks: complete.json holds both ranks' files' hashes; each rank read back only its own DeepSpeed file (its
    rank_state file is hashed from memory), so rank 0 never reads rank 1's files."""
    spawn_two_ranks(_two_rank_save, str(tmp_path))
    mark = checkpoint.read_complete(tmp_path / TAG)
    assert sorted(mark["sha256"]) == ["rank_state_0.pt", "rank_state_1.pt", "shard_0.pt", "shard_1.pt"]
    assert mark["sha256"] == {k: v for k, v in hashes(tmp_path / TAG).items() if k != checkpoint.COMPLETE}
    assert [json.loads((tmp_path / f"read_{r}.json").read_text()) for r in (0, 1)] == [["shard_0.pt"], ["shard_1.pt"]]
    assert integrity.check_tag(tmp_path / TAG).ok
