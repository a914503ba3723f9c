"""Build the run from its two configs, once: data, model, objective and the DeepSpeed engine (``build_run``).

``build_engine`` is the engine part (our optimizer, LR scaling and schedule, compression); ``build_run``
puts it together with the rest into one frozen :class:`BuiltRun`, which the trainer holds. What changes as
the run goes (the step counters, the weight EMA, the metrics file) stays on the trainer.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from ..attacks import attack_view
from ..comm.protocol import CommunicatingOptimizer
from ..core import dist
from ..core.config import RunConfig, replace
from ..core.errors import ConfigError
from ..core.io import megabytes
from ..data import build_dataset
from ..data.base import DataSpec
from ..data.corrupt import CorruptImages, corrupt_images
from ..data.loaders import TrainLoaderFactory, build_train_loader
from ..data.split import split_validation
from ..models import create_model, normalization_of
from ..objectives import Objective, ObjectiveContext, build_objective, eps_warmup, prepare_model
from ..objectives.reuse import PerturbationStore, check_reuse_budget
from ..optim import build_optimizer, build_scheduler, lr_scale, param_groups
from ..optim.schedule import StepPlan, accumulation_unit
from . import ds_adapter, ds_config
from .loop import NonFiniteWatch
from .replica import GatheredCopy

log = logging.getLogger(__name__)


@dataclass
class BuiltEngine:
    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: Any  # what DeepSpeed wraps or uses as is
    scheduler: Any
    lr_scale: float
    # The optimizer that averages gradients over ranks itself (compressed), None when DeepSpeed does:
    # the runtime logs its comm_stats() and checkpoints its rank_local_state() through this.
    comm: CommunicatingOptimizer | None = None
    plan: StepPlan | None = None  # the optimizer steps the schedule was built for


def build_engine(cfg: RunConfig, settings: ds_config.EngineSettings, model: torch.nn.Module,
                 steps_per_epoch: int, *, replays: int = 1) -> BuiltEngine:
    """``steps_per_epoch``: loader batches per epoch on this rank; ``replays``: ``engine.step()`` calls per
    batch (``Objective.replays``). The schedule and the compression plan count optimizer steps (:class:`StepPlan`)."""
    import deepspeed

    plan = StepPlan(steps_per_epoch, cfg.train.epochs, replays=replays, grad_accum=settings.grad_accum)
    log.info("%d optimizer steps: %d epoch(s) x %d batch(es) x %d replay(s) / %d accumulation step(s)",
             plan.total, plan.epochs, plan.batches_per_epoch, plan.replays, plan.grad_accum)

    weight_decay = (settings.optimizer.get("params") or {}).get("weight_decay")
    scale = lr_scale(cfg.optim, settings.global_batch)
    optimizer = build_optimizer(settings.optimizer, param_groups(model, weight_decay), lr_scale=scale)
    gc = settings.gradient_compression
    if gc is not None:
        from ..comm.gradient import QuantizedAllReduceOptimizer

        optimizer = QuantizedAllReduceOptimizer(optimizer, bits=gc["bits"], block=gc["block"], seed=cfg.seed)
    comm = optimizer if settings.compresses or gc is not None else None
    if comm is not None and not isinstance(comm, CommunicatingOptimizer):
        raise TypeError(f"{type(comm).__name__} is registered as compressing but is not a CommunicatingOptimizer")
    scheduler = None
    if not settings.has_scheduler:  # on the object DeepSpeed steps (the wrapper, if any)
        scheduler = build_scheduler(optimizer, cfg.optim, plan.per_epoch, cfg.train.epochs)
    engine, ds_optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=settings.ds_config
    )
    if settings.precision in ("bf16", "fp16"):
        cast = ds_adapter.batchnorm_statistics_like_weights(engine.module)
        if cast:
            log.info("%s: the running statistics of %d BatchNorm layer(s) are kept in %s, like their weights",
                     settings.precision, cast, settings.precision)
    if comm is None:
        return BuiltEngine(engine=engine, optimizer=ds_optimizer, scheduler=scheduler, lr_scale=scale, plan=plan)
    if engine.optimizer is not comm:
        # ds_config allows compression with ZeRO 0 and fp32 weights only, where DeepSpeed steps the client
        # optimizer itself; a DeepSpeed wrapper in between would bypass our all-reduce.
        raise RuntimeError(f"DeepSpeed wrapped {type(comm).__name__} in {type(engine.optimizer).__name__}; "
                           "compressed communication needs ZeRO stage 0 with fp32 weights")
    # The optimizer communicates (compressed) itself: DeepSpeed must not also all-reduce gradients.
    engine.enable_backward_allreduce = False
    world = dist.world_size()
    if world > 1:  # at world size 1 compression is skipped, and check_compression_plan says so, once
        if gc is not None:
            log.info("gradient_compression %s: %d-bit quantized gradient all-reduce replaces DeepSpeed's",
                     gc["type"], gc["bits"])
        else:
            log.info("%s does its own compressed communication; DeepSpeed's gradient all-reduce is off",
                     settings.optimizer["type"])
    from ..optim.onebit import check_compression_plan

    check_compression_plan(comm, plan.total, world)
    return BuiltEngine(engine=engine, optimizer=ds_optimizer, scheduler=scheduler, lr_scale=scale, comm=comm,
                       plan=plan)


@dataclass(frozen=True)
class BuiltRun:
    """Everything ``build_run`` builds once for a run on this rank; the trainer holds one."""

    settings: ds_config.EngineSettings  # the DeepSpeed JSON, resolved for this world size
    spec: DataSpec  # the training data's shape, classes and normalisation (saved in every checkpoint)
    loaders: TrainLoaderFactory  # this rank's shard of the training set, one loader per epoch
    val_set: Dataset | None  # train.keep_best: the validation split, held out of the training set
    corrupt: CorruptImages | None  # data.on_corrupt=skip: counted, reported per epoch
    objective: Objective
    steps_per_epoch: int  # loader batches per epoch on this rank, a whole number of optimizer steps
    accumulation_unit: int  # batches per optimizer step: checkpoints fall on multiples of it
    perturbations: PerturbationStore | None  # attack.reuse: this rank's stored perturbations
    built_engine: BuiltEngine
    generator: torch.Generator  # this rank's stream for attacks' random starts
    attack_module: torch.nn.Module  # the engine's module as attacks call it (training precision)
    gathered: GatheredCopy | None  # ZeRO-3: the full-weight copy evaluation runs on (and attacks: gather_attacks)
    gather_attacks: bool  # attack.zero3_gather resolved: training attacks run on ``gathered``, refreshed per step
    ctx: ObjectiveContext
    watch: NonFiniteWatch

    @property
    def engine(self) -> Any:  # deepspeed.DeepSpeedEngine
        return self.built_engine.engine

    @property
    def comm(self) -> CommunicatingOptimizer | None:
        return self.built_engine.comm

    @property
    def ds_json(self) -> dict[str, Any]:
        return self.settings.saved_json

    def eval_module(self) -> torch.nn.Module:
        """What evaluation runs (every rank calls it; collective under ZeRO-3): the module in the training precision,
        and under ZeRO-3 a copy of the full weights gathered once, so that attacks which make a data-dependent
        number of forwards cannot desynchronise ZeRO-3's per-forward all-gathers (``runtime.replica``). Call it
        inside ``ema.applied`` to evaluate the EMA weights."""
        if self.gathered is None:
            return self.attack_module
        return self.gathered.refresh(self.engine.module)


def build_run(cfg: RunConfig, settings: ds_config.EngineSettings) -> BuiltRun:
    """Data, model, objective and engine for this rank (collective: ``deepspeed.initialize``). Seeds the global
    RNG twice: identical initial weights on every rank, then a per-rank stream for dropout and the like."""
    s = settings
    rank, world = dist.rank(), dist.world_size()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    train_set, spec = build_dataset(cfg.data, "train")
    where = f" from {cfg.data.root}" if cfg.data.root else ""
    log.info("data %s%s: %d training images, %d classes, %dx%dx%d", cfg.data.name, where, len(train_set),
             spec.num_classes, spec.in_chans, spec.img_size, spec.img_size)
    corrupt = corrupt_images(train_set)
    val_set = None
    if cfg.train.keep_best != "none":
        plain = build_dataset(replace(cfg.data, augment=False), "train")[0] if cfg.data.augment else None
        train_set, val_set = split_validation(train_set, cfg.train.val_examples, cfg.seed, plain)
        log.info("train.keep_best=%s: %d training examples held out for validation, %d left to train on",
                 cfg.train.keep_best, len(val_set), len(train_set))
    model = make_model(cfg, spec, cfg.model.weights)
    norm = normalization_of(model)
    if norm is not None:
        log.info("input normalisation (model.normalization=%s): %s", cfg.model.normalization, norm.describe())
    loaders = build_train_loader(cfg, train_set, micro_batch=s.micro_batch, rank=rank, world_size=world)
    steps = loaders.steps_per_epoch
    if cfg.train.max_steps_per_epoch is not None:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    if steps == 0:
        raise ConfigError(f"the training set ({len(train_set)} examples) is smaller than one global batch "
                          f"({s.global_batch}); lower train_micro_batch_size_per_gpu")
    objective = build_objective(cfg)  # before the engine: its replays count in the LR schedule
    unit = accumulation_unit(s.grad_accum, objective.replays)
    if steps % unit and steps > unit:
        log.info("gradient_accumulation_steps=%d: %d of the epoch's %d batches are trained, so every epoch "
                 "ends on an optimizer step (a checkpoint between two would not resume exactly)",
                 s.grad_accum, steps - steps % unit, steps)
        steps -= steps % unit
    if steps < unit:
        raise ConfigError(f"the training set ({len(train_set)} examples) is smaller than one optimizer step "
                          f"({unit} batches of {s.micro_batch * world}); lower train_micro_batch_size_per_gpu "
                          "or gradient_accumulation_steps")
    if cfg.train.save_every_steps % unit:
        raise ConfigError(f"train.save_every_steps={cfg.train.save_every_steps} would save between two optimizer "
                          f"steps (gradient_accumulation_steps={s.grad_accum}: one every {unit} batch(es)), which "
                          f"DeepSpeed cannot resume exactly; use a multiple of {unit}")
    perturbations = perturbation_store(cfg, train_set, loaders, world) if cfg.attack.reuse else None
    built = build_engine(cfg, s, model, steps, replays=objective.replays)
    engine = built.engine
    if cfg.model.channels_last:
        weights_channels_last(engine.module, s)
    if built.lr_scale != 1.0:
        log.info("LR scaled x%.3g (%s rule, global batch %d / base %d)", built.lr_scale,
                 cfg.optim.lr_scaling, s.global_batch, cfg.optim.base_batch_size)
    generator = torch.Generator(device=dist.device()).manual_seed(cfg.seed * 1_000_003 + 7919 * (rank + 1))
    torch.manual_seed(cfg.seed + 1 + rank)  # dropout etc. differ per rank from here on
    attack_module = in_training_precision(engine.module, s)
    gathered = (GatheredCopy(functools.partial(eval_copy, cfg, spec), functools.partial(in_training_precision, settings=s))
                if s.zero_stage == 3 else None)
    gather_attacks = gathered is not None and gathers_attacks(cfg, objective, engine.module)
    ctx = ObjectiveContext(model=engine, module=attack_module, cfg=cfg, generator=generator,
                           total_steps=cfg.train.epochs * steps, perturbations=perturbations, steps_per_epoch=steps,
                           gather=functools.partial(gathered.held, engine.module) if gather_attacks else None)
    if cfg.attack.eps_warmup_epochs > 0:
        log.info("%s", eps_warmup.describe(cfg.attack, steps))
    return BuiltRun(settings=s, spec=spec, loaders=loaders, val_set=val_set, corrupt=corrupt, objective=objective,
                    steps_per_epoch=steps, accumulation_unit=unit, perturbations=perturbations, built_engine=built,
                    generator=generator, attack_module=attack_module, gathered=gathered,
                    gather_attacks=gather_attacks, ctx=ctx,
                    watch=NonFiniteWatch(dist.device()))


def gathers_attacks(cfg: RunConfig, objective: Objective, module: torch.nn.Module) -> bool:
    """ZeRO-3: whether training attacks run on weights gathered once per step (``attack.zero3_gather``; logged
    once). Every rank decides alike: under ``auto`` without a budget, from the smallest rank's free memory
    (collective)."""
    a = cfg.attack
    mode = a.zero3_gather
    if mode == "never":
        log.info("attack.zero3_gather=never: attacks run on the engine's module, which all-gathers every layer "
                 "again at each attack step")
        return False
    if not objective.gathers_attacks or a.name == "none":  # `always` was refused for these (core.config.check_engine)
        log.info("attack.zero3_gather=%s: objective %s runs no attack apart from the training pass; nothing to "
                 "gather", mode, cfg.objective.name)
        return False
    needed = GatheredCopy.nbytes(module)
    if mode == "always":
        log.info("attack.zero3_gather=always: attacks run on a copy of the full weights gathered once per step "
                 "(%s MB per rank while the attack runs)", megabytes(needed))
        return True
    if a.zero3_gather_budget_gb is not None:
        budget, rule = a.zero3_gather_budget_gb * 1e9, "attack.zero3_gather_budget_gb"
    else:
        acc = dist.accelerator()
        free = acc.available_memory()
        if acc.device_name() == "cpu":  # the host's RAM, shared by its ranks
            free //= max(1, dist.local_world_size())
        budget, rule = min(dist.all_gather_object(free)) / 2, "half the smallest rank's free memory"
    fits = needed <= budget
    log.info("attack.zero3_gather=auto: the copy of the full weights takes %s MB per rank, the budget is %s MB "
             "(%s): %s", megabytes(needed), megabytes(budget), rule,
             "attacks run on it, gathered once per step" if fits else
             "attacks run on the engine's module, which all-gathers every layer again at each attack step")
    return fits


def make_model(cfg: RunConfig, spec: DataSpec, weights: str | None) -> torch.nn.Module:
    """``weights`` None (ZeRO-3's evaluation copy) builds the same model, its normalisation included."""
    return prepare_model(cfg, spec, create_model(cfg.model.name, spec, weights, act=cfg.model.act,
                                                 strict_head=cfg.model.strict_head,
                                                 normalization=cfg.model.normalization,
                                                 pretrained=cfg.model.weights is not None,
                                                 grad_checkpointing=cfg.model.grad_checkpointing))


def eval_copy(cfg: RunConfig, spec: DataSpec) -> torch.nn.Module:
    """ZeRO-3 evaluation's module (``GatheredCopy``): the architecture again, its weights come from the engine."""
    model = make_model(cfg, spec, None)
    return model.to(memory_format=torch.channels_last) if cfg.model.channels_last else model


def in_training_precision(module: torch.nn.Module, settings: ds_config.EngineSettings) -> torch.nn.Module:
    """``module`` as attacks and evaluation call it: in the training forward's precision (bf16 autocast), with
    fp32 logits and fp16 input gradients that do not underflow (``attacks.attack_view``)."""
    if settings.precision == "bf16-autocast":
        from ..models.wrapper import AutocastModule

        return AutocastModule(module, dist.accelerator().device_name())
    return attack_view(module)


def perturbation_store(cfg: RunConfig, train_set: Dataset, loaders: TrainLoaderFactory,
                       world: int) -> PerturbationStore:
    """``attack.reuse``: this rank's store, after the budget check (before the engine is built)."""
    shape = tuple(train_set[0][0].shape)
    needed = check_reuse_budget(len(train_set), world, shape, cfg.attack.reuse_max_bytes)
    log.info("attack.reuse: keeping each example's last perturbation, %.1f MB per rank", needed / 1e6)
    return PerturbationStore(loaders.shard(), len(train_set), shape, cfg.attack.eps, dist.device())


def weights_channels_last(module: torch.nn.Module, settings: ds_config.EngineSettings) -> bool:
    """``model.channels_last``: put the 4-D weights in NHWC after ``deepspeed.initialize``, where that is safe.

    Not before: DeepSpeed's start-up broadcast views every parameter as bytes (``p.data.view(torch.uint8)``),
    which needs a unit last stride that NHWC weights lack, so several ranks would fail at start-up.
    Only with ZeRO 0 and fp32 weights (``fp32`` or ``bf16-autocast``): there the optimizer holds the module's
    own parameters and ``Module.to`` swaps their ``.data`` in place. ZeRO 1-3 and DeepSpeed's bf16/fp16
    keep the weights as views of flat buffers; re-laying them out would cut the views loose, so the weights
    stay NCHW there and only the inputs go NHWC (the loop does that): convolutions take the channels-last
    path when either operand is channels-last. Returns whether the weights were converted.
    """
    if settings.zero_stage == 0 and settings.precision in ("fp32", "bf16-autocast"):
        module.to(memory_format=torch.channels_last)
        log.info("model.channels_last: weights and inputs in NHWC")
        return True
    log.info("model.channels_last: inputs in NHWC; the weights stay NCHW (ZeRO-%d / %s keep them in flat buffers)",
             settings.zero_stage, settings.precision)
    return False
