"""``dat-ds bench <name>``: a registry of benchmarks, each ``(add_args(parser), run(args) -> dict)``.

A benchmark module registers itself with ``BENCHES.register(name)(Bench(add_args, run, help))`` and is
imported by ``_load_benches``. Results go to ``--out`` (default ``bench/``) as ``<name>.json``.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..cli import command
from ..core.registry import Registry


@dataclass(frozen=True)
class Bench:
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict[str, Any]]
    help: str


BENCHES: Registry[Bench] = Registry("benchmark")
BENCH_MODULES = ("step", "engine_bench", "scaling", "time_to_robust", "comm", "eval_bench")


def _load_benches() -> None:
    for mod in BENCH_MODULES:
        try:
            importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{mod}":
                raise


def machine_info() -> dict[str, Any]:
    import os

    import torch

    from ..core import dist

    return {"host_cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "accelerator": dist.accelerator().device_name(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_result(out_dir: str | Path, name: str, result: dict[str, Any]) -> Path:
    from ..core.io import atomic_write_json

    path = Path(out_dir) / f"{name}.json"
    atomic_write_json(path, {"benchmark": name, "machine": machine_info(), **result})
    return path


def _add(p: argparse.ArgumentParser) -> None:
    _load_benches()
    sub = p.add_subparsers(dest="bench", required=True)
    for name in BENCHES.names():
        b = BENCHES.get(name)
        sp = sub.add_parser(name, help=b.help, description=b.help)
        sp.add_argument("--out", default="bench", help="folder for <name>.json and plots (default bench/)")
        b.add_args(sp)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    b = BENCHES.get(args.bench)
    b.run(args)
    return 0


command("bench", "benchmarks: step cost, engine overhead, scaling, communication, time to robustness, eval")((_add, _run))
