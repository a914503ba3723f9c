"""ruff (pyflakes, isort, bugbear, blind-except; pyproject's [tool.ruff]) finds nothing, so a ``noqa`` means something.

Part of the default suite, so that ``.ci/run`` (the README's test command) runs the linter before anything lands.
"""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO


def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "dat_ds", "benchmarks", "tests"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
