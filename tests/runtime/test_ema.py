"""Weight EMA: the maths on a tiny model, the swap for evaluation, exact resume, export and eval.

The maths: ``ema = d * ema + (1 - d) * param`` with ``d = min(decay, (1 + t) / (10 + t))`` during warm-up,
BatchNorm buffers copied. The run-level tests train ``tiny_cnn`` for seconds (``tests.helpers``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dat_ds import cli
from dat_ds.core.config import EMAConfig, build_config
from dat_ds.core.errors import ConfigError
from dat_ds.runtime import checkpoint
from dat_ds.runtime.ema import WeightEMA, assemble, warmup_decay
from tests.helpers import REPO, Crash, assert_identical, crash_after_save, model_state, tiny_args, write_ds

# ----------------------------------------------------------------------------- config


def test_config_section_is_off_unless_given_and_validated():
    assert build_config(None, []).ema is None
    assert build_config(None, ["ema={}"]).ema == EMAConfig(decay=0.995, warmup=True, every=1)
    cfg = build_config(None, ["ema.decay=0.999", "ema.every=4", "ema.warmup=false"])
    assert cfg.ema == EMAConfig(decay=0.999, warmup=False, every=4)
    assert build_config(None, ["ema.decay=0.99", "ema=null"]).ema is None  # a later null turns it off
    for override, message in (("ema.decay=1", "ema.decay=1 must be in (0, 1)"),
                              ("ema.decay=0", "ema.decay=0 must be in (0, 1)"),
                              ("ema.every=0", "ema.every=0 must be >= 1"),
                              ("ema.warmup=10", "'ema.warmup' must be true or false"),
                              ("ema=5", "'ema' must be a mapping of its fields, or null"),
                              ("ema.decy=0.9", "unknown config key 'ema.decy'")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            build_config(None, [override])


# ----------------------------------------------------------------------------- maths


def _tiny_bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def _train_step(model: nn.Module, seed: int) -> None:
    """Stands in for an optimizer step: moves every parameter and BatchNorm's running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    model.train()
    model(torch.randn(8, 3, generator=g).to(next(model.parameters()).dtype))  # updates running_mean/var and num_batches_tracked


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_equals_hand_computed_average_and_copies_batchnorm_buffers(warmup):
    model = _tiny_bn_model()
    decay = 0.9
    ema = WeightEMA(model, EMAConfig(decay=decay, warmup=warmup, every=1))
    expected = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    # the warm-up decays of the first updates, from (1 + t) / (10 + t): 0.1, 2/11, 0.25, then capped at 0.9
    assert [warmup_decay(decay, t, True) for t in (0, 1, 2)] == [0.1, 2 / 11, 0.25]
    assert warmup_decay(decay, 1000, True) == decay and warmup_decay(decay, 0, False) == decay
    for t in range(4):
        _train_step(model, seed=t)
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        for n, p in model.named_parameters():
            expected[n] = d * expected[n] + (1 - d) * p.detach().double()
        ema.update(model)
    assert ema.updates == 4
    for n, value in expected.items():
        assert ema.shadow[n].dtype == torch.float32
        torch.testing.assert_close(ema.shadow[n].double(), value, rtol=0, atol=1e-6)
    bn = model[1]
    assert torch.equal(ema.buffers["1.running_mean"], bn.running_mean)  # copied, not averaged
    assert torch.equal(ema.buffers["1.running_var"], bn.running_var)
    assert int(ema.buffers["1.num_batches_tracked"]) == int(bn.num_batches_tracked) == 4
    # the average is not the last weights (it really averages)
    assert not torch.allclose(ema.shadow["0.weight"], model[0].weight.detach())


def test_on_step_counts_optimizer_steps_every_n():
    """``every`` counts the engine's optimizer steps; a training step without one (mid-accumulation) moves nothing."""
    model = _tiny_bn_model()
    ema = WeightEMA(model, EMAConfig(decay=0.9, warmup=True, every=2))
    engine = SimpleNamespace(global_steps=0, module=model)
    trainer = SimpleNamespace(engine=engine)
    updated_at = []
    for optimizer_steps in (0, 1, 1, 2, 3, 4, 4, 6):  # engine.global_steps after each training step
        engine.global_steps = optimizer_steps
        before = ema.updates
        ema.on_step(trainer, None)
        if ema.updates > before:
            updated_at.append(optimizer_steps)
    assert updated_at == [2, 4, 6]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_applied_swaps_in_the_average_and_restores_raw_weights_bit_exactly(dtype):
    model = _tiny_bn_model().to(dtype)
    ema = WeightEMA(model, EMAConfig(decay=0.5, warmup=False))
    for t in range(3):
        _train_step(model, seed=10 + t)
        ema.update(model)
    _train_step(model, seed=99)  # raw weights and BN statistics move on after the last EMA update
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 3).to(dtype)
    model.eval()
    with ema.applied(model) as swapped:
        assert swapped is model
        for n, p in model.named_parameters():
            assert torch.equal(p, ema.shadow[n].to(dtype))
        assert torch.equal(model[1].running_mean, ema.buffers["1.running_mean"])
        inside = model(x)
    assert_identical(model.state_dict(), raw)
    assert not torch.equal(inside, model(x))
    with pytest.raises(RuntimeError, match="boom"):  # restored also when the evaluation fails
        with ema.applied(model):
            raise RuntimeError("boom")
    assert_identical(model.state_dict(), raw)


def test_state_dict_round_trip_and_zero3_shards_put_together():
    model = _tiny_bn_model()
    ema = WeightEMA(model, EMAConfig(decay=0.9))
    _train_step(model, 1)
    ema.update(model)
    other = WeightEMA(_tiny_bn_model(), EMAConfig(decay=0.9))
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and other.optimizer_step == 0
    assert_identical(other.shadow, ema.shadow)
    assert_identical(assemble([ema.state_dict()]), {**ema.shadow, **ema.buffers})
    # ZeRO-3: 2 ranks hold ceil(5 / 2) = 3 elements each of a 5-element parameter, the last one padded
    full = torch.arange(10.0).reshape(5, 2)[:, 0]
    shards = [{"sharded": True, "shapes": {"w": [5]}, "params": {"w": full[:3].clone()}, "buffers": {}},
              {"sharded": True, "shapes": {"w": [5]}, "params": {"w": torch.cat([full[3:], torch.zeros(1)])},
               "buffers": {}}]
    assert torch.equal(assemble(shards)["w"], full)


# ----------------------------------------------------------------------------- runs (1 rank, seconds)


def _ema_of(tag_dir: Path) -> dict:
    states = torch.load(Path(tag_dir) / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return states["ema"]


@pytest.fixture(scope="module")
def ema_runs(tmp_path_factory):
    """A 1-rank run with ema (2 epochs x 6 steps, saves every 4 steps), a copy crashed after its step-4
    checkpoint and resumed, and a run without ema."""
    folder = tmp_path_factory.mktemp("ema")
    ds = write_ds(folder)
    runs = folder / "runs"
    ema = ("--set", "ema.decay=0.9")
    assert cli.main(["train", *tiny_args(runs, "ref", ds, *ema)]) == 0
    with crash_after_save("step000000004"), pytest.raises(Crash):
        cli.main(["train", *tiny_args(runs, "crashed", ds, *ema)])
    assert cli.main(["train", *tiny_args(runs, "crashed", ds, *ema), "--resume", "auto"]) == 0
    assert cli.main(["train", *tiny_args(runs, "plain", ds, epochs=1)]) == 0
    return runs


def test_every_eval_reports_raw_and_ema_accuracies(ema_runs):
    rows = [json.loads(line) for line in (ema_runs / "ref" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 2
    for r in epochs:
        for key in ("clean_acc", "robust_acc", "ema_clean_acc", "ema_robust_acc"):
            assert 0.0 <= r[key] <= 1.0, (key, r)
        assert r["ema_updates"] == r["optimizer_steps"] == 6 * r["epoch"]
    summary = json.loads((ema_runs / "ref" / "summary.json").read_text())
    assert summary["final"]["ema_clean_acc"] == epochs[-1]["ema_clean_acc"]
    plain = [json.loads(line) for line in (ema_runs / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert all("ema_clean_acc" not in r for r in plain)


def test_crash_then_resume_gives_a_bit_identical_ema(ema_runs):
    ref, crashed = ema_runs / "ref" / "checkpoint", ema_runs / "crashed" / "checkpoint"
    a, b = _ema_of(ref / "epoch0002"), _ema_of(crashed / "epoch0002")
    assert a["updates"] == b["updates"] == 12
    assert_identical(a["params"], b["params"])
    assert_identical(a["buffers"], b["buffers"])
    assert_identical(model_state(ref / "epoch0002"), model_state(crashed / "epoch0002"))
    # the EMA is not the raw weights, and both were saved
    raw = model_state(ref / "epoch0002")
    assert any(not torch.equal(a["params"][k], raw[k].float()) for k in a["params"])


def test_export_picks_the_ema_by_default_and_raw_on_request(ema_runs, tmp_path, capsys):
    from safetensors.torch import load_file

    tag = ema_runs / "ref" / "checkpoint" / "epoch0002"
    saved_ema, raw = _ema_of(tag)["params"], model_state(tag)
    assert cli.main(["export", "--run", str(ema_runs / "ref"), "--out", str(tmp_path / "default.safetensors")]) == 0
    assert "ema weights" in capsys.readouterr().out
    assert cli.main(["export", "--run", str(ema_runs / "ref"), "--out", str(tmp_path / "raw.safetensors"),
                     "--weights", "raw"]) == 0
    default, exported_raw = load_file(tmp_path / "default.safetensors"), load_file(tmp_path / "raw.safetensors")
    for key, value in saved_ema.items():
        short = key.removeprefix("backbone.")
        assert torch.equal(default[short], value)
        assert torch.equal(exported_raw[short], raw[key].float())
    assert json.loads((tmp_path / "default.json").read_text())["weights"] == "ema"
    assert json.loads((tmp_path / "raw.json").read_text())["weights"] == "raw"
    # a run without an EMA: raw by default, and asking for the EMA is one line
    assert cli.main(["export", "--run", str(ema_runs / "plain"), "--out", str(tmp_path / "plain.safetensors")]) == 0
    assert json.loads((tmp_path / "plain.json").read_text())["weights"] == "raw"
    capsys.readouterr()
    assert cli.main(["export", "--run", str(ema_runs / "plain"), "--out", str(tmp_path / "no.safetensors"),
                     "--weights", "ema"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no weight EMA" in err and "--weights raw" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "no.safetensors").exists()


def test_eval_weights_ema_or_raw_of_a_run(ema_runs, tmp_path):
    from dat_ds.evaluation.loading import load_run

    ema, raw = load_run(ema_runs / "ref"), load_run(ema_runs / "ref", weights="raw")
    assert ema.source["which_weights"] == "ema" and raw.source["which_weights"] == "raw"
    for which in ("ema", "raw"):
        out = tmp_path / which
        assert cli.main(["eval", "--run", str(ema_runs / "ref"), "--weights", which, "--attacks", "fgsm",
                         "--max-examples", "16", "--out", str(out)]) == 0
        report = json.loads((out / "eval.json").read_text())
        assert report["source"]["which_weights"] == which
    rows = [json.loads(line) for line in (ema_runs / "ref" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["kind"] == "epoch"][-1]
    # the same 16 test images the training evaluated: the loaded weights give the accuracies it logged
    assert json.loads((tmp_path / "ema" / "eval.json").read_text())["clean_acc"] == last["ema_clean_acc"]
    assert json.loads((tmp_path / "raw" / "eval.json").read_text())["clean_acc"] == last["clean_acc"]


def test_eval_weights_flag_with_run_is_ema_or_raw(tmp_path):
    """Torch-free: with --run, --weights picks the run's weights; a file goes without --run."""
    import argparse

    from dat_ds.cli.args import add_eval_args, eval_request
    from dat_ds.launch.validate import check_eval_request

    parser = argparse.ArgumentParser()
    add_eval_args(parser)
    run = tmp_path / "run"
    run.mkdir()
    for which in ("ema", "raw"):
        check_eval_request(eval_request(parser.parse_args(["--run", str(run), "--weights", which])))
    with pytest.raises(ConfigError, match="with --run, --weights is ema or raw"):
        check_eval_request(eval_request(parser.parse_args(["--run", str(run), "--weights", "w.pt"])))


# ----------------------------------------------------------------------------- 2 ranks, ZeRO-3 (slow)


def _train(runs: Path, name: str, ds: Path, *extra: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "dat_ds.cli", "train", "--nproc", "2",
                           *tiny_args(runs, name, ds, "--set", "ema.decay=0.9", subset=192, epochs=2, save_every=4),
                           *extra], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("gather", ["always", "never"])
def test_zero3_two_ranks_interrupted_and_resumed_gives_a_bit_identical_sharded_ema(tmp_path, gather):
    """2 CPU ranks under ZeRO-3 (6 steps per epoch; small tensors persistent, large ones partitioned), the training
    attacks on weights gathered once per step or on the engine's module (``attack.zero3_gather``): the EMA
    is sharded per rank. A copy of the run cut back to its step-4 checkpoint (a crash right after that
    commit) and resumed ends with EMA shards bit-identical to the uninterrupted run's; the shards put
    together evaluate to the EMA accuracy the training logged."""
    ds = write_ds(tmp_path, zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 100})
    runs = tmp_path / "runs"
    _train(runs, "ref", ds, "--set", f"attack.zero3_gather={gather}")
    root = runs / "ref" / "checkpoint"
    assert [t for _, t in checkpoint.complete_tags(root)] == ["step000000004", "epoch0001", "step000000008",
                                                              "epoch0002"]
    cut = runs / "cut"
    shutil.copytree(runs / "ref", cut)
    for tag in ("epoch0001", "step000000008", "epoch0002"):
        shutil.rmtree(cut / "checkpoint" / tag)
    (cut / "checkpoint" / "latest").write_text("step000000004\n")
    (cut / "metrics.jsonl").unlink()
    _train(runs, "cut", ds, "--set", f"attack.zero3_gather={gather}", "--resume", "auto")
    for r in (0, 1):
        a = torch.load(root / "epoch0002" / f"rank_state_{r}.pt", weights_only=True)["ema"]
        b = torch.load(cut / "checkpoint" / "epoch0002" / f"rank_state_{r}.pt", weights_only=True)["ema"]
        assert a["sharded"] and a["updates"] == b["updates"] == 12
        assert_identical(a["params"], b["params"])
        assert_identical(a["buffers"], b["buffers"])
    shard0 = torch.load(root / "epoch0002" / "rank_state_0.pt", weights_only=True)["ema"]
    assert shard0["params"]["backbone.head.1.weight"].numel() == 128 * 784 // 2  # half of it on this rank

    from dat_ds.data import build_dataset
    from dat_ds.evaluation.evaluate import evaluate
    from dat_ds.evaluation.loading import load_run

    ema, raw = load_run(runs / "ref", weights="ema"), load_run(runs / "ref", weights="raw")
    assert any(not torch.equal(ema.model.state_dict()[k], v) for k, v in raw.model.state_dict().items())
    test_set, _ = build_dataset(ema.cfg.data, "test")
    rows = [json.loads(line) for line in (runs / "ref" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["kind"] == "epoch"][-1]
    assert evaluate(ema.model, test_set, [], batch_size=16, seed=0, max_examples=16).clean_acc == last["ema_clean_acc"]
    assert evaluate(raw.model, test_set, [], batch_size=16, seed=0, max_examples=16).clean_acc == last["clean_acc"]


def test_a_monitor_rollback_takes_the_checkpoints_ema_back_too(tmp_path, dat_ds_log):
    """The overfitting monitor's rollback reloads weights and optimizer; the EMA must follow, or it would keep
    averaging the weights the rollback discarded."""
    from dat_ds.runtime.ema import STATE_KEY
    from dat_ds.runtime.trainer import Trainer

    cfg = EMAConfig(decay=0.9, warmup=False, every=1)
    model = _tiny_bn_model()
    saved = WeightEMA(model, cfg)  # the EMA at the checkpoint
    _train_step(model, seed=1)
    live = WeightEMA(model, cfg)  # ... and after the steps the rollback discards
    for _ in range(3):
        _train_step(model, seed=2)
        live.update(model)
    trainer = SimpleNamespace(ema=live, engine=SimpleNamespace(module=model), cfg=SimpleNamespace(ema=cfg))
    trainer._restore_ema = lambda *a: Trainer._restore_ema(trainer, *a)  # the one EMA restore, shared with resume
    Trainer.reload_ema(trainer, tmp_path, "step000000010", {STATE_KEY: saved.state_dict()})
    for name, value in saved.shadow.items():
        assert torch.equal(trainer.ema.shadow[name], value)
    assert trainer.ema.updates == saved.updates == 0
    Trainer.reload_ema(trainer, tmp_path, "step000000010", {})  # a checkpoint of a run without ema
    assert trainer.ema is not live and "has no weight EMA; the EMA starts again" in dat_ds_log.text
