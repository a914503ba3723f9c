"""Shared benchmark plumbing: interleaved timing, pass counting, table output, finished-run checks (torch imported lazily).

Bar plots: ``dat_ds.core.io.save_bar_plot`` (the tuner draws them too).
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from torch import nn


def interleaved_timing(arms: dict[str, Callable[[], None]], *, warmup: int = 2, rounds: int = 5) -> dict[str, dict[str, float]]:
    """Time each arm ``rounds`` times, alternating arms round by round so drifts hit all arms alike."""
    for fn in arms.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(rounds):
        for name, fn in arms.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "rounds": len(v)}
            for k, v in samples.items()}


class PassCounter:
    """Counts forward passes through a module and backward passes that flow back through its output."""

    def __init__(self):
        self.forward = 0
        self.backward = 0

    def _on_forward(self, module, inputs, output):
        import torch

        self.forward += 1
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._on_backward)

    def _on_backward(self, grad):
        self.backward += 1


@contextmanager
def runs_folder(runs_dir: str | None, reuse: bool, prefix: str) -> Iterator[Path]:
    """The folder a bench trains its runs in: ``--runs-dir`` (kept), else a temporary one removed afterwards."""
    from dat_ds.core.errors import ConfigError

    if reuse and not runs_dir:
        raise ConfigError("--reuse needs --runs-dir (the folder holding the earlier runs)")
    if runs_dir:
        yield Path(runs_dir)
        return
    tmp = tempfile.mkdtemp(prefix=prefix)
    try:
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def count_passes(model: nn.Module) -> Iterator[PassCounter]:
    counter = PassCounter()
    handle = model.register_forward_hook(counter._on_forward)
    try:
        yield counter
    finally:
        handle.remove()


def show_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from dat_ds.core import ui

    ui.show(ui.table(title, columns, rows))


def finished_run(run_dir: Path, argv: list[str], epochs: int) -> bool:
    """``run_dir`` holds a run of exactly the config ``argv`` builds, trained for all ``epochs``.

    The saved config is read back through the defaults, so a key added to the config since that run (at its
    default) does not make the run look different; ``dist`` (how long a collective waits for a dead peer)
    changes nothing a healthy run computes or how fast, and is not compared."""
    import yaml

    from dat_ds.cli.args import train_args_parser, train_request
    from dat_ds.core.config import config_from_dict, replace
    from dat_ds.launch.validate import config_from_request

    summary, saved = run_dir / "summary.json", run_dir / "config.yaml"
    if not (summary.is_file() and saved.is_file()):
        return False
    wanted = config_from_request(train_request(train_args_parser().parse_args(argv)))
    history = json.loads(summary.read_text()).get("history", [])
    saved_cfg = config_from_dict(yaml.safe_load(saved.read_text()))
    return replace(saved_cfg, dist=wanted.dist) == wanted and len(history) == epochs


def selected_names(text: str, known: Any, first: str, *, what: str, flag: str) -> list[str]:
    """The comma list ``text`` of names from ``known``, without repeats, ``first`` always first (a one-line
    ConfigError names the first unknown one, the ``flag`` it came from and the choices)."""
    from dat_ds.core.errors import ConfigError

    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in known]
    if unknown:
        raise ConfigError(f"unknown {what} {unknown[0]!r} for {flag}; choose from {', '.join(known)}")
    return [first] + [m for m in dict.fromkeys(names) if m != first]
