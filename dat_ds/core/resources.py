"""Package data found by name: ``recipes/*.yaml`` and ``ds_configs/*.json`` ship inside the wheel.

``--recipe demo`` and ``--deepspeed_config zero2_fp32`` work from any directory, and so do the paths
the docs use (``recipes/demo.yaml``, ``ds_configs/zero0_fp32.json``): a path that exists is used as
given, otherwise its file name is looked up in the package.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

RECIPES = "recipes"
DS_CONFIGS = "ds_configs"


def _folder(kind: str) -> Path:
    return Path(str(resources.files("dat_ds") / kind))


def names(kind: str) -> list[str]:
    """Stems of the shipped files of ``kind`` (``recipes`` or ``ds_configs``)."""
    suffix = ".yaml" if kind == RECIPES else ".json"
    return sorted(p.stem for p in _folder(kind).glob(f"*{suffix}"))


def packaged(kind: str, name: str) -> Path:
    """The shipped file ``name`` (a stem, a file name or ``<kind>/<file>``) of ``kind``; may not exist."""
    suffix = ".yaml" if kind == RECIPES else ".json"
    p = Path(name)
    stem = p.name[: -len(suffix)] if p.name.endswith(suffix) else p.name
    return _folder(kind) / f"{stem}{suffix}"


def find(kind: str, path: str | Path) -> Path:
    """``path`` if it exists, else the shipped file of that name if there is one, else ``path`` unchanged
    (so the caller's "not found" error names what the user typed)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    parent = p.parent.as_posix()
    if parent in (".", kind):
        shipped = packaged(kind, p.name)
        if shipped.is_file():
            return shipped
    return p


def recipe(path: str | Path) -> Path:
    return find(RECIPES, path)


def ds_config(path: str | Path) -> Path:
    return find(DS_CONFIGS, path)
