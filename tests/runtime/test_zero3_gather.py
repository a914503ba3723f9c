"""ZeRO-3 training attacks on weights gathered once per step (``attack.zero3_gather``).

On 2 gloo CPU ranks, from the same seed, for madry (trades, mart and acl: slow): what the training forwards see --
the adversarial examples PGD-3 made under ZeRO-3 on the gathered copy (and the clean inputs or views) -- is
bit-identical to ZeRO-2's at the first step and to ZeRO-3's on the engine's module (``never``) at both steps. Bit-identical, not
close: they attack the same fp32 weights with the same eval-mode forwards and the same CPU kernels on the same
shapes; gathering only moves the weights. Training then goes on: ZeRO-3's weights after two steps with and
without gathering are bit-identical too (the training passes are the same engine's), and ZeRO-2's equal them
to float tolerance (its gradient reduction is another collective).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from dat_ds.core.config import build_config, check_engine
from dat_ds.core.errors import ConfigError
from tests.helpers import join_two_rank_world, spawn_two_ranks, write_ds

ARMS = (("zero2", 2, "auto"), ("zero3_gathered", 3, "always"), ("zero3_never", 3, "never"))


def _arm(tmp: Path, name: str, stage: int, gather: str, objective: str) -> dict:
    from dat_ds.runtime import ds_config
    from dat_ds.runtime.build import build_run
    from dat_ds.runtime.loop import TrainState, train_one_epoch

    zero = {"stage": stage, "stage3_param_persistence_threshold": 0} if stage == 3 else {"stage": stage}
    from dat_ds.core import dist

    folder = tmp / f"{name}_{objective}_rank{dist.rank()}"
    folder.mkdir()
    ds = write_ds(folder, zero_optimization=zero)
    cfg = build_config(None, [f"output_dir={folder}", f"deepspeed_config={ds}", "model.name=tiny_cnn",
                              "data.train_subset=64", "attack.steps=3", f"attack.zero3_gather={gather}",
                              f"objective.name={objective}", "train.max_steps_per_epoch=2", "train.log_every=100"])
    check_engine(cfg, stage)
    run = build_run(cfg, ds_config.prepare_run(cfg, 2))
    initial = _weights(run)
    refreshes = []
    if run.gathered is not None:
        refresh = run.gathered.refresh
        run.gathered.refresh = lambda module: refreshes.append(1) or refresh(module)
    x = next(iter(run.loaders.loader(0)))[0]
    # What the training forwards see (the engine's own forward; attacks call its module): the adversarial examples
    trained_on: list[torch.Tensor] = []

    def training_forward(_, args) -> None:
        assert run.ctx.gathered is None  # the phase ended, the copy freed, before each training forward
        trained_on.append(args[0].detach().clone())

    hook = run.engine.register_forward_pre_hook(training_forward)
    train_one_epoch(run.engine, run.objective, run.ctx, run.loaders.loader(0), TrainState(), cfg=cfg)
    hook.remove()
    refreshed = len(refreshes)
    weights = _weights(run)
    return {"x_adv": trained_on, "x": x, "gathered": run.gather_attacks, "refreshes_in_training": refreshed,
            "weights": weights, "trained": any(not torch.equal(v, initial[k]) for k, v in weights.items())}


def _weights(run) -> dict[str, torch.Tensor]:
    """The full weights (collective under ZeRO-3: gathered into the copy)."""
    module = run.eval_module() if run.gathered is not None else run.engine.module
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) > 0 and all(torch.equal(u, v) for u, v in zip(a, b))


def _first_step(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return inputs[: len(inputs) // 2]  # two steps, the same number of training forwards each


def _worker(rank: int, port: int, tmp: str, objective: str) -> None:
    join_two_rank_world(rank, port, LOCAL_WORLD_SIZE="2", DAT_DS_THREADS_PER_RANK="1")
    from dat_ds.core import dist

    dist.init_distributed(timeout_s=60)
    dist.set_threads_per_rank()
    out = {name: _arm(Path(tmp), name, stage, gather, objective) for name, stage, gather in ARMS}
    ref, gathered, never = out["zero2"], out["zero3_gathered"], out["zero3_never"]
    report = {
        "gathered": [ref["gathered"], gathered["gathered"], never["gathered"]],
        # one refresh per training step (2), none without gathering
        "refreshes": [gathered["refreshes_in_training"], never["refreshes_in_training"]],
        "attacked": any(t.shape != ref["x"].shape or not torch.equal(t, ref["x"]) for t in ref["x_adv"]),
        # the first step's (the same initial weights; ZeRO-2's step may round otherwise than ZeRO-3's)
        "x_adv_zero3_equal_zero2": _equal(_first_step(gathered["x_adv"]), _first_step(ref["x_adv"])),
        "x_adv_zero3_equal_never": _equal(gathered["x_adv"], never["x_adv"]),
        "weights_zero3_equal_never": all(torch.equal(v, never["weights"][k]) for k, v in gathered["weights"].items()),
        "weights_zero3_close_zero2": all(torch.allclose(v, ref["weights"][k], rtol=1e-5, atol=1e-6)
                                         for k, v in gathered["weights"].items()),
        "trained": [o["trained"] for o in out.values()],
    }
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize("objective", ["madry", *(pytest.param(o, marks=pytest.mark.slow) for o in ("trades", "mart", "acl", "fare"))])
def test_zero3_gathered_attacks_equal_zero2_bit_for_bit_and_training_goes_on(tmp_path, objective):
    spawn_two_ranks(_worker, str(tmp_path), objective)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["gathered"] == [False, True, False]
        assert report["refreshes"] == [2, 0]
        assert report["attacked"]
        assert report["x_adv_zero3_equal_zero2"] and report["x_adv_zero3_equal_never"]
        assert report["weights_zero3_equal_never"]
        assert report["weights_zero3_close_zero2"]
        assert report["trained"] == [True, True, True]


def _cfg(*overrides: str):
    return build_config(None, list(overrides))


@pytest.mark.parametrize("overrides, stage, message", [
    (["attack.zero3_gather=always"], 2, "attack.zero3_gather=always gathers ZeRO-3's partitioned weights, but "
                                        "zero_optimization.stage is 2"),
    (["attack.zero3_gather=always", "objective.name=free"], 3, "objective.name='free' runs no attack of its own"),
    (["attack.zero3_gather=always", "objective.name=clean"], 3, "objective.name='clean' runs no attack of its own"),
    (["attack.zero3_gather=always", "attack.name=none"], 3, "attack.name=none: there is no attack"),
])
def test_always_where_there_is_nothing_to_gather_is_one_line(overrides, stage, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        check_engine(_cfg(*overrides), stage)
    assert "\n" not in str(e.value) and "use auto or never" in str(e.value)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("mode", ["auto", "never"])
def test_auto_and_never_are_accepted_at_every_stage_and_objective(stage, mode):
    for objective in ("madry", "free", "clean", "trades"):
        check_engine(_cfg(f"attack.zero3_gather={mode}", f"objective.name={objective}"), stage)


def test_the_budget_must_be_positive():
    with pytest.raises(ConfigError, match="zero3_gather_budget_gb"):
        _cfg("attack.zero3_gather_budget_gb=0")


def test_the_copy_is_freed_after_the_phase_and_allocated_again_with_its_layout():
    from torch import nn

    from dat_ds.objectives import ObjectiveContext, attack_phase
    from dat_ds.runtime.replica import GatheredCopy

    def build():
        return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)).to(memory_format=torch.channels_last)

    torch.manual_seed(0)
    module = build()
    copy = GatheredCopy(build)
    assert GatheredCopy.nbytes(module) == 4 * (4 * 2 * 9 + 4 + 4 + 4) + 4 * 4 * 2 + 8  # + BN's running stats, count
    ctx = ObjectiveContext(model=module, module=module, cfg=_cfg(), generator=torch.Generator(),
                           gather=lambda: copy.held(module))
    x = torch.rand(2, 2, 5, 5)
    for _ in range(2):
        with attack_phase(ctx):
            inner = ctx.attack_module
            assert inner is not module
            with attack_phase(ctx):  # nested: the outer phase's copy, gathered once
                assert ctx.attack_module is inner
            inner.eval(), module.eval()
            torch.testing.assert_close(inner(x), module(x), rtol=0, atol=0)
            assert inner[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert ctx.attack_module is module
        assert all(p.numel() == 0 for p in inner.parameters())  # freed until the next phase
        with torch.no_grad():
            module[0].weight.add_(1.0)


@pytest.mark.parametrize("overrides, gathers, says", [
    (["attack.zero3_gather=auto", "attack.zero3_gather_budget_gb=1"], True, "the budget is 1,000 MB (attack.zero3_gather_budget_gb): attacks run on it"),
    (["attack.zero3_gather=auto", "attack.zero3_gather_budget_gb=1e-9"], False, "attacks run on the engine's module"),
    (["attack.zero3_gather=auto"], True, "(half the smallest rank's free memory): attacks run on it"),
    (["attack.zero3_gather=always"], True, "attacks run on a copy of the full weights gathered once per step (0.0016 MB"),
    (["attack.zero3_gather=never"], False, "attack.zero3_gather=never: attacks run on the engine's module"),
    (["attack.zero3_gather=auto", "objective.name=free"], False, "objective free runs no attack apart from the training"),
    (["attack.zero3_gather=auto", "attack.name=none"], False, "objective dat runs no attack apart from the training"),
])
def test_what_auto_chooses_is_logged_once_with_the_bytes(overrides, gathers, says, dat_ds_log):
    from torch import nn

    from dat_ds.objectives import build_objective
    from dat_ds.runtime.build import gathers_attacks

    dat_ds_log.set_level(logging.INFO)
    cfg = _cfg(*overrides)
    module = nn.Linear(19, 20)  # 400 parameters: 1,600 bytes
    assert gathers_attacks(cfg, build_objective(cfg), module) is gathers
    (line,) = [r for r in dat_ds_log.text.splitlines() if "attack.zero3_gather" in r]
    assert says in line
