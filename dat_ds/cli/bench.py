"""``dat-ds bench <name>``: the benchmark harnesses of a checkout's ``benchmarks/`` folder (outside the wheel).

The names and their help are static data here, so ``dat-ds bench --help`` lists them anywhere and imports
no torch. The ``benchmarks`` package is imported only when a benchmark is chosen (its options are added as
its sub-parser starts parsing): the one import of ``benchmarks`` in ``dat_ds``. Installed from a wheel, it
is not there: ``dat-ds bench <name>`` then says so in one line and exits with code 2, as a config error does.
A benchmark called ``name`` is the module ``benchmarks/<name with - as _>.py`` (``benchmarks.get_bench``).
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from ..core.errors import EXIT_USER_ERROR
from . import command

BENCH_HELP: dict[str, str] = {
    "step": "PGD-k AT step cost / clean step: input-gradient attack vs naive loop",
    "engine": "samples/s: DeepSpeed-engine trainer vs a plain DDP loop, same AT work; "
              "--deepspeed_config A --vs B: two JSONs side by side",
    "scaling": "weak and strong scaling 1 -> N ranks (samples/s)",
    "time-to-robust": "training time of PGD-5, FGSM-RS, N-FGSM, Free-AT, ATTA, N-FGSM + one-cycle "
                      "to PGD-10 AT's AutoAttack accuracy (-1 pp)",
    "comm": "bytes and time per step: fp32 all-reduce vs DAT 8-bit, 1-bit Adam, 0/1 Adam, 1-bit LAMB",
    "network": "two nodes (network namespaces) behind a shaped link: step time and time to a loss, "
               "fp32 all-reduce vs DAT 8-bit, 1-bit Adam, 0/1 Adam, 1-bit LAMB",
    "simulate": "alpha-beta cost model calibrated and checked on bench network: step time and scaling "
                "efficiency for N ranks on 1-400 Gbit/s links",
    "eval": "PGD-20 evaluation throughput on 1 vs N ranks",
    "startup": "wall time of dat-ds --help, a config error, an eval error and the demo's first step, "
               "each vs `import torch`",
    "gpu-smoke": "one CUDA device: every one-rank ds_config, bf16, ZeRO-3, attacks, AutoAttack eval, "
                 "SSL commands, dat-ds vs plain PyTorch samples/s",
    "unlabeled-memory": "resident memory of generated-data mixing (memory-mapped .npz shards) "
                        "from 100k to 1M generated images",
    "soak": "a long 2-rank run with saves, keep_last, EMA, reuse and loader workers: resident memory, open "
            "files, disk use and step time sampled throughout, each tested for an upward trend",
    "plan": "dat-ds plan's predicted memory vs the measured peak of real training steps (CPU: live tensor bytes "
            "from torch's profiler) for small models, ZeRO 0/2/3, fp32/bf16",
    "zero3": "all-gather bytes and step time per PGD-k step (k = 1, 5, 10): ZeRO-2, ZeRO-3, ZeRO-3 with attacks "
             "on weights gathered once per step",
    "ablations": "what EMA, AWP, label smoothing, CutMix, consistency each add to TRADES, one at a "
                 "time, paired over seeds (APGD-CE + APGD-DLR worst case)",
}

NOT_IN_WHEEL = ("dat-ds bench runs from a checkout of the repository: the benchmarks live in its benchmarks/ "
                "folder, outside the wheel (git clone ...; uv run dat-ds bench step)")


def benchmarks_package() -> ModuleType | None:
    """The checkout's ``benchmarks`` package, or None where there is none (dat-ds installed from a wheel)."""
    try:
        import benchmarks
    except ModuleNotFoundError as e:
        if e.name != "benchmarks":  # a harness's own missing import is a bug to see, not "no checkout"
            raise
        return None
    return benchmarks if hasattr(benchmarks, "get_bench") else None  # someone else's package of that name


def _harness(name: str):
    """``benchmarks.get_bench(name)``; without a checkout, the one line and exit code 2."""
    package = benchmarks_package()
    if package is None:
        sys.stderr.write(f"error: {NOT_IN_WHEEL}\n")
        sys.stderr.flush()
        sys.exit(EXIT_USER_ERROR)
    return package.get_bench(name)


class _BenchParser(argparse.ArgumentParser):
    """A benchmark's sub-parser: adds that benchmark's options on first use."""

    def __init__(self, *args, bench: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._bench, self._loaded = bench, bench is None

    def parse_known_args(self, args=None, namespace=None):
        if not self._loaded:
            self._loaded = True
            _harness(self._bench).add_args(self)
        return super().parse_known_args(args, namespace)


def _bench_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", required=True, metavar="NAME", parser_class=_BenchParser)
    for name, help_ in BENCH_HELP.items():
        sub.add_parser(name, help=help_, description=help_, bench=name)


def check_bench_flags(harness, args: argparse.Namespace) -> None:
    """Every int/float flag of ``harness`` in ``args`` through the typed fields of the config keys (``core.fields``),
    before it runs: an integer flag is a count >= 1 and a float flag a finite number > 0, unless its dest is named
    below (one meaning in every harness). One line naming the first bad flag."""
    from ..core.fields import Count, Fraction, Positive, PositiveFloat, Radius, check_flag

    named = {"warmup": Count, "local_rank": Count, "latency_us": Radius, "eps": Fraction, "unsup_fraction": Fraction,
             "warmup_share": Fraction}
    parser = argparse.ArgumentParser()
    harness.add_args(parser)
    for action in parser._actions:  # the harness's own options, as it declared them
        value = getattr(args, action.dest, None)
        if action.type not in (int, float) or value is None or not action.option_strings:
            continue
        field = named.get(action.dest, Positive if action.type is int else PositiveFloat)
        check_flag(max(action.option_strings, key=len), value, field)


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    harness = _harness(args.bench)
    check_bench_flags(harness, args)
    harness.run(args)
    return 0


command("bench", "benchmarks (from a checkout: benchmarks/ is not in the wheel): step cost, engine overhead, "
        "scaling, communication, time to robustness, eval, start-up, GPU smoke test")((_bench_args, _bench))
