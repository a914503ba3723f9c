"""Run files are written atomically, with the permissions ``open()`` would give them."""

from __future__ import annotations

import os
import stat

import pytest

from dat_ds.core.io import JsonlWriter, atomic_write_json, save_figure, umask


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_run_files_follow_the_umask(tmp_path, mask, mode):
    """mkstemp made every run file 0600 whatever the umask: teammates on shared storage could not read a run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    old = os.umask(mask)
    try:
        assert umask() == mask and umask() == mask  # reading it leaves it as it was
        atomic_write_json(tmp_path / "summary.json", {"ok": True})
        save_figure(plt.figure(), tmp_path / "curves.png")
        JsonlWriter(tmp_path / "metrics.jsonl").write({"kind": "step"})
        reference = tmp_path / "opened.txt"
        reference.write_text("x")
    finally:
        os.umask(old)
    for name in ("summary.json", "curves.png", "metrics.jsonl", "opened.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
