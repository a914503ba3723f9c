"""``dat-ds verify RUN``: registered on import by ``dat_ds.cli._load_extensions``. Torch-free (``core.integrity``)."""

from __future__ import annotations

import argparse

from . import command

EXIT_DAMAGED = 1  # some checkpoint is damaged (a bad RUN is a ConfigError: exit 2)


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run folder (runs/<name>), its checkpoint/ folder, or one checkpoint folder")


def _verify(args: argparse.Namespace, argv: list[str]) -> int:
    from ..core.integrity import check_run

    checks = check_run(args.run)
    for check in checks:
        print(check.line(), flush=True)  # the command's report: one line per checkpoint
    return 0 if all(c.ok for c in checks) else EXIT_DAMAGED


command("verify", "check every committed checkpoint of a run against the sizes and SHA-256 hashes in its "
        "complete.json (exit 0: all intact, 1: damaged)")((_verify_args, _verify))
