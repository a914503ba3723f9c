"""Load a model to evaluate: one of our run folders (DeepSpeed checkpoint) or a plain weights file.

Our checkpoints are DeepSpeed tag folders. Under ZeRO 0/1/2 the full module state (fp32 here) sits in
``mp_rank_00_model_states.pt`` under ``"module"``, together with our run config in the client state; it
loads with ``torch.load(weights_only=True)``, no engine needed. ZeRO-3 partitions the parameters, so those
are reassembled with DeepSpeed's own ``zero_to_fp32`` reader.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..core.config import DataConfig, RunConfig, config_from_dict
from ..data import build_dataset
from ..runtime import checkpoint
from ..core.errors import ConfigError
from ..models import NormalizedModel, create_model

log = logging.getLogger(__name__)
MODEL_STATES = "mp_rank_00_model_states.pt"


@dataclass
class LoadedModel:
    model: NormalizedModel  # eval mode, on CPU
    data_cfg: DataConfig
    source: dict[str, Any]  # what was loaded, for eval.json
    cfg: RunConfig | None = None  # the run config, when loaded from a run


def _run_config(run_dir: Path, states: dict[str, Any] | None) -> RunConfig:
    cfg_file = run_dir / "config.yaml"
    if cfg_file.is_file():
        values = yaml.safe_load(cfg_file.read_text()) or {}
    elif states is not None and isinstance(states.get("config"), dict):
        values = states["config"]
    else:
        raise ConfigError(f"no config.yaml in {str(run_dir)!r}; give a run folder written by `dat-ds train`")
    try:
        return config_from_dict(values)
    except ConfigError as e:
        raise ConfigError(f"{run_dir / 'config.yaml'} is not a valid run config ({e}); re-save it or use --weights") from None


def resolve_checkpoint(run: str | Path, tag: str | None = None) -> tuple[Path, Path, str]:
    """``run`` may be a run folder, its checkpoint/ folder or one tag folder -> (run_dir, root, tag)."""
    p = Path(run)
    if not p.exists():
        raise ConfigError(f"--run {str(p)!r} does not exist; give a run folder such as runs/demo")
    if (p / checkpoint.COMPLETE).is_file() or (p / MODEL_STATES).is_file():  # a tag folder
        root, found = p.parent, p.name
    else:
        root = p / "checkpoint" if (p / "checkpoint").is_dir() else p
        found = tag or checkpoint.find_resume_tag(root)
    if found is None or not (root / found).is_dir():
        raise ConfigError(f"no complete checkpoint in {str(root)!r}; train first (dat-ds train) or pass --weights FILE")
    if not (root / found / checkpoint.COMPLETE).is_file():
        log.warning("checkpoint %s has no %s: it may be incomplete", root / found, checkpoint.COMPLETE)
    run_dir = root.parent if root.name == "checkpoint" else root
    return run_dir, root, found


def _zero_stage(states: dict[str, Any]) -> int:
    zero = (states.get("ds_config") or {}).get("zero_optimization") or {}
    return int(zero.get("stage", 0)) if isinstance(zero, dict) else 0


def load_run(run: str | Path, tag: str | None = None) -> LoadedModel:
    run_dir, root, tag = resolve_checkpoint(run, tag)
    states_file = root / tag / MODEL_STATES
    if not states_file.is_file():
        raise ConfigError(f"{str(states_file)!r} is missing; is {str(root / tag)!r} a DeepSpeed checkpoint?")
    try:
        states = torch.load(states_file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unreadable file is the user's to fix
        raise ConfigError(f"cannot read {str(states_file)!r} safely ({type(e).__name__}: {e}); "
                          "re-save the checkpoint with this dat-ds version") from None
    cfg = _run_config(run_dir, states)
    _, spec = build_dataset(cfg.data, "test")
    model = create_model(cfg.model.name, spec, None)  # weights come from the checkpoint
    stage = _zero_stage(states)
    if stage >= 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        module_state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:
        module_state = states["module"]
    module_state = {k: v.float() if v.is_floating_point() else v for k, v in module_state.items()}
    missing, unexpected = model.load_state_dict(module_state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"checkpoint {str(root / tag)!r} does not fit model {cfg.model.name!r} (missing {missing[:2]}, "
                          f"unexpected {unexpected[:2]}); was config.yaml edited?")
    model.eval()
    source = {"kind": "run", "run_dir": str(run_dir), "tag": tag, "zero_stage": stage,
              "global_step": states.get("global_step"), "model": cfg.model.name, "data": cfg.data.name}
    log.info("loaded %s (tag %s, ZeRO-%d, global step %s)", run_dir, tag, stage, states.get("global_step"))
    return LoadedModel(model=model, data_cfg=cfg.data, source=source, cfg=cfg)


def load_weights(path: str | Path, model_name: str, data_name: str, data_root: str | None = None) -> LoadedModel:
    """A timm/torch state dict or a safetensors file for backbone ``model_name`` on data set ``data_name``."""
    if not Path(path).is_file():
        raise ConfigError(f"--weights {str(path)!r} not found; give a local .safetensors or .pt file")
    data_cfg = DataConfig(name=data_name, root=data_root)
    _, spec = build_dataset(data_cfg, "test")
    model = create_model(model_name, spec, str(path))
    model.eval()
    source = {"kind": "weights", "weights": str(path), "model": model_name, "data": data_name}
    return LoadedModel(model=model, data_cfg=data_cfg, source=source)
