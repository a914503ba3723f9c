"""Compressed communication in training, on 2 gloo ranks.

* the real DeepSpeed engine (``runtime.build.build_engine``) with each compressing setup: DeepSpeed's own
  gradient all-reduce is off (gradients differ across ranks after ``engine.backward``), our optimizer
  keeps the replicas identical, and ``comm_stats`` reports the compression stage and its bytes;
* 1-bit Adam reaches Adam's loss on a convex least-squares problem;
* the whole trainer (``dat-ds train --nproc 2``) with 1-bit Adam logs comm_stage "compressed";
  the other setups and the accuracy comparison against Adam are ``slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dat_ds.core.io import read_jsonl
from tests.helpers import (
    COMPRESSED_SETUPS,
    REPO,
    assert_identical,
    join_two_rank_world,
    model_state,
    spawn_two_ranks,
    tiny_args,
    write_compressed_setup,
)

SETUPS = {**COMPRESSED_SETUPS, "fp32_adamw": ("zero0_fp32.json", {})}  # the control: DeepSpeed all-reduces


def write_setup(name: str, directory: Path, **params) -> Path:
    """Setup ``name`` with optimizer ``params`` changed, as ``directory/<name>.json``."""
    return write_compressed_setup(directory, name, setups=SETUPS, optimizer_params=params)


# ----------------------------------------------------------------------------- 2-rank worker


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    import torch.distributed as tdist

    out = [torch.empty_like(t) for _ in range(tdist.get_world_size())]
    tdist.all_gather(out, t.contiguous())
    return out


def _engine_checks(rank: int, ds_dir: Path) -> dict:
    from dat_ds.comm import CommunicatingOptimizer
    from dat_ds.core.config import build_config
    from dat_ds.data.base import DataSpec
    from dat_ds.models import create_model
    from dat_ds.optim import lr_multiplier
    from dat_ds.runtime import ds_config
    from dat_ds.runtime.build import build_engine

    spec = DataSpec(in_chans=1, num_classes=10, img_size=28, mean=(0.5,), std=(0.5,), classes=tuple(map(str, range(10))))
    results = {}
    for name in SETUPS:
        path = ds_dir / f"{name}.json"
        cfg = build_config(REPO / "recipes" / "demo.yaml", [f"deepspeed_config={path}", "train.epochs=1"])
        settings = ds_config.prepare(path, 2)
        torch.manual_seed(0)
        model = create_model("tiny_cnn", spec)
        built = build_engine(cfg, settings, model, steps_per_epoch=8)
        engine, optimizer = built.engine, built.optimizer
        base_lr = settings.optimizer["params"]["lr"] * built.lr_scale
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        grads_differ, params_equal, lrs = [], [], []
        for _ in range(6):
            x, y = torch.rand(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
            loss = torch.nn.functional.cross_entropy(engine(x), y)
            engine.backward(loss)
            grad = torch.cat([p.grad.reshape(-1) for p in engine.module.parameters()])
            a, b = _gather(grad)
            grads_differ.append(not torch.allclose(a, b))
            engine.step()
            flat = torch.cat([p.detach().reshape(-1) for p in engine.module.parameters()])
            a, b = _gather(flat)
            params_equal.append(bool(torch.equal(a, b)))
            lrs.append(engine.get_lr()[0] / base_lr)
        comm = built.comm
        stats = comm.comm_stats() if comm is not None else None
        # the scheduler (LambdaLR on the object DeepSpeed steps) drives the LR of the parameters that move
        inner_lr = comm.optimizer.param_groups[0]["lr"] if name == "dat_8bit" else None
        results[name] = {"backward_allreduce": bool(engine.enable_backward_allreduce), "grads_differ": grads_differ,
                         "params_equal": params_equal, "stats": stats,
                         "same_optimizer": engine.optimizer is optimizer and (comm is None or optimizer is comm),
                         "protocol": isinstance(comm, CommunicatingOptimizer), "comm_type": type(comm).__name__,
                         "lrs": lrs, "want_lrs": [lr_multiplier(cfg.optim, k, 8, 1) for k in range(1, 7)],
                         "inner_lr_ok": inner_lr is None or inner_lr == engine.get_lr()[0]}
    return results


def _least_squares(rank: int) -> dict:
    """2 ranks, each its own rows of a least-squares problem; Adam (fp32 all-reduce) vs 1-bit Adam."""
    import torch.distributed as tdist

    from dat_ds.optim.onebit import OneBitAdam

    g = torch.Generator().manual_seed(5)
    w_true = torch.randn(40, generator=g)
    a_all = torch.randn(2, 200, 40, generator=g)
    b_all = a_all @ w_true + 0.1 * torch.randn(2, 200, generator=g)
    a, b = a_all[rank], b_all[rank]
    w_best = torch.linalg.lstsq(a_all.reshape(400, 40), b_all.reshape(400)).solution
    best = float(((a_all.reshape(400, 40) @ w_best - b_all.reshape(400)) ** 2).mean())

    def global_loss(w):
        local = ((a @ w - b) ** 2).mean().reshape(1)
        tdist.all_reduce(local)
        return float(local) / 2

    out = {"best": best}
    for name in ("adam", "onebit"):
        w = torch.nn.Parameter(torch.zeros(40))
        if name == "adam":
            opt = torch.optim.Adam([w], lr=0.05)
        else:
            opt = OneBitAdam([w], lr=0.05, freeze_step=80)
        for _ in range(400):
            opt.zero_grad()
            ((a @ w - b) ** 2).mean().backward()
            if name == "adam":  # plain data parallel: average the gradient in fp32
                tdist.all_reduce(w.grad)
                w.grad /= 2
            opt.step()
        out[name] = global_loss(w.detach())
        if name == "onebit":
            out["onebit_stats"] = opt.comm_stats()
    return out


def _worker(rank: int, port: int, out_dir: str, ds_dir: str) -> None:
    join_two_rank_world(rank, port, LOCAL_SIZE="2")
    torch.set_num_threads(1)
    from dat_ds.core import dist

    dist.init_distributed()  # DeepSpeed's accelerator picks the backend (gloo here)
    result = {"least_squares": _least_squares(rank), "engine": _engine_checks(rank, Path(ds_dir))}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    # An orderly teardown: a process that exits while gloo's threads still run can abort (std::terminate).
    import torch.distributed as tdist

    tdist.barrier()
    tdist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("compressed2")
    for name in SETUPS:
        write_setup(name, out)
    spawn_two_ranks(_worker, str(out), str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.dist
@pytest.mark.parametrize("name", [n for n in SETUPS if n != "fp32_adamw"])
def test_deepspeed_does_not_allreduce_when_we_compress(two_ranks, name):
    r = two_ranks[0]["engine"][name]
    # the engine steps our optimizer itself (fp32, ZeRO 0), the one BuiltEngine.comm names
    assert r["same_optimizer"] and r["protocol"]
    if name == "dat_8bit":  # DAT's quantizer: the wrapper around AdamW is what DeepSpeed got
        assert r["comm_type"] == "QuantizedAllReduceOptimizer"
    assert r["lrs"] == pytest.approx(r["want_lrs"]) and r["inner_lr_ok"]
    assert r["backward_allreduce"] is False
    assert all(r["grads_differ"])  # DeepSpeed left each rank's local gradient alone ...
    stats = r["stats"]
    # ... and our compressed all-reduce kept the replicas identical (0/1 Adam: except on its local steps,
    # which skip communication by design; every synchronisation brings them back together)
    assert r["params_equal"][-1]
    assert r["params_equal"].count(False) == stats["local_steps"]
    assert stats["stage"] == "compressed" and stats["world_size"] == 2
    assert stats["bytes_sent"] > 0 and stats["bytes_sent"] < stats["bytes_fp32_equiv"]
    if stats["step_bytes_sent"]:  # 0/1 Adam may end on a local step that sends nothing
        bound = 3.9 if name == "dat_8bit" else 20
        assert stats["step_bytes_fp32_equiv"] / stats["step_bytes_sent"] >= bound, stats
    assert two_ranks[0]["engine"][name]["stats"]["bytes_sent"] == two_ranks[1]["engine"][name]["stats"]["bytes_sent"]


@pytest.mark.dist
def test_control_plain_optimizer_gets_deepspeeds_allreduce(two_ranks):
    r = two_ranks[0]["engine"]["fp32_adamw"]
    assert r["backward_allreduce"] is True and r["stats"] is None and r["comm_type"] == "NoneType"
    assert r["lrs"] == pytest.approx(r["want_lrs"])
    assert not any(r["grads_differ"]) and all(r["params_equal"])


@pytest.mark.dist
def test_zero_one_adam_skips_rounds_with_local_steps(two_ranks):
    stats = two_ranks[0]["engine"]["zero_one_adam"]["stats"]
    assert stats["local_steps"] > 0 and stats["var_frozen"] == 1


@pytest.mark.dist
def test_onebit_adam_matches_adam_on_least_squares(two_ranks):
    r = two_ranks[0]["least_squares"]
    assert r["adam"] < 1.05 * r["best"] + 1e-3  # Adam itself converged
    assert abs(r["onebit"] - r["adam"]) <= 0.05 * r["adam"] + 1e-3, r
    stats = r["onebit_stats"]
    assert stats["stage"] == "compressed" and stats["compressed_steps"] == 320
    assert two_ranks[0]["least_squares"]["onebit"] == two_ranks[1]["least_squares"]["onebit"]


# ----------------------------------------------------------------------------- the whole trainer


def _train(cli, tmp_path: Path, name: str, *extra: str, **params):
    ds = write_setup(name, tmp_path, **params)
    proc = cli("train", "--nproc", "2", "--config", "recipes/demo.yaml", "--deepspeed_config", str(ds),
               "--epochs", "1", "--output-dir", str(tmp_path / "runs"), "--name", name, *extra, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run = tmp_path / "runs" / name
    return proc, read_jsonl(run / "metrics.jsonl"), json.loads((run / "summary.json").read_text())


SMALL = ("--set", "train.max_steps_per_epoch=6", "--set", "train.log_every=2", "--set", "eval.max_examples=64",
         "--set", "eval.steps=2", "--set", "attack.steps=1")


def _check_compressed_run(proc, rows, bound):
    steps = [r for r in rows if r["kind"] == "step"]
    assert steps[0]["comm_world_size"] == 2
    last = steps[-1]
    assert last["comm_stage"] == "compressed" and last["comm_bytes_sent"] > 0
    assert last["comm_bytes_fp32_equiv"] / last["comm_bytes_sent"] > 1
    compressed_steps = [r for r in steps if r["comm_stage"] == "compressed" and r["comm_step_bytes_sent"] > 0]
    assert compressed_steps and all(r["comm_step_ratio"] >= bound for r in compressed_steps)
    log = proc.stdout + proc.stderr
    assert "compressed gradient all-reduce engaged" in log or "compression stage engaged" in log
    assert "communication stage compressed" in log  # the per-epoch trainer line


@pytest.mark.dist
def test_trainer_runs_onebit_adam_on_two_ranks(cli, tmp_path):
    proc, rows, summary = _train(cli, tmp_path, "onebit_adam", *SMALL)
    _check_compressed_run(proc, rows, 20)
    assert summary["final"]["clean_acc"] is not None


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("name,bound", [("zero_one_adam", 20), ("onebit_lamb", 20), ("dat_8bit", 3.9)])
def test_trainer_runs_every_compressed_setup_on_two_ranks(cli, tmp_path, name, bound):
    proc, rows, _ = _train(cli, tmp_path, name, *SMALL)
    _check_compressed_run(proc, rows, bound)


def test_a_run_that_would_never_compress_says_so():
    """freeze_step beyond the run's steps: the trainer warns at start-up that it will never compress."""
    import logging

    from dat_ds.optim.onebit import OneBitAdam, check_compression_plan

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("dat_ds.optim.onebit")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        check_compression_plan(OneBitAdam([torch.nn.Parameter(torch.zeros(3))], freeze_step=100), 78, 2)
        check_compression_plan(OneBitAdam([torch.nn.Parameter(torch.zeros(3))], freeze_step=10), 78, 2)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert records[0].levelno == logging.WARNING and "NEVER compress" in records[0].getMessage()
    assert records[1].levelno == logging.INFO and "then 1-bit" in records[1].getMessage()


# ----------------------------------------------------------------------------- accuracy vs Adam (slow)

# The 0/1 Adam arm refreshes the variance at steps 1, 3, 7, 15 and takes local steps soon after the
# freeze (interval doubling every 2 steps, at most 4): an aggressive setting, to exercise its local steps.
COMPARE = {"fp32_adamw": {}, "onebit_adam": {"freeze_step": 16},
           "zero_one_adam": {"var_freeze_step": 16, "var_update_scaler": 1, "local_step_scaler": 2, "local_step_clipper": 4},
           "onebit_lamb": {"freeze_step": 16}, "dat_8bit": {}}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_one_epoch_accuracy_is_close_to_adam(cli, tmp_path):
    """1 epoch of the demo (DAT-PGD-5, 78 steps at global batch 128) per setup; compression from step 17."""
    acc = {}
    for name, params in COMPARE.items():
        extra = ("--set", "eval.max_examples=1000", "--set", "eval.steps=10")
        _, _, summary = _train(cli, tmp_path, name, *extra, **params)
        acc[name] = summary["final"]["clean_acc"], summary["final"]["robust_acc"]
    (tmp_path / "accuracy.json").write_text(json.dumps(acc))
    print(json.dumps(acc))
    for name, (clean, _) in acc.items():
        assert clean >= acc["fp32_adamw"][0] - 0.05, (name, acc)


# ----------------------------------------------------------------------------- exact resume per rank

# Compression from step 3; 0/1 Adam synchronises at steps 2, 3, 4, 6, 10, 14, 18, so the epoch-1
# checkpoint (step 9 of 18) falls between two synchronisations, with local steps pending on every rank.
RESUME = {"zero_one_adam": {"var_freeze_step": 2, "var_update_scaler": 1, "local_step_scaler": 2,
                            "local_step_clipper": 4},
          "onebit_adam": {"freeze_step": 2}, "onebit_lamb": {"freeze_step": 2}, "dat_8bit": {}}


# 2-3 min each; the default suite resumes every setup bit-identically in
# test_compression_with_accumulation_and_autocast.py
@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("name", list(RESUME))
def test_compressed_run_resumes_bit_identical_on_every_rank(cli, tmp_path, name):
    """2 ranks: 1 epoch, then --resume auto to 2 epochs == 2 epochs uninterrupted, bit for bit.

    DeepSpeed (ZeRO 0) saves rank 0's optimizer state only; rank 1's error feedback (and 0/1 Adam's
    pending local steps, the quantizer's noise counter) must come from rank 1's own checkpoint file.
    """
    ds = write_setup(name, tmp_path, **RESUME[name])
    ds.write_text(json.dumps({**json.loads(ds.read_text()), "train_micro_batch_size_per_gpu": 16}))  # 9 steps/epoch
    runs = tmp_path / "runs"

    def train(run: str, epochs: int, *extra: str):
        cli("train", "--nproc", "2", *tiny_args(runs, run, ds, subset=288, epochs=epochs, save_every=0), *extra,
            check=True, timeout=900)

    train("ref", 2)
    train("resumed", 1)
    first = runs / "resumed" / "checkpoint" / "epoch0001"
    local = [torch.load(first / f"rank_state_{r}.pt", weights_only=True)["optimizer_local"] for r in range(2)]
    if name == "dat_8bit":
        assert local[0]["steps"] == local[1]["steps"] == 9
    else:
        assert [s["rank"] for s in local] == [0, 1]
        assert not torch.equal(local[0]["worker_error"], local[1]["worker_error"])  # really per rank
    if name == "zero_one_adam":
        assert "local" in local[1]  # the checkpoint sits between two synchronisations
        assert not torch.equal(local[0]["local"][0]["param"], local[1]["local"][0]["param"])
    train("resumed", 2, "--resume", "auto")
    assert_identical(model_state(runs / "ref" / "checkpoint" / "epoch0002"), model_state(runs / "resumed" / "checkpoint" / "epoch0002"))
    rows = [r for r in read_jsonl(runs / "resumed" / "metrics.jsonl") if r["kind"] == "step"]
    ref_rows = [r for r in read_jsonl(runs / "ref" / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
