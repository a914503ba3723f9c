"""``dat-ds bench scaling``: samples/s on 1 vs 2 ranks, one thread per rank (one core each).

Weak scaling keeps the per-rank batch (the DAT setting: every rank attacks its own shard); strong
scaling keeps the global batch and splits it. Ideal is 2.0x for weak scaling.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dat_ds.core.io import save_bar_plot

from . import write_result
from .common import show_table
from .engine import launch_worker


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--micro", type=int, default=64, help="per-rank batch for weak scaling")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--attack-steps", type=int, default=5)


def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.max_ranks
    kw = dict(steps=args.steps, model=args.model, attack_steps=args.attack_steps, threads_per_rank=1)
    one = launch_worker("deepspeed", 1, micro=args.micro, **kw)
    weak = launch_worker("deepspeed", n, micro=args.micro, **kw)
    strong_one = launch_worker("deepspeed", 1, micro=args.micro * n, **kw)
    strong = launch_worker("deepspeed", n, micro=args.micro, **kw)
    out = {
        "threads_per_rank": 1, "model": args.model, "attack_steps": args.attack_steps,
        "weak": {"per_rank_batch": args.micro, "samples_per_s_1": one["samples_per_s"],
                 f"samples_per_s_{n}": weak["samples_per_s"], "speedup": weak["samples_per_s"] / one["samples_per_s"]},
        "strong": {"global_batch": args.micro * n, "samples_per_s_1": strong_one["samples_per_s"],
                   f"samples_per_s_{n}": strong["samples_per_s"],
                   "speedup": strong["samples_per_s"] / strong_one["samples_per_s"]},
        "goal": f"weak speedup >= {0.9 * n:.1f}",
    }
    out["goal_met"] = out["weak"]["speedup"] >= 0.9 * n
    write_result(args.out, "scaling", out)
    save_bar_plot(Path(args.out) / "scaling.png", ["weak", "strong"], [out["weak"]["speedup"], out["strong"]["speedup"]],
                  ylabel=f"speed-up 1 -> {n} ranks", title="scaling (1 thread per rank)", hline=float(n),
                  hline_label="ideal")
    show_table(f"bench scaling: 1 -> {n} ranks, 1 thread each", ["case", "batch", "1 rank samples/s",
                                                                 f"{n} ranks samples/s", "speed-up"],
               [["weak", f"{args.micro}/rank", one["samples_per_s"], weak["samples_per_s"], out["weak"]["speedup"]],
                ["strong", f"{args.micro * n} global", strong_one["samples_per_s"], strong["samples_per_s"],
                 out["strong"]["speedup"]]])
    return out
