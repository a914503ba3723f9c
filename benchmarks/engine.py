"""``dat-ds bench engine`` and ``launch_worker``, which the multi-rank benchmarks share.

engine: samples/s of our DeepSpeed-engine trainer vs a plain ``torch.nn.parallel.DDP`` loop doing the
same adversarial-training work on 2 ranks (same objective, model, batch, data shard; pass counts are
recorded to show the work is equal). Arms alternate over ``--repeats`` launches.

engine --deepspeed_config A --vs B: two DeepSpeed JSONs side by side in one launch of the tune ranks
(``dat_ds.tune.worker``): the recipe's own step, same world size, A and B alternating for ``--rounds`` rounds;
writes ``engine_vs.json`` with ``ratio`` = samples/s of A / samples/s of B (e.g. a ``dat-ds tune`` result
against the JSON it started from).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

from dat_ds.core.io import save_bar_plot
from dat_ds.launch.launcher import launch

from . import checkout_env, write_result
from .common import show_table

log = logging.getLogger(__name__)


def launch_worker(arm: str, nproc: int, *, steps: int, micro: int, model: str, attack_steps: int,
                  threads_per_rank: int | None = None, extra: list[str] | None = None) -> dict[str, Any]:
    """One ``benchmarks.worker`` run on ``nproc`` ranks (through ``launch()``); returns rank 0's result."""
    with tempfile.TemporaryDirectory(prefix="dat-ds-bench-") as tmp:
        result = Path(tmp) / "result.json"
        argv = ["--arm", arm, "--result", str(result), "--steps", str(steps), "--micro", str(micro),
                "--model", model, "--attack-steps", str(attack_steps), *(extra or [])]
        env = checkout_env({"DAT_DS_THREADS_PER_RANK": str(threads_per_rank)} if threads_per_rank else None)
        launch("benchmarks.worker", argv, nproc=nproc, env=env)  # raises RankFailure naming the failed rank
        return json.loads(result.read_text())


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=30, help="timed steps per launch")
    p.add_argument("--micro", type=int, default=64, help="per-rank batch")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--attack-steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="launches per arm, alternating")
    p.add_argument("--deepspeed_config", "--ds-config", dest="deepspeed_config", default=None,
                   help="with --vs: the JSON A to compare (e.g. a dat-ds tune result)")
    p.add_argument("--vs", default=None, metavar="B", help="compare --deepspeed_config A with JSON B side by side")
    p.add_argument("--recipe", default="demo", help="with --vs: the recipe whose step is timed (default demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="with --vs: run-config overrides of the recipe (repeatable)")
    p.add_argument("--rounds", type=int, default=3, help="with --vs: alternating rounds (A, B) in the one launch")
    p.add_argument("--a-set", dest="a_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="with --vs: run-config overrides for A only (what dat-ds tune prints, e.g. data.num_workers=1)")
    p.add_argument("--vs-nproc", type=int, default=None,
                   help="with --vs: ranks for B when a tuned layout differs (default --nproc); each arm keeps its "
                        "launch, requests alternate")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.vs is not None or args.deepspeed_config is not None:
        return run_vs(args)
    runs: dict[str, list[dict[str, Any]]] = {"deepspeed": [], "ddp": []}
    for _ in range(args.repeats):
        for arm in ("deepspeed", "ddp"):
            runs[arm].append(launch_worker(arm, args.nproc, steps=args.steps, micro=args.micro, model=args.model,
                                           attack_steps=args.attack_steps))
    sps = {arm: statistics.median(r["samples_per_s"] for r in rs) for arm, rs in runs.items()}
    ratio = sps["deepspeed"] / sps["ddp"]
    out = {"nproc": args.nproc, "micro_batch": args.micro, "model": args.model, "attack_steps": args.attack_steps,
           "runs": runs, "samples_per_s": sps, "deepspeed_over_ddp": ratio, "goal": "deepspeed_over_ddp >= 0.95",
           "goal_met": ratio >= 0.95,
           "same_work": all(a["forward_passes_rank0"] == b["forward_passes_rank0"] and
                            a["backward_passes_rank0"] == b["backward_passes_rank0"]
                            for a, b in zip(runs["deepspeed"], runs["ddp"]))}
    write_result(args.out, "engine", out)
    save_bar_plot(Path(args.out) / "engine.png", ["DeepSpeed engine", "plain DDP"], [sps["deepspeed"], sps["ddp"]],
                  ylabel="samples/s", title=f"DAT-PGD-{args.attack_steps} on {args.nproc} ranks")
    show_table(f"bench engine: {args.nproc} ranks, DAT-PGD-{args.attack_steps}, {args.model}",
               ["arm", "samples/s", "fwd passes", "bwd passes"],
               [[arm, sps[arm], runs[arm][0]["forward_passes_rank0"], runs[arm][0]["backward_passes_rank0"]]
                for arm in runs] + [["ratio", ratio, None, None]])
    return out


def check_vs_args(args: argparse.Namespace):
    """Torch-free: both JSONs exist and pass the DeepSpeed-JSON validation at this world size."""
    from dat_ds.core.config import build_config
    from dat_ds.core.errors import ConfigError
    from dat_ds.launch.validate import recipe_path
    from dat_ds.runtime import ds_config

    if args.vs is None or args.deepspeed_config is None:
        raise ConfigError("bench engine compares two JSONs with both --deepspeed_config A and --vs B")
    if args.rounds < 1 or args.steps < 1:
        raise ConfigError(f"--rounds={args.rounds} and --steps={args.steps} must be >= 1")
    recipe = recipe_path(args.recipe)
    build_config(recipe, list(args.overrides) + list(args.a_overrides))
    paths = {}
    for arm, path, world in (("A", args.deepspeed_config, args.nproc), ("B", args.vs, args.vs_nproc or args.nproc)):
        if world < 1:
            raise ConfigError(f"--nproc/--vs-nproc={world} must be >= 1")
        resolved = str(ds_config.resolve_path(path))
        ds_config.prepare(resolved, world, data=ds_config.load_ds_json(resolved))
        paths[arm] = resolved
    return recipe, paths


def run_vs(args: argparse.Namespace) -> dict[str, Any]:
    """A and B alternating in one launch: ``ratio`` = samples/s of A / samples/s of B."""
    import time

    from dat_ds.cli.tune import start_ranks
    from dat_ds.runtime import ds_config
    from dat_ds.tune.measure import STEPS, EngineMeasure
    from dat_ds.tune.search import Point

    recipe, paths = check_vs_args(args)
    jsons = {arm: ds_config.load_ds_json(p) for arm, p in paths.items()}
    runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    nprocs = {"A": args.nproc, "B": args.vs_nproc or args.nproc}
    with tempfile.TemporaryDirectory(prefix="dat-ds-vs-") as tmp:
        def measurer(nproc: int) -> EngineMeasure:
            dummy = Point(micro=1, accum=1, global_batch=nproc, ranks=nproc)
            return EngineMeasure(start_ranks, recipe=recipe, sets=list(args.overrides), hostfile=None,
                                 base_json=jsons["A"], start=dummy, optimizer_family="adamw", lr_rule="none",
                                 deadline=time.time() + 10**6, rss_cap_mb=None, exchange=Path(tmp))

        # one launch per world size, both kept: the idle one waits on a file, the rounds alternate
        measures = {"A": measurer(nprocs["A"])}
        measures["B"] = measures["A"] if nprocs["B"] == nprocs["A"] else measurer(nprocs["B"])
        try:
            for _ in range(args.rounds):
                for arm in ("A", "B"):
                    sets = list(args.a_overrides) if arm == "A" else []
                    r = measures[arm].run_json((nprocs[arm], 0), jsons[arm], sets, steps=args.steps or STEPS)
                    if r.status != "ok":
                        from dat_ds.core.errors import ConfigError

                        raise ConfigError(f"--{'deepspeed_config' if arm == 'A' else 'vs'} {paths[arm]} did not run: "
                                          f"{r.status} {r.message}")
                    runs[arm].append({"samples_per_s": r.samples_per_s, "step_s": r.step_s, "peak_mem_mb": r.peak_mem_mb})
        finally:
            for m in {id(m): m for m in measures.values()}.values():
                m.close()
    sps = {arm: statistics.median(x["samples_per_s"] for x in rs) for arm, rs in runs.items()}
    ratio = sps["A"] / sps["B"]
    out = {"recipe": args.recipe, "nproc": args.nproc, "nproc_B": nprocs["B"], "a_sets": list(args.a_overrides), "steps_per_round": args.steps, "rounds": args.rounds,
           "A": paths["A"], "B": paths["B"], "json_A": jsons["A"], "json_B": jsons["B"], "runs": runs,
           "samples_per_s": sps, "ratio": ratio, "a_not_slower": ratio >= 1.0}
    write_result(args.out, "engine_vs", out)
    save_bar_plot(Path(args.out) / "engine_vs.png", [f"A: {Path(paths['A']).name}", f"B: {Path(paths['B']).name}"],
                  [sps["A"], sps["B"]], ylabel="samples/s", title=f"{args.recipe} on {args.nproc} ranks, alternating")
    show_table(f"bench engine --vs: {args.recipe}, {args.rounds} alternating rounds of {args.steps} steps",
               ["arm", "ranks", "samples/s"],
               [[f"A {paths['A']}", nprocs["A"], sps["A"]], [f"B {paths['B']}", nprocs["B"], sps["B"]],
                ["ratio A / B", None, ratio]])
    return out
