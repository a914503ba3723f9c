"""Build everything from the two configs and run the epochs: data, model, engine, checkpoints, eval."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..core import dist, ui
from ..core.config import RunConfig
from ..data import build_dataset
from ..data.loaders import build_train_loader
from ..core.io import JsonlWriter, atomic_write_json, atomic_write_text
from ..models import create_model
from ..objectives import ObjectiveContext, build_objective, prepare_model
from . import checkpoint, ds_config
from .build import build_engine
from ..evaluation.evaluate import AttackSpec, evaluate
from .loop import StopTraining, TrainState, train_one_epoch

log = logging.getLogger("dat_ds.launch.train")


def eval_specs(cfg: RunConfig) -> list[AttackSpec]:
    eps = cfg.eval.eps if cfg.eval.eps is not None else cfg.attack.eps
    return [AttackSpec(attack=cfg.eval.attack, eps=eps, steps=cfg.eval.steps, restarts=cfg.eval.restarts,
                       step_size=cfg.eval.step_size, norm=cfg.attack.norm)]


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.io import save_figure

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax1.set(xlabel="epoch", ylabel="train loss", title="training objective")
    ax2.plot(epochs, [h["clean_acc"] for h in history], marker="o", label="clean")
    rob = [(h["epoch"], h["robust_acc"]) for h in history if h.get("robust_acc") is not None]
    if rob:
        ax2.plot(*zip(*rob), marker="s", label=history[-1].get("robust_attack", "robust"))
    ax2.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1), title=title)
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def run_training(cfg: RunConfig, resume: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    dist.init_distributed()
    threads = dist.set_threads_per_rank()
    rank, world = dist.rank(), dist.world_size()
    settings = ds_config.prepare(cfg.deepspeed_config, world)
    run_dir = cfg.run_dir
    ckpt_root = run_dir / "checkpoint"
    # Resolve and vet the checkpoint before anything is built: a mismatch is one line, not a DeepSpeed crash.
    found = checkpoint.resolve_resume(resume, run_dir) if resume is not None else None
    if found is not None:
        checkpoint.check_compatible(*found, cfg, {**settings.ds_config, "optimizer": settings.optimizer})
    if dist.is_main_process():
        if overwrite and resume is None and run_dir.exists():
            shutil.rmtree(ckpt_root, ignore_errors=True)
            for name in ("metrics.jsonl", "summary.json", "curves.png"):
                (run_dir / name).unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        atomic_write_json(run_dir / "ds_config.json", {**settings.ds_config, "optimizer": settings.optimizer})
    dist.barrier()
    log.info("run %s: %d rank(s) on %s/%s, %d thread(s) per rank, global batch %d (micro %d x accum %d x %d), "
             "ZeRO-%d, %s", cfg.name, world, dist.accelerator().device_name(),
             dist.accelerator().communication_backend_name(), threads, settings.global_batch, settings.micro_batch,
             settings.grad_accum, world, settings.zero_stage, settings.precision)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    train_set, spec = build_dataset(cfg.data, "train")
    test_set, _ = build_dataset(cfg.data, "test")
    model = create_model(cfg.model.name, spec, cfg.model.weights)
    model = prepare_model(cfg, spec, model)  # e.g. acl trains an encoder + projection head
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loaders = build_train_loader(cfg, train_set, micro_batch=settings.micro_batch, rank=rank, world_size=world)
    steps_per_epoch = loaders.steps_per_epoch
    if cfg.train.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    if steps_per_epoch == 0:
        from ..core.errors import ConfigError

        raise ConfigError(f"the training set ({len(train_set)} examples) is smaller than one global batch "
                          f"({settings.global_batch}); lower train_micro_batch_size_per_gpu")
    optimizer_steps_per_epoch = max(1, steps_per_epoch // settings.grad_accum)
    built = build_engine(cfg, settings, model, optimizer_steps_per_epoch)
    engine, scale = built.engine, built.lr_scale
    if settings.compresses:
        from ..optim.onebit import check_compression_plan

        check_compression_plan(engine.optimizer, cfg.train.epochs * optimizer_steps_per_epoch, world)
    if scale != 1.0:
        log.info("LR scaled x%.3g (%s rule, global batch %d / base %d)", scale, cfg.optim.lr_scaling,
                 settings.global_batch, cfg.optim.base_batch_size)
    objective = build_objective(cfg)
    device = dist.device()
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + 7919 * (rank + 1))
    torch.manual_seed(cfg.seed + 1 + rank)  # dropout etc. differ per rank from here on
    attack_module = engine.module
    if settings.precision == "bf16-autocast":  # attacks run in the same precision as the training forward
        from ..models.wrapper import AutocastModule

        attack_module = AutocastModule(engine.module, dist.accelerator().device_name())
    ctx = ObjectiveContext(model=engine, module=attack_module, cfg=cfg, generator=generator)

    state = TrainState()
    if found is not None:
        root, tag = found
        client = checkpoint.load(engine, root, tag, generator)
        state = TrainState(epoch=client["epoch"], step_in_epoch=client["step_in_epoch"],
                           global_step=client["global_step"], skipped_steps=client.get("skipped_steps", 0),
                           history=client.get("history", []))
        if client.get("objective_state"):
            objective.load_state_dict(client["objective_state"])
        if state.step_in_epoch >= steps_per_epoch:  # the checkpoint closed its epoch
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        log.info("resumed from %s: epoch %d, step %d of the epoch, global step %d", root / tag, state.epoch,
                 state.step_in_epoch, state.global_step)

    metrics = JsonlWriter(run_dir / "metrics.jsonl") if dist.is_main_process() else None
    write = (lambda rec: metrics.write(rec)) if metrics is not None else (lambda rec: None)
    specs = eval_specs(cfg)
    client_extra = {"config": cfg.to_dict(), "ds_config": {**settings.ds_config, "optimizer": settings.optimizer},
                    "data_spec": {"in_chans": spec.in_chans, "num_classes": spec.num_classes, "img_size": spec.img_size,
                                  "mean": list(spec.mean), "std": list(spec.std), "classes": list(spec.classes)}}

    def save(end_of_epoch: bool) -> None:
        tag = checkpoint.tag_for(state.epoch, state.global_step, end_of_epoch)
        checkpoint.save(engine, ckpt_root, tag,
                        client_state={**state.to_dict(), **client_extra, "objective_state": objective.state_dict()},
                        rank_state=checkpoint.capture_rng(generator), keep_last=cfg.train.keep_last)

    callbacks = []
    if cfg.monitor.every_steps > 0:
        from ..evaluation.monitor import CatastrophicOverfittingMonitor

        callbacks.append(CatastrophicOverfittingMonitor(cfg, engine, test_set, ckpt_root=ckpt_root, write=write))

    def on_step(s: TrainState) -> None:
        for cb in callbacks:
            cb.on_step(s)
        every = cfg.train.save_every_steps
        if every and s.global_step % every == 0 and s.step_in_epoch < steps_per_epoch:
            save(end_of_epoch=False)

    t_run = time.perf_counter()
    stopped = None
    while state.epoch < cfg.train.epochs:
        epoch = state.epoch
        loader = loaders.loader(epoch, state.step_in_epoch)
        remaining = (steps_per_epoch - state.step_in_epoch) * settings.micro_batch * world
        stopped = None
        with ui.progress_bar(remaining, f"epoch {epoch + 1}/{cfg.train.epochs}") as advance:
            try:
                train_stats = train_one_epoch(engine, objective, ctx, loader, state, cfg=cfg, metrics=write,
                                              on_step=on_step, progress=advance)
            except StopTraining as e:
                stopped = str(e)
                log.warning("training stopped early at epoch %d step %d: %s", epoch + 1, state.step_in_epoch, e)
        if stopped is not None:
            write({"kind": "stopped", "epoch": epoch + 1, "step": state.global_step, "reason": stopped})
            break
        last = epoch + 1 == cfg.train.epochs
        robust = last or (epoch + 1) % cfg.eval.every_epochs == 0
        t_eval = time.perf_counter()
        result = evaluate(engine.module, test_set, specs if robust else [], batch_size=cfg.eval.batch_size,
                          seed=cfg.seed, max_examples=cfg.eval.max_examples, lockstep=settings.zero_stage == 3)
        row = {"kind": "epoch", "epoch": epoch + 1, **train_stats, "clean_acc": result.clean_acc,
               "robust_acc": result.robust_acc(specs[0].label) if robust else None,
               "robust_attack": specs[0].label, "eval_count": result.count,
               "eval_seconds": time.perf_counter() - t_eval, "lr": engine.get_lr()[0]}
        state.history.append(row)
        write(row)
        log.info("epoch %d/%d: loss %.4f, train acc %.4f, clean acc %.4f%s (%.1fs train, %.1fs eval)",
                 epoch + 1, cfg.train.epochs, row["train_loss"], row["train_acc"], row["clean_acc"],
                 f", {specs[0].label} acc {row['robust_acc']:.4f}" if robust else "", row["train_seconds"],
                 row["eval_seconds"])
        if callable(getattr(engine.optimizer, "comm_stats", None)):
            from ..optim.onebit import describe_comm

            log.info("epoch %d/%d: %s", epoch + 1, cfg.train.epochs, describe_comm(engine.optimizer.comm_stats()))
        state.step_in_epoch = steps_per_epoch
        save(end_of_epoch=True)
        state.epoch, state.step_in_epoch = epoch + 1, 0

    summary = {"stopped": stopped, "name": cfg.name, "run_dir": str(run_dir), "world_size": world, "epochs": cfg.train.epochs,
               "seconds": time.perf_counter() - t_run, "final": state.history[-1] if state.history else None,
               "history": state.history}
    if dist.is_main_process():
        atomic_write_json(run_dir / "summary.json", summary)
        if state.history:
            plot_history(state.history, run_dir / "curves.png", f"{cfg.name}: test accuracy")
        ui.show(ui.table(
            f"dat-ds {cfg.name}: {cfg.objective.name} / {cfg.attack.name} eps={cfg.attack.eps:.4g} on {world} rank(s)",
            ["epoch", "loss", "train acc", "clean acc", "robust acc", "seconds"],
            [(h["epoch"], h["train_loss"], h["train_acc"], h["clean_acc"], h["robust_acc"],
              h["train_seconds"] + h["eval_seconds"]) for h in state.history]))
    dist.barrier()
    return summary
