"""The one validation pass: every command checks all of its inputs here before any rank starts.

Two halves, run in this order by the command line (in the launcher process) and again by every rank:

* ``train_inputs`` / ``eval_inputs`` -- torch-free: config keys and values, registered names (static,
  ``core/names.py``), the DeepSpeed JSON with its batch arithmetic for the requested world size, files
  and output paths. A mistake here costs a fraction of a second and imports nothing heavy.
* ``launch.preflight`` -- heavy: data files, checkpoints to resume, attack settings, and model names that
  are not ours (``check_model_name`` imports timm only for those).

Both take the command's request (``core.requests``), built by ``cli/`` from the command line. Every failure
is a one-line ``ConfigError`` (exit code 2 through ``launch.entry.run_entry``).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..core import names, resources
from ..core.config import RunConfig, build_config, check_engine, parse_eps
from ..core.errors import ConfigError
from ..core.fields import Positive, check_flag
from ..core.io import read_indices
from ..core.requests import EvalRequest, TrainRequest

__all__ = ["EVAL_ATTACKS", "EVAL_PROTOCOLS", "RUN_WEIGHTS", "check_eval_request", "check_model_name", "check_protocol",
           "check_input_paths", "check_run_dir", "config_from_request", "dry_run_report", "eval_attacks", "eval_inputs", "named_flags",
           "recipe_path", "train_inputs"]

EVAL_ATTACKS, EVAL_PROTOCOLS = names.EVAL_ATTACKS, names.EVAL_PROTOCOLS
ROBUSTBENCH_AA = {"aa_steps": 100, "aa_queries": 5000}  # standard AutoAttack (Croce & Hein 2020)
RUN_WEIGHTS = ("ema", "raw")  # `dat-ds eval --run R --weights ema|raw`: the weight EMA or the raw weights


def recipe_path(path: str | None) -> str | None:
    """A recipe file path, or a shipped recipe's name (``demo``, ``recipes/demo.yaml`` from anywhere)."""
    return None if path is None else str(resources.recipe(path))


def named_flags(request: TrainRequest) -> dict[str, Any]:
    """The named options as typed config values (never YAML text: ``--name "exp #3"`` stays whole)."""
    flags: dict[str, Any] = {}
    if request.deepspeed_config is not None:
        flags["deepspeed_config"] = request.deepspeed_config
    if request.name is not None:
        flags["name"] = request.name
    if request.epochs is not None:
        flags["train"] = {"epochs": request.epochs}
    if request.output_dir is not None:
        flags["output_dir"] = request.output_dir
    if request.trust_pickle:
        flags["data"] = {"trust_pickle": True}
    if request.ds_overrides:
        flags["deepspeed_overrides"] = list(request.ds_overrides)
    return flags


def config_from_request(request: TrainRequest, base: dict[str, Any] | None = None) -> RunConfig:
    """Recipe, then ``--set`` overrides, then the named options (they win)."""
    return build_config(recipe_path(request.config), list(request.overrides), base=base, flags=named_flags(request))


def check_run_dir(cfg: RunConfig, resume: str | None, overwrite: bool) -> Path:
    """The run folder can be written and does not hold another run (unless resuming or overwriting)."""
    run_dir = cfg.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output path {str(run_dir)!r} is a file; choose another output_dir or name")
    parent = run_dir.parent
    probe = parent if parent.exists() else next((p for p in parent.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise ConfigError(f"output path {str(run_dir)!r} lies under the file {str(probe)!r}; choose another --output-dir")
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"output folder {str(probe)!r} is not writable; choose another --output-dir")
    if resume is None and (run_dir / "checkpoint").exists() and any((run_dir / "checkpoint").iterdir()):
        if not overwrite:
            raise ConfigError(
                f"run folder {str(run_dir)!r} already holds a run; pass --resume auto to continue it, "
                "--overwrite to replace it, or --name NEW"
            )
    return run_dir


def check_model_name(name: str) -> None:
    """A model is ours (``core/names.py``) or a timm name; only the latter needs timm to tell."""
    if name in names.MODELS or name in names.PLUGINS["model"]:
        return
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"unknown model {name!r}; use one of {', '.join(names.known('model'))} "
                          "or a timm model name (see `timm.list_models()`)")


def train_inputs(request: TrainRequest, world: int, *, needs_unlabeled_objective: bool = False,
                 base: dict[str, Any] | None = None):
    """The torch-free half for ``train`` / ``demo`` / ``pretrain``: returns ``(cfg, engine settings)``.

    The launcher's own flags (``--nproc``, ``--master-port``) are the launching command's to check."""
    from ..runtime import ds_config

    cfg = config_from_request(request, base)
    if needs_unlabeled_objective and cfg.objective.name not in names.UNLABELED_OBJECTIVES:
        raise ConfigError(f"dat-ds pretrain needs a self-supervised objective "
                          f"({', '.join(names.UNLABELED_OBJECTIVES)}), the config has {cfg.objective.name!r}; "
                          f"set objective.name=acl (or fare) or use `dat-ds train`")
    settings = ds_config.prepare_run(cfg, world)
    check_engine(cfg, settings.zero_stage)
    check_input_paths(cfg)
    if not request.dry_run:
        check_run_dir(cfg, request.resume, request.overwrite)
    return cfg, settings


def check_input_paths(cfg: RunConfig) -> None:
    """The files and folders a run reads exist (no decoding: ``--dry-run`` stays fast; the preflight of a real
    run then checks what is in them)."""
    data = cfg.data
    if data.name in names.ROOTED_DATASETS and data.root is None:
        raise ConfigError(f"data.root is not set; data.name={data.name} reads its files from a folder: give it "
                          "with --set data.root=DIR")
    root = data.root if data.name in names.ROOTED_DATASETS else None  # fashion-mnist-full's loader says more
    for key, value in (("data.root", root), ("data.unlabeled", data.unlabeled), ("model.weights", cfg.model.weights)):
        if value and not Path(value).exists():
            relative = "" if Path(value).is_absolute() else f" (relative to {str(Path.cwd())!r})"
            raise ConfigError(f"{key} {value!r} does not exist; check the path{relative}")
    if cfg.model.weights and not Path(cfg.model.weights).is_file():
        raise ConfigError(f"model.weights {cfg.model.weights!r} is not a file; give a .safetensors or .pt weights file")


def dry_run_report(cfg: RunConfig, settings, world: int) -> dict[str, Any]:
    return {"world_size": world, "global_batch": settings.global_batch, "micro_batch_per_rank": settings.micro_batch,
            "grad_accum": settings.grad_accum, "zero_stage": settings.zero_stage, "precision": settings.precision}


def eval_inputs(request: EvalRequest) -> EvalRequest:
    """The torch-free half for ``eval``: arguments, attack/data names, files and the output folder.
    Returns the request to run (``--protocol robustbench`` picks its attack)."""
    return check_eval_request(request)


def check_protocol(request: EvalRequest) -> EvalRequest:
    """``--protocol robustbench``: standard AutoAttack only, one eps; returns the request with
    ``attacks="autoattack"``. One-line errors."""
    if request.protocol != "robustbench":
        for flag, value in (("--subset-file", request.subset_file), ("--entry-name", request.entry_name)):
            if value is not None:
                raise ConfigError(f"{flag} belongs to --protocol robustbench; add it or drop the flag")
        return request
    if request.attacks.replace(" ", "") not in ("pgd", "autoattack"):  # pgd: the flag's default, left alone
        raise ConfigError(f"--protocol robustbench runs standard AutoAttack only; drop --attacks {request.attacks}")
    for flag, given, standard in (("--aa-steps", request.aa_steps, ROBUSTBENCH_AA["aa_steps"]),
                                  ("--aa-queries", request.aa_queries, ROBUSTBENCH_AA["aa_queries"])):
        if given != standard:
            raise ConfigError(f"--protocol robustbench uses standard AutoAttack ({standard} for {flag}); "
                              f"drop {flag} {given}")
    if request.eps is not None and len(parse_eps(request.eps)) != 1:
        raise ConfigError(f"--protocol robustbench scores one eps; give one (--eps 8/255), not {request.eps}")
    if request.subset_file is not None:
        if not Path(request.subset_file).exists():
            raise ConfigError(f"--subset-file {request.subset_file!r} not found; give a text file of test-set indices")
        read_indices(request.subset_file, f"--subset-file {request.subset_file!r}")  # the range once the test set is known
    return replace(request, attacks="autoattack")


def eval_attacks(text: str) -> list[str]:
    """``"pgd, autoattack"`` -> the attack names, each checked against the registered evaluation attacks."""
    out = [a.strip() for a in text.split(",") if a.strip()]
    if not out:
        raise ConfigError("--attacks is empty; give e.g. --attacks pgd,autoattack")
    for name in out:
        if name not in EVAL_ATTACKS and name not in names.PLUGINS["attack"]:
            raise ConfigError(names.unknown_message("attack", name, [*EVAL_ATTACKS, *names.PLUGINS["attack"]]))
    return out


def check_eval_request(request: EvalRequest) -> EvalRequest:
    """Every ``dat-ds eval`` argument the command line alone can check; one-line ConfigError otherwise.
    Returns the request to run (see ``check_protocol``)."""
    if request.run is None and request.weights is None:
        raise ConfigError("nothing to evaluate; pass --run runs/<name>, or --weights FILE --model NAME --data NAME")
    run_weights = request.run is not None and request.weights in RUN_WEIGHTS  # which of the run's weights
    if request.run is not None and request.weights is not None and not run_weights:
        raise ConfigError("with --run, --weights is ema or raw (which of the run's weights); evaluate a weights "
                          "file without --run: --weights FILE --model NAME --data NAME")
    if request.weights is not None and not run_weights and not request.model:
        raise ConfigError("--weights needs --model NAME (e.g. --model small_cnn or a timm name)")
    for flag, value in (("--steps", request.steps), ("--restarts", request.restarts),
                        ("--batch-size", request.batch_size), ("--aa-steps", request.aa_steps),
                        ("--aa-queries", request.aa_queries), ("--apgd-steps", request.apgd_steps),
                        ("--square-queries", request.square_queries), ("--max-examples", request.max_examples),
                        ("--threads", request.threads)):
        if value is not None:  # the last two: None is "all" / "cores per rank"
            check_flag(flag, value, Positive)
    request = check_protocol(request)
    eval_attacks(request.attacks)
    if request.data is not None:
        names.check("data set", request.data)
    if request.eps is not None:
        eps = parse_eps(request.eps)
        if request.norm == "linf" and max(eps) > 1:
            raise ConfigError(f"--eps {max(eps)} is above 1; L-inf eps is in pixel units of [0, 1] images, e.g. 8/255")
    if request.run is not None and not Path(request.run).exists():
        raise ConfigError(f"--run {request.run!r} does not exist; give a run folder such as runs/demo")
    if request.weights is not None and not run_weights and not Path(request.weights).is_file():
        raise ConfigError(f"--weights {request.weights!r} not found; give a local .safetensors or .pt file")
    if request.out is not None and Path(request.out).exists() and not Path(request.out).is_dir():
        raise ConfigError(f"--out {request.out!r} is a file; give a folder for eval.json and the plot")
    return request
