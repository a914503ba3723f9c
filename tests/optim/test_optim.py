"""Optimizers from the DeepSpeed JSON, LR scaling and schedules, and the compressing optimizers on 1 rank."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from dat_ds.core.config import OptimConfig
from dat_ds.core.errors import ConfigError
from dat_ds.optim import OPTIMIZERS, build_optimizer, build_scheduler, lr_multiplier, lr_scale, param_groups
from dat_ds.optim.onebit import OneBitAdam
from dat_ds.runtime import ds_config
from tests.helpers import REPO, tiny_problem

DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
# Every parameter DeepSpeed 0.18 documents for its 1-bit optimizers, so its JSONs work unchanged.
DS018_PARAMS = {
    "onebitadam": {"lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "freeze_step": 3,
                   "cuda_aware": False, "comm_backend_name": "nccl"},
    "zerooneadam": {"lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "var_freeze_step": 3,
                    "var_update_scaler": 2, "local_step_scaler": 2, "local_step_clipper": 4, "cuda_aware": False,
                    "comm_backend_name": "mpi"},
    "onebitlamb": {"lr": 0.05, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "freeze_step": 3,
                   "max_coeff": 10.0, "min_coeff": 0.01, "coeff_beta": 0.9, "factor_max": 4.0, "factor_min": 0.5,
                   "factor_threshold": 0.1, "cuda_aware": False, "comm_backend_name": "nccl"},
}


def _train(model, opt, x, y, steps):
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_registered_optimizer_builds_from_json_and_lowers_the_loss(name):
    model, x, y = tiny_problem()
    plain = {"sgd": {"lr": 0.05, "momentum": 0.9}, "lars": {"lr": 1.0, "momentum": 0.9}, "lamb": {"lr": 0.05}}
    params = DS018_PARAMS.get(name) or plain.get(name, {"lr": 0.01})
    # compress_single_rank: the compressed maths on this one process (a real world of one skips it)
    opt = build_optimizer({"type": name, "params": params}, param_groups(model, 1e-4), compress_single_rank=True)
    losses = _train(model, opt, x, y, 30)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], (name, losses[0], losses[-1])
    if OPTIMIZERS.get(name).compresses:
        stats = opt.comm_stats()
        assert stats["stage"] == "compressed" and stats["world_size"] == 1 and stats["bytes_sent"] == 0
        assert stats["compressed_steps"] > 0


@pytest.mark.parametrize("type_name", ["OneBitAdam", "onebitadam", "ONEBITADAM", "one_bit_adam", "ZeroOneAdam",
                                       "OneBitLamb", "Lamb", "LARS"])
def test_json_types_are_case_insensitive(type_name):
    model, _, _ = tiny_problem()
    opt = build_optimizer({"type": type_name, "params": {"lr": 0.01}}, model.parameters())
    assert isinstance(opt, torch.optim.Optimizer)


@pytest.mark.parametrize("name", sorted(DS018_PARAMS))
def test_compressing_optimizers_reject_unknown_parameters(name):
    model, _, _ = tiny_problem()
    with pytest.raises(ConfigError, match="unknown parameter 'freeze_stepp'"):
        build_optimizer({"type": name, "params": {**DS018_PARAMS[name], "freeze_stepp": 3}}, model.parameters())
    assert OPTIMIZERS.get(name).compresses


def test_comm_backend_names_map_onto_torch_distributed_and_bad_ones_fail():
    model, x, y = tiny_problem()
    for backend in ("nccl", "mpi", "gloo", "torch"):
        opt = build_optimizer({"type": "OneBitAdam", "params": {"lr": 0.01, "comm_backend_name": backend}},
                              model.parameters())
        _train(model, opt, x, y, 1)
        assert opt.backend.name == backend
    opt = build_optimizer({"type": "OneBitAdam", "params": {"lr": 0.01, "comm_backend_name": "cupy"}}, model.parameters())
    with pytest.raises(ConfigError, match="comm_backend_name='cupy'"):
        _train(model, opt, x, y, 1)


def test_onebit_adam_warmup_is_exactly_adamw():
    """Before freeze_step 1-bit Adam is Adam (bias-corrected, decoupled weight decay)."""
    model_a, x, y = tiny_problem()
    model_b = copy.deepcopy(model_a)
    ours = OneBitAdam(param_groups(model_a, 1e-2), lr=0.01, weight_decay=1e-2, freeze_step=1000,
                      compress_single_rank=True)
    ref = torch.optim.AdamW(param_groups(model_b, 1e-2), lr=0.01, weight_decay=1e-2)
    _train(model_a, ours, x, y, 20)
    _train(model_b, ref, x, y, 20)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert ours.comm_stats()["stage"] == "warmup"


@pytest.mark.parametrize("name", sorted(DS018_PARAMS))
def test_state_dict_resumes_exactly_including_error_feedback(name):
    model, x, y = tiny_problem()
    section = {"type": name, "params": DS018_PARAMS[name]}
    opt = build_optimizer(section, model.parameters(), compress_single_rank=True)  # compressed on one process
    _train(model, opt, x, y, 6)  # past the freeze: error-feedback buffers exist
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["comm"]["worker_error"] is not None and saved_opt["comm"]["worker_error"].abs().sum() > 0
    _train(model, opt, x, y, 5)
    model2, _, _ = tiny_problem(seed=1)
    model2.load_state_dict(saved_model)
    opt2 = build_optimizer(section, model2.parameters(), compress_single_rank=True)
    opt2.load_state_dict(saved_opt)
    _train(model2, opt2, x, y, 5)
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)
    assert opt2.comm_stats()["compressed_steps"] == opt.comm_stats()["compressed_steps"]


# ----------------------------------------------------------------------------- DeepSpeed JSONs


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_shipped_ds_configs_validate(path):
    settings = ds_config.prepare(path, world_size=2)
    assert "optimizer" not in settings.ds_config and "gradient_compression" not in settings.ds_config
    assert settings.global_batch == settings.micro_batch * settings.grad_accum * 2


@pytest.mark.parametrize("name,compresses", [("onebit_adam.json", True), ("zero_one_adam.json", True),
                                             ("onebit_lamb.json", True), ("dat_8bit.json", False),
                                             ("lamb_large_batch.json", False)])
def test_compression_ds_configs(name, compresses):
    settings = ds_config.prepare(REPO / "ds_configs" / name, world_size=2)
    assert settings.compresses is compresses
    assert (settings.gradient_compression is not None) is (name == "dat_8bit.json")


def _ds(tmp_path, **changes):
    data = json.loads((REPO / "ds_configs" / "onebit_adam.json").read_text())
    data.update(changes)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("changes,match", [
    ({"zero_optimization": {"stage": 2}}, "cannot run with ZeRO stage 2"),
    ({"bf16": {"enabled": True}}, "cannot run with bf16: DeepSpeed's bf16/fp16 engine"),
    ({"fp16": {"enabled": True}}, "cannot run with fp16: DeepSpeed's bf16/fp16 engine"),
    ({"torch_autocast": {"enabled": True, "dtype": "float16"}}, "cannot run with torch_autocast float16"),
    ({"gradient_compression": {"type": "dat_quantizer", "bits": 8}}, "already compresses"),
])
def test_impossible_combinations_fail_at_start_up(tmp_path, changes, match):
    with pytest.raises(ConfigError, match=match):
        ds_config.prepare(_ds(tmp_path, **changes), world_size=2)


@pytest.mark.parametrize("section,match", [
    ({"type": "dat_quantizer", "bits": 3}, "bits=3"),
    ({"type": "topk", "bits": 8}, "type 'topk' is unknown"),
    ({"type": "dat_quantizer", "bitz": 8}, "unknown key 'bitz'"),
    ("8bit", "must be an object"),
])
def test_gradient_compression_section_is_validated(tmp_path, section, match):
    path = _ds(tmp_path, optimizer={"type": "AdamW", "params": {"lr": 1e-3}}, gradient_compression=section)
    with pytest.raises(ConfigError, match=match):
        ds_config.prepare(path, world_size=2)


def test_gradient_compression_rejects_zero(tmp_path):
    path = _ds(tmp_path, optimizer={"type": "AdamW", "params": {"lr": 1e-3}}, zero_optimization={"stage": 1},
               gradient_compression={"type": "dat_quantizer"})
    with pytest.raises(ConfigError, match="ZeRO stage 1"):
        ds_config.prepare(path, world_size=2)


# ----------------------------------------------------------------------------- LR scaling and schedules


def test_lr_scaling_rules():
    assert lr_scale(OptimConfig(lr_scaling="none", base_batch_size=256), 2048) == 1.0
    assert lr_scale(OptimConfig(lr_scaling="linear", base_batch_size=256), 2048) == 8.0
    assert lr_scale(OptimConfig(lr_scaling="sqrt", base_batch_size=256), 1024) == pytest.approx(2.0)


def test_linear_warmup_then_multistep():
    cfg = OptimConfig(warmup_epochs=2, schedule="multistep", milestones=(5, 8), gamma=0.1)
    spe = 10
    ramp = [lr_multiplier(cfg, s, spe, 10) for s in range(20)]
    assert ramp == pytest.approx([(s + 1) / 20 for s in range(20)])  # linear from ~0 to 1 over 2 epochs
    assert lr_multiplier(cfg, 20, spe, 10) == 1.0
    assert lr_multiplier(cfg, 49, spe, 10) == 1.0
    assert lr_multiplier(cfg, 50, spe, 10) == pytest.approx(0.1)
    assert lr_multiplier(cfg, 80, spe, 10) == pytest.approx(0.01)


def test_cosine_schedule_runs_from_one_to_zero_after_warmup():
    cfg = OptimConfig(warmup_epochs=1, schedule="cosine")
    spe, epochs = 10, 5
    assert lr_multiplier(cfg, 10, spe, epochs) == pytest.approx(1.0)
    assert lr_multiplier(cfg, 30, spe, epochs) == pytest.approx(0.5)  # half-way through the decay
    assert lr_multiplier(cfg, 50, spe, epochs) == pytest.approx(0.0, abs=1e-12)
    values = [lr_multiplier(cfg, s, spe, epochs) for s in range(10, 51)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_build_scheduler_drives_the_optimizer_lr():
    model, x, y = tiny_problem()
    opt = build_optimizer({"type": "lamb", "params": {"lr": 0.1}}, model.parameters(), lr_scale=2.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    sched = build_scheduler(opt, OptimConfig(warmup_epochs=1, schedule="cosine"), steps_per_epoch=4, total_epochs=3)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        _train(model, opt, x, y, 1)
        sched.step()
    assert lrs[:4] == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert lrs[4] == pytest.approx(0.2) and lrs[-1] < 0.02


@pytest.mark.parametrize("name", ["lamb_large_batch.json"])
def test_layerwise_adaptive_optimizers_from_json(name):
    """DAT's layer-wise adaptive LR (LAMB from timm) and LARS build from JSON and step."""
    settings = ds_config.prepare(REPO / "ds_configs" / name, world_size=2)
    for section in (settings.optimizer, {"type": "Lars", "params": {"lr": 1.0, "momentum": 0.9, "trust_coeff": 0.001}}):
        model, x, y = tiny_problem()
        opt = build_optimizer(section, param_groups(model, 1e-4))
        losses = _train(model, opt, x, y, 25)
        assert losses[-1] < losses[0]


@pytest.mark.parametrize("name,params,match", [
    ("OneBitAdam", {"freeze_step": 0}, "freeze_step=0"),
    ("OneBitLamb", {"freeze_step": 0}, "freeze_step >= 1"),
    ("OneBitLamb", {"min_coeff": 2.0, "max_coeff": 1.0}, "min_coeff <= max_coeff"),
    ("ZeroOneAdam", {"local_step_clipper": 0}, "local_step_clipper=0"),
    ("OneBitAdam", {"betas": [0.9, 1.0]}, "betas"),
])
def test_compressing_optimizers_reject_bad_values(name, params, match):
    model, _, _ = tiny_problem()
    with pytest.raises(ConfigError, match=match):
        build_optimizer({"type": name, "params": {"lr": 0.01, **params}}, model.parameters())
