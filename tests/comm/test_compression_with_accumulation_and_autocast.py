"""Compressed communication beyond DeepSpeed's limits (issue 16, item 3), on 2 gloo ranks.

DeepSpeed's own 1-bit optimizers refused gradient accumulation, ZeRO and bf16 (DeepSpeed issues 5046 and
5708). Ours run with ``gradient_accumulation_steps`` > 1 and with ``torch_autocast`` bf16:

* DeepSpeed calls the client optimizer's ``step()`` only at the accumulation boundary, and with its
  backward all-reduce off the micro-batches' gradients add up locally, so each optimizer step
  communicates once: the real engine with accumulation 2 sends exactly what accumulation 1 on the doubled
  micro-batch sends, lands on the same weights, and nothing goes on the wire between two boundaries;
* the whole trainer (torch_autocast bf16 + accumulation 2) compresses from the optimizer step after
  ``freeze_step``, counts compressed steps and bytes per optimizer step, and a run resumed from a
  mid-epoch checkpoint ends bit-identical to an uninterrupted one (every rank's ``launch.train.main``,
  in the two test processes; the same through ``dat-ds train --nproc 2`` is in the slow set);
* what stays refused (DeepSpeed's bf16/fp16 engine, ZeRO, torch_autocast float16) is one line that says
  why and what to use instead.

One 2-rank start-up (``two_ranks``) serves every distributed check here: about a minute on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dat_ds.core.errors import ConfigError
from dat_ds.core.io import read_jsonl
from dat_ds.runtime import ds_config
from tests.helpers import (
    COMPRESSED_SETUPS,
    REPO,
    assert_identical,
    compressed_setup,
    join_two_rank_world,
    model_state,
    spawn_two_ranks,
    tiny_args,
    write_compressed_setup,
)

SETUPS = COMPRESSED_SETUPS
WARMUP = {"onebit_adam": 2, "onebit_lamb": 2, "dat_8bit": 0}  # optimizer steps before the first compressed one
AUTOCAST = {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}


# ----------------------------------------------------------------------------- start-up validation


@pytest.mark.parametrize("name", SETUPS)
@pytest.mark.parametrize("changes", [{"gradient_accumulation_steps": 2}, AUTOCAST,
                                     {"gradient_accumulation_steps": 4, **AUTOCAST}],
                         ids=["accum2", "autocast-bf16", "accum4-autocast-bf16"])
def test_accumulation_and_autocast_are_accepted(name, changes):
    settings = ds_config.prepare("inline.json", 2, data=compressed_setup(name, train_micro_batch_size_per_gpu=8, **changes))
    assert settings.grad_accum == changes.get("gradient_accumulation_steps", 1)
    assert settings.global_batch == 8 * settings.grad_accum * 2
    assert settings.precision == ("bf16-autocast" if "torch_autocast" in changes else "fp32")
    assert settings.compresses is (name != "dat_8bit")
    assert (settings.gradient_compression is not None) is (name == "dat_8bit")


def _refusal(name: str, **changes) -> str:
    with pytest.raises(ConfigError) as e:
        ds_config.prepare("inline.json", 2, data=compressed_setup(name, **changes))
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", SETUPS)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_deepspeeds_16bit_engine_is_refused_saying_why_and_what_instead(name, precision):
    message = _refusal(name, **{precision: {"enabled": True}})
    assert f"cannot run with {precision}" in message
    assert "steps its own optimizer wrapper" in message and "fp32 master copies" in message  # why
    assert '"torch_autocast": {"enabled": true, "dtype": "bfloat16"}' in message  # what instead


@pytest.mark.parametrize("name", SETUPS)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_is_refused_because_it_reduces_inside_its_own_optimizer(name, stage):
    message = _refusal(name, zero_optimization={"stage": stage})
    assert f"ZeRO stage {stage}" in message
    assert "reduce-scatters flat gradient buckets inside its own optimizer" in message
    assert "no communication hook" in message and "zero_optimization.stage 0" in message


@pytest.mark.parametrize("name", SETUPS)
def test_torch_autocast_float16_is_refused_its_gradscaler_skips_per_rank(name):
    message = _refusal(name, torch_autocast={"enabled": True, "dtype": "float16"})
    assert "torch_autocast float16" in message and "GradScaler" in message and "hang" in message
    assert '"dtype": "bfloat16"' in message


def test_the_quantizer_on_a_compressing_optimizer_is_still_refused():
    data = compressed_setup("onebit_adam", gradient_compression={"type": "dat_quantizer", "bits": 8})
    with pytest.raises(ConfigError, match="already compresses its own communication; use a plain optimizer"):
        ds_config.prepare("inline.json", 2, data=data)


# ----------------------------------------------------------------------------- the real engine, 2 ranks

ENGINE_STEPS = 6  # optimizer steps per arm
ARMS = {"accum1": {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1},
        "accum2": {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2},
        "accum2-autocast": {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, **AUTOCAST}}


def _mlp() -> torch.nn.Module:
    """No batch norm: a batch of 16 and two of 8 give the same mean gradient, up to float rounding."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10))


def _count_rounds(backend) -> list[int]:
    """Wrap this rank's transport: one entry per all-to-all (compressed) or fp32 all-reduce (warm-up)."""
    rounds: list[int] = []
    for method in ("all_to_all", "all_reduce_mean_"):
        real = getattr(backend, method)

        def counted(*args, _real=real, **kwargs):
            rounds.append(1)
            return _real(*args, **kwargs)

        setattr(backend, method, counted)
    return rounds


def _run_arm(cfg, path: Path, rank: int) -> dict:
    import torch.distributed as tdist

    from dat_ds.runtime.build import build_engine

    settings = ds_config.prepare(path, 2)
    accum, micro = settings.grad_accum, settings.micro_batch
    built = build_engine(cfg, settings, _mlp(), steps_per_epoch=ENGINE_STEPS * accum)
    engine, comm = built.engine, built.comm
    rounds = _count_rounds(comm.backend)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data, the same in every arm
    per_engine_step, losses, boundaries = [], [], []
    for _ in range(ENGINE_STEPS):
        x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        for k in range(accum):
            part = slice(k * micro, (k + 1) * micro)
            loss = torch.nn.functional.cross_entropy(engine(x[part]), y[part])
            engine.backward(loss)
            boundaries.append(bool(engine.is_gradient_accumulation_boundary()))
            before = len(rounds)
            engine.step()
            per_engine_step.append(len(rounds) - before)
            losses.append(float(loss.detach()))
    flat = torch.cat([p.detach().reshape(-1) for p in engine.module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(2)]
    tdist.all_gather(gathered, flat)
    stats = comm.comm_stats()
    return {"per_engine_step": per_engine_step, "boundaries": boundaries, "losses": losses,
            "global_steps": engine.global_steps, "stats": stats, "params": flat.tolist(),
            "replicas_equal": bool(torch.equal(gathered[0], gathered[1])),
            "start": torch.cat([p.detach().reshape(-1) for p in _mlp().parameters()]).tolist()}


def _engine_checks(rank: int, folder: Path) -> None:
    from dat_ds.core.config import build_config

    results = {}
    for name in SETUPS:
        for arm in ARMS:
            path = folder / f"{name}-{arm}.json"
            cfg = build_config(REPO / "recipes" / "demo.yaml", [f"deepspeed_config={path}", "train.epochs=1",
                                                               "optim.schedule=constant", "optim.warmup_epochs=0"])
            results[f"{name}/{arm}"] = _run_arm(cfg, path, rank)
    (folder / f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def engine_runs(two_ranks: Path) -> list[dict]:
    return [json.loads((two_ranks / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.dist
@pytest.mark.parametrize("name", SETUPS)
def test_accumulation_communicates_once_per_optimizer_step(engine_runs, name):
    one, two = engine_runs[0][f"{name}/accum1"], engine_runs[0][f"{name}/accum2"]
    assert two["boundaries"] == [False, True] * ENGINE_STEPS
    assert two["global_steps"] == one["global_steps"] == ENGINE_STEPS
    # Nothing goes on the wire at a micro-step; at a boundary one round (0/1 Adam: none on its local steps).
    assert two["per_engine_step"][0::2] == [0] * ENGINE_STEPS
    assert two["per_engine_step"][1::2] == one["per_engine_step"]
    rounds = ENGINE_STEPS - one["stats"]["local_steps"]
    assert sum(one["per_engine_step"]) == rounds and set(one["per_engine_step"]) <= {0, 1}
    # Stage, compressed steps, local steps and bytes count optimizer steps: the same with accumulation.
    assert two["stats"] == one["stats"]
    stats = one["stats"]
    assert stats["stage"] == "compressed" and stats["world_size"] == 2
    if name in WARMUP:
        assert stats["compressed_steps"] == ENGINE_STEPS - WARMUP[name]
    else:  # 0/1 Adam: fp32 variance refreshes, 1-bit synchronisations and local steps
        assert stats["local_steps"] > 0 and stats["compressed_steps"] > 0
    assert stats["bytes_fp32_equiv"] == ENGINE_STEPS * stats["step_bytes_fp32_equiv"]  # one reference a step


@pytest.mark.dist
@pytest.mark.parametrize("name", SETUPS)
def test_accumulation_lands_where_the_doubled_micro_batch_does(engine_runs, name):
    """Two micro-batches of 8 accumulated == one of 16: the same mean gradient reaches our all-reduce."""
    for rank in range(2):
        one, two = (torch.tensor(engine_runs[rank][f"{name}/{arm}"]["params"]) for arm in ("accum1", "accum2"))
        start = torch.tensor(engine_runs[rank][f"{name}/accum1"]["start"])
        moved = (one - start).abs().max()
        assert moved > 1e-3
        assert (two - one).abs().max() <= 1e-4 * moved, (name, rank, float((two - one).abs().max()), float(moved))
    for arm in ("accum1", "accum2"):  # the compressed all-reduce kept the replicas identical (0/1 Adam: at a sync)
        r = engine_runs[0][f"{name}/{arm}"]
        assert r["replicas_equal"] or r["stats"]["local_steps"] > 0


@pytest.mark.dist
@pytest.mark.parametrize("name", SETUPS)
def test_torch_autocast_bf16_with_accumulation_trains_compressed(engine_runs, name):
    r, exact = engine_runs[0][f"{name}/accum2-autocast"], engine_runs[0][f"{name}/accum2"]
    assert all(torch.isfinite(torch.tensor(r["losses"])))
    assert r["per_engine_step"] == exact["per_engine_step"]  # the same communication pattern as fp32
    assert r["stats"]["stage"] == "compressed"
    assert r["stats"]["compressed_steps"] == exact["stats"]["compressed_steps"]
    assert r["stats"]["bytes_sent"] == exact["stats"]["bytes_sent"]
    assert r["replicas_equal"] or r["stats"]["local_steps"] > 0
    # bf16 compute, fp32 weights: close to the fp32 run, not equal to it
    a, b = torch.tensor(r["params"]), torch.tensor(exact["params"])
    assert not torch.equal(a, b) and (a - b).abs().max() < 0.05


# ----------------------------------------------------------------------------- the whole trainer

# 96 images on 2 ranks, micro-batch 8, accumulation 2: 6 loader batches = 3 optimizer steps per epoch;
# 12 batches and 6 optimizer steps in 2 epochs, a mid-epoch checkpoint after batch 8 (optimizer step 4,
# inside the compressed stage).
TRAINER = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, **AUTOCAST}
ACCUM, BATCHES, SAVE_AT = 2, 12, 8


def _run_args(runs: Path, name: str, ds: Path, *extra: str) -> list[str]:
    return [*tiny_args(runs, name, ds, subset=96, epochs=2, save_every=SAVE_AT), *extra]


def _trainer_runs(rank: int, folder: Path) -> None:
    """Both ranks of each run in the two test processes: ``dat_ds.launch.train.main``, what every rank of
    ``dat-ds train --nproc 2`` runs. Per setup: 2 epochs, then a run resumed from its mid-epoch checkpoint."""
    import logging

    from dat_ds.cli.args import train_args_parser, train_request
    from dat_ds.core import dist
    from dat_ds.launch import train

    dist.setup_logging()
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logging.getLogger("dat_ds").addHandler(Keep())
    for name in SETUPS:
        runs, ds = folder / name, folder / f"{name}.json"
        lines.clear()
        train.main(train_request(train_args_parser().parse_args(_run_args(runs, "ref", ds))))
        if rank == 0:
            (runs / "ref.log").write_text("\n".join(lines))
        tag = runs / "ref" / "checkpoint" / f"step{SAVE_AT:09d}"
        train.main(train_request(train_args_parser().parse_args(_run_args(runs, "resumed", ds, "--resume", str(tag)))))


def _worker(rank: int, port: int, folder: str) -> None:
    join_two_rank_world(rank, port, LOCAL_SIZE="2")
    torch.set_num_threads(1)
    import torch.distributed as tdist

    from dat_ds.core import dist

    dist.init_distributed()
    _engine_checks(rank, Path(folder))
    _trainer_runs(rank, Path(folder))
    tdist.barrier()  # an orderly teardown: gloo's threads must not outlive the process
    tdist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """One 2-rank start-up for every check of this file: the engine arms, then the trainer runs."""
    folder = tmp_path_factory.mktemp("limits")
    for name in SETUPS:
        for arm, changes in ARMS.items():
            write_compressed_setup(folder, name, stem=f"{name}-{arm}", **changes)
        write_compressed_setup(folder, name, **TRAINER)
    spawn_two_ranks(_worker, str(folder))
    return folder


@pytest.fixture(scope="module")
def trainer_runs(two_ranks: Path) -> Path:
    return two_ranks


def _check_trains_per_optimizer_step(name: str, log: str, rows: list[dict]) -> None:
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == list(range(1, BATCHES + 1))
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in steps])))
    assert [r["optimizer_steps"] for r in epochs] == [BATCHES // ACCUM // 2, BATCHES // ACCUM]
    assert "global batch 32 (micro 8 x accum 2 x 2), ZeRO-0, bf16-autocast" in log
    assert f"{BATCHES // ACCUM} optimizer steps" in log  # StepPlan: the compression plan counts optimizer steps
    per_step_fp32 = steps[-1]["comm_step_bytes_fp32_equiv"]
    assert per_step_fp32 > 0
    for r in steps:  # every record: compressed steps and bytes follow the optimizer steps, not the batches
        optimizer_steps = r["step"] // ACCUM
        if name in WARMUP:
            assert r["comm_compressed_steps"] == max(0, optimizer_steps - WARMUP[name]), r
        assert r["comm_bytes_fp32_equiv"] == optimizer_steps * per_step_fp32, r
    last = steps[-1]
    assert last["comm_stage"] == "compressed" and last["comm_world_size"] == 2
    assert 0 < last["comm_bytes_sent"] < last["comm_bytes_fp32_equiv"]
    if name in WARMUP:
        assert last["comm_compressed_steps"] == BATCHES // ACCUM - WARMUP[name]
        first = WARMUP[name] + 1
        assert (f"compression stage engaged at step {first} " in log
                or f"compressed gradient all-reduce engaged at step {first} " in log), log
    else:  # 0/1 Adam: local steps and 1-bit synchronisations, both counted in optimizer steps
        assert 0 < last["comm_local_steps"] and 0 < last["comm_compressed_steps"]
        assert last["comm_local_steps"] + last["comm_compressed_steps"] <= BATCHES // ACCUM
    if name in ("onebit_adam", "onebit_lamb"):
        assert f"fp32 warm-up for {WARMUP[name]} of {BATCHES // ACCUM} steps" in log
    assert "NEVER compress" not in log


def _check_resumed_exactly(name: str, runs: Path) -> None:
    tag = runs / "ref" / "checkpoint" / f"step{SAVE_AT:09d}"
    local = [torch.load(tag / f"rank_state_{r}.pt", weights_only=True)["optimizer_local"] for r in range(2)]
    if name == "dat_8bit":  # the noise counter: one quantized all-reduce per optimizer step
        assert local[0]["steps"] == local[1]["steps"] == SAVE_AT // ACCUM
    else:
        assert not torch.equal(local[0]["worker_error"], local[1]["worker_error"])  # each rank its own
    assert_identical(model_state(runs / "ref" / "checkpoint" / "epoch0002"),
                     model_state(runs / "resumed" / "checkpoint" / "epoch0002"))
    ref = [r for r in read_jsonl(runs / "ref" / "metrics.jsonl") if r["kind"] == "step"]
    resumed = {r["step"]: r for r in read_jsonl(runs / "resumed" / "metrics.jsonl") if r["kind"] == "step"}
    assert set(range(SAVE_AT + 1, BATCHES + 1)) <= set(resumed)
    for r in ref[SAVE_AT:]:
        for key in ("loss", "comm_compressed_steps", "comm_local_steps", "comm_bytes_sent"):
            assert resumed[r["step"]][key] == r[key], (key, r["step"])


@pytest.mark.dist
@pytest.mark.parametrize("name", SETUPS)
def test_trainer_with_autocast_and_accumulation_compresses_per_optimizer_step(trainer_runs, name):
    runs = trainer_runs / name
    _check_trains_per_optimizer_step(name, (runs / "ref.log").read_text(), read_jsonl(runs / "ref" / "metrics.jsonl"))


@pytest.mark.dist
@pytest.mark.parametrize("name", SETUPS)
def test_trainer_with_autocast_and_accumulation_resumes_bit_identical(trainer_runs, name):
    """Stopped after the mid-epoch checkpoint (optimizer step 4, compressed stage) and resumed with --resume."""
    _check_resumed_exactly(name, trainer_runs / name)


@pytest.mark.dist
@pytest.mark.slow
def test_dat_ds_train_command_with_autocast_and_accumulation(cli, tmp_path):
    """The same through ``dat-ds train --nproc 2`` (launcher, validation pass, one process per rank)."""
    name = "onebit_adam"
    ds = write_compressed_setup(tmp_path, name, **TRAINER)
    runs = tmp_path / name

    def train(run: str, *extra: str) -> str:
        proc = cli("train", "--nproc", "2", *_run_args(runs, run, ds, *extra), timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc.stdout + proc.stderr

    log = train("ref")
    _check_trains_per_optimizer_step(name, log, read_jsonl(runs / "ref" / "metrics.jsonl"))
    train("resumed", "--resume", str(runs / "ref" / "checkpoint" / f"step{SAVE_AT:09d}"))
    _check_resumed_exactly(name, runs)
