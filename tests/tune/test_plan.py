"""``dat-ds plan``: the accounting against hand-computed bytes, the traced activations of a tiny model, the
fastest-setting rule, and one plan of a shipped recipe end to end (its model is small: seconds)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dat_ds.tune.plan import Engine, Footprint, Plan, predict

PSI = 1000  # parameters of the hand-computed model


def _fp(weight_bytes: int = 4, **kw) -> Footprint:
    base = dict(params=PSI, buffer_bytes=0, largest_layer=600, persistent_params=0, weight_bytes=weight_bytes,
                train_per_sample=0, train_fixed=0, attack_per_sample=0, attack_fixed=0, largest_saved_per_sample=0,
                input_per_sample=0)
    return Footprint(**{**base, **kw})


# (precision, optimizer, stage) -> (weights, gradients, optimizer) bytes per rank on N = 4 ranks, by hand:
# fp32: 4-byte weights and gradients, Adam's 2 fp32 states (8 bytes), SGD momentum 1 (4 bytes); ZeRO 1-3 add
# DeepSpeed's fp32 master partition (4/N) and fp32 gradient partition (4/N); stage 1 splits the optimizer,
# 2 the gradients too, 3 the weights too. bf16: 2-byte weights and gradients, an fp32 master (4) and fp32
# gradients (4) at stage 0 whole, partitioned from stage 1 (the ZeRO paper's 2 + 2 + 12 for Adam).
HAND = {
    ("fp32", "adamw", 0): (4000, 4000, 8000),
    ("fp32", "adamw", 1): (4000, 4000 + 1000, (4000 + 8000) // 4),
    ("fp32", "adamw", 2): (4000, 1000 + 1000, 3000),
    ("fp32", "adamw", 3): (1000, 2000, 3000),
    ("fp32", "sgd", 0): (4000, 4000, 4000),
    ("fp32", "sgd", 2): (4000, 2000, (4000 + 4000) // 4),
    ("bf16", "adamw", 0): (2000, 2000 + 4000, 4000 + 8000),
    ("bf16", "adamw", 1): (2000, 2000 + 1000, 12000 // 4),
    ("bf16", "adamw", 2): (2000, 500 + 1000, 3000),
    ("bf16", "adamw", 3): (500, 1500, 3000),
    ("bf16-autocast", "lamb", 0): (4000, 4000, 8000),  # fp32 weights, bf16 compute: as fp32
}


@pytest.mark.parametrize("key", HAND, ids=lambda k: "-".join(map(str, k)))
def test_model_states_match_hand_computed_bytes(key):
    precision, optimizer, stage = key
    fp = _fp(weight_bytes=2 if precision == "bf16" else 4)
    eng = Engine(world=4, precision=precision, optimizer=optimizer, contiguous_gradients=False, allowance=0)
    p = predict(fp, eng, stage, micro=1)
    assert (p.parts["weights"], p.parts["gradients"], p.parts["optimizer"]) == HAND[key]
    # no activations or allowance in this footprint; ZeRO-3 gathers the whole (small) model to compute
    assert p.total == sum(HAND[key]) + (PSI * fp.weight_bytes if stage == 3 else 0)


def test_buffers_activations_gathered_copy_and_allowance():
    fp = _fp(weight_bytes=2, train_per_sample=100, train_fixed=7, attack_per_sample=300, attack_fixed=0,
             largest_saved_per_sample=10, input_per_sample=1, buffer_bytes=5, persistent_params=40)
    eng = Engine(world=4, precision="bf16", optimizer="adamw", reduce_bucket=50, overlap_comm=True,
                 prefetch_bucket=100, train_forwards=2, gathered_attack=True, allowance=1000)
    z2 = predict(fp, eng, 2, micro=8)
    assert z2.parts["buffers"] == 5 + 50 * 2 * 2  # two bf16 buckets (overlap_comm)
    # training pass: 2 forwards x 8 x 100 + 7, plus 8 x 10 working gradient and 3 x 8 inputs = 1711;
    # attack pass: 8 x 300 + 80 + 24 = 2504: the larger one counts
    assert z2.parts["activations"] == 2504
    assert z2.parts["gathered_copy"] == 0 and z2.parts["allowance"] == 1000
    z3 = predict(fp, eng, 3, micro=8)
    # largest layer + prefetch; persistent; the gradient bucket (contiguous_gradients), one, in bf16
    assert z3.parts["buffers"] == 5 + (600 + 100) * 2 + 40 * 2 * 3 // 4 + 50 * 2
    assert z3.parts["gathered_copy"] == PSI * 2  # the full weights in bf16, for the attacks
    assert predict(fp, Engine(world=4, precision="bf16", optimizer="adamw", attack=False, allowance=0), 0, 8
                   ).parts["activations"] == 8 * 100 + 7 + 80 + 24


def test_fastest_is_the_lowest_stage_then_the_largest_micro_batch_that_fits():
    fp = _fp(train_per_sample=1000)
    eng = Engine(world=2, precision="fp32", optimizer="adamw", contiguous_gradients=False, allowance=0)
    rows = tuple(predict(fp, eng, s, m) for s in (0, 1, 2, 3) for m in (1, 2, 4, 8))
    # per rank, 1000 bytes per sample on top of the states: ZeRO-0 16000, ZeRO-1 16000, ZeRO-2 14000
    plan = Plan(predictions=rows, capacity=20_000, engine=eng, footprint=fp)
    assert (plan.fastest().stage, plan.fastest().micro) == (0, 4)
    plan = Plan(predictions=rows, capacity=16_500, engine=eng, footprint=fp)
    assert (plan.fastest().stage, plan.fastest().micro) == (2, 2)
    refused = tuple(dataclasses.replace(p, allowed="LAMB needs per-layer tensors") if p.stage == 0 else p for p in rows)
    plan = Plan(predictions=refused, capacity=20_000, engine=eng, footprint=fp)
    assert (plan.fastest().stage, plan.fastest().micro) == (1, 4)  # ZeRO-0 fits but may not run
    assert Plan(predictions=rows, capacity=100, engine=eng, footprint=fp).fastest() is None


def test_traced_activations_of_a_tiny_model_are_exact():
    """Linear(8, 4) -> ReLU -> Linear(4, 2): training saves the input (8 floats) and the ReLU output (4 floats,
    saved by ReLU and by the second Linear: counted once) per sample; the weights are not activations."""
    import torch

    from dat_ds.tune import footprint

    with torch.device("meta"):  # the images are 2 x 2 x 2 = 8 values
        flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    fp = footprint.measure(flat, in_chans=2, img_size=2, precision="fp32")
    assert fp.params == 8 * 4 + 4 + 4 * 2 + 2
    assert fp.train_per_sample == (8 + 4) * 4 and fp.train_fixed == 0
    assert fp.attack_per_sample == (8 + 4) * 4  # the input gradient needs the same tensors
    assert fp.largest_layer == 36 and fp.weight_bytes == 4
    fp16 = footprint.measure(flat, in_chans=2, img_size=2, precision="bf16")
    assert fp16.train_per_sample == (8 + 4) * 2 and fp16.weight_bytes == 2


def test_plan_of_the_demo_recipe_end_to_end(capsys):
    from dat_ds.cli import main

    assert main(["plan", "--recipe", "demo", "--gpus", "2", "--gpu-memory", "1GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["world"] == 2 and out["capacity_bytes"] == 2**30
    stages = {p["zero"] for p in out["predictions"]}
    assert stages == {0, 1, 2, 3}
    assert [p["micro_batch"] for p in out["predictions"] if p["zero"] == 0] == [1, 2, 4, 8, 16, 32, 64]
    # 1 GiB minus the 2 GiB CUDA allowance: nothing fits; the same plan at 80GB picks ZeRO-0, micro-batch 64
    assert out["fastest"] is None
    assert main(["plan", "--recipe", "demo", "--gpus", "2", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["fastest"]
    assert (best["zero"], best["micro_batch"], best["grad_accum"]) == (0, 64, 1)


def test_the_gathered_copy_is_freed_before_the_training_pass():
    """attack.zero3_gather's copy lives through the attack only: it adds to the attack's pass, not the training one."""
    fp = _fp(weight_bytes=2, train_per_sample=1000, train_fixed=0, attack_per_sample=10, attack_fixed=0,
             largest_saved_per_sample=0, input_per_sample=0)
    eng = Engine(world=4, precision="bf16", optimizer="adamw", gathered_attack=True, allowance=0)
    big_train = predict(fp, eng, 3, micro=8)  # training pass 8000 > attack 80 + copy
    assert big_train.parts["gathered_copy"] + big_train.parts["activations"] == max(8000, 80 + PSI * 2)
    assert predict(fp, Engine(world=4, precision="bf16", optimizer="adamw", gathered_attack=True, attack=False,
                              allowance=0), 3, 8).parts["gathered_copy"] == 0  # no attack, nothing gathered


@pytest.mark.parametrize("overrides, capacity, gathers", [
    (["attack.zero3_gather=always"], 10, True),
    (["attack.zero3_gather=never"], 10**12, False),
    (["attack.zero3_gather=auto"], 10**12, True),  # fits half the GPU
    (["attack.zero3_gather=auto"], 10, False),
    (["attack.zero3_gather=auto", "attack.zero3_gather_budget_gb=1"], 10, True),  # the stated budget decides
    (["attack.zero3_gather=auto", "attack.name=none"], 10**12, False),
    (["attack.zero3_gather=auto", "objective.name=free"], 10**12, False)])
def test_the_plan_gathers_as_the_run_would(overrides, capacity, gathers):
    from dat_ds.core.config import build_config
    from dat_ds.tune.plan import gathers_attacks

    assert gathers_attacks(build_config(None, overrides), copy_bytes=1000, capacity=capacity) is gathers
