"""Every ``ds_configs/*.json`` validates and starts a DeepSpeed engine for one step on 2 ranks (CPU).

One 2-rank launch runs all the configs one after the other (this file doubles as the rank script,
see ``__main__``): starting DeepSpeed once instead of once per file keeps the suite fast. Each config
then gets its own parametrized test reading that launch's per-config result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))

# Tiny run per config: tiny_cnn on the embedded data, one optimizer step, PGD-1, 32 eval images.
SMOKE_OVERRIDES = ["data.name=fashion-mnist", "model.name=tiny_cnn", "attack.steps=1", "train.epochs=1",
                   "train.log_every=1", "eval.max_examples=32", "eval.steps=1",
                   "eval.batch_size=16", "optim.schedule=constant", "optim.warmup_epochs=0"]


def _rank_main(out_dir: str, paths: list[str]) -> None:
    """Runs inside each rank: one engine per config, results written by rank 0."""
    import torch

    from dat_ds.core import dist
    from dat_ds.core.config import build_config
    from dat_ds.runtime import ds_config
    from dat_ds.evaluation.training import run_training

    results = {}
    for path in paths:
        stem = Path(path).stem
        try:
            # One optimizer step: as many micro-steps as the config accumulates.
            accum = ds_config.prepare(path, dist.world_size()).grad_accum
            cfg = build_config(None, [*SMOKE_OVERRIDES, f"deepspeed_config={path}", f"name={stem}",
                                      f"output_dir={out_dir}", f"train.max_steps_per_epoch={accum}"])
            summary = run_training(cfg)
            final = summary["final"]
            results[stem] = {"ok": True, "train_loss": final["train_loss"], "clean_acc": final["clean_acc"],
                             "robust_acc": final["robust_acc"], "eval_count": final["eval_count"],
                             "micro_steps": accum}
        except Exception as e:  # noqa: BLE001 - recorded per config, reported by its test
            results[stem] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # the next config starts together on both ranks
    if dist.is_main_process():
        (Path(out_dir) / "results.json").write_text(json.dumps(results, indent=1))


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    from dat_ds.core.dist import free_port

    out = tmp_path_factory.mktemp("ds_configs")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           __file__, "--out", str(out), *map(str, CONFIGS)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=900)
    results_file = out / "results.json"
    if not results_file.exists():
        raise AssertionError(f"2-rank launch wrote no results (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out, json.loads(results_file.read_text())


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_ds_config_validates(path):
    from dat_ds.runtime import ds_config

    for world in (1, 2):
        settings = ds_config.prepare(path, world)
        assert settings.micro_batch * settings.grad_accum * world == settings.global_batch
        assert "optimizer" not in settings.ds_config  # we build the optimizer ourselves


@pytest.mark.dist
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_ds_config_trains_one_step_on_two_ranks(path, smoke_results):
    out, results = smoke_results
    res = results[path.stem]
    assert res["ok"], f"{path.name}: {res.get('error')}"
    assert res["train_loss"] == res["train_loss"] and res["train_loss"] > 0  # finite, positive CE
    assert res["eval_count"] == 32
    assert 0.0 <= res["robust_acc"] <= res["clean_acc"] <= 1.0
    run = out / path.stem
    saved = json.loads((run / "ds_config.json").read_text())
    assert saved["train_batch_size"] == saved["train_micro_batch_size_per_gpu"] * saved["gradient_accumulation_steps"] * 2
    assert (run / "checkpoint").is_dir()
    monitor = json.loads(path.read_text()).get("csv_monitor", {})
    if monitor.get("enabled"):
        # DeepSpeed's CSV monitor wrote its per-step files (paths relative to the working directory).
        csvs = list((out / monitor["output_path"] / monitor["job_name"]).glob("*.csv"))
        assert csvs, f"csv_monitor enabled in {path.name} but no CSV files were written"


if __name__ == "__main__":  # rank script for the 2-rank launch above
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    _rank_main(args.out, args.paths)
