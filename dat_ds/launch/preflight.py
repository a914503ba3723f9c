"""The heavy half of the one validation pass (``launch.validate`` is the torch-free half): data files,
checkpoints to resume, model names that may be timm's.

Called by every command in the launcher process before it starts ranks, and by every rank before the
run folder is written, so a bad data file or checkpoint leaves no partial outputs behind.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..core import dist
from ..core.errors import ConfigError
from .validate import check_model_name

log = logging.getLogger(__name__)


def warn_step_sizes(cfg) -> list[str]:
    """A step larger than the radius is legal (FGSM-RS uses 1.25 eps) but usually a units mistake."""
    out = []
    a = cfg.attack
    if a.name != "none" and a.eps > 0 and a.step_size is not None and a.step_size > a.eps and a.name != "fgsm_rs":
        out.append(f"attack.step_size={a.step_size:g} is larger than attack.eps={a.eps:g}; every step overshoots "
                   "the eps-ball and is projected back (did you mean a step in pixel units, e.g. eps/4?)")
    e = cfg.eval
    eps = e.eps if e.eps is not None else a.eps
    step = e.step_size  # only an explicit step can be too large: the standard ones are set for each attack
    if step is not None and eps > 0 and step > eps and e.attack != "fgsm_rs":
        out.append(f"eval.step_size={step:g} is larger than the eval eps={eps:g}; PGD will mostly bounce on the "
                   "ball's surface")
    for msg in out:
        log.warning(msg)
    return out


def _labels_of(ds) -> torch.Tensor | None:
    tensors = getattr(ds, "tensors", None)
    if isinstance(tensors, (tuple, list)) and len(tensors) >= 2:
        return torch.as_tensor(tensors[1])
    for name in ("targets", "labels"):
        value = getattr(ds, name, None)
        if value is not None and not callable(value):
            try:
                return torch.as_tensor(value)
            except (TypeError, ValueError, RuntimeError):
                return None
    return None


def check_dataset(ds, spec, where: str) -> None:
    """Images match the spec's channels and size; labels are finite integers in [0, num_classes)."""
    if len(ds) == 0:
        raise ConfigError(f"{where} is empty; check data.root and data.train_subset")
    x, y = ds[0]
    if isinstance(x, torch.Tensor) and spec.img_size:
        want = (spec.in_chans, spec.img_size, spec.img_size)
        if x.dim() != 3 or x.shape[0] != spec.in_chans:
            raise ConfigError(f"{where} images have shape {tuple(x.shape)} but {spec.in_chans} channel(s) are "
                              f"expected ({want}); check the data files under data.root")
        if tuple(x.shape[1:]) != want[1:]:
            raise ConfigError(f"{where} images are {x.shape[1]}x{x.shape[2]} but the data set declares "
                              f"{spec.img_size}x{spec.img_size}; check the data files under data.root")
    labels = _labels_of(ds)
    if labels is None:
        labels = torch.as_tensor([y]) if isinstance(y, (int, float)) or (isinstance(y, torch.Tensor) and y.dim() == 0) else None
    if labels is None or labels.numel() == 0:
        return
    if labels.is_floating_point():
        bad = ~torch.isfinite(labels)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ConfigError(f"{where} label {i} is {labels[i].item()}; labels must be integer class indices")
        if (labels != labels.round()).any():
            raise ConfigError(f"{where} has fractional labels; labels must be integer class indices")
    low, high = labels.min().item(), labels.max().item()
    if low < 0 or high >= spec.num_classes:
        value = low if low < 0 else high
        raise ConfigError(f"{where} has label {value:g} outside [0, {spec.num_classes - 1}]; "
                          "fix the label file or the data set's class count")


def check_data(cfg) -> Any:
    spec = None
    for split in ("train", "test"):
        spec = load_and_check_split(cfg.data, split)
    return spec


def load_and_check_split(data_cfg, split: str):
    """Load one split and check it (see ``check_dataset``); an unreadable file is one ConfigError line."""
    from ..data import build_dataset

    where = f"data set {data_cfg.name!r} ({split} split)"
    try:
        ds, spec = build_dataset(data_cfg, split)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable user data is a user problem, said in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"cannot load {where} ({type(e).__name__}: {msg}); check the files under "
                          f"data.root={data_cfg.root!r}") from None
    check_dataset(ds, spec, where)
    return spec


def check_unlabeled(cfg, spec) -> None:
    """The pseudo-labelled pool: readable without pickle (unless trusted), finite in-range labels."""
    if not cfg.data.unlabeled:
        return
    from pathlib import Path

    import numpy as np

    path = Path(cfg.data.unlabeled)
    if path.suffix == ".npz" and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                raw = z["labels"] if "labels" in z.files else None
        except (ValueError, OSError, EOFError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"pseudo-label file {str(path)!r} is unreadable without pickle ({first}); "
                              "rewrite it with `dat-ds pseudo-label`") from None
        if raw is not None:
            check_dataset(torch.utils.data.TensorDataset(torch.zeros(len(raw), 0), torch.from_numpy(np.asarray(raw))),
                          _no_image_spec(spec), f"data.unlabeled {str(path)!r}")
    from ..data.unlabeled import load_pseudo_labels

    if path.suffix in (".npz", ".pkl", ".pickle"):  # other forms are pool specs, checked by their owner
        pseudo = load_pseudo_labels(path, trust_pickle=cfg.data.trust_pickle)
        from ..data.embedded import ArrayDataset

        check_dataset(ArrayDataset(pseudo.images[:1], pseudo.labels[:1]), spec, f"data.unlabeled {str(path)!r}")


def _no_image_spec(spec):
    import dataclasses

    return dataclasses.replace(spec, img_size=0)


def check_precision(settings, accelerator=None) -> None:
    """bf16/fp16 weights need the accelerator's support: DeepSpeed's own start-up check, said in one line.

    Asked of DeepSpeed's accelerator (``is_bf16_supported`` / ``is_fp16_supported``), as the engine does
    in ``_do_sanity_check``; its CPU accelerator runs bf16 but fp16 only where oneDNN has fp16 kernels.
    """
    if settings.precision not in ("bf16", "fp16"):
        return  # fp32 and bf16 autocast run everywhere
    accelerator = accelerator or dist.accelerator()
    supported = accelerator.is_bf16_supported() if settings.precision == "bf16" else accelerator.is_fp16_supported()
    if not supported:
        raise ConfigError(f"DeepSpeed config enables {settings.precision}, which DeepSpeed's "
                          f"{accelerator.device_name()} accelerator does not support on this machine; set "
                          f"{settings.precision}.enabled to false (fp32 runs everywhere)")


def preflight(cfg, resume: str | None = None, world: int | None = None) -> None:
    """All start-up checks; raises ConfigError (one line) on the first problem found."""
    from ..runtime import checkpoint, ds_config

    settings = ds_config.prepare(cfg.deepspeed_config, world or dist.world_size())
    check_precision(settings)
    check_model_name(cfg.model.name)
    warn_step_sizes(cfg)
    from ..attacks import eval_spec, training_spec

    training_spec(cfg.attack)  # restarts / a step size the attack does not take: one line, before any rank
    eval_spec(cfg)
    if resume is not None:
        found = checkpoint.resolve_resume(resume, cfg.run_dir)
        if found is not None:
            checkpoint.check_compatible(*found, cfg, {**settings.ds_config, "optimizer": settings.optimizer})
    spec = check_data(cfg)
    check_unlabeled(cfg, spec)


def preflight_eval(args) -> None:
    """``dat-ds eval``'s heavy checks: the run has a complete checkpoint and a valid config, or the
    --weights model name exists; the data set to evaluate on loads."""
    from ..core.config import DataConfig
    from ..evaluation.run import attack_options

    attack_options(args)  # a flag none of --attacks takes (--restarts with square, --steps with autoattack)

    if args.run is not None:
        import yaml

        from ..core.config import config_from_dict
        from ..evaluation.loading import resolve_checkpoint

        run_dir, _, _ = resolve_checkpoint(args.run, args.tag)
        cfg_file = run_dir / "config.yaml"
        if cfg_file.is_file():
            cfg = config_from_dict(yaml.safe_load(cfg_file.read_text()) or {})
            check_model_name(cfg.model.name)
            data = cfg.data if args.data is None else DataConfig(name=args.data, root=args.data_root or cfg.data.root)
        else:  # older runs keep the config in the checkpoint only; the ranks read it there
            return
    else:
        check_model_name(args.model)
        data = DataConfig(name=args.data or "fashion-mnist", root=args.data_root)
    load_and_check_split(data, "test")
