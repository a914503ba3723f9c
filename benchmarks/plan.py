"""``dat-ds bench plan``: the memory planner (``dat-ds plan``) against measured peak memory on this machine.

For each case (a model, a DeepSpeed JSON, an objective and attack, a micro-batch, one rank) a fresh process
builds the run exactly as ``dat-ds train`` does (``runtime.Trainer`` on the embedded Fashion-MNIST data) and
trains ``--steps`` optimizer steps under ``torch.profiler`` with ``profile_memory``: every allocation and
free of torch's CPU allocator, from before the model is built to the end of the last step. The running sum
of those events is the bytes of live tensors, the quantity ``torch.cuda.max_memory_allocated`` reports on a
GPU and the one the planner predicts (without its CUDA allowance: ``--cpu``); its maximum is the measured
peak. The data set's own tensors (the uint8 images the loader reads from) are subtracted: the planner does
not count the data set, which on a GPU stays in host memory. Resident memory (RSS) is not used: glibc and
oneDNN keep freed memory, so it overstates the peak by a varying amount.

ZeRO-1/2 cases set ``reduce_bucket_size`` to 5e6 elements: DeepSpeed allocates the whole bucket
(default 5e8 elements, 1 GB in bf16) whatever the model's size, which would dwarf the small models
measured here and make any prediction look right; the planner counts the bucket at its configured size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

# name -> (run-config --set overrides, DeepSpeed JSON overrides): one rank each, the embedded data (1 x 28 x 28).
SMALL_BUCKET = "zero_optimization.reduce_bucket_size=5000000"
CASES: dict[str, tuple[list[str], list[str]]] = {
    "small_cnn z0 fp32 DAT-PGD5": (
        ["model.name=small_cnn", "deepspeed_config=zero0_fp32"], ["train_micro_batch_size_per_gpu=128"]),
    "preactresnet18 z0 fp32 DAT-PGD5": (
        ["model.name=preactresnet18", "deepspeed_config=zero0_fp32"], ["train_micro_batch_size_per_gpu=64"]),
    "preactresnet18 z2 fp32 DAT-PGD5": (
        ["model.name=preactresnet18", "deepspeed_config=zero2_fp32"], ["train_micro_batch_size_per_gpu=64",
                                                                         SMALL_BUCKET]),
    "preactresnet18 z2 bf16 DAT-PGD5": (
        ["model.name=preactresnet18", "deepspeed_config=zero2_bf16"], ["train_micro_batch_size_per_gpu=64",
                                                                         SMALL_BUCKET]),
    "preactresnet18 z3 fp32 gathered DAT-PGD5": (
        ["model.name=preactresnet18", "deepspeed_config=zero3_fp32", "attack.zero3_gather=always"],
        ["train_micro_batch_size_per_gpu=64"]),
    "vit_small_patch8 z0 LAMB bf16-autocast Madry-PGD2": (
        ["model.name=vit_small_patch8_224", "deepspeed_config=imagenet_lamb_bs2048_bf16", "objective.name=madry",
         "attack.steps=2"], ["train_batch_size=64"]),
}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", default="all", help="comma list of case names (default: all): " + "; ".join(CASES))
    p.add_argument("--steps", type=int, default=3, help="optimizer steps measured per case (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each measuring process (default 1)")


def _ds_json(ds_name: str, ds_sets: list[str]) -> tuple[str, dict[str, Any]]:
    from dat_ds.runtime import ds_config

    path = str(ds_config.resolve_path(ds_name))
    return path, ds_config.apply_overrides(ds_config.load_ds_json(path), ds_sets)


def _config(sets: list[str], ds_sets: list[str], steps: int, out: str):
    from dat_ds.core.config import build_config
    from dat_ds.launch.validate import recipe_path

    return build_config(recipe_path("demo"), [*sets, "train.epochs=1", f"train.max_steps_per_epoch={steps}",
                                              f"train.log_every={10**9}", f"output_dir={out}", "name=plan",
                                              f"deepspeed_overrides={json.dumps(ds_sets)}"])


def predict(name: str) -> dict[str, Any]:
    """The planner's CPU prediction (no allowance) for one case."""
    from dat_ds.tune.plan import PlanRequest, plan_recipe

    sets, ds_sets = CASES[name]
    cfg = _config(sets, ds_sets, 1, tempfile.gettempdir())
    path, data = _ds_json(cfg.deepspeed_config, ds_sets)
    from dat_ds.runtime import ds_config

    micro = ds_config.prepare(path, 1, data=data).micro_batch
    plan = plan_recipe(PlanRequest(cfg=cfg, ds_path=path, ds_json=data, world=1, capacity=2**60, gpu=False,
                                   micro_batches=(micro,)))
    stage = ds_config.prepare(path, 1, data=data).zero_stage
    row = next(p for p in plan.predictions if p.stage == stage and p.micro == micro)
    return {"micro_batch": micro, "zero": stage, "parts": row.parts, "total_bytes": row.total,
            "footprint": plan.footprint.to_json()}


def _child(name: str, steps: int) -> dict[str, Any]:
    """One measurement, in a fresh process (nothing allocated before it starts counting)."""
    import gc

    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.data import TensorDataset

    from dat_ds.core import dist
    from dat_ds.runtime.callbacks import StopTraining
    from dat_ds.runtime.trainer import Trainer

    sets, ds_sets = CASES[name]
    dist.init_distributed()
    with tempfile.TemporaryDirectory() as out:
        cfg = _config(sets, ds_sets, steps, out)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            trainer = Trainer(cfg)
            trainer.setup()
            try:
                trainer.train_epoch()
            except StopTraining:
                pass
        data_bytes = sum(t.untyped_storage().nbytes() for o in gc.get_objects() if isinstance(o, TensorDataset)
                         for t in o.tensors)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return {"peak_bytes": peak - data_bytes, "end_bytes": live - data_bytes, "data_set_bytes": data_bytes,
            "allocations": len(events), "torch_threads": torch.get_num_threads()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dat_ds.core.errors import ConfigError

    from . import checkout_env, write_result
    from .common import show_table

    names = list(CASES) if args.cases == "all" else [c.strip() for c in args.cases.split(",")]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ConfigError(f"unknown case {unknown[0]!r}; choose from: {'; '.join(CASES)}")
    rows, out = [], []
    for name in names:
        predicted = predict(name)
        cmd = [sys.executable, "-m", "benchmarks.plan", name, str(args.steps)]
        env = {**os.environ, **checkout_env(), "OMP_NUM_THREADS": str(args.threads), "DAT_DS_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
        if proc.returncode != 0:  # recorded, and the other cases still run
            out.append({"case": name, "predicted": predicted, "failed": proc.stderr.strip().splitlines()[-1:]})
            rows.append([name, predicted["micro_batch"], f"{predicted['total_bytes'] / 2**20:.0f}", "failed", "-"])
            continue
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        error = predicted["total_bytes"] / measured["peak_bytes"] - 1
        out.append({"case": name, "predicted": predicted, "measured": measured, "error": error})
        rows.append([name, predicted["micro_batch"], f"{predicted['total_bytes'] / 2**20:.0f}",
                     f"{measured['peak_bytes'] / 2**20:.0f}", f"{error:+.1%}"])
    show_table("dat-ds plan vs measured peak (CPU, 1 rank, live tensor bytes)",
               ["case", "micro-batch", "predicted MiB", "measured MiB", "error"], rows)
    result = {"steps": args.steps, "threads": args.threads, "cases": out,
              "max_abs_error": max((abs(r["error"]) for r in out if "error" in r), default=None)}
    write_result(args.out, "plan", result)
    return result


if __name__ == "__main__":  # the measuring process: python -m benchmarks.plan CASE STEPS
    import torch

    torch.set_num_threads(int(os.environ.get("DAT_DS_THREADS", "1")))
    case, steps_ = sys.argv[1:3]
    print(json.dumps(_child(case, int(steps_))))
