"""Load a trained model back from a run folder (``config.yaml`` + the newest complete checkpoint)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

from ..core.config import RunConfig, config_from_dict
from ..core.errors import ConfigError


def load_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run folder (no config.yaml); give the folder `dat-ds train` wrote")
    return config_from_dict(yaml.safe_load(path.read_text()) or {})


def load_run_state(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of the newest complete checkpoint of ``run_dir``."""
    from ..runtime.checkpoint import find_resume_tag

    root = Path(run_dir) / "checkpoint"
    tag = find_resume_tag(root)
    if tag is None:
        raise ConfigError(f"run folder {str(run_dir)!r} has no complete checkpoint; train it first (or finish the run)")
    path = root / tag / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(root / tag)!r} has no mp_rank_00_model_states.pt; it is not a dat-ds checkpoint")
    try:  # weights_only: loading a checkpoint never runs code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise ConfigError(f"cannot load {str(path)!r} safely ({type(e).__name__}); is it a dat-ds checkpoint?") from None
    return state["module"]


def load_run_model(run_dir: str | Path) -> tuple[RunConfig, nn.Module, object]:
    """(config, model in eval mode, DataSpec) of a finished or interrupted run."""
    from ..data import build_dataset
    from ..models import create_model
    from ..objectives import prepare_model

    cfg = load_run_config(run_dir)
    _, spec = build_dataset(cfg.data, "test")
    model = prepare_model(cfg, spec, create_model(cfg.model.name, spec))
    model.load_state_dict(load_run_state(run_dir))
    return cfg, model.eval(), spec
