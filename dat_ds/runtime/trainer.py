"""The training run on one rank: build everything from the two configs, resume, run the epochs.

``Trainer(cfg).setup()`` builds data, model, engine and objective, restores a checkpoint when
resuming, and only then, with everything checked, writes the run folder (under ``--overwrite`` it moves
the old run aside first: ``set_aside``); ``fit(callbacks)`` runs the epochs and returns the run's summary. Around
the loop the callbacks (``runtime.callbacks``) do the rest: the trainer always adds mid-epoch
checkpointing last; evaluation and the overfitting monitor come from the layer above
(``dat_ds.evaluation.training.run_training`` is the composition ``dat-ds train`` uses).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..attacks import attack_view
from ..core import dist, stop, ui
from ..core.config import RunConfig, check_engine, replace
from ..core.errors import ConfigError, PeerLostError
from ..core.io import JsonlWriter, atomic_write_json, atomic_write_text
from ..data import build_dataset
from ..data.corrupt import corrupt_images
from ..data.loaders import build_train_loader
from ..data.split import split_validation
from ..models import create_model
from ..objectives import ObjectiveContext, build_objective, eps_warmup, prepare_model
from ..objectives.reuse import PerturbationStore, check_reuse_budget
from ..optim.schedule import accumulation_unit
from . import backends, checkpoint, ds_config
from .build import build_engine
from .callbacks import Callback, Checkpointing, StopTraining
from .ema import STATE_KEY as EMA_KEY
from .ema import WeightEMA
from .loop import NonFiniteWatch, TrainState, train_one_epoch
from .replica import GatheredCopy
from .signal_stop import SignalStop

log = logging.getLogger(__name__)
REUSE_KEY = "perturbations"  # attack.reuse's store in rank_state_<r>.pt
BEST_ROW_KEY = "best"  # an epoch row with best: true (train.keep_best's callback) makes its checkpoint the run's best
OVERWRITTEN = ".overwritten-"  # <run>.overwritten-<time>-<pid>: the old run under --overwrite until it is replaced


def set_aside(run_dir: Path) -> Path:
    """``--overwrite``: move the old run out of the way with one rename; it is deleted once the new run has
    committed its first checkpoint, and put back (``settle_overwritten``) if the new run stops before."""
    aside = run_dir.with_name(f"{run_dir.name}{OVERWRITTEN}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.rename(run_dir, aside)
    log.info("--overwrite: moved the old run to %s until the new one has its first checkpoint", aside)
    return aside


def overwritten_by(run_dir: Path, pid: int) -> list[Path]:
    """The old runs that process ``pid`` set aside from ``run_dir`` and has not settled yet."""
    return sorted(Path(run_dir).parent.glob(f"{glob.escape(Path(run_dir).name)}{OVERWRITTEN}*-{pid}"))


def settle_overwritten(run_dir: Path, aside: Path) -> str:
    """A run under ``--overwrite`` stopped: keep it if it committed a checkpoint (the old one goes), else
    delete its partial folder and put the old run back, so the file system is as it was. Returns which."""
    run_dir = Path(run_dir)
    if checkpoint.complete_tags(run_dir / "checkpoint"):
        shutil.rmtree(aside, ignore_errors=True)
        log.info("--overwrite: the new run has a complete checkpoint; deleted the old run (%s)", aside)
        return "replaced"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    os.rename(aside, run_dir)
    log.warning("the new run stopped before its first checkpoint; the old run is back in %s", run_dir)
    return "restored"


COMPRESSING_OPTIMIZERS = ("onebitadam", "onebitlamb", "zerooneadam")  # per-rank state that cannot be re-sharded


def check_world_size(root: Path, tag: str, world: int, allow_change: bool = False) -> int | None:
    """A checkpoint resumes on the world size it was saved with (``complete.json``'s ``world_size``): per-rank
    RNG and optimizer state and the data shards are per rank. With ``allow_change`` (``--allow-world-size-change``)
    another world size is accepted where the state can be re-sharded (ZeRO-0, no compressing optimizer);
    returns the saved world size when it differs, else None."""
    mark = checkpoint.read_complete(Path(root) / tag) or {}
    saved, where = mark.get("world_size"), str(Path(root) / tag)
    if not isinstance(saved, int) or saved == world:
        return None
    if not allow_change:
        raise ConfigError(f"checkpoint {where!r} was saved with {saved} rank(s), but this run has {world}; resume "
                          f"with --nproc {saved}, or pass --allow-world-size-change (not bit-identical), or start a "
                          "new run with another --name")
    fits = mark.get("fits") or {}
    optimizer = str(fits.get("optimizer") or "").lower()
    if fits.get("zero_stage"):
        raise ConfigError(f"checkpoint {where!r} was saved with ZeRO-{fits['zero_stage']} on {saved} rank(s): its "
                          f"optimizer state is partitioned per rank and cannot be re-sharded to {world}; resume with "
                          f"--nproc {saved}")
    if optimizer in COMPRESSING_OPTIMIZERS:
        raise ConfigError(f"checkpoint {where!r} was saved with {fits['optimizer']} on {saved} rank(s): its per-rank "
                          f"compression state cannot be re-sharded to {world}; resume with --nproc {saved}")
    return saved


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


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training loss and, where the rows have them, clean and robust test accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.io import save_figure

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax1.set(xlabel="epoch", ylabel="train loss", title="training objective")
    clean = [(h["epoch"], h["clean_acc"]) for h in history if h.get("clean_acc") is not None]
    if clean:
        ax2.plot(*zip(*clean), marker="o", label="clean")
    rob = [(h["epoch"], h["robust_acc"]) for h in history if h.get("robust_acc") is not None]
    if rob:
        ax2.plot(*zip(*rob), marker="s", label=history[-1].get("robust_attack", "robust"))
    for key, marker, label in (("ema_clean_acc", "o", "EMA clean"), ("ema_robust_acc", "s", "EMA robust")):
        points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if points:
            ax2.plot(*zip(*points), marker=marker, linestyle="--", label=label)
    ax2.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1), title=title)
    if clean or rob:
        ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


class Trainer:
    """One run on this rank. Every rank builds one and calls the same methods in the same order."""

    def __init__(self, cfg: RunConfig, *, resume: str | None = None, overwrite: bool = False,
                 allow_world_size_change: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.allow_world_size_change = allow_world_size_change
        self.saved_world: int | None = None  # the checkpoint's world size, when it differs from this run's
        self.overwrite = overwrite
        self.run_dir = cfg.run_dir
        self.ckpt_root = self.run_dir / "checkpoint"
        self.state = TrainState()
        self.callbacks: list[Callback] = []
        self.overwritten: Path | None = None  # the old run set aside by --overwrite (rank 0), until replaced
        self._ready = False
        self.last_save_seconds: float | None = None  # how long this process's last save took (save_on_signal)
        self.last_saved_step: int | None = None
        self.signal_stop: SignalStop | None = None
        self.ema: WeightEMA | None = None  # the weight EMA (cfg.ema), built with the engine
        self._rank_ema: dict[str, Any] | None = None  # ZeRO-3: this rank's EMA shards from the checkpoint's rank state

    # ------------------------------------------------------------------ setup

    def setup(self) -> Trainer:
        """Data, model, engine, objective and the checkpoint when resuming; then the run folder. Collective.

        Nothing is written (or, with ``--overwrite``, moved aside) before everything else has been built:
        a start that fails on a setting only the engine checks leaves the file system as it was.
        """
        backend_line = backends.configure(self.cfg.train, dist.accelerator().device_name())  # before any kernel
        dist.init_distributed(timeout_s=self.cfg.dist.timeout_s)
        threads = dist.set_threads_per_rank()
        cfg, world = self.cfg, dist.world_size()
        self.settings = ds_config.prepare(cfg.deepspeed_config, world)
        check_engine(cfg, self.settings.zero_stage)  # awp with ZeRO-3
        self.ds_json = {**self.settings.ds_config, "optimizer": self.settings.optimizer}
        # Resolve and vet the checkpoint before anything is built: a mismatch is one line, not a DeepSpeed crash.
        found = checkpoint.resolve_resume(self.resume, self.run_dir) if self.resume is not None else None
        if found is not None:
            self.saved_world = check_world_size(*found, world, self.allow_world_size_change)
            checkpoint.check_compatible(*found, cfg, self.ds_json)
        s = self.settings
        log.info("run %s: %d rank(s) on %s/%s, %d thread(s) per rank, global batch %d (micro %d x accum %d x %d), "
                 "ZeRO-%d, %s", cfg.name, world, dist.accelerator().device_name(),
                 dist.accelerator().communication_backend_name(), threads, s.global_batch, s.micro_batch,
                 s.grad_accum, world, s.zero_stage, s.precision)
        if backend_line is not None:
            log.info("%s", backend_line)
        self._build()
        if found is not None:
            self._restore(*found)
        try:
            self._prepare_run_dir()
            self.metrics_file = JsonlWriter(self.run_dir / "metrics.jsonl") if dist.is_main_process() else None
        except BaseException:
            self._settle()
            raise
        self._ready = True
        return self

    def _prepare_run_dir(self) -> None:
        if dist.is_main_process():
            if self.overwrite and self.resume is None and self.run_dir.exists():
                self.overwritten = set_aside(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", self.cfg.to_yaml())
            atomic_write_json(self.run_dir / "ds_config.json", self.ds_json)
        dist.barrier()

    def _settle(self) -> None:
        """The run stops (an exception): under --overwrite, put the old run back unless this one replaced it."""
        if self.overwritten is not None:
            aside, self.overwritten = self.overwritten, None
            settle_overwritten(self.run_dir, aside)

    def _build(self) -> None:
        cfg, s = self.cfg, self.settings
        rank, world = dist.rank(), dist.world_size()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        train_set, spec = build_dataset(cfg.data, "train")
        self.spec = spec
        self.corrupt = corrupt_images(train_set)  # data.on_corrupt=skip: counted, reported per epoch
        self.val_set = None  # train.keep_best: the validation split, held out of the training set
        if cfg.train.keep_best != "none":
            plain = build_dataset(replace(cfg.data, augment=False), "train")[0] if cfg.data.augment else None
            train_set, self.val_set = split_validation(train_set, cfg.train.val_examples, cfg.seed, plain)
            log.info("train.keep_best=%s: %d training examples held out for validation, %d left to train on",
                     cfg.train.keep_best, len(self.val_set), len(train_set))
        model = self._make_model(cfg.model.weights)
        self.loaders = build_train_loader(cfg, train_set, micro_batch=s.micro_batch, rank=rank, world_size=world)
        steps = self.loaders.steps_per_epoch
        if cfg.train.max_steps_per_epoch is not None:
            steps = min(steps, cfg.train.max_steps_per_epoch)
        if steps == 0:
            raise ConfigError(f"the training set ({len(train_set)} examples) is smaller than one global batch "
                              f"({s.global_batch}); lower train_micro_batch_size_per_gpu")
        self.objective = build_objective(cfg)  # before the engine: its replays count in the LR schedule
        unit = accumulation_unit(s.grad_accum, self.objective.replays)
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
        self.steps_per_epoch = steps
        self.accumulation_unit = unit
        self.perturbations = self._perturbation_store(train_set, world) if cfg.attack.reuse else None
        self.built = build_engine(cfg, s, model, steps, replays=self.objective.replays)
        self.engine = self.built.engine
        if cfg.model.channels_last:
            weights_channels_last(self.engine.module, s)
        if self.built.lr_scale != 1.0:
            log.info("LR scaled x%.3g (%s rule, global batch %d / base %d)", self.built.lr_scale,
                     cfg.optim.lr_scaling, s.global_batch, cfg.optim.base_batch_size)
        self.generator = torch.Generator(device=dist.device()).manual_seed(cfg.seed * 1_000_003 + 7919 * (rank + 1))
        torch.manual_seed(cfg.seed + 1 + rank)  # dropout etc. differ per rank from here on
        self.attack_module = self._in_training_precision(self.engine.module)
        self._gathered = GatheredCopy(self._eval_copy) if s.zero_stage == 3 else None
        self.ctx = ObjectiveContext(model=self.engine, module=self.attack_module, cfg=cfg, generator=self.generator,
                                    total_steps=cfg.train.epochs * steps, perturbations=self.perturbations,
                                    steps_per_epoch=steps)
        if cfg.attack.eps_warmup_epochs > 0:
            log.info("%s", eps_warmup.describe(cfg.attack, steps))
        self.watch = NonFiniteWatch(dist.device())
        if cfg.ema is not None:  # after the engine: under ZeRO-3 it averages this rank's partitions
            self.ema = WeightEMA(self.engine.module, cfg.ema)

    def _make_model(self, weights: str | None) -> torch.nn.Module:
        cfg = self.cfg
        return prepare_model(cfg, self.spec, create_model(cfg.model.name, self.spec, weights, act=cfg.model.act))

    def _eval_copy(self) -> torch.nn.Module:
        """ZeRO-3 evaluation's module (``GatheredCopy``): the architecture again, its weights come from the engine."""
        model = self._make_model(None)
        return model.to(memory_format=torch.channels_last) if self.cfg.model.channels_last else model

    def _in_training_precision(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` as attacks and evaluation call it: in the training forward's precision (bf16 autocast), with
        fp32 logits and fp16 input gradients that do not underflow (``attacks.attack_view``)."""
        if self.settings.precision == "bf16-autocast":
            from ..models.wrapper import AutocastModule

            return AutocastModule(module, dist.accelerator().device_name())
        return attack_view(module)

    def eval_module(self) -> torch.nn.Module:
        """What evaluation runs (every rank calls it; collective under ZeRO-3): the module in the training precision,
        and under ZeRO-3 a copy of the full weights gathered once, so that attacks which make a data-dependent
        number of forwards cannot desynchronise ZeRO-3's per-forward all-gathers (``runtime.replica``). Call it
        inside ``ema.applied`` to evaluate the EMA weights."""
        if self._gathered is None:
            return self.attack_module
        return self._in_training_precision(self._gathered.refresh(self.engine.module))

    def _perturbation_store(self, train_set, world: int) -> PerturbationStore:
        """``attack.reuse``: this rank's store, after the budget check (before the engine is built)."""
        shape = tuple(train_set[0][0].shape)
        needed = check_reuse_budget(len(train_set), world, shape, self.cfg.attack.reuse_max_bytes)
        log.info("attack.reuse: keeping each example's last perturbation, %.1f MB per rank", needed / 1e6)
        return PerturbationStore(self.loaders.shard(), len(train_set), shape, self.cfg.attack.eps, dist.device())

    def _rank_state(self) -> dict[str, Any]:
        """What this rank alone holds: its random streams and, under ``attack.reuse``, its perturbations."""
        state = checkpoint.capture_rng(self.generator)
        if self.perturbations is not None:
            state[REUSE_KEY] = self.perturbations.state_dict()
        if self.ema is not None and self.ema.sharded:  # ZeRO-3: this rank's EMA shards
            state[EMA_KEY] = self.ema.state_dict()
        return state

    def _load_rank_state(self, rank_state: dict[str, Any]) -> None:
        if self.perturbations is not None and REUSE_KEY in rank_state:
            self.perturbations.load_state_dict(rank_state[REUSE_KEY])
        elif self.perturbations is not None:
            log.warning("the checkpoint has no stored perturbations; attack.reuse starts from random starts")
        self._rank_ema = rank_state.get(EMA_KEY)

    def _restore_ema(self, tag: str, client: dict[str, Any] | None, rank_ema: dict[str, Any] | None) -> None:
        """The weight EMA checkpoint ``tag`` holds: in its client state, or (ZeRO-3 shards) in this rank's rank
        state; a checkpoint without one (a run without ema) restarts the EMA from the restored weights."""
        if self.ema is None:
            return
        state = rank_ema if self.ema.sharded else (client or {}).get(EMA_KEY)
        if state is not None:
            self.ema.load_state_dict(state)
        else:
            self.ema = WeightEMA(self.engine.module, self.cfg.ema)
            log.warning("checkpoint %s has no weight EMA; the EMA starts again from its weights", tag)

    def reload_ema(self, root: Path, tag: str, client: dict[str, Any] | None) -> None:
        """The weight EMA saved in checkpoint ``tag`` (after the overfitting monitor's rollback reloaded its weights)."""
        rank_state = checkpoint.read_rank_state(root, tag) if self.ema is not None and self.ema.sharded else None
        self._restore_ema(tag, client, (rank_state or {}).get(EMA_KEY))

    def _restore(self, root: Path, tag: str) -> None:
        resharded = self.saved_world is not None
        self._rank_ema = None
        client = checkpoint.load(self.engine, root, tag, self.generator, comm=self.built.comm,
                                 on_rank_state=self._load_rank_state, rank_state=not resharded)
        state = TrainState(epoch=client["epoch"], step_in_epoch=client["step_in_epoch"],
                           global_step=client["global_step"], skipped_steps=client.get("skipped_steps", 0),
                           overflow_steps=client.get("overflow_steps", 0),
                           history=client.get("history", []))
        if client.get("objective_state"):
            self.objective.load_state_dict(client["objective_state"])
        self._restore_ema(tag, client, self._rank_ema)
        if resharded:
            self._reshard(state, client, closed=tag.startswith("epoch"))
        elif state.step_in_epoch >= self.steps_per_epoch:  # the checkpoint closed its epoch
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        self.state = state
        log.info("resumed from %s: epoch %d, step %d of the epoch, global step %d", root / tag, state.epoch,
                 state.step_in_epoch, state.global_step)

    def _reshard(self, state: TrainState, client: dict[str, Any], *, closed: bool) -> None:
        """``--allow-world-size-change``: map the checkpoint's place in its epoch onto this world size, re-seed.

        The epoch's order depends on (seed, epoch) only and the old ranks together took its first G examples
        (G = step x micro batch x old world size), so this run starts the epoch at global example G, rounded
        down to a whole step of the new world (up to one global batch is trained twice). An epoch the
        checkpoint closed is left as it was: the next one starts at its beginning."""
        old, world, rank = self.saved_world, dist.world_size(), dist.rank()
        old_micro = int((client.get("ds_config") or {}).get("train_micro_batch_size_per_gpu") or self.settings.micro_batch)
        new_batch = self.settings.micro_batch * world
        if closed or state.step_in_epoch * old_micro * old >= self.steps_per_epoch * new_batch:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
            where = f"epoch {state.epoch + 1} starts at its beginning"
        else:
            consumed = state.step_in_epoch * old_micro * old
            state.step_in_epoch = consumed // new_batch
            where = (f"data position re-sharded at global example {consumed} of epoch {state.epoch + 1} (step "
                     f"{state.step_in_epoch} of {self.steps_per_epoch}; {consumed - state.step_in_epoch * new_batch} "
                     "example(s) seen again)")
        checkpoint.reseed_rank(self.cfg.seed, state.global_step, rank, self.generator)
        reuse = "; attack.reuse perturbations start afresh" if self.perturbations is not None else ""
        log.warning("world size %d -> %d: %s; per-rank RNG re-seeded%s; the global step counter continues at %d; "
                    "results will not be bit-identical to an uninterrupted run", old, world, where, reuse,
                    state.global_step)

    # ------------------------------------------------------------------ the run

    def write(self, record: dict[str, Any]) -> None:
        """Append one record to ``metrics.jsonl`` (rank 0; a no-op elsewhere)."""
        if self.metrics_file is not None:
            self.metrics_file.write(record)

    def fit(self, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
        """Run the remaining epochs with ``callbacks`` (then mid-epoch checkpointing); returns the summary."""
        if not self._ready:
            self.setup()
        ema = [self.ema] if self.ema is not None else []  # first: the other callbacks see this step's EMA
        self.callbacks = [*ema, *callbacks, Checkpointing(self.cfg.train.save_every_steps)]
        if self.cfg.train.save_on_signal:  # a signal now ends the step in progress (core.stop), then maybe a save
            self.signal_stop = SignalStop()
            self.callbacks.append(self.signal_stop)
            stop.defer()
        try:
            summary = self._fit()
        except BaseException as e:
            try:
                lost = self.lost_contact(e)  # first: the ranks still in contact check in with each other now
            finally:
                self._settle()
            if lost is not None:
                raise lost from e
            raise
        finally:
            stop.defer(False)
        if self.overwritten is not None:  # it ended (stopped early) before any checkpoint: still the new run
            aside, self.overwritten = self.overwritten, None
            shutil.rmtree(aside, ignore_errors=True)
        return summary

    def lost_contact(self, error: BaseException) -> PeerLostError | None:
        """A collective failed because a peer stopped answering: the one line naming it and the last checkpoint."""
        state = self.state
        who = dist.lost_contact(error, during=f"after training step {state.global_step} (epoch {state.epoch + 1})")
        if who is None:
            return None
        tags = checkpoint.complete_tags(self.ckpt_root)  # committed ones; a save the failure cut short is not
        last = (f"last checkpoint: {self.ckpt_root / tags[-1][1]}; resume with --resume auto" if tags
                else "no checkpoint yet; run the command again to start over")
        return PeerLostError(f"{who}; {last}")

    def _fit(self) -> dict[str, Any]:
        t_run = time.perf_counter()
        stopped = None
        while self.state.epoch < self.cfg.train.epochs:
            try:
                train_stats = self.train_epoch()
            except StopTraining as e:
                stopped = str(e)
                log.warning("training stopped early at epoch %d step %d: %s", self.state.epoch + 1,
                            self.state.step_in_epoch, e)
                self.write({"kind": "stopped", "epoch": self.state.epoch + 1, "step": self.state.global_step,
                            "reason": stopped})
                break
            self.end_epoch(train_stats)
            if self.signal_stop is not None:
                self.signal_stop.check(self)
        return self.finish(stopped, time.perf_counter() - t_run)

    def train_epoch(self) -> dict[str, float]:
        """Train the rest of the current epoch; the callbacks' ``on_step`` run after every step."""
        cfg, state = self.cfg, self.state
        loader = self.loaders.loader(state.epoch, state.step_in_epoch)
        remaining = (self.steps_per_epoch - state.step_in_epoch) * self.settings.micro_batch * dist.world_size()
        with ui.progress_bar(remaining, f"epoch {state.epoch + 1}/{cfg.train.epochs}") as advance:
            return train_one_epoch(self.engine, self.objective, self.ctx, loader, state, cfg=cfg, metrics=self.write,
                                   on_step=self._on_step, progress=advance, comm=self.built.comm, watch=self.watch,
                                   max_steps=self.steps_per_epoch)

    def _on_step(self, state: TrainState) -> None:
        for cb in self.callbacks:
            cb.on_step(self, state)

    def end_epoch(self, train_stats: dict[str, float]) -> dict[str, Any]:
        """The epoch's row (callbacks add to it), logged and kept in the history; then the epoch checkpoint."""
        cfg, state = self.cfg, self.state
        epoch = state.epoch
        log.info("epoch %d/%d: loss %.4f, train acc %.4f (%.1fs)", epoch + 1, cfg.train.epochs,
                 train_stats["train_loss"], train_stats["train_acc"], train_stats["train_seconds"])
        row = {"kind": "epoch", "epoch": epoch + 1, **train_stats, "lr": self.engine.get_lr()[0],
               "optimizer_steps": self.engine.global_steps}  # replays included (Free-AT: m per batch)
        if self.corrupt is not None and self.cfg.data.on_corrupt == "skip":
            row["corrupt_skipped"] = self._report_corrupt(epoch)
        for cb in self.callbacks:
            cb.on_epoch_end(self, state, row)
        state.history.append(row)
        self.write(row)
        if self.built.comm is not None:
            from ..optim.onebit import describe_comm

            log.info("epoch %d/%d: %s", epoch + 1, cfg.train.epochs, describe_comm(self.built.comm))
        state.step_in_epoch = self.steps_per_epoch
        self.save(end_of_epoch=True, best=bool(row.get(BEST_ROW_KEY)))
        state.epoch, state.step_in_epoch = epoch + 1, 0
        return row

    def _report_corrupt(self, epoch: int) -> int:
        """The epoch's corrupt images skipped on all ranks (one all-reduce), logged once; a few of rank 0's named."""
        count, examples = self.corrupt.epoch_report()
        total = int(dist.all_reduce_sum(torch.tensor([float(count)], dtype=torch.float64)).item())
        if total:
            log.warning("epoch %d/%d: skipped %d corrupt image(s) (data.on_corrupt=skip), each replaced by the next "
                        "one that decodes%s", epoch + 1, self.cfg.train.epochs, total,
                        f"; e.g. {', '.join(examples)}" if examples else "")
        return total

    def save(self, end_of_epoch: bool, best: bool = False) -> Path:
        """Checkpoint the current state (collective). Never after a non-finite step: the check comes first.
        ``best``: the checkpoint becomes the run's ``best`` (``train.keep_best``; pruning keeps it)."""
        self.watch.check(self.state)
        state = self.state
        client = {**state.to_dict(), "config": self.cfg.to_dict(), "ds_config": self.ds_json,
                  "data_spec": {"in_chans": self.spec.in_chans, "num_classes": self.spec.num_classes,
                                "img_size": self.spec.img_size, "mean": list(self.spec.mean),
                                "std": list(self.spec.std), "classes": list(self.spec.classes)},
                  "objective_state": self.objective.state_dict()}
        if self.ema is not None and not self.ema.sharded:  # ZeRO 0-2: one full copy, saved by rank 0
            client[EMA_KEY] = self.ema.state_dict()
        tag = checkpoint.tag_for(state.epoch, state.global_step, end_of_epoch)
        t_save = time.perf_counter()
        path = checkpoint.save(self.engine, self.ckpt_root, tag, client_state=client,
                               rank_state=self._rank_state(), keep_last=self.cfg.train.keep_last,
                               comm=self.built.comm, best=best)
        self.last_save_seconds, self.last_saved_step = time.perf_counter() - t_save, state.global_step
        if self.overwritten is not None:  # the new run has a complete checkpoint: it replaces the old one now
            aside, self.overwritten = self.overwritten, None
            settle_overwritten(self.run_dir, aside)
        return path

    def finish(self, stopped: str | None, seconds: float) -> dict[str, Any]:
        """``summary.json``, ``curves.png`` and the end-of-run table (rank 0); returns the summary."""
        cfg, history, world = self.cfg, self.state.history, dist.world_size()
        summary = {"stopped": stopped, "name": cfg.name, "run_dir": str(self.run_dir), "world_size": world,
                   "epochs": cfg.train.epochs, "seconds": seconds, "final": history[-1] if history else None,
                   "history": history}
        best_rows = [h for h in history if h.get(BEST_ROW_KEY)]
        if cfg.train.keep_best != "none":  # the checkpoint eval and export default to (Rice et al. 2020)
            summary["best"] = None if not best_rows else {
                "epoch": best_rows[-1]["epoch"], "tag": checkpoint.tag_for(best_rows[-1]["epoch"] - 1, 0, True),
                "val_robust_acc": best_rows[-1].get("val_robust_acc"), "val_clean_acc": best_rows[-1].get("val_clean_acc")}
        if dist.is_main_process():
            atomic_write_json(self.run_dir / "summary.json", summary)
            if history:
                plot_history(history, self.run_dir / "curves.png", f"{cfg.name}: test accuracy")
            ema = cfg.ema is not None  # the EMA's accuracies next to the raw weights'
            ui.show(ui.table(
                f"dat-ds {cfg.name}: {cfg.objective.name} / {cfg.attack.name} eps={cfg.attack.eps:.4g} on {world} rank(s)",
                ["epoch", "loss", "train acc", "clean acc", "robust acc",
                 *(["ema clean acc", "ema robust acc"] if ema else []), "seconds"],
                [(h["epoch"], h["train_loss"], h["train_acc"], h.get("clean_acc"), h.get("robust_acc"),
                  *((h.get("ema_clean_acc"), h.get("ema_robust_acc")) if ema else ()),
                  h["train_seconds"] + h.get("eval_seconds", 0.0)) for h in history]))
        dist.barrier()
        return summary
