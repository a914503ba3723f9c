"""Benchmarks: ``dat-ds bench <name>``; each writes ``bench/<name>.json`` (+ a PNG) and prints a table.

Ratios are measured side by side in one run: absolute times on shared machines are noise.

The CLI builds ``dat-ds bench`` from ``BENCH_HELP`` (a static table, so ``--help`` imports nothing) and
``get_bench(name)``, which imports that one benchmark's module. No bench module imports torch at import
time: ``dat-ds bench <name> --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..core.errors import ConfigError

# name -> (module under dat_ds.bench, one-line help). Every module has ``add_args(p)`` and ``run(args) -> dict``.
_BENCHES: dict[str, tuple[str, str]] = {
    "step": ("step", "PGD-k AT step cost / clean step: input-gradient attack vs naive loop"),
    "engine": ("engine_bench", "samples/s: DeepSpeed-engine trainer vs a plain DDP loop, same AT work; "
                               "--deepspeed_config A --vs B: two JSONs side by side"),
    "scaling": ("scaling", "weak and strong scaling 1 -> N ranks (samples/s)"),
    "time-to-robust": ("time_to_robust", "training time of PGD-5, FGSM-RS, N-FGSM, Free-AT, ATTA, N-FGSM + one-cycle "
                                         "to PGD-10 AT's AutoAttack accuracy (-1 pp)"),
    "comm": ("comm", "bytes and time per step: fp32 all-reduce vs DAT 8-bit, 1-bit Adam, 0/1 Adam, 1-bit LAMB"),
    "network": ("network", "two nodes (network namespaces) behind a shaped link: step time and time to a loss, "
                           "fp32 all-reduce vs DAT 8-bit, 1-bit Adam, 0/1 Adam, 1-bit LAMB"),
    "simulate": ("simulate", "alpha-beta cost model calibrated and checked on bench network: step time and scaling "
                             "efficiency for N ranks on 1-400 Gbit/s links"),
    "eval": ("eval_bench", "PGD-20 evaluation throughput on 1 vs N ranks"),
    "startup": ("startup", "wall time of dat-ds --help, a config error, an eval error and the demo's first step, "
                           "each vs `import torch`"),
    "gpu-smoke": ("gpu_smoke", "one CUDA device: every one-rank ds_config, bf16, ZeRO-3, attacks, AutoAttack eval, "
                               "SSL commands, dat-ds vs plain PyTorch samples/s"),
}
_BENCHES["unlabeled-memory"] = ("unlabeled_memory", "resident memory of generated-data mixing (memory-mapped .npz shards) "
                                                   "from 100k to 1M generated images")
_BENCHES["ablations"] = ("ablations", "what EMA, AWP, label smoothing, CutMix, consistency each add to TRADES, one at a "
                                     "time, paired over seeds (APGD-CE + APGD-DLR worst case)")
BENCH_HELP: dict[str, str] = {name: help_ for name, (_, help_) in _BENCHES.items()}


@dataclass(frozen=True)
class Bench:
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict[str, Any]]
    help: str


def get_bench(name: str) -> Bench:
    """The benchmark called ``name``; imports only its module."""
    if name not in _BENCHES:
        raise ConfigError(f"unknown benchmark {name!r}; choose one of {', '.join(_BENCHES)}")
    module_name, help_ = _BENCHES[name]
    module = importlib.import_module(f"{__name__}.{module_name}")

    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", default="bench", help="folder for <name>.json and plots (default bench/)")
        module.add_args(p)

    return Bench(add_args, module.run, help_)


def machine_info() -> dict[str, Any]:
    import os

    import torch

    from ..core import dist

    return {"host_cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "accelerator": dist.accelerator().device_name(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_result(out_dir: str | Path, name: str, result: dict[str, Any]) -> Path:
    """``<out_dir>/<name>.json`` with the machine it ran on, written atomically."""
    from ..core.io import atomic_write_json

    path = Path(out_dir) / f"{name}.json"
    atomic_write_json(path, {"benchmark": name, "machine": machine_info(), **result})
    return path
