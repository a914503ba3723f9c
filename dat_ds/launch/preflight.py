"""The heavy half of the one validation pass (``launch.validate`` is the torch-free half): data files,
checkpoints to resume, model names that may be timm's.

Called by every command in the launcher process before it starts ranks, and by every rank before the
run folder is written, so a bad data file or checkpoint leaves no partial outputs behind.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ..core import dist
from ..core.errors import ConfigError
from ..core.requests import EvalRequest
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


def _arrays_of(ds) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The whole image and label arrays of a data set held in memory (None where it reads files lazily).

    Our in-memory sets (embedded, IDX, CIFAR, .npz pools) are ``ArrayDataset``s, possibly under a
    ``TransformDataset``; image folders and HF sets give their labels without decoding an image.
    """
    from torch.utils.data import TensorDataset

    from ..data.hf import HFImageDataset
    from ..data.imagefolder import FolderDataset
    from ..data.transforms import TransformDataset

    if isinstance(ds, TransformDataset):  # a transform changes the images, never the labels
        _, labels = _arrays_of(ds.base)
        return None, labels
    if isinstance(ds, TensorDataset) and len(ds.tensors) >= 2:
        return ds.tensors[0], torch.as_tensor(ds.tensors[1])
    if isinstance(ds, FolderDataset):
        return None, torch.as_tensor(ds.folder.targets)
    if isinstance(ds, HFImageDataset):
        import numpy as np

        return None, torch.from_numpy(np.asarray(ds.ds[ds.label_col]))
    for name in ("targets", "labels"):  # the torchvision convention, for data sets from plugins
        value = getattr(ds, name, None)
        if value is not None and not callable(value):
            try:
                return None, torch.as_tensor(value)
            except (TypeError, ValueError, RuntimeError):
                return None, None
    return None, None


def _check_images(x: torch.Tensor, spec, where: str) -> None:
    want = (spec.in_chans, spec.img_size, spec.img_size)
    if x.dim() != 3 or x.shape[0] != spec.in_chans:
        raise ConfigError(f"{where} images have shape {tuple(x.shape)} but {spec.in_chans} channel(s) are "
                          f"expected ({want}); check the data files under data.root")
    if tuple(x.shape[1:]) != want[1:]:
        raise ConfigError(f"{where} images are {x.shape[1]}x{x.shape[2]} but the data set declares "
                          f"{spec.img_size}x{spec.img_size}; check the data files under data.root")


def check_labels(labels: torch.Tensor, spec, where: str, *, min_classes: int = 1) -> None:
    """Every label is a finite integer in [0, num_classes); at least ``min_classes`` distinct ones."""
    if labels.numel() == 0:
        return
    if labels.dtype == torch.bool or labels.is_complex():
        raise ConfigError(f"{where} has {labels.dtype} labels; labels must be integer class indices")
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
    if min_classes > 1 and low == high:
        raise ConfigError(f"{where} has one class only (label {low:g} on all {labels.numel()} examples); a classifier "
                          "needs at least two: check the label file and data.train_subset")


# Image files (ImageFolder, HF) are all decoded before any rank starts when a split has at most this many;
# larger ones are decoded when met (``data.on_corrupt``). In-memory arrays are checked whole anyway.
DECODE_ALL_UP_TO = 5000
# Set by `dat-ds train` for the ranks it starts, to this host's name, once its own preflight decoded every
# image: ranks on the same host skip that pass (N ranks would decode the same files N more times). Ranks on
# other hosts (a hostfile; their data is their own copy) and ranks a user's own `deepspeed` command started
# decode them themselves.
DECODED_ENV = "DAT_DS_IMAGES_DECODED_ON"


def images_decoded_here() -> bool:
    import socket

    return os.environ.get(DECODED_ENV) == socket.gethostname()


def check_dataset(ds, spec, where: str, *, min_classes: int = 1) -> None:
    """Images match the spec's channels and size; labels are finite integers in [0, num_classes).

    In-memory sets are checked whole (every label; the image array's dtype and shape), others through
    their first image and, where the data set lists them without decoding, every label; a split of image
    files with up to ``DECODE_ALL_UP_TO`` images has every image decoded (a corrupt one is one line naming
    it, unless ``data.on_corrupt=skip`` says to train without it).
    """
    from ..data.embedded import ArrayDataset

    if len(ds) == 0:
        raise ConfigError(f"{where} is empty; check data.root and data.train_subset")
    images, labels = _arrays_of(ds)
    if isinstance(ds, ArrayDataset) and images is not None and images.dtype != torch.uint8:  # read as pixels / 255
        raise ConfigError(f"{where} holds {str(images.dtype).removeprefix('torch.')} images; store uint8 pixels (0-255)")
    x, y = ds[0]  # an array has one shape, so its first image stands for all of them
    if isinstance(x, torch.Tensor) and spec.img_size:
        _check_images(x, spec, where)
    corrupt = getattr(ds, "corrupt", None)  # image files, with data.on_corrupt's bookkeeping
    if corrupt is not None and corrupt.policy == "abort" and len(ds) <= DECODE_ALL_UP_TO and not images_decoded_here():
        for i in range(1, len(ds)):
            ds[i]  # raises CorruptImageError (one line naming the file) for an image that does not decode
    if labels is not None:
        check_labels(labels.reshape(-1), spec, where, min_classes=min_classes)
    elif isinstance(y, (int, float)) or (isinstance(y, torch.Tensor) and y.dim() == 0):  # one label: no class count
        check_labels(torch.as_tensor([y]), spec, where)


def check_data(cfg) -> Any:
    """Both splits load and pass ``check_dataset``; a classifier's training split has two classes or more."""
    from ..core.names import DLR_ATTACKS, UNLABELED_OBJECTIVES

    spec = None
    for split in ("train", "test"):
        two = split == "train" and cfg.objective.name not in UNLABELED_OBJECTIVES  # acl ignores the labels
        spec = load_and_check_split(cfg.data, split, min_classes=2 if two else 1)
    if cfg.eval.attack in DLR_ATTACKS and spec.num_classes < 3:  # DLR divides by the gap of the top-3 logits
        raise ConfigError(f"eval.attack={cfg.eval.attack} needs 3 classes or more (the DLR loss), the data has "
                          f"{spec.num_classes}; use --set eval.attack=pgd")
    return spec


def check_weights(cfg, spec) -> None:
    """``model.weights`` load into the model the run builds (the trainer's own call): keys and shapes match; and
    ``model.normalization=model`` finds the statistics (a timm model's ``pretrained_cfg``) for the data's channels."""
    if not cfg.model.weights and cfg.model.normalization != "model":
        return
    from ..runtime.build import make_model

    make_model(cfg, spec, cfg.model.weights)


def check_grad_checkpointing(cfg) -> None:
    """``model.grad_checkpointing``: the model can checkpoint (ours all can; a timm model is built on the meta device,
    which allocates nothing, and asked)."""
    from ..core import names

    if not cfg.model.grad_checkpointing or cfg.model.name in names.MODELS:
        return
    import timm

    from ..models import enable_grad_checkpointing

    with torch.device("meta"):
        backbone = timm.create_model(cfg.model.name, pretrained=False)
    enable_grad_checkpointing(backbone, cfg.model.name)


def check_nproc(nproc: int, accelerator=None) -> str | None:
    """``--nproc`` ranks on this node: more than the GPUs is an error (a rank would have no device); more
    than the cores on the CPU accelerator works but oversubscribes (a WARNING, returned too)."""
    accelerator = accelerator or dist.accelerator()
    if accelerator.device_name() == "cpu":
        import os

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if nproc <= cores:
            return None
        msg = (f"--nproc {nproc} starts more ranks than the {cores} CPU core(s) available to this process; they "
               f"will share cores and run slower (--nproc {cores} or fewer avoids it)")
        log.warning(msg)
        return msg
    devices = accelerator.device_count()
    if nproc > devices:
        raise ConfigError(f"--nproc {nproc} is more than the {devices} {accelerator.device_name()} device(s) on this "
                          f"machine; use --nproc {devices} or fewer (one rank per device)")
    return None


def load_and_check_split(data_cfg, split: str, *, min_classes: int = 1):
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
    check_dataset(ds, spec, where, min_classes=min_classes)
    return spec


def check_reuse(cfg, world: int) -> None:
    """``attack.reuse``: each rank's stored perturbations fit ``attack.reuse_max_bytes`` (the trainer checks again)."""
    if not cfg.attack.reuse:
        return
    from ..data import build_dataset
    from ..objectives.reuse import check_reuse_budget

    train, _ = build_dataset(cfg.data, "train")  # check_data has already loaded it once without error
    check_reuse_budget(len(train), world, tuple(train[0][0].shape), cfg.attack.reuse_max_bytes)


def check_generated(spec_path: str, spec) -> None:
    """Generated-data shards: headers, shapes and dtypes (uncompressed, uint8 images, integer labels of one
    length), image size against the data set, label ranges; pixels are never read."""
    from ..data.generated import label_range, read_shard_infos

    for info in read_shard_infos(spec_path):
        where = f"generated-data shard {str(info.path)!r}"
        h, w, c = info.image_shape
        if c != spec.in_chans or (spec.img_size and (h, w) != (spec.img_size, spec.img_size)):
            raise ConfigError(f"{where} holds {h}x{w}x{c} images but the labeled data set is "
                              f"{spec.img_size}x{spec.img_size}x{spec.in_chans}; generate data of the same size")
        low, high = label_range(info)
        if low < 0 or high >= spec.num_classes:
            raise ConfigError(f"{where} has label {low if low < 0 else high} outside [0, {spec.num_classes - 1}]; "
                              "fix the shard or the data set's class count")


def check_unlabeled(cfg, spec) -> None:
    """``data.unlabeled``: generated shards (``check_generated``) or a pseudo-label file, read whole by the one
    reader of that format (``load_pseudo_labels``: readable without pickle unless trusted, uint8 images,
    integer labels, one per image); here its images' size and its labels' range against the labeled data."""
    if not cfg.data.unlabeled:
        return
    from ..data.generated import is_generated
    from ..data.unlabeled import load_pseudo_labels

    if is_generated(cfg.data.unlabeled):
        check_generated(cfg.data.unlabeled, spec)
        return
    where = f"data.unlabeled {cfg.data.unlabeled!r}"
    pseudo = load_pseudo_labels(cfg.data.unlabeled, trust_pickle=cfg.data.trust_pickle, what=where)
    if spec.img_size:  # the whole array has one shape: its first image stands for all
        _check_images(torch.from_numpy(pseudo.images[0]).permute(2, 0, 1), spec, where)
    check_labels(torch.from_numpy(pseudo.labels), spec, where)


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


def preflight(cfg, resume: str | None = None, world: int | None = None, *, nproc: int | None = None,
              allow_world_size_change: bool = False) -> None:
    """All start-up checks; raises ConfigError (one line) on the first problem found.

    ``nproc``: the ranks the calling process is about to start on this node (the launcher passes it; a
    rank, which is already running, does not). ``allow_world_size_change``: ``train --allow-world-size-change``.
    """
    from ..runtime import checkpoint, ds_config
    from ..runtime.run_dir import check_world_size

    world = world or dist.world_size()
    if nproc is not None:
        check_nproc(nproc)
    settings = ds_config.prepare_run(cfg, world)
    check_precision(settings)
    check_model_name(cfg.model.name)
    check_grad_checkpointing(cfg)
    warn_step_sizes(cfg)
    from ..attacks import eval_spec, training_spec

    training_spec(cfg.attack)  # restarts / a step size the attack does not take: one line, before any rank
    eval_spec(cfg)
    if resume is not None:
        found = checkpoint.resolve_resume(resume, cfg.run_dir)
        if found is not None:
            check_world_size(*found, world, allow_world_size_change)
            checkpoint.check_compatible(*found, cfg, settings.saved_json)
    spec = check_data(cfg)
    check_reuse(cfg, world)
    check_unlabeled(cfg, spec)
    check_weights(cfg, spec)


def preflight_eval(request: EvalRequest, *, nproc: int | None = None) -> None:
    """``dat-ds eval``'s heavy checks (a checked request): the run has a
    complete checkpoint and a valid config, or the --weights model name exists; the data set to evaluate on
    loads. ``nproc``: as for ``preflight``, the ranks the launching process is about to start on this node."""
    from ..core.config import DataConfig
    from ..evaluation.run import attack_options

    if nproc is not None:
        check_nproc(nproc)
    attack_options(request)  # a flag none of --attacks takes (--restarts with square, --steps with autoattack)

    if request.run is not None:
        import yaml

        from ..core.config import config_from_dict
        from ..evaluation.loading import resolve_checkpoint

        run_dir, _, _ = resolve_checkpoint(request.run, request.tag)
        cfg_file = run_dir / "config.yaml"
        if cfg_file.is_file():
            cfg = config_from_dict(yaml.safe_load(cfg_file.read_text()) or {})
            check_model_name(cfg.model.name)
            data = cfg.data if request.data is None else DataConfig(name=request.data, root=request.data_root or cfg.data.root)
        else:  # older runs keep the config in the checkpoint only; the ranks read it there
            return
    else:
        check_model_name(request.model)
        data = DataConfig(name=request.data or "fashion-mnist", root=request.data_root)
    load_and_check_split(data, "test")
