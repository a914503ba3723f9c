"""dat_ds.comm: compressor maths on tiny tensors, and the compressed all-reduce on 2 gloo ranks."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from dat_ds.comm import (
    COMPRESSORS,
    ByteMeter,
    SignCompressor,
    StochasticQuantizer,
    TorchBackend,
    build_compressor,
    compressed_allreduce,
    error_buffers,
    fp32_allreduce_bytes,
    pack_bits,
    padded_numel,
    unpack_bits,
)
from dat_ds.core.errors import ConfigError
from tests.helpers import join_two_rank_world, spawn_two_ranks

# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_unpack_round_trip_is_exact(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 64), generator=g).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 64 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits), codes)


def test_sign_compressor_keeps_every_sign_and_each_block_norm():
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(0))
    x[0, :7] = 0.0  # sign(0) is sent as +
    comp = SignCompressor(block=128)
    payload = comp.encode(x)
    assert payload.dtype == torch.uint8 and payload.shape == (2, comp.payload_bytes(512))
    assert comp.payload_bytes(512) == 512 // 8 + 4 * (512 // 128)
    y = comp.decode(payload, 512)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(y >= 0, x >= 0)
    # scale = ||x_block|| / sqrt(block): the decoded block has the same L2 norm as the input block
    torch.testing.assert_close(y.view(2, 4, 128).norm(dim=-1), x.view(2, 4, 128).norm(dim=-1))


# ----------------------------------------------------------------------------- DAT quantizer


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stochastic_quantizer_is_unbiased(bits):
    q = StochasticQuantizer(bits=bits, block=64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 256, generator=g) * torch.linspace(0.01, 3, 256)
    draws = 2000
    samples = torch.stack([q.roundtrip(x, g) for _ in range(draws)])
    err = samples.mean(0) - x
    # Each element's mean over `draws` has std sigma / sqrt(draws); 6 sigma over 256 elements never trips
    # by chance, and a systematic bias of even a tenth of a quantization step would.
    sigma = samples.std(0).clamp_min(1e-12) / math.sqrt(draws)
    float_slack = 1e-6 * x.abs() + 1e-7  # elements on a grid point (the block max) decode exactly, up to fp32
    assert (err.abs() <= 6 * sigma + float_slack).all(), float(((err.abs() - float_slack) / sigma).max())
    step = 2 * x.abs().view(4, 64).amax(1) / (2**bits - 1)
    assert float(err.abs().mean()) < 0.02 * float(step.mean())
    # Every decoded value sits on the block's grid of 2^b levels on [-s, s].
    assert (samples.abs() <= x.abs().view(4, 64).amax(1).repeat_interleave(64) * (1 + 1e-6)).all()


def test_stochastic_quantizer_handles_all_zero_tensors_and_blocks():
    q = StochasticQuantizer(bits=8, block=32)
    zeros = torch.zeros(2, 64)
    out = q.roundtrip(zeros, torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all() and torch.equal(out, zeros)
    mixed = torch.cat([torch.zeros(1, 32), torch.ones(1, 32)], dim=1)
    out = q.roundtrip(mixed, torch.Generator().manual_seed(0))
    assert torch.equal(out[0, :32], torch.zeros(32)) and torch.allclose(out[0, 32:], torch.ones(32))


def test_quantizer_payload_shape_dtype_and_size():
    q = StochasticQuantizer(bits=4, block=64)
    payload = q.encode(torch.randn(3, 128))
    assert payload.dtype == torch.uint8 and payload.shape == (3, 128 * 4 // 8 + 4 * 2)
    assert q.decode(payload, 128).shape == (3, 128)


def test_compressor_registry_and_bad_options():
    assert set(COMPRESSORS.names()) >= {"onebit", "dat_quantizer"}
    assert isinstance(build_compressor("dat_quantizer", bits=4), StochasticQuantizer)
    with pytest.raises(ConfigError, match="bits=3"):
        build_compressor("dat_quantizer", bits=3)
    with pytest.raises(ConfigError, match="unknown compressor"):
        build_compressor("topk")


def test_single_rank_compressed_allreduce_with_error_feedback_tracks_the_input():
    """World size 1: nothing is sent, but the maths (two compressions + error feedback) still runs."""
    backend = TorchBackend()
    comp = SignCompressor(block=64)
    worker, server = error_buffers(300, 1, 64)
    g = torch.Generator().manual_seed(0)
    signal = 0.5 * torch.sin(torch.arange(300) / 7.0)  # what the running average converges to
    xs = [torch.randn(300, generator=g) + signal for _ in range(200)]
    total = sum(compressed_allreduce(x, comp, backend, worker, server) for x in xs)
    exact = sum(xs)
    assert float((total - exact).norm() / exact.norm()) < 0.05
    assert backend.meter.bytes_sent == 0 and backend.meter.bytes_fp32_equiv == 0


def test_byte_meter_and_fp32_reference():
    assert fp32_allreduce_bytes(1000, 1) == 0
    assert fp32_allreduce_bytes(1000, 2) == 4000  # 2 (W-1)/W * 4 n
    assert fp32_allreduce_bytes(1000, 4) == 6000
    m = ByteMeter()
    m.add(10, 40)
    m.start_step()
    m.add(5, 100)
    d = m.as_dict()
    assert (d["bytes_sent"], d["bytes_fp32_equiv"], d["step_bytes_sent"], d["ratio"]) == (15, 140, 5, 140 / 15)
    assert padded_numel(1000, 2, 256) == 1024 and padded_numel(1024, 2, 256) == 1024


# ----------------------------------------------------------------------------- torch-free rules


def test_compression_rules_import_no_torch_and_are_the_quantizers_own():
    """ds_config validates gradient_compression with comm.spec before any rank starts: no torch import."""
    import subprocess
    import sys

    code = ("import sys, dat_ds.comm.spec as s, dat_ds.comm.protocol; assert 'torch' not in sys.modules, 'torch'; "
            "print(s.check_gradient_compression({'type': 'dat_quantizer', 'bits': 4}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "{'type': 'dat_quantizer', 'bits': 4, 'block': 256}"
    from dat_ds.comm.spec import QUANTIZER_BITS, check_gradient_compression

    for bits in QUANTIZER_BITS:  # what the JSON check accepts, the quantizer builds, and vice versa
        assert StochasticQuantizer(bits=bits).bits == bits
    for bad in ({"bits": 3}, {"bits": True}, {"block": 12}, {"block": 0}):
        with pytest.raises(ConfigError, match="bits=|block="):
            check_gradient_compression({"type": "dat_quantizer", **bad})
        with pytest.raises(ConfigError, match="bits=|block="):
            StochasticQuantizer(**bad)


# ----------------------------------------------------------------------------- the optimizer wrapper


def _wrapped_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 4))
    x, y = torch.randn(32, 20, generator=g), torch.randint(0, 4, (32,), generator=g)
    return model, x, y


def _backward(model, x, y):
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()


def test_every_compressing_optimizer_is_a_communicating_optimizer_and_plain_ones_are_not():
    from dat_ds.comm import CommunicatingOptimizer, QuantizedAllReduceOptimizer
    from dat_ds.optim import OPTIMIZERS, build_optimizer

    for name in OPTIMIZERS.names():
        model, _, _ = _wrapped_problem()
        opt = build_optimizer({"type": name, "params": {"lr": 0.01}}, model.parameters())
        assert isinstance(opt, CommunicatingOptimizer) is OPTIMIZERS.get(name).compresses, name
        if isinstance(opt, CommunicatingOptimizer):
            assert opt.label and opt.scheme.startswith("1-bit") and opt.warmup_steps >= 1
        else:
            wrapped = QuantizedAllReduceOptimizer(opt, bits=4)
            assert isinstance(wrapped, CommunicatingOptimizer) and isinstance(wrapped, torch.optim.Optimizer)
            assert wrapped.warmup_steps == 0 and wrapped.scheme == "4-bit quantized gradients"


def test_wrapper_shares_the_inner_optimizer_and_sets_nothing_on_it():
    from dat_ds.comm import QuantizedAllReduceOptimizer
    from dat_ds.core.config import OptimConfig
    from dat_ds.optim import build_scheduler

    model, x, y = _wrapped_problem()
    inner = torch.optim.AdamW(model.parameters(), lr=0.01)
    before = dict(vars(inner))
    wrapped = QuantizedAllReduceOptimizer(inner, compress_single_rank=True)  # quantized on one process
    sched = build_scheduler(wrapped, OptimConfig(warmup_epochs=1, schedule="cosine"), steps_per_epoch=4, total_epochs=2)
    lrs = []
    for _ in range(4):
        _backward(model, x, y)
        wrapped.step()
        sched.step()
        lrs.append(inner.param_groups[0]["lr"])
    assert wrapped.param_groups is inner.param_groups and wrapped.state is inner.state
    assert wrapped.defaults is inner.defaults and len(inner.state) == 4  # AdamW's moments, in one place
    assert lrs == pytest.approx([0.005, 0.0075, 0.01, 0.01])  # the scheduler drives the inner optimizer
    # No attribute patched onto the inner optimizer (LambdaLR's step counter lands on the wrapper)
    assert set(vars(inner)) == set(before) and all(vars(inner)[k] is v for k, v in before.items())
    assert not inner._optimizer_step_pre_hooks and not hasattr(inner, "comm_stats")
    assert wrapped.comm_stats()["compressed_steps"] == 4
    with pytest.raises(TypeError, match="already wrapped"):
        QuantizedAllReduceOptimizer(wrapped)


def test_wrapper_step_is_the_quantized_allreduce_then_the_inner_step():
    """One rank: step() == compressed_allreduce of the flat gradient (the wrapper's noise seed), then AdamW."""
    import copy

    from dat_ds.comm import QuantizedAllReduceOptimizer

    model_a, x, y = _wrapped_problem()
    model_b = copy.deepcopy(model_a)
    wrapped = QuantizedAllReduceOptimizer(torch.optim.AdamW(model_a.parameters(), lr=0.01), bits=4, block=64, seed=3,
                                          compress_single_rank=True)  # a real world of one skips the quantizer
    ref = torch.optim.AdamW(model_b.parameters(), lr=0.01)
    quantizer, backend = StochasticQuantizer(bits=4, block=64), TorchBackend()
    for step in range(1, 4):
        _backward(model_a, x, y)
        _backward(model_b, x, y)
        params = list(model_b.parameters())
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        averaged = compressed_allreduce(flat, quantizer, backend,
                                        generator=torch.Generator().manual_seed(wrapped.noise_seed(0, step)))
        assert not torch.equal(averaged, flat)  # it really quantizes ...
        assert float((averaged - flat).abs().max()) <= 4 * float(flat.abs().max()) / 15  # two 4-bit roundings
        for p, chunk in zip(params, torch.split(averaged, [p.numel() for p in params])):
            p.grad.copy_(chunk.view_as(p))
        wrapped.step()
        ref.step()
        for pa, pb in zip(model_a.parameters(), model_b.parameters()):
            assert torch.equal(pa.grad, pb.grad) and torch.equal(pa, pb)


def test_wrapper_state_dict_resumes_exactly():
    import copy

    from dat_ds.comm import QuantizedAllReduceOptimizer

    model, x, y = _wrapped_problem()
    wrapped = QuantizedAllReduceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), seed=1,
                                          compress_single_rank=True)
    for _ in range(3):
        _backward(model, x, y)
        wrapped.step()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(wrapped.state_dict())
    assert saved_opt["comm"]["steps"] == 3 and wrapped.rank_local_state()["steps"] == 3
    for _ in range(3):
        _backward(model, x, y)
        wrapped.step()
    model2, _, _ = _wrapped_problem(seed=1)
    model2.load_state_dict(saved_model)
    resumed = QuantizedAllReduceOptimizer(torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9), seed=1,
                                          compress_single_rank=True)
    resumed.load_state_dict(saved_opt)
    resumed.load_rank_local_state(saved_opt["comm"])
    for _ in range(3):
        _backward(model2, x, y)
        resumed.step()
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)
    assert resumed.comm_stats()["compressed_steps"] == 6


# ----------------------------------------------------------------------------- 2 ranks, gloo


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    join_two_rank_world(rank, port)
    torch.set_num_threads(1)
    import torch.distributed as tdist

    from dat_ds.core.dist import accelerator

    tdist.init_process_group(accelerator().communication_backend_name(), rank=rank, world_size=2)
    result: dict = {}
    numel = 1000
    # A fixed sequence of different tensors on each rank: the running average of the 1-bit results
    # must converge to the running average of the exact means (error feedback).
    backend = TorchBackend()
    comp = SignCompressor(block=128)
    worker, server = error_buffers(numel, 2, 128)
    gens = [torch.Generator().manual_seed(100 * r) for r in range(2)]
    sum_exact, sum_compressed, rel_errors, first_round = torch.zeros(numel), torch.zeros(numel), [], None
    for rnd in range(200):
        xs = [torch.randn(numel, generator=g) + 0.5 * torch.sin(torch.arange(numel) / 7.0) for g in gens]
        exact = (xs[0] + xs[1]) / 2
        got = compressed_allreduce(xs[rank], comp, backend, worker, server)
        if rnd == 0:
            first_round = float((got - exact).norm() / exact.norm())
            sent = backend.meter.step_bytes_sent
        sum_exact += exact
        sum_compressed += got
        rel_errors.append(float((sum_compressed - sum_exact).norm() / sum_exact.norm()))
    result["onebit"] = {"first_round": first_round, "after_200": rel_errors[-1], "after_20": rel_errors[19],
                        "result_sum": sum_compressed.tolist()[:50], "bytes_per_call": sent,
                        "meter": backend.meter.as_dict()}
    # DAT 8-bit: unbiased, no error feedback; the average over draws approaches the exact mean.
    q_backend = TorchBackend()
    quant = StochasticQuantizer(bits=8, block=256)
    numel = 2048
    x = torch.randn(numel, generator=torch.Generator().manual_seed(7 + rank)) * 3
    other = torch.randn(numel, generator=torch.Generator().manual_seed(8 - rank)) * 3  # the other rank's x
    exact = (x + other) / 2
    g = torch.Generator().manual_seed(1000 + rank)
    draws = [compressed_allreduce(x, quant, q_backend, generator=g) for _ in range(300)]
    stack = torch.stack(draws)
    result["quant"] = {"single_error": float((draws[0] - exact).norm() / exact.norm()),
                       "mean_error": float((stack.mean(0) - exact).norm() / exact.norm()),
                       "bytes_per_call": q_backend.meter.bytes_sent // 300,
                       "fp32_per_call": q_backend.meter.bytes_fp32_equiv // 300,
                       "first": draws[0].tolist()[:50]}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    tdist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("comm2")
    spawn_two_ranks(_two_rank_worker, str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.dist
def test_error_feedback_running_average_converges_to_the_exact_mean(two_rank_results):
    r = two_rank_results[0]["onebit"]
    assert r["after_200"] < 0.05
    assert r["after_200"] < r["first_round"] / 10  # error feedback, not luck: one round alone is far off
    assert r["after_200"] < r["after_20"]
    # Both ranks decode the same all-gathered bytes: identical results.
    assert two_rank_results[0]["onebit"]["result_sum"] == two_rank_results[1]["onebit"]["result_sum"]


@pytest.mark.dist
def test_compressed_allreduce_byte_counts(two_rank_results):
    r = two_rank_results[0]["onebit"]
    n, m = padded_numel(1000, 2, 128), padded_numel(1000, 2, 128) // 2
    chunk_payload = m // 8 + 4 * (m // 128)  # signs + one fp32 scale per block, for one rank's chunk
    assert r["bytes_per_call"] == 2 * chunk_payload  # one chunk out in the all-to-all, one in the all-gather
    assert r["meter"]["bytes_fp32_equiv"] == 200 * fp32_allreduce_bytes(1000, 2)
    assert fp32_allreduce_bytes(1000, 2) / r["bytes_per_call"] >= 20
    q = two_rank_results[0]["quant"]
    assert q["bytes_per_call"] == 2 * (1024 + 4 * 4)  # 8-bit codes + a scale per 256-block, two chunk transfers
    assert q["fp32_per_call"] / q["bytes_per_call"] >= 3.9
    assert n == 1024


@pytest.mark.dist
def test_quantized_allreduce_is_unbiased_across_ranks(two_rank_results):
    q = two_rank_results[0]["quant"]
    assert q["single_error"] > 0  # it really quantizes
    assert q["mean_error"] < q["single_error"] / 8  # noise averages out: ~1/sqrt(300) of one draw
    assert two_rank_results[0]["quant"]["first"] == two_rank_results[1]["quant"]["first"]


# ----------------------------------------------------------------------------- dat-ds bench comm


def test_bench_comm_needs_two_ranks(cli, tmp_path):
    proc = cli("bench", "comm", "--nproc", "1", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--nproc >= 2" in proc.stderr


@pytest.mark.dist
@pytest.mark.slow
def test_bench_comm_writes_json_and_png_and_meets_the_byte_goals(cli, tmp_path):
    proc = cli("bench", "comm", "--steps", "3", "--warmup", "2", "--out", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "comm.json").read_text())
    assert (tmp_path / "comm.png").stat().st_size > 0
    arms = result["arms"]
    assert set(arms) == {"fp32 all-reduce", "DAT 8-bit", "1-bit Adam", "0/1 Adam", "1-bit LAMB"}
    assert arms["DAT 8-bit"]["ratio"] >= 3.9
    for name in ("1-bit Adam", "0/1 Adam", "1-bit LAMB"):
        assert arms[name]["stage"] == "compressed" and arms[name]["ratio"] >= 20
    assert result["goal_met"]
