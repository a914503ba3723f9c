"""``dat-ds export``: registered on import by ``dat_ds.cli._load_extensions``."""

from __future__ import annotations

import argparse

from . import command


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder (runs/<name>) or its checkpoint folder")
    p.add_argument("--out", required=True, help="output .safetensors file; model.json is written next to it")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the newest complete one)")


def _export(args: argparse.Namespace, argv: list[str]) -> int:
    from ..core import ui
    from ..evaluation.export import export

    info = export(args.run, args.out, args.tag)
    ui.console.print(f"wrote {info['weights']} and {info['meta']} ({info['model']}, {info['num_classes']} classes, "
                     f"from {info['source']})")
    return 0


command("export", "export a run's weights to safetensors + model.json (loadable by timm and dat-ds eval)")(
    (_export_args, _export))
