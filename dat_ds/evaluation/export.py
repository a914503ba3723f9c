"""``dat-ds export``: a run's weights as safetensors + a ``model.json`` that timm and ``dat-ds eval`` read.

The safetensors file holds the backbone's state dict (no ``backbone.``/``module.`` prefixes, no
normalisation buffers), so plain timm loads it::

    model = timm.create_model(meta["model"], num_classes=meta["num_classes"], in_chans=meta["in_chans"])
    model.load_state_dict(safetensors.torch.load_file("model.safetensors"))

Inputs must then be normalised with ``meta["mean"]``/``meta["std"]`` (dat-ds keeps that inside the model).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..runtime import checkpoint
from ..core.errors import ConfigError
from ..core.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)


def _checkpoint_of(run: Path, tag: str | None) -> tuple[Path, str]:
    if tag is None and (run / checkpoint.COMPLETE).is_file():  # a tag folder itself
        return run.parent, run.name
    root = run / "checkpoint" if (run / "checkpoint").is_dir() else run
    tag = tag or checkpoint.find_resume_tag(root)
    if tag is None:
        raise ConfigError(f"no complete checkpoint in {str(root)!r}; give the folder of a dat-ds run")
    if not (root / tag / checkpoint.COMPLETE).is_file():
        raise ConfigError(f"checkpoint {str(root / tag)!r} is not a complete checkpoint; pick one in {str(root)!r}")
    return root, tag


def load_module_state(root: Path, tag: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full model state dict and client state of a committed tag, read with weights_only=True."""
    try:
        checkpoint.verify_tag(root, tag)
    except checkpoint.CorruptCheckpoint as e:
        raise ConfigError(f"checkpoint {str(root / tag)!r} is corrupt ({e}); export another one") from None
    files = sorted((root / tag).glob("*model_states.pt"))
    if not files:
        raise ConfigError(f"checkpoint {str(root / tag)!r} has no model states file; is it a DeepSpeed checkpoint?")
    with torch.serialization.safe_globals(checkpoint._deepspeed_safe_globals()):
        states = torch.load(files[0], map_location="cpu", weights_only=True)
    module = states.get("module")
    zero_stage = ((states.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0)
    if zero_stage == 3 or not module:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        module = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)  # files verified above
    return module, states


def export(run: str | Path, out: str | Path, tag: str | None = None) -> dict[str, Any]:
    from safetensors.torch import save

    run, out = Path(run), Path(out)
    if not run.is_dir():
        raise ConfigError(f"run folder {str(run)!r} not found; give --run runs/<name>")
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {str(out)!r} must end in .safetensors")
    if out.parent.exists() and not out.parent.is_dir():
        raise ConfigError(f"--out {str(out)!r} lies under a file; choose another path")
    root, tag = _checkpoint_of(run, tag)
    module, states = load_module_state(root, tag)
    config = states.get("config") or {}
    spec = states.get("data_spec")
    if spec is None:  # checkpoints written before the spec was stored: ask the data set
        from ..core.config import config_from_dict
        from ..data import build_dataset

        cfg = config_from_dict(config)
        _, s = build_dataset(cfg.data, "test")
        spec = {"in_chans": s.in_chans, "num_classes": s.num_classes, "img_size": s.img_size, "mean": list(s.mean),
                "std": list(s.std), "classes": list(s.classes)}
    weights = {}
    for key, value in module.items():
        key = key.removeprefix("module.").removeprefix("backbone.")
        if key in ("mean", "std"):
            continue
        value = value.detach().cpu()
        weights[key] = (value.float() if value.is_floating_point() else value).contiguous()
    meta = {
        "model": (config.get("model") or {}).get("name"),
        "dataset": (config.get("data") or {}).get("name"),
        "num_classes": spec["num_classes"], "in_chans": spec["in_chans"], "img_size": spec["img_size"],
        "mean": list(spec["mean"]), "std": list(spec["std"]), "classes": list(spec.get("classes") or []),
        "source": str(root / tag), "global_step": states.get("global_step"),
        "format": "backbone state dict (no normalisation); normalise inputs with mean/std",
    }
    atomic_write_bytes(out, save(weights, metadata={"dat_ds": json.dumps({k: meta[k] for k in ("model", "dataset")})}))
    meta_path = out.with_name("model.json") if out.name == "model.safetensors" else out.with_suffix(".json")
    atomic_write_json(meta_path, meta)
    log.info("exported %d tensors from %s to %s (+ %s)", len(weights), root / tag, out, meta_path)
    return {"weights": str(out), "meta": str(meta_path), **meta}
