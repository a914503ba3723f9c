"""``dat-ds pseudo-label``, ``dat-ds pretrain`` and ``dat-ds finetune`` (registered on import by dat_ds.cli)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..core import names
from ..core.errors import ConfigError
from ..core.pools import check_pool_spec
from . import _train, _train_args, command, resolve_recipe

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- pseudo-label


def _pseudo_label_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", default=None, metavar="RUN_DIR", help="teacher: a `dat-ds train` run folder")
    src.add_argument("--weights", default=None, metavar="FILE", help="teacher: a .safetensors/.pt state dict (needs --model)")
    p.add_argument("--model", default=None, help="model name for --weights (e.g. small_cnn)")
    p.add_argument("--data", default="fashion-mnist", help="data set whose shape/normalisation --weights expects")
    p.add_argument("--data-root", default=None, help="data.root for --data")
    p.add_argument("--pool", default=None,
                   help="unlabeled images: embedded:train[1000:], fashion-mnist-full:train[10000:] or FILE.npz "
                        "(default with --run on the embedded data: the training examples after data.train_subset)")
    p.add_argument("--out", required=True, metavar="FILE.npz", help="where to write images + pseudo-labels + confidences")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--trust-pickle", action="store_true", help="allow a legacy pickle pool file (it can run code)")


def _check_pseudo_label_args(args: argparse.Namespace) -> None:
    """Torch-free: names, files and the output path, before the teacher is loaded."""
    from ..core.fields import Positive, check_flag

    check_flag("--batch-size", args.batch_size, Positive)
    if args.run is not None and not Path(args.run).exists():
        raise ConfigError(f"--run {args.run!r} does not exist; give a run folder such as runs/demo")
    if args.weights is not None:
        if not args.model:
            raise ConfigError("--weights needs --model NAME (the architecture the weights belong to)")
        if args.pool is None:
            raise ConfigError("--weights needs --pool (e.g. embedded:train[1000:] or FILE.npz)")
        names.check("data set", args.data)
        if not Path(args.weights).is_file():
            raise ConfigError(f"--weights {args.weights!r} not found; give a local .safetensors or .pt file")
    if args.pool is not None:
        check_pool_spec(args.pool)
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {args.out!r} is a folder; give a FILE.npz to write")
    if out.suffix != ".npz":  # found by the writer only after the whole pool was labelled
        raise ConfigError(f"--out {args.out!r} must end in .npz")
    blocker = next((p for p in out.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(f"--out {args.out!r} lies under the file {str(blocker)!r}; choose another path")


def _pseudo_label(args: argparse.Namespace, argv: list[str]) -> int:
    _check_pseudo_label_args(args)
    from ..core.config import DataConfig
    from ..data import build_dataset
    from ..evaluation.loading import load_classifier
    from ..evaluation.pseudo_label import pseudo_label
    from ..models import create_model

    if args.run:
        loaded = load_classifier(args.run)
        cfg, model = loaded.cfg, loaded.model
        teacher, pool = f"run:{args.run}", args.pool
        if pool is None:
            if cfg.data.name != "fashion-mnist" or cfg.data.train_subset is None:
                raise ConfigError("--pool is needed: the teacher was not trained on a data.train_subset of the "
                                  "embedded data, so there is no default unlabeled remainder")
            pool = f"embedded:train[{cfg.data.train_subset}:]"
    else:
        from ..launch.validate import check_model_name

        check_model_name(args.model)
        _, spec = build_dataset(DataConfig(name=args.data, root=args.data_root), "test")
        model = create_model(args.model, spec, args.weights)
        teacher, pool = f"weights:{args.weights}", args.pool
    from ..core import ui

    data = pseudo_label(model, pool, args.out, batch_size=args.batch_size, teacher=teacher,
                        trust_pickle=args.trust_pickle)
    rows = [("images", len(data)), ("mean confidence", f"{data.meta['mean_confidence']:.4f}"),
            ("class counts", " ".join(map(str, data.meta["class_counts"])))]
    if "pseudo_label_accuracy" in data.meta:
        rows.append(("accuracy vs withheld labels", f"{data.meta['pseudo_label_accuracy']:.4f}"))
    ui.show(ui.table(f"pseudo-labels {pool} -> {args.out}", ["", "value"], rows))
    return 0


command("pseudo-label", "label an unlabeled pool with a trained teacher (RST); writes a safe .npz")(
    (_pseudo_label_args, _pseudo_label))


# ----------------------------------------------------------------------------- pretrain


def _pretrain(args: argparse.Namespace, argv: list[str]) -> int:
    return _train(args, argv, needs_unlabeled_objective=True)


command("pretrain", "self-supervised adversarial pre-training (ACL) or fine-tuning (FARE) of an encoder; same options as train")(
    (_train_args, _pretrain))


# ----------------------------------------------------------------------------- finetune


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", required=True, choices=["slf", "alf", "aff"],
                   help="slf: linear head, clean CE; alf: linear head, PGD examples; aff: full PGD-AT")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--encoder", default=None, metavar="RUN_DIR", help="a `dat-ds pretrain` run folder")
    src.add_argument("--random-init", action="store_true",
                     help="baseline: a randomly initialised encoder of --config's model")
    p.add_argument("--config", "--recipe", dest="config", default=None,
                   help="recipe for --random-init (e.g. recipes/acl_pretrain_embedded.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of --config for --random-init (e.g. model.name=tiny_cnn)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=None, help="Adam LR (default 0.01 for slf/alf, 0.001 for aff)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eps", type=float, default=None, help="attack radius (default: the run's attack.eps)")
    p.add_argument("--attack-steps", type=int, default=None, help="PGD steps of the training attack")
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N labeled examples")
    p.add_argument("--eval-examples", type=int, default=None, help="evaluate on the first N test examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="FILE.json",
                   help="result file (default <encoder run>/finetune_<mode>.json; required with --random-init)")


def _check_finetune_args(args: argparse.Namespace):
    """Torch-free: numbers, the encoder run or the recipe (with its names), the output path."""
    from ..core.config import EPS_UNITS, PixelEps, build_config
    from ..core.fields import Positive, PositiveFloat, check_flag

    for flag, value, field in (("--epochs", args.epochs, Positive), ("--batch-size", args.batch_size, Positive),
                               ("--attack-steps", args.attack_steps, Positive), ("--train-subset", args.train_subset, Positive),
                               ("--eval-examples", args.eval_examples, Positive), ("--lr", args.lr, PositiveFloat),
                               ("--eps", args.eps, PixelEps)):
        if value is not None:  # the first two are never None (their flags have defaults)
            check_flag(flag, value, field, EPS_UNITS if flag == "--eps" else "")
    if args.random_init:
        if not args.config or not args.out:
            raise ConfigError("--random-init needs --config RECIPE (the encoder architecture and data) and --out FILE.json")
        cfg = build_config(resolve_recipe(args.config), args.overrides)
    else:
        if args.overrides:
            raise ConfigError("--set only applies to --random-init; an --encoder run brings its own config")
        if not Path(args.encoder).is_dir():
            raise ConfigError(f"--encoder {args.encoder!r} is not a folder; give a `dat-ds pretrain` run folder")
        cfg = None
    out = Path(args.out or Path(args.encoder) / f"finetune_{args.mode}.json")
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder; give a FILE.json to write")
    return cfg


def _finetune(args: argparse.Namespace, argv: list[str]) -> int:
    checked = _check_finetune_args(args)
    from ..core import ui
    from ..core.io import atomic_write_json
    from ..evaluation.finetune import FinetuneSettings, encoder_from_run, finetune, random_encoder

    settings = FinetuneSettings(mode=args.mode, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                eps=args.eps, attack_steps=args.attack_steps, train_subset=args.train_subset,
                                eval_examples=args.eval_examples, seed=args.seed)
    if args.random_init:
        cfg = checked
        from ..launch.validate import check_model_name

        check_model_name(cfg.model.name)
        encoder, spec = random_encoder(cfg, args.seed)
        source, out = "random-init", Path(args.out)
    else:
        cfg, encoder, spec = encoder_from_run(args.encoder)
        source, out = f"run:{args.encoder}", Path(args.out or Path(args.encoder) / f"finetune_{args.mode}.json")
    result = {"encoder": source, **finetune(cfg, encoder, spec, settings)}
    atomic_write_json(out, result)
    ui.show(ui.table(f"finetune {args.mode.upper()} ({source})", ["clean acc", f"{result['robust_attack']} acc",
                                                                  "train examples", "epochs", "seconds"],
                     [(result["clean_acc"], result["robust_acc"], result["train_examples"], result["epochs"],
                       result["train_seconds"])]))
    log.info("wrote %s", out)
    return 0


command("finetune", "SLF / ALF / AFF evaluation of a pre-trained encoder: clean and PGD-20 accuracy")(
    (_finetune_args, _finetune))
