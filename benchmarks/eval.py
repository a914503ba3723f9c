"""``dat-ds bench eval``: PGD-20 evaluation throughput on 1 vs N ranks (goal: >= 0.9 N x).

Runs the ``dat-ds eval`` ranks (``dat_ds.evaluate`` through ``launch()``, one thread per rank so each
rank owns one core) on
the same examples, and reads the attack time each run reports in ``eval.json`` (the slowest rank's,
process start-up excluded). Also checks that both runs agree example by example.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from dat_ds.launch.launcher import launch

from . import write_result


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-ranks", type=int, default=2)
    p.add_argument("--examples", type=int, default=1024, help="test examples attacked")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="PGD steps")
    p.add_argument("--eps", default="0.1")
    p.add_argument("--model", default="small_cnn", help="model for a random-weights run (ignored with --run)")
    p.add_argument("--run", default=None, help="evaluate this run folder's checkpoint instead of random weights")


def _eval_once(nproc: int, source: list[str], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    argv = [*source, "--attacks", "pgd", "--eps", str(args.eps), "--steps", str(args.steps), "--max-examples",
            str(args.examples), "--batch-size", str(args.batch_size), "--threads", "1", "--out", str(out)]
    launch("dat_ds.evaluate", argv, nproc=nproc)  # the `dat-ds eval` ranks; raises RankFailure on failure
    return json.loads((out / "eval.json").read_text())


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dat_ds.core.config import DataConfig
    from dat_ds.data import build_dataset
    from dat_ds.models import create_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if args.run:
            source = ["--run", args.run]
        else:
            import torch
            from safetensors.torch import save_file

            torch.manual_seed(0)
            _, spec = build_dataset(DataConfig(), "test")
            backbone = create_model(args.model, spec).backbone
            weights = tmp_path / "weights.safetensors"
            save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(weights))
            source = ["--weights", str(weights), "--model", args.model, "--data", "fashion-mnist"]
        reports = {n: _eval_once(n, source, args, tmp_path / f"np{n}") for n in sorted({1, args.max_ranks})}
    rows = {}
    for n, rep in reports.items():
        r = rep["results"][0]
        rows[n] = {"ranks": n, "examples": r["count"], "attack_seconds": r["seconds"],
                   "examples_per_s": r["count"] / max(r["seconds"], 1e-9), "robust_acc": r["robust_acc"]}
    n = args.max_ranks
    speedup = rows[n]["examples_per_s"] / rows[1]["examples_per_s"]
    identical = reports[1]["results"][0]["correct"] == reports[n]["results"][0]["correct"]
    out = {"attack": reports[1]["results"][0]["label"], "threads_per_rank": 1, "runs": list(rows.values()),
           "speedup": speedup, "goal": f"speedup >= {0.9 * n:.1f}", "goal_met": speedup >= 0.9 * n,
           "per_example_identical": identical}
    path = write_result(args.out, "eval", out)
    from dat_ds.core import ui

    ui.show(ui.table(f"bench eval: {out['attack']} on {rows[1]['examples']} examples, 1 thread per rank",
                     ["ranks", "attack seconds", "examples/s", "robust acc"],
                     [(r["ranks"], r["attack_seconds"], r["examples_per_s"], r["robust_acc"]) for r in rows.values()]))
    ui.console.print(f"speed-up 1 -> {n} ranks: {speedup:.2f}x (goal >= {0.9 * n:.1f}x); "
                     f"per-example results identical: {identical}; wrote {path}")
    return out
