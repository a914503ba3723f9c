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

# Not tests.helpers.REPO: this file is also the ranks' script, run before the checkout is on sys.path.
REPO = Path(__file__).resolve().parents[2]
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
    from dat_ds.evaluation.training import run_training
    from dat_ds.runtime import ds_config

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


def test_static_scheduler_facts_match_the_installed_deepspeed():
    import inspect

    import torch.optim.lr_scheduler as torch_schedules
    from deepspeed.runtime import lr_schedules

    from dat_ds.optim.specs import DEEPSPEED_SCHEDULERS, TORCH_SCHEDULERS

    assert list(DEEPSPEED_SCHEDULERS) == list(lr_schedules.VALID_LR_SCHEDULES)
    for name, params in DEEPSPEED_SCHEDULERS.items():
        signature = inspect.signature(getattr(lr_schedules, name))
        assert params == set(signature.parameters) - {"optimizer"}, name
    for name in TORCH_SCHEDULERS:  # the fallback DeepSpeed's engine takes for names it does not have
        assert inspect.isclass(getattr(torch_schedules, name)) and not hasattr(lr_schedules, name), name


def _prepare(**changes):
    from dat_ds.runtime import ds_config

    data = {"train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, **changes}
    return ds_config.prepare("inline.json", 1, data=data)


@pytest.mark.parametrize("scheduler", [
    {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 10}},
    {"type": "WarmupCosineLR", "params": {"total_num_steps": 100, "warmup_num_steps": 10}},
    {"type": "StepLR", "params": {"step_size": 10, "gamma": 0.5}},
])
def test_schedulers_deepspeed_can_build_are_accepted(scheduler):
    assert _prepare(scheduler=scheduler).has_scheduler


# (changes to a valid JSON, the start of the one-line error: the whole line where it is short)
SEMANTIC_ERRORS = [
    ({"scheduler": {"type": "warmuplr"}}, "unknown scheduler type 'warmuplr' in the DeepSpeed config; choose one of"),
    ({"scheduler": {"type": "LambdaLR"}}, "unknown scheduler type 'LambdaLR'"),  # needs a callable: not from JSON
    ({"scheduler": "WarmupLR"}, 'DeepSpeed config "scheduler" must be an object like'),
    ({"scheduler": {"type": "WarmupLR", "param": {}}},
     "unknown key 'param' in DeepSpeed config \"scheduler\"; allowed: type, params"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": float("inf")}}},
     "scheduler 'WarmupLR' warmup_max_lr=inf must be a finite number"),
    ({"fp16": {"enabled": 1}}, "DeepSpeed config fp16.enabled=1 must be true or false"),
    ({"fp16": {"enabled": True, "min_loss_scale": 0.5}}, "DeepSpeed config fp16.min_loss_scale=0.5 must be an integer"),
    ({"torch_autocast": {"enabled": True, "dtype": 16}}, "DeepSpeed config torch_autocast.dtype=16 must be a string"),
    ({"zero_optimization": None}, "DeepSpeed config zero_optimization=null must be an object"),
    ({"zero_optimization": {"stage": 2.0}}, "DeepSpeed config zero_optimization.stage=2.0 must be an integer"),
    ({"zero_optimization": {"stage": 3, "offload_param": "cpu"}},
     'DeepSpeed config zero_optimization.offload_param="cpu" must be an object or null'),
    ({"zero_optimization": {"stage": 2, "allgather_bucket_size": -1}},
     "DeepSpeed config zero_optimization.allgather_bucket_size=-1 must be >= 0"),
    ({"gradient_clipping": "1.0"}, 'DeepSpeed config gradient_clipping="1.0" must be a number'),
    ({"gradient_clipping": float("inf")}, "DeepSpeed config gradient_clipping=Infinity must be a finite number"),
    ({"wall_clock_breakdown": "false"}, 'DeepSpeed config wall_clock_breakdown="false" must be true or false'),
    ({"csv_monitor": {"enabled": "yes"}}, 'DeepSpeed config csv_monitor.enabled="yes" must be true or false'),
    ({"steps_per_print": 1.5}, "DeepSpeed config steps_per_print=1.5 must be an integer"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": float("nan")}}}, "optimizer 'AdamW' lr=nan must be a finite number"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": True}}}, "optimizer 'AdamW' lr=True must be a number"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9]}}},
     "optimizer 'AdamW' betas=[0.9] must be a list of two numbers, e.g. [0.9, 0.999]"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [-0.1, 0.999]}}},
     "optimizer 'AdamW' betas=[-0.1, 0.999]: each beta must be in [0, 1)"),
    ({"optimizer": {"type": "Lamb", "params": {"lr": 1e-3, "eps": -1e-8}}}, "optimizer 'Lamb' eps=-1e-08 must be > 0"),
    ({"optimizer": {"type": "Lars", "params": {"lr": 0.1, "momentum": -0.5}}},
     "optimizer 'Lars' momentum=-0.5 must be in [0, 1)"),
    ({"optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3, "freeze_step": float("inf")}}},
     "optimizer 'OneBitAdam' freeze_step=inf must be a finite number"),
]


@pytest.mark.parametrize("changes, message", SEMANTIC_ERRORS)
def test_semantic_errors_are_one_line(changes, message):
    from dat_ds.core.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        _prepare(**changes)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_valid_edges_of_the_ranges_are_accepted():
    _prepare(optimizer={"type": "SGD", "params": {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "dampening": 1.0}})
    _prepare(optimizer={"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.0, 0.0], "eps": 1e-12}},
             gradient_clipping=0, zero_optimization={"stage": 3, "offload_param": None, "reduce_bucket_size": 5e8})


def test_precision_check_asks_deepspeeds_accelerator():
    """bf16 runs where DeepSpeed's accelerator says it does (the zero*_bf16 configs train on 2 CPU ranks
    below); fp16 is refused exactly where the accelerator's own ``is_fp16_supported()`` says no."""
    from dat_ds.core import dist
    from dat_ds.core.errors import ConfigError
    from dat_ds.launch.preflight import check_precision

    acc = dist.accelerator()
    for precision, supported in (("bf16", acc.is_bf16_supported()), ("fp16", acc.is_fp16_supported())):
        settings = _prepare(**{precision: {"enabled": True}})
        if supported:
            check_precision(settings, acc)
        else:
            with pytest.raises(ConfigError, match=f"enables {precision}, which DeepSpeed's {acc.device_name()} "
                                                  "accelerator does not support"):
                check_precision(settings, acc)
    if acc.device_name() == "cpu":
        assert acc.is_bf16_supported()  # so the shipped zero*_bf16 configs stay allowed on CPU
    check_precision(_prepare(torch_autocast={"enabled": True, "dtype": "bfloat16"}), acc)  # fp32 weights: always


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


def test_ds_set_changes_the_json_the_run_uses_and_saves(tmp_path):
    """--ds-set optimizer.params.lr=... (a learning rate could not be overridden from the command line)."""
    import yaml

    from dat_ds import cli
    from tests.helpers import tiny_args, write_ds

    argv = ["train", *tiny_args(tmp_path, "lr", write_ds(tmp_path), epochs=1, subset=64),
            "--ds-set", "optimizer.params.lr=0.25", "--ds-set", "gradient_clipping=2"]
    assert cli.main(argv) == 0
    saved = json.loads((tmp_path / "lr" / "ds_config.json").read_text())
    assert saved["optimizer"]["params"]["lr"] == 0.25 and saved["gradient_clipping"] == 2
    cfg = yaml.safe_load((tmp_path / "lr" / "config.yaml").read_text())
    assert cfg["deepspeed_overrides"] == ["optimizer.params.lr=0.25", "gradient_clipping=2"]
    metrics = [json.loads(line) for line in (tmp_path / "lr" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in metrics if r["kind"] == "epoch"] == [0.25]  # constant schedule: the JSON's lr, as changed


def test_ds_set_applies_in_order_and_creates_sections():
    from dat_ds.runtime.ds_config import apply_overrides

    base = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    out = apply_overrides(base, ["optimizer.params.lr=0.1", "optimizer.params.lr=0.2", "bf16.enabled=true"])
    assert out == {"optimizer": {"type": "AdamW", "params": {"lr": 0.2}}, "bf16": {"enabled": True}}
    assert base["optimizer"]["params"]["lr"] == 1e-3  # a copy
