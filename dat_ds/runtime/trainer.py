"""The training run on one rank: build everything from the two configs, resume, run the epochs.

``Trainer(cfg).setup()`` builds data, model, engine and objective once (``runtime.build.build_run``: the
trainer holds the frozen ``BuiltRun`` as ``trainer.run``), restores a checkpoint when resuming, and only
then, with everything checked, writes the run folder (``runtime.run_dir``: under ``--overwrite`` it moves
the old run aside first); ``fit(callbacks)`` runs the epochs and returns the run's summary. Around
the loop the callbacks (``runtime.callbacks``) do the rest: the trainer always adds mid-epoch
checkpointing last; evaluation and the overfitting monitor come from the layer above
(``dat_ds.evaluation.training.run_training`` is the composition ``dat-ds train`` uses).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..core import dist, stop, ui
from ..core.config import RunConfig, check_engine
from ..core.errors import PeerLostError
from ..core.io import JsonlWriter, atomic_write_json
from ..core.provenance import provenance
from ..data.corrupt import CorruptImages
from . import backends, checkpoint, ds_adapter, ds_config
from .build import BuiltRun, build_run
from .callbacks import Callback, Checkpointing, StopTraining
from .ema import STATE_KEY as EMA_KEY
from .ema import WeightEMA
from .loop import TrainState, train_one_epoch
from .plots import plot_history
from .run_dir import RunFolder, check_world_size
from .signal_stop import SignalStop

log = logging.getLogger(__name__)
REUSE_KEY = "perturbations"  # attack.reuse's store in rank_state_<r>.pt
BEST_ROW_KEY = "best"  # an epoch row with best: true (train.keep_best's callback) makes its checkpoint the run's best


def monitor_events(record: dict[str, Any], step: int) -> list[tuple[str, float, int]]:
    """A metrics record as monitor events: every finite number but the counters that are its x axis."""
    kind = record.get("kind", "record")
    return [(f"dat_ds/{kind}/{key}", float(value), step) for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "epoch")
            and math.isfinite(value)]


class Trainer:
    """One run on this rank. Every rank builds one and calls the same methods in the same order."""

    def __init__(self, cfg: RunConfig, *, resume: str | None = None, overwrite: bool = False,
                 allow_world_size_change: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.allow_world_size_change = allow_world_size_change
        self.saved_world: int | None = None  # the checkpoint's world size, when it differs from this run's
        self.run_dir = cfg.run_dir
        self.ckpt_root = self.run_dir / "checkpoint"
        self.folder = RunFolder(self.run_dir, overwrite=overwrite, resuming=resume is not None)
        self.run: BuiltRun | None = None  # everything built once (setup)
        self.state = TrainState()
        self.callbacks: list[Callback] = []
        self.metrics_file: JsonlWriter | None = None  # metrics.jsonl (rank 0, from setup)
        self.last_save_seconds: float | None = None  # how long this process's last save took (save_on_signal)
        self.last_saved_step: int | None = None
        self.signal_stop: SignalStop | None = None
        self.ema: WeightEMA | None = None  # the weight EMA (cfg.ema), built with the engine; a restore may rebuild it
        self._ready = False  # setup() has run to the end
        self._rank_ema: dict[str, Any] | None = None  # ZeRO-3: this rank's EMA shards from the checkpoint's rank state

    # What callbacks read (``TrainerView``): the built run's, read-only.

    @property
    def engine(self) -> Any:  # deepspeed.DeepSpeedEngine
        return self._built().engine

    @property
    def steps_per_epoch(self) -> int:
        return self._built().steps_per_epoch

    @property
    def accumulation_unit(self) -> int:
        return self._built().accumulation_unit

    @property
    def val_set(self) -> Any:
        return self._built().val_set

    def _built(self) -> BuiltRun:
        if self.run is None:
            raise RuntimeError("the run is not built yet: call Trainer.setup() first")
        return self.run

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
        s = ds_config.prepare_run(cfg, world)
        check_engine(cfg, s.zero_stage)  # awp with ZeRO-3, attack.zero3_gather
        # Resolve and vet the checkpoint before anything is built: a mismatch is one line, not a DeepSpeed crash.
        found = checkpoint.resolve_resume(self.resume, self.run_dir) if self.resume is not None else None
        if found is not None:
            self.saved_world = check_world_size(*found, world, self.allow_world_size_change)
            checkpoint.check_compatible(*found, cfg, s.saved_json)
        log.info("run %s: %d rank(s) on %s/%s, %d thread(s) per rank, global batch %d (micro %d x accum %d x %d), "
                 "ZeRO-%d, %s; outputs in %s", cfg.name, world, dist.accelerator().device_name(),
                 dist.accelerator().communication_backend_name(), threads, s.global_batch, s.micro_batch,
                 s.grad_accum, world, s.zero_stage, s.precision, self.run_dir)
        if backend_line is not None:
            log.info("%s", backend_line)
        self.run = run = build_run(cfg, s)
        if cfg.ema is not None:  # after the engine: under ZeRO-3 it averages this rank's partitions
            self.ema = WeightEMA(run.engine.module, cfg.ema)
        if found is not None:
            self._restore(*found)
        try:
            self.folder.prepare(cfg, run.ds_json)
            self.metrics_file = JsonlWriter(self.run_dir / "metrics.jsonl") if dist.is_main_process() else None
        except BaseException:
            self.folder.settle()
            raise
        self._ready = True
        return self

    def eval_module(self) -> torch.nn.Module:
        """What evaluation runs (collective under ZeRO-3): ``BuiltRun.eval_module``."""
        return self._built().eval_module()

    def _rank_state(self) -> dict[str, Any]:
        """What this rank alone holds: its random streams and, under ``attack.reuse``, its perturbations."""
        run = self._built()
        state = checkpoint.capture_rng(run.generator)
        if run.perturbations is not None:
            state[REUSE_KEY] = run.perturbations.state_dict()
        if self.ema is not None and self.ema.sharded:  # ZeRO-3: this rank's EMA shards
            state[EMA_KEY] = self.ema.state_dict()
        return state

    def _load_rank_state(self, rank_state: dict[str, Any]) -> None:
        perturbations = self._built().perturbations
        if perturbations is not None and REUSE_KEY in rank_state:
            perturbations.load_state_dict(rank_state[REUSE_KEY])
        elif perturbations is not None:
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
        run, resharded = self._built(), self.saved_world is not None
        self._rank_ema = None
        client = checkpoint.load(run.engine, root, tag, run.generator, comm=run.comm,
                                 on_rank_state=self._load_rank_state, rank_state=not resharded)
        state = TrainState(epoch=client["epoch"], step_in_epoch=client["step_in_epoch"],
                           global_step=client["global_step"], skipped_steps=client.get("skipped_steps", 0),
                           overflow_steps=client.get("overflow_steps", 0),
                           history=client.get("history", []))
        if client.get("objective_state"):
            run.objective.load_state_dict(client["objective_state"])
        self._restore_ema(tag, client, self._rank_ema)
        if resharded:
            self._reshard(state, client, closed=tag.startswith("epoch"))
        elif state.step_in_epoch >= run.steps_per_epoch:  # the checkpoint closed its epoch
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        self.state = state
        log.info("resumed from %s: epoch %d, step %d of the epoch, global step %d", root / tag, state.epoch + 1,
                 state.step_in_epoch, state.global_step)

    def _reshard(self, state: TrainState, client: dict[str, Any], *, closed: bool) -> None:
        """``--allow-world-size-change``: map the checkpoint's place in its epoch onto this world size, re-seed.

        The epoch's order depends on (seed, epoch) only and the old ranks together took its first G examples
        (G = step x micro batch x old world size), so this run starts the epoch at global example G, rounded
        down to a whole step of the new world (up to one global batch is trained twice). An epoch the
        checkpoint closed is left as it was: the next one starts at its beginning."""
        run, old, world, rank = self._built(), self.saved_world, dist.world_size(), dist.rank()
        old_micro = int((client.get("ds_config") or {}).get("train_micro_batch_size_per_gpu") or run.settings.micro_batch)
        new_batch = run.settings.micro_batch * world
        if closed or state.step_in_epoch * old_micro * old >= run.steps_per_epoch * new_batch:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
            where = f"epoch {state.epoch + 1} starts at its beginning"
        else:
            consumed = state.step_in_epoch * old_micro * old
            state.step_in_epoch = consumed // new_batch
            where = (f"data position re-sharded at global example {consumed} of epoch {state.epoch + 1} (step "
                     f"{state.step_in_epoch} of {run.steps_per_epoch}; {consumed - state.step_in_epoch * new_batch} "
                     "example(s) seen again)")
        checkpoint.reseed_rank(self.cfg.seed, state.global_step, rank, run.generator)
        reuse = "; attack.reuse perturbations start afresh" if run.perturbations is not None else ""
        log.warning("world size %d -> %d: %s; per-rank RNG re-seeded%s; the global step counter continues at %d; "
                    "results will not be bit-identical to an uninterrupted run", old, world, where, reuse,
                    state.global_step)

    # ------------------------------------------------------------------ the run

    def write(self, record: dict[str, Any]) -> None:
        """Append one record to ``metrics.jsonl`` (rank 0; a no-op elsewhere), and its numbers to the JSON's
        monitors (TensorBoard, W&B, CSV, Comet) as ``dat_ds/<kind>/<name>`` at the global step."""
        if self.metrics_file is not None:
            self.metrics_file.write(record)
            master = ds_adapter.monitor(self.engine) if self.run is not None else None
            if master is not None:
                master.write_events(monitor_events(record, self.state.global_step))

    def fit(self, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
        """Run the remaining epochs with ``callbacks`` (then mid-epoch checkpointing); returns the summary."""
        if not self._ready:
            self.setup()
        ema = [self.ema] if self.ema is not None else []  # first: the other callbacks see this step's EMA
        self.callbacks = [*ema, *callbacks, Checkpointing(self.cfg.train.save_every_steps)]
        if self.cfg.train.save_on_signal:  # a signal now ends the step in progress (core.stop), then maybe a save
            self.signal_stop = SignalStop()
            self.callbacks.append(self.signal_stop)
            stop.defer(stop.signal_numbers(self.cfg.train.stop_signals))
        try:
            summary = self._fit()
        except BaseException as e:
            try:
                lost = self.lost_contact(e)  # first: the ranks still in contact check in with each other now
            finally:
                self.folder.settle()
            if lost is not None:
                raise lost from e
            raise
        finally:
            stop.defer(())
        self.folder.ended()  # under --overwrite, stopped early before any checkpoint: still the new run
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
        cfg, state, run = self.cfg, self.state, self._built()
        loader = run.loaders.loader(state.epoch, state.step_in_epoch)
        remaining = (run.steps_per_epoch - state.step_in_epoch) * run.settings.micro_batch * dist.world_size()
        with ui.progress_bar(remaining, f"epoch {state.epoch + 1}/{cfg.train.epochs}") as advance:
            return train_one_epoch(run.engine, run.objective, run.ctx, loader, state, cfg=cfg, metrics=self.write,
                                   on_step=self._on_step, progress=advance, comm=run.comm, watch=run.watch,
                                   max_steps=run.steps_per_epoch)

    def _on_step(self, state: TrainState) -> None:
        for cb in self.callbacks:
            cb.on_step(self, state)

    def end_epoch(self, train_stats: dict[str, float]) -> dict[str, Any]:
        """The epoch's row (callbacks add to it), logged and kept in the history; then the epoch checkpoint."""
        cfg, state, run = self.cfg, self.state, self._built()
        epoch = state.epoch
        log.info("epoch %d/%d: loss %.4f, train acc %.4f (%.1fs)", epoch + 1, cfg.train.epochs,
                 train_stats["train_loss"], train_stats["train_acc"], train_stats["train_seconds"])
        row = {"kind": "epoch", "epoch": epoch + 1, **train_stats, "lr": run.engine.get_lr()[0],
               "optimizer_steps": run.engine.global_steps}  # replays included (Free-AT: m per batch)
        if run.corrupt is not None and self.cfg.data.on_corrupt == "skip":
            row["corrupt_skipped"] = self._report_corrupt(run.corrupt, epoch)
        for cb in self.callbacks:
            cb.on_epoch_end(self, state, row)
        state.history.append(row)
        self.write(row)
        if run.comm is not None:
            from ..optim.onebit import describe_comm

            log.info("epoch %d/%d: %s", epoch + 1, cfg.train.epochs, describe_comm(run.comm))
        state.step_in_epoch = run.steps_per_epoch
        self.save(end_of_epoch=True, best=bool(row.get(BEST_ROW_KEY)))
        state.epoch, state.step_in_epoch = epoch + 1, 0
        return row

    def _report_corrupt(self, corrupt: CorruptImages, epoch: int) -> int:
        """The epoch's corrupt images skipped on all ranks (one all-reduce), logged once; a few of rank 0's named."""
        count, examples = corrupt.epoch_report()
        total = int(dist.all_reduce_sum(torch.tensor([float(count)], dtype=torch.float64)).item())
        if total:
            log.warning("epoch %d/%d: skipped %d corrupt image(s) (data.on_corrupt=skip), each replaced by the next "
                        "one that decodes%s", epoch + 1, self.cfg.train.epochs, total,
                        f"; e.g. {', '.join(examples)}" if examples else "")
        return total

    def save(self, end_of_epoch: bool, best: bool = False) -> Path:
        """Checkpoint the current state (collective). Never after a non-finite step: the check comes first.
        ``best``: the checkpoint becomes the run's ``best`` (``train.keep_best``; pruning keeps it)."""
        run = self._built()
        run.watch.check(self.state)
        state, spec = self.state, run.spec
        client = {**state.to_dict(), "config": self.cfg.to_dict(), "ds_config": run.ds_json,
                  "data_spec": {"in_chans": spec.in_chans, "num_classes": spec.num_classes,
                                "img_size": spec.img_size, "mean": list(spec.mean),
                                "std": list(spec.std), "classes": list(spec.classes)},
                  "objective_state": run.objective.state_dict()}
        if self.ema is not None and not self.ema.sharded:  # ZeRO 0-2: one full copy, saved by rank 0
            client[EMA_KEY] = self.ema.state_dict()
        tag = checkpoint.tag_for(state.epoch, state.global_step, end_of_epoch)
        t_save = time.perf_counter()
        path = checkpoint.save(run.engine, self.ckpt_root, tag, client_state=client,
                               rank_state=self._rank_state(), keep_last=self.cfg.train.keep_last,
                               comm=run.comm, best=best)
        self.last_save_seconds, self.last_saved_step = time.perf_counter() - t_save, state.global_step
        self.folder.settle()  # the new run has a complete checkpoint: under --overwrite it replaces the old one now
        return path

    def finish(self, stopped: str | None, seconds: float) -> dict[str, Any]:
        """``summary.json``, ``curves.png`` and the end-of-run table (rank 0); returns the summary."""
        cfg, history, world = self.cfg, self.state.history, dist.world_size()
        summary = {"stopped": stopped, "name": cfg.name, "run_dir": str(self.run_dir), "world_size": world,
                   "epochs": cfg.train.epochs, "seconds": seconds, "final": history[-1] if history else None,
                   "history": history, "provenance": provenance(world_size=world, hosts=dist.hosts())}
        best_rows = [h for h in history if h.get(BEST_ROW_KEY)]
        if cfg.train.keep_best != "none":  # the checkpoint eval and export default to (Rice et al. 2020)
            best = best_rows[-1] if best_rows else None
            # the tag `best` names (a run resumed from a save made before tags were 1-based keeps its old names)
            summary["best"] = None if best is None else {
                "epoch": best["epoch"], "val_robust_acc": best.get("val_robust_acc"),
                "tag": checkpoint.best_tag(self.ckpt_root) or checkpoint.tag_for(best["epoch"] - 1, 0, True),
                "val_clean_acc": best.get("val_clean_acc")}
        if dist.is_main_process():
            atomic_write_json(self.run_dir / "summary.json", summary)
            log.info("outputs in %s: summary.json, metrics.jsonl, curves.png, checkpoint/", self.run_dir)
            if history:
                plot_history(history, self.run_dir / "curves.png", f"{cfg.name}: test accuracy")
            ema = cfg.ema is not None  # the EMA's accuracies next to the raw weights'
            attacks = {h["robust_attack"] for h in history if h.get("robust_attack")}
            robust = f"robust acc ({', '.join(sorted(attacks))})" if attacks else "robust acc"  # which attack says it
            ui.show(ui.table(
                f"dat-ds {cfg.name}: {cfg.objective.name} / {cfg.attack.name} eps={cfg.attack.eps:.4g} on {world} rank(s)",
                ["epoch", "loss", "train acc", "clean acc", robust,
                 *(["ema clean acc", "ema robust acc"] if ema else []), "seconds"],
                [(h["epoch"], h["train_loss"], h["train_acc"], h.get("clean_acc"), h.get("robust_acc"),
                  *((h.get("ema_clean_acc"), h.get("ema_robust_acc")) if ema else ()),
                  h["train_seconds"] + h.get("eval_seconds", 0.0)) for h in history]))
        dist.barrier()
        return summary
