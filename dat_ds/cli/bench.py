"""``dat-ds bench <name>``: built from ``dat_ds.bench.BENCH_HELP``; a benchmark's module is imported only
when that benchmark is chosen (its options are added as its sub-parser starts parsing), so
``dat-ds bench --help`` and ``dat-ds bench <name> --help`` import no torch.
"""

from __future__ import annotations

import argparse

from ..bench import BENCH_HELP, get_bench
from . import command


class _BenchParser(argparse.ArgumentParser):
    """A benchmark's sub-parser: adds that benchmark's options on first use."""

    def __init__(self, *args, bench: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._bench, self._loaded = bench, bench is None

    def parse_known_args(self, args=None, namespace=None):
        if not self._loaded:
            self._loaded = True
            get_bench(self._bench).add_args(self)
        return super().parse_known_args(args, namespace)


def _bench_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", required=True, metavar="NAME", parser_class=_BenchParser)
    for name, help_ in BENCH_HELP.items():
        sub.add_parser(name, help=help_, description=help_, bench=name)


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    get_bench(args.bench).run(args)
    return 0


command("bench", "benchmarks: step cost, engine overhead, scaling, communication, time to robustness, eval, "
        "start-up, GPU smoke test")((_bench_args, _bench))
