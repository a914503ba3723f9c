"""One benchmark arm on every rank: N timed adversarial-training steps, DeepSpeed engine or plain DDP.

Started by the benchmarks through ``dat_ds.launch.launcher.launch("benchmarks.worker", argv)``. Both
arms run the same objective (``dat_ds.objectives``), data shard, model, optimizer and batch; rank 0
writes ``--result`` (JSON) with samples/s over the timed steps and the pass counts.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

from dat_ds.launch.entry import run_entry

from .common import count_passes


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="one benchmark arm on every rank (started by launch())")
    p.add_argument("--arm", choices=["deepspeed", "ddp"], required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro", type=int, default=64)
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--attack-steps", type=int, default=5)
    p.add_argument("--deepspeed_config", default="ds_configs/zero0_fp32.json")
    p.add_argument("--synthetic", default=None, metavar="CxS",
                   help="random CxSxS images in 10 classes instead of the embedded data, e.g. 3x32 (CIFAR-sized)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the DeepSpeed launcher
    return p


def synthetic_data(shape: str, count: int):
    """``count`` seeded random images of ``shape`` (``CxS``): the same on every rank and in both arms."""
    import torch

    from dat_ds.core.errors import ConfigError
    from dat_ds.data.base import DataSpec

    try:
        chans, size = (int(v) for v in shape.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--synthetic {shape!r} is not CxS, e.g. 3x32") from None
    g = torch.Generator().manual_seed(0)
    images = torch.rand(count, chans, size, size, generator=g)
    labels = torch.randint(0, 10, (count,), generator=g)
    spec = DataSpec(chans, 10, size, (0.5,) * chans, (0.5,) * chans)
    return torch.utils.data.TensorDataset(images, labels), spec


def run_config(args: argparse.Namespace, world: int):
    """The run config of this arm's work (DAT-PGD-k on ``--model``) and its engine settings at ``--micro``."""
    from dat_ds.core.config import build_config
    from dat_ds.runtime import ds_config

    total = args.warmup + args.steps
    cfg = build_config(None, [f"model.name={args.model}", f"attack.steps={args.attack_steps}", "objective.name=dat",
                              f"train.max_steps_per_epoch={total}", f"train.log_every={10**6}",
                              f"deepspeed_config={args.deepspeed_config}"])
    raw = ds_config.load_ds_json(cfg.deepspeed_config)
    raw.pop("train_batch_size", None)
    raw["train_micro_batch_size_per_gpu"] = args.micro
    raw["gradient_accumulation_steps"] = 1
    return cfg, ds_config.prepare(cfg.deepspeed_config, world, data=raw)


def deepspeed_arm(cfg, settings, model, loaders, objective, generator, *, total: int, stamp: Callable[..., None]):
    """Our trainer's loop on the DeepSpeed engine (the run config stops it after ``total`` steps); returns the
    pass counts."""
    from dat_ds.objectives import ObjectiveContext
    from dat_ds.runtime.build import build_engine
    from dat_ds.runtime.loop import TrainState, train_one_epoch

    engine = build_engine(cfg, settings, model, loaders.steps_per_epoch).engine
    ctx = ObjectiveContext(model=engine, module=engine.module, cfg=cfg, generator=generator)
    with count_passes(engine.module) as counter:
        train_one_epoch(engine, objective, ctx, loaders.loader(0), TrainState(), cfg=cfg, on_step=stamp)
    return counter


def ddp_arm(cfg, settings, model, loaders, objective, generator, *, total: int, stamp: Callable[..., None]):
    """``total`` steps of the textbook loop: the same objective under plain ``DistributedDataParallel``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dat_ds.core import dist
    from dat_ds.objectives import ObjectiveContext, plain_step
    from dat_ds.optim import build_optimizer, param_groups

    device = dist.device()
    model = model.to(device)
    ddp = DDP(model) if dist.world_size() > 1 else model
    opt = build_optimizer(settings.optimizer, param_groups(model, 1e-4))
    ctx = ObjectiveContext(model=ddp, module=model, cfg=cfg, generator=generator)
    with count_passes(model) as counter:
        for step, (x, y) in enumerate(loaders.loader(0)):
            if step >= total:
                break
            plain_step(objective, ctx, x.to(device), y.to(device), opt, ddp)
            stamp()
    return counter


def write_arm_result(args: argparse.Namespace, stamps: list[float], counter, *, threads: int) -> None:
    """Rank 0 writes samples/s over the timed steps (the slowest rank's time) and the pass counts."""
    from dat_ds.core import dist
    from dat_ds.core.io import atomic_write_json

    world = dist.world_size()
    timed = stamps[args.warmup - 1:] if args.warmup > 0 else stamps
    seconds = timed[-1] - timed[0]
    n_steps = len(timed) - 1
    samples = n_steps * args.micro * world
    per_rank = dist.all_gather_object({"seconds": seconds, "forward": counter.forward, "backward": counter.backward})
    if dist.is_main_process():
        slowest = max(r["seconds"] for r in per_rank)
        atomic_write_json(args.result, {
            "arm": args.arm, "world_size": world, "threads_per_rank": threads, "micro_batch": args.micro,
            "timed_steps": n_steps, "seconds": slowest, "samples_per_s": samples / slowest,
            "forward_passes_rank0": per_rank[0]["forward"], "backward_passes_rank0": per_rank[0]["backward"],
        })


def main(args: argparse.Namespace) -> int:
    import torch

    from dat_ds.core import dist
    from dat_ds.data import build_dataset
    from dat_ds.data.loaders import build_train_loader
    from dat_ds.models import create_model
    from dat_ds.objectives import build_objective

    dist.setup_logging()
    dist.init_distributed()
    threads = dist.set_threads_per_rank()
    rank, world = dist.rank(), dist.world_size()
    total = args.warmup + args.steps
    cfg, settings = run_config(args, world)
    torch.manual_seed(cfg.seed)
    train_set, spec = synthetic_data(args.synthetic, total * args.micro * world) if args.synthetic else \
        build_dataset(cfg.data, "train")
    model = create_model(cfg.model.name, spec)
    loaders = build_train_loader(cfg, train_set, micro_batch=args.micro, rank=rank, world_size=world)
    objective = build_objective(cfg)
    generator = torch.Generator(device=dist.device()).manual_seed(1 + rank)
    stamps: list[float] = []

    def stamp(*_) -> None:  # kernels are async on GPUs: a step ends when its work has finished
        dist.accelerator().synchronize()
        stamps.append(time.perf_counter())

    arm = deepspeed_arm if args.arm == "deepspeed" else ddp_arm
    counter = arm(cfg, settings, model, loaders, objective, generator, total=total, stamp=stamp)
    write_arm_result(args, stamps, counter, threads=threads)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(lambda: main(get_args_parser().parse_args())))
