"""The one run loader: the model a ``dat-ds train`` run trained, back from its checkpoint (or a weights file).

``dat-ds eval --run``, ``dat-ds pseudo-label --run``, ``dat-ds finetune --encoder`` and ``dat-ds export``
all come through :func:`load_run`:

1. find the tag (a run folder, its ``checkpoint/`` folder or one tag folder; default the run's ``best`` checkpoint
   where ``train.keep_best`` kept one, else the newest complete one);
2. verify it (``checkpoint.verify_tag``: recorded sizes and SHA-256 hashes, then the restricted unpickler on every file), so
   nothing loaded here can run code, and read the model states with ``weights_only=True``;
3. build the model the objective trained: ``create_model`` from the run config, then the objective's
   ``prepare_model`` (``acl``: the contrastive encoder + projection head);
4. load the weights: under ZeRO 0/1/2 the full module state sits in ``mp_rank_00_model_states.pt`` under
   ``"module"``; ZeRO-3 partitions it, and DeepSpeed's ``zero_to_fp32`` reader reassembles it. With a
   weight EMA (``ema`` in the run config) ``weights`` picks the averaged weights or the raw ones (default:
   the EMA where the checkpoint has one): a full copy in the client state (ZeRO 0/1/2), or one shard per
   rank in ``rank_state_<r>.pt`` (ZeRO-3), put together here.

Every user mistake is a one-line ConfigError.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..core import names
from ..core.config import DataConfig, RunConfig, config_from_dict, replace
from ..core.errors import ConfigError
from ..data import build_dataset
from ..data.base import DataSpec
from ..models import NormalizedModel, create_model, input_statistics, normalization_of
from ..objectives import OBJECTIVES
from ..runtime import checkpoint
from ..runtime.ema import STATE_KEY as EMA_KEY
from ..runtime.ema import assemble

log = logging.getLogger(__name__)
MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # ZeRO-3: each rank writes its own; rank 0's
TAG_CHOICE = {"given": "", "latest": ": the newest complete checkpoint",
              "best": ": the run's best checkpoint by validation robust accuracy (train.keep_best); --tag picks another"}
WEIGHTS = ("auto", "ema", "raw")  # which weights of a run: the EMA where there is one, else the raw ones


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode, on CPU, fp32
    data_cfg: DataConfig
    source: dict[str, Any]  # what was loaded, for eval.json
    cfg: RunConfig | None = None  # the run config, when loaded from a run
    spec: DataSpec | None = None  # the data set's shape and normalisation the model was built for
    client_state: dict[str, Any] = dataclasses.field(default_factory=dict)  # the checkpoint's, without weights


def resolve_checkpoint(run: str | Path, tag: str | None = None) -> tuple[Path, Path, str]:
    """``run`` may be a run folder, its checkpoint/ folder or one tag folder -> (run_dir, root, tag).

    Without ``tag``: the run's ``best`` checkpoint where ``train.keep_best`` kept one, else the newest complete one."""
    p = Path(run)
    if not p.exists():
        raise ConfigError(f"--run {str(p)!r} does not exist; give a run folder such as runs/demo")
    if (p / checkpoint.COMPLETE).is_file() or (p / MODEL_STATES).is_file():  # a tag folder
        root, found = p.parent, p.name
    else:
        root = p / "checkpoint" if (p / "checkpoint").is_dir() else p
        found = tag or checkpoint.best_tag(root) or checkpoint.find_resume_tag(root)
    if found is None or not (root / found).is_dir():
        what = f"tag {tag!r}" if tag else "complete checkpoint"
        raise ConfigError(f"{str(p)!r} is not a run folder with a {what} (looked in {str(root)!r}); "
                          "give the folder `dat-ds train` wrote, after at least one checkpoint")
    if not (root / found / checkpoint.COMPLETE).is_file():
        raise ConfigError(f"checkpoint {str(root / found)!r} is not complete (no {checkpoint.COMPLETE}: it was "
                          f"interrupted while being written); pick another tag in {str(root)!r}")
    run_dir = root.parent if root.name == "checkpoint" else root
    return run_dir, root, found


def _read_states(root: Path, tag: str) -> dict[str, Any]:
    try:
        checkpoint.verify_tag(root, tag)  # unsafe files raise ConfigError ("refusing to load ...") themselves
    except checkpoint.CorruptCheckpoint as e:
        raise ConfigError(f"checkpoint {str(root / tag)!r} is corrupt ({e}); pick another tag") from None
    states_file = root / tag / MODEL_STATES
    if not states_file.is_file() and (root / tag / ZERO3_MODEL_STATES).is_file():
        states_file = root / tag / ZERO3_MODEL_STATES  # client state as usual, the weights partitioned
    if not states_file.is_file():
        raise ConfigError(f"{str(states_file)!r} is missing; is {str(root / tag)!r} a DeepSpeed checkpoint?")
    with torch.serialization.safe_globals(checkpoint._deepspeed_safe_globals()):
        return torch.load(states_file, map_location="cpu", weights_only=True)


def _run_config(run_dir: Path, states: dict[str, Any]) -> RunConfig:
    """The config saved inside the checkpoint (what trained this tag); older ones: the run's config.yaml."""
    if isinstance(states.get("config"), dict):
        values, where = states["config"], "the checkpoint's config"
    elif (run_dir / "config.yaml").is_file():
        values, where = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}, str(run_dir / "config.yaml")
    else:
        raise ConfigError(f"no run config in the checkpoint or {str(run_dir)!r}; "
                          "give a run folder written by `dat-ds train`")
    model = values.get("model")
    if isinstance(model, dict) and "normalization" not in model:
        # Saved before model.normalization existed: every model then normalised with the data set's statistics.
        values = {**values, "model": {**model, "normalization": "data"}}
    try:
        return config_from_dict(values)
    except ConfigError as e:
        raise ConfigError(f"{where} is not a valid run config ({e}); "
                          "evaluate the weights with --weights instead") from None


def _data_spec(cfg: RunConfig, states: dict[str, Any]) -> DataSpec:
    saved = states.get("data_spec")
    if isinstance(saved, dict):  # no need for the data set on disk
        return DataSpec(in_chans=saved["in_chans"], num_classes=saved["num_classes"], img_size=saved["img_size"],
                        mean=tuple(saved["mean"]), std=tuple(saved["std"]), classes=tuple(saved.get("classes") or ()))
    _, spec = build_dataset(cfg.data, "test")
    return spec


def trained_model(cfg: RunConfig, spec: DataSpec) -> nn.Module:
    """The architecture ``cfg`` trains, with fresh weights: the classifier, or what the objective makes of it,
    normalising its inputs as training did (``model.normalization``; "auto" chose by ``model.weights``)."""
    pretrained = cfg.model.weights is not None
    model = create_model(cfg.model.name, spec, act=cfg.model.act,  # model.act: no weights say which
                         normalization=cfg.model.normalization, pretrained=pretrained)
    # The weights are the checkpoint's, so model.weights goes; what "auto" chose with it stays.
    chosen = input_statistics(model.backbone, cfg.model.name, spec, cfg.model.normalization, pretrained).chosen
    cfg = replace(cfg, model=replace(cfg.model, weights=None, normalization=chosen))
    return OBJECTIVES.get(cfg.objective.name).prepare_model(cfg, spec, model)


def _zero_stage(states: dict[str, Any]) -> int:
    zero = (states.get("ds_config") or {}).get("zero_optimization") or {}
    return int(zero.get("stage", 0)) if isinstance(zero, dict) else 0


def _ema_state(root: Path, tag: str, states: dict[str, Any], stage: int) -> dict[str, torch.Tensor] | None:
    """The checkpoint's full EMA state (parameters and buffers), or None if it has none."""
    if isinstance(states.get(EMA_KEY), dict):  # ZeRO 0/1/2: rank 0's full copy
        return assemble([states[EMA_KEY]])
    if stage < 3:
        return None
    world = int((checkpoint.read_complete(root / tag) or {}).get("world_size") or 0)
    shards = []
    for r in range(world):  # files verified by _read_states (verify_tag): weights_only is safe and enough
        rank_file = root / tag / f"rank_state_{r}.pt"
        shard = torch.load(rank_file, map_location="cpu", weights_only=True).get(EMA_KEY) if rank_file.is_file() else None
        if shard is None:
            return None
        shards.append(shard)
    return assemble(shards) if shards else None


def load_run(run: str | Path, tag: str | None = None, weights: str = "auto") -> LoadedModel:
    """The model of run folder ``run`` at checkpoint ``tag`` (default: ``best`` where the run kept one
    (``train.keep_best``), else the newest complete one; ``source["tag_choice"]`` says which).

    ``weights``: ``ema`` (the weight EMA; a ConfigError if the run has none), ``raw`` (the trained
    weights), or ``auto`` (the EMA where the checkpoint has one). ``source["which_weights"]`` says which."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights={weights!r}; choose one of {', '.join(WEIGHTS)}")
    run_dir, root, found = resolve_checkpoint(run, tag)
    is_best = found == checkpoint.best_tag(root)
    choice = "given" if tag is not None else "best" if is_best else "latest"
    tag = found
    states = _read_states(root, tag)
    cfg = _run_config(run_dir, states)
    spec = _data_spec(cfg, states)
    model = trained_model(cfg, spec)
    stage = _zero_stage(states)
    ema_state = _ema_state(root, tag, states, stage) if weights != "raw" else None
    if weights == "ema" and ema_state is None:
        raise ConfigError(f"checkpoint {str(root / tag)!r} has no weight EMA (the run trained without `ema`); "
                          "use --weights raw, or train with --set ema.decay=0.995")
    module_state = states.get("module")
    if ema_state is not None:
        keys = model.state_dict().keys()  # the EMA also holds non-persistent buffers: not part of a state dict
        module_state = {k: v for k, v in ema_state.items() if k in keys}
    elif stage >= 3 or not module_state:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        module_state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)  # files verified above
    module_state = {k: v.float() if v.is_floating_point() else v for k, v in module_state.items()}
    try:
        missing, unexpected = model.load_state_dict(module_state, strict=False)
    except RuntimeError as e:  # same names, other shapes
        missing, unexpected = [str(e).split("\n\t")[-1][:120]], []
    if missing or unexpected:
        raise ConfigError(f"checkpoint {str(root / tag)!r} does not fit model {cfg.model.name!r} trained by objective "
                          f"{cfg.objective.name!r} (missing {list(missing)[:2]}, unexpected {list(unexpected)[:2]})")
    model.eval()
    client_state = {k: v for k, v in states.items() if k not in ("module", EMA_KEY)}
    which = "ema" if ema_state is not None else "raw"
    source = {"kind": "run", "run_dir": str(run_dir), "tag": tag, "tag_dir": str(root / tag), "zero_stage": stage,
              "global_step": states.get("global_step"), "model": cfg.model.name, "objective": cfg.objective.name,
              "data": cfg.data.name, "which_weights": which, "tag_choice": choice, "best": is_best}
    norm = normalization_of(model)
    log.info("loaded %s (tag %s%s, ZeRO-%d, global step %s, %s weights)%s", run_dir, tag, TAG_CHOICE[choice], stage,
             states.get("global_step"), "EMA" if which == "ema" else "raw",
             f"; input normalisation: {norm.describe()}" if norm is not None else "")
    return LoadedModel(model=model, data_cfg=cfg.data, source=source, cfg=cfg, spec=spec, client_state=client_state)


def load_classifier(run: str | Path, tag: str | None = None, weights: str = "auto") -> LoadedModel:
    """``load_run`` for commands that need class predictions (eval, pseudo-label)."""
    loaded = load_run(run, tag, weights)
    if not OBJECTIVES.get(loaded.cfg.objective.name).needs_labels:
        raise ConfigError(f"run {str(run)!r} trained a self-supervised encoder (objective "
                          f"{loaded.cfg.objective.name!r}), not a classifier; evaluate it with "
                          f"`dat-ds finetune --mode slf --encoder {run}`")
    return loaded


def exported_meta(path: str | Path, model_name: str) -> dict[str, Any] | None:
    """The ``.json`` ``dat-ds export`` wrote next to ``path``, when there is one and it describes ``model_name``."""
    try:
        meta = json.loads(Path(path).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("model") == model_name else None


def exported_act(path: str | Path, model_name: str) -> str:
    """The ``model.act`` that ``dat-ds export`` recorded in the ``.json`` next to ``path`` for ``model_name``;
    "relu" (as built) when there is none or it describes another model."""
    act = (exported_meta(path, model_name) or {}).get("act", "relu")
    if act not in names.ACTIVATIONS:
        raise ConfigError(f"{str(Path(path).with_suffix('.json'))!r} has act={act!r}; allowed: "
                          f"{', '.join(names.ACTIVATIONS)}")
    return act


def exported_statistics(path: str | Path, model_name: str, spec: DataSpec) -> tuple[list[float], list[float]] | None:
    """The input mean/std the exported model was trained with (its run's ``model.normalization``: not always the
    data set's), from the ``.json`` next to ``path``; None without one (a plain timm/torch checkpoint)."""
    meta = exported_meta(path, model_name)
    if meta is None:
        return None
    meta_file = str(Path(path).with_suffix(".json"))
    stats = [meta.get(key) for key in ("mean", "std")]
    if not all(isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
               for v in stats):
        raise ConfigError(f"{meta_file!r} records no input mean/std lists for {model_name!r}, which the weights need; "
                          f"export the run again (dat-ds export --run RUN --out {path} --force), or add its "
                          '"mean"/"std" lists (move the file away to normalise with the data set\'s statistics)')
    mean, std = ([float(x) for x in v] for v in stats)
    if len(mean) != spec.in_chans or len(std) != spec.in_chans:
        raise ConfigError(f"{meta_file!r} has mean/std for {len(mean)}/{len(std)} channel(s), the data {spec.in_chans}; "
                          f"evaluate on the data the model was exported for ({meta.get('dataset')!r}: --data)")
    if min(std) <= 0:
        raise ConfigError(f"{meta_file!r} has std {std}; every channel's std must be > 0")
    return mean, std


def load_weights(path: str | Path, model_name: str, data_name: str, data_root: str | None = None) -> LoadedModel:
    """A timm/torch state dict or a safetensors file for backbone ``model_name`` on data set ``data_name``.

    The activation and the input mean/std come from the ``model.json`` ``dat-ds export`` wrote next to the file
    (``exported_act``, ``exported_statistics``: a run trained with ``model.normalization=model`` normalised with
    its model's statistics, not the data set's); without one, the model's default activation and the data set's
    statistics."""
    if not Path(path).is_file():
        raise ConfigError(f"--weights {str(path)!r} not found; give a local .safetensors or .pt file")
    data_cfg = DataConfig(name=data_name, root=data_root)
    _, spec = build_dataset(data_cfg, "test")
    act = exported_act(path, model_name)
    stats = exported_statistics(path, model_name, spec)
    model = create_model(model_name, spec, str(path), act=act)
    if stats is not None:
        model = NormalizedModel(model.backbone, *stats, source=f"{Path(path).with_suffix('.json').name}, as exported")
    model.eval()
    log.info("loaded %s (%s); input normalisation: %s", path, model_name, model.describe())
    source = {"kind": "weights", "weights": str(path), "model": model_name, "data": data_name, "act": act,
              "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()}
    return LoadedModel(model=model, data_cfg=data_cfg, source=source, spec=spec)
