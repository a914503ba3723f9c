"""``dat-ds export``: registered on import by ``dat_ds.cli._load_extensions``."""

from __future__ import annotations

import argparse

from . import command


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder (runs/<name>) or its checkpoint folder")
    p.add_argument("--out", required=True, help="output .safetensors file; model.json is written next to it")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the run's best one when train.keep_best kept one, else the newest)")
    p.add_argument("--force", action="store_true", help="replace the output files if they exist")
    p.add_argument("--weights", choices=("ema", "raw"), default=None,
                   help="the weight EMA or the raw trained weights (default: the EMA when the run has one)")


def _check_export_args(args: argparse.Namespace) -> None:
    """Torch-free: the run exists and the output paths can be written (and are new, unless --force)."""
    from pathlib import Path

    from ..core.errors import ConfigError

    if not Path(args.run).exists():
        raise ConfigError(f"--run {args.run!r} does not exist; give a run folder such as runs/demo")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {str(out)!r} must end in .safetensors")
    if out.is_dir():
        raise ConfigError(f"--out {args.out!r} is a folder; give a FILE.safetensors to write")
    blocker = next((p for p in out.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(f"--out {args.out!r} lies under the file {str(blocker)!r}; choose another path")
    # The same rule as dat_ds.evaluation.export.check_outputs (which imports torch): the weights and
    # their .json, neither replaced unless asked.
    for path in (out, out.with_suffix(".json")):
        if path.exists() and not args.force:
            raise ConfigError(f"{str(path)!r} already exists; pass --force to replace it, or choose another --out")


def _export(args: argparse.Namespace, argv: list[str]) -> int:
    _check_export_args(args)
    from ..core import ui
    from ..evaluation.export import export

    info = export(args.run, args.out, args.tag, force=args.force, weights=args.weights or "auto")
    best = " -- the run's best checkpoint by validation robust accuracy; --tag picks another" if info["best"] else ""
    ui.console.print(f"wrote {info['weights']} and {info['meta']} ({info['model']}, {info['num_classes']} classes, "
                     f"{info['which_weights']} weights, from {info['source']}{best})")
    return 0


command("export", "export a run's weights to safetensors + model.json (loadable by timm and dat-ds eval)")(
    (_export_args, _export))
