"""The benchmark harnesses behind ``dat-ds bench <name>``: they reproduce the README's tables.

They live beside the package, not in it (like timm's ``benchmark.py`` and DeepSpeed's ``benchmarks/``):
the wheel ships ``dat_ds`` only, and ``dat-ds bench`` runs from a checkout of the repository. Each writes
``bench/<name>.json`` (+ a PNG) and prints a table; ratios are measured side by side in one run: absolute
times on shared machines are noise.

The benchmark called ``name`` is the module ``benchmarks/<name with - as _>.py``, with ``add_args(p)`` and
``run(args) -> dict``; the list of names and their one-line help is the CLI's static table
(``dat_ds.cli.bench.BENCH_HELP``), so ``dat-ds bench --help`` imports nothing of this package.
``get_bench(name)`` imports that one module. No module here imports torch at import time: ``dat-ds bench
<name> --help`` stays fast.

Ranks and helper processes started as ``python -m benchmarks.<module>`` get the checkout on their
``PYTHONPATH`` (``checkout_env``), whatever folder they start in.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dat_ds.cli.bench import BENCH_HELP
from dat_ds.core.errors import ConfigError

CHECKOUT = Path(__file__).resolve().parents[1]  # the repository root: `benchmarks` is importable from it


@dataclass(frozen=True)
class Bench:
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict[str, Any]]
    help: str


def get_bench(name: str) -> Bench:
    """The benchmark called ``name``; imports only its module."""
    if name not in BENCH_HELP:
        raise ConfigError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCH_HELP)}")
    module = importlib.import_module(f"{__name__}.{name.replace('-', '_')}")

    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", default="bench", help="folder for <name>.json and plots (default bench/)")
        module.add_args(p)

    return Bench(add_args, module.run, BENCH_HELP[name])


def checkout_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` plus a ``PYTHONPATH`` that starts with the checkout: for processes started as
    ``python -m benchmarks.<module>`` (through ``launch()`` or a subprocess), in whatever folder they start."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(CHECKOUT)]
    return {**(env or {}), "PYTHONPATH": os.pathsep.join([str(CHECKOUT), *paths])}


def machine_info() -> dict[str, Any]:
    import torch

    from dat_ds.core import dist

    return {"host_cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "accelerator": dist.accelerator().device_name(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_result(out_dir: str | Path, name: str, result: dict[str, Any]) -> Path:
    """``<out_dir>/<name>.json`` with the machine it ran on, written atomically."""
    from dat_ds.core.io import atomic_write_json

    path = Path(out_dir) / f"{name}.json"
    atomic_write_json(path, {"benchmark": name, "machine": machine_info(), **result})
    return path
