"""Hostfiles are checked before anything starts: one line naming the bad entry, exit 2, nothing written."""

from __future__ import annotations

import pytest

from dat_ds import cli
from dat_ds.launch.launcher import read_hostfile

BAD = [
    ("no-slots", "worker-1\n", "line 1 ('worker-1') is not 'HOST slots=N'; write one node per line, e.g. 'worker-1 slots=8'"),
    ("slots-zero", "worker-1 slots=0\n", "line 1 ('worker-1 slots=0'): slots=0 must be a whole number >= 1 (the GPUs of that node)"),
    ("slots-text", "a slots=four\n", "line 1 ('a slots=four'): slots=four must be a whole number >= 1 (the GPUs of that node)"),
    ("shell-metacharacters", "a;rm slots=2\n",
     "line 1 ('a;rm slots=2'): 'a;rm' is not a host name (RFC 1123: letters, digits, '-' and '.') or an IPv4 address"),
    ("command-substitution", "$(id) slots=2\n",
     "line 1 ('$(id) slots=2'): '$(id)' is not a host name (RFC 1123: letters, digits, '-' and '.') or an IPv4 address"),
    ("label-starts-with-dash", "-node slots=2\n",
     "line 1 ('-node slots=2'): '-node' is not a host name (RFC 1123: letters, digits, '-' and '.') or an IPv4 address"),
    ("duplicate-host", "a slots=2\n# spare\nb slots=2\na slots=4\n",
     "line 4 ('a slots=4'): host 'a' is listed twice; give each node one line"),
    ("empty", "# nothing yet\n\n", "lists no host; write one 'host slots=N' line per node"),
]


@pytest.mark.parametrize("case_id,text,expected", BAD, ids=[c[0] for c in BAD])
def test_bad_hostfile_is_one_line_before_launch(case_id, text, expected, tmp_path, capsys):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    out = tmp_path / "runs"
    assert cli.main(["train", "--hostfile", str(hostfile), "--output-dir", str(out), "--dry-run"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: hostfile {str(hostfile)!r}"), lines
    assert lines[0].endswith(expected), lines[0]
    assert not out.exists()


def test_good_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-1.cluster.example slots=8\n10.0.0.2   slots = 4  # a comment\n")
    assert read_hostfile(str(hostfile)) == [("node-1.cluster.example", 8), ("10.0.0.2", 4)]
