"""``dat-ds export``: a run's weights as safetensors + a ``model.json`` that timm and ``dat-ds eval`` read.

The safetensors file holds the backbone's state dict (no ``backbone.``/``module.`` prefixes, no
normalisation buffers), so plain timm loads it::

    model = timm.create_model(meta["model"], num_classes=meta["num_classes"], in_chans=meta["in_chans"],
                              **({"act": meta["act"]} if meta["act"] != "relu" else {}))  # model.act (SiLU)
    model.load_state_dict(safetensors.torch.load_file("model.safetensors"))

Inputs must then be normalised with ``meta["mean"]``/``meta["std"]`` (dat-ds keeps that inside the model).
``meta["act"]`` is the run's ``model.act``; ``dat-ds eval --weights`` reads it from the ``.json`` next to the
weights, so an exported SiLU model is rebuilt with SiLU. A run trained with a weight EMA exports the averaged
weights unless ``weights="raw"``; ``meta["weights"]`` says which. ``meta["best"]``: the tag is the run's ``best``
(``train.keep_best``), which export loads unless a tag is given.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.io import atomic_write_bytes, atomic_write_json
from ..models import normalization_of
from .loading import load_run

log = logging.getLogger(__name__)


def meta_path(out: Path) -> Path:
    """``model.safetensors`` -> ``model.json`` (the metadata written next to the weights)."""
    return out.with_suffix(".json")


def check_outputs(run: Path, out: Path, force: bool = False) -> None:
    """Everything about the paths, before the checkpoint is read or anything is written."""
    if not run.is_dir():
        raise ConfigError(f"run folder {str(run)!r} not found; give --run runs/<name>")
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {str(out)!r} must end in .safetensors")
    if out.parent.exists() and not out.parent.is_dir():
        raise ConfigError(f"--out {str(out)!r} lies under a file; choose another path")
    for path in (out, meta_path(out)):
        if path.exists() and not force:
            raise ConfigError(f"{str(path)!r} already exists; pass --force to replace it, or choose another --out")


def export(run: str | Path, out: str | Path, tag: str | None = None, *, force: bool = False,
           weights: str = "auto") -> dict[str, Any]:
    """Write ``out`` and its ``.json``; existing files are an error unless ``force``. ``weights``: ``ema``,
    ``raw`` or ``auto`` (the EMA where the run has one; ``ema`` without one is a ConfigError)."""
    from safetensors.torch import save

    run, out = Path(run), Path(out)
    check_outputs(run, out, force)
    loaded = load_run(run, tag, weights)  # verified tag, weights_only, any ZeRO stage
    module, spec, states = loaded.model.state_dict(), loaded.spec, loaded.client_state
    norm = normalization_of(loaded.model)  # the statistics training used (model.normalization), not always the data's
    mean, std = (norm.mean.flatten().tolist(), norm.std.flatten().tolist()) if norm is not None else (spec.mean, spec.std)
    tensors = {}
    for key, value in module.items():
        key = key.removeprefix("module.").removeprefix("backbone.")
        if key in ("mean", "std"):
            continue
        value = value.detach().cpu()
        tensors[key] = (value.float() if value.is_floating_point() else value).contiguous()
    meta = {
        "model": loaded.cfg.model.name, "act": loaded.cfg.model.act, "dataset": loaded.cfg.data.name,
        "num_classes": spec.num_classes, "in_chans": spec.in_chans, "img_size": spec.img_size,
        "mean": list(mean), "std": list(std), "classes": list(spec.classes),
        "source": loaded.source["tag_dir"], "global_step": states.get("global_step"),
        "weights": loaded.source["which_weights"], "best": loaded.source["best"],
        "format": "backbone state dict (no normalisation); normalise inputs with mean/std",
    }
    atomic_write_bytes(out, save(tensors, metadata={"dat_ds": json.dumps({k: meta[k] for k in ("model", "act", "dataset", "weights")})}))
    meta_file = meta_path(out)
    atomic_write_json(meta_file, meta)
    log.info("exported %d tensors (%s weights) from %s to %s (+ %s)", len(tensors), meta["weights"], meta["source"],
             out, meta_file)
    return {**meta, "which_weights": meta["weights"], "weights": str(out), "meta": str(meta_file)}
