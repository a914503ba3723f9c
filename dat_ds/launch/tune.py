"""Rank entry of ``dat-ds tune``'s measuring ranks (``tune.worker``), and ``start_ranks``, which starts them.

The tuner sits below this layer: ``tune.run`` and ``tune.measure.EngineMeasure`` are handed ``start_ranks``
(by ``cli.tune`` and ``bench engine --vs``) and never import the launcher themselves.
"""

from __future__ import annotations

import sys

from .entry import run_entry
from .launcher import RankFailure, launch


def start_ranks(argv: list[str], *, nproc: int, hostfile: str | None, env: dict[str, str] | None) -> str | None:
    """``tune.measure.StartRanks`` through the one launcher: None when the ranks exited cleanly, else why not."""
    try:
        launch("dat_ds.launch.tune", argv, nproc=nproc, hostfile=hostfile, env=env)
    except RankFailure as e:
        return str(e) or f"the ranks exited with code {e.code}"
    return None


def main() -> int:
    from ..tune import worker

    return worker.main(worker.get_args_parser().parse_args())


if __name__ == "__main__":
    sys.exit(run_entry(main))
