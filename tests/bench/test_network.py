"""``dat-ds bench network``: two namespaces behind a shaped link, the speedup arithmetic, the fast packers;
``dat-ds bench simulate``: its cost model (pure functions), the recipe scenarios, the crossover table.

The namespace tests need root and iproute2 and skip with the reason otherwise; every namespace they make
is deleted by the test itself (and by conftest's session finalizer if a test was killed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import netns, network, simulate
from benchmarks.simulate import FP32, Method
from dat_ds.comm.compressors import pack_bits, unpack_bits, unpack_signs
from dat_ds.core.errors import ConfigError
from tests.helpers import REPO

needs_netns = pytest.mark.skipif(netns.unavailable() is not None, reason=f"network namespaces: {netns.unavailable()}")


# ------------------------------------------------------------------------------------ options
def test_bandwidths_and_optimizers_parse_and_bad_values_are_one_line_errors():
    assert network._parse_bandwidths("none,1000,100") == [None, 1000.0, 100.0]
    assert network._parse_bandwidths("unshaped, 2.5") == [None, 2.5]
    with pytest.raises(ConfigError, match="'fast' is not a number"):
        network._parse_bandwidths("fast")
    with pytest.raises(ConfigError, match="outside"):
        network._parse_bandwidths("0.01")
    # fp32 is always measured alongside: every speedup is relative to it
    assert network._parse_optimizers("onebit_adam") == ["fp32 all-reduce", "1-bit Adam"]
    assert network._parse_optimizers("fp32,dat8,zero_one_adam,onebit_lamb") == [
        "fp32 all-reduce", "DAT 8-bit", "0/1 Adam", "1-bit LAMB"]
    with pytest.raises(ConfigError, match="unknown onebit_sgd"):
        network._parse_optimizers("onebit_sgd")


def _steps(seconds, losses, stages, sent):
    return [{"seconds": s, "loss": l, "stage": st, "bytes": b, "fp32_bytes": 4000} for s, l, st, b in
            zip(seconds, losses, stages, sent)]


def test_summary_takes_the_slower_rank_and_computes_speedups_and_time_to_loss():
    fp32_losses = [2.0, 1.8, 1.6, 1.4, 1.2, 1.0, 0.8, 0.6]
    fast_losses = [2.0, 1.8, 1.6, 1.4, 1.25, 1.05, 0.85, 0.65]  # a little behind fp32, still reaches the target
    fp32 = {"numel": 1000, "local_steps": 0,
            "steps": _steps([4.0] * 8, fp32_losses, ["fp32"] * 8, [4000] * 8)}
    onebit = {"numel": 1000, "local_steps": 0,
              "steps": _steps([4.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], fast_losses, ["warmup"] * 2 + ["compressed"] * 6,
                              [4000] * 2 + [140] * 6)}
    slower = json.loads(json.dumps(onebit))
    slower["steps"][3]["seconds"] = 3.0  # rank 1 was slow in one step: the step took 3 s
    measured = {"ranks": [{"fp32 all-reduce": fp32, "1-bit Adam": onebit}, {"fp32 all-reduce": fp32, "1-bit Adam": slower}]}
    rows = {r["optimizer"]: r for r in network.summarise(measured, model="m", bandwidth=100.0, link_mb_s=12.0)}
    base, fast = rows["fp32 all-reduce"], rows["1-bit Adam"]
    assert base["ms_per_step_fp32"] == 4000.0 and base["speedup"] == 1.0 and base["ms_per_step_warmup"] is None
    assert fast["ms_per_step_warmup"] == 4000.0 and fast["ms_per_step_compressed"] == 1000.0
    assert fast["speedup"] == 4.0  # median of [1, 3, 1, 1, 1, 1]
    assert fast["bytes_per_step_compressed"] == 140 and fast["warmup_steps"] == 2 and fast["compressed_steps"] == 6
    # target: fp32's loss smoothed over 8 // 5 = 1 -> 2 steps, at 3/4 of its 8 steps (step 6): (1.2 + 1.0) / 2
    assert base["target_loss"] == pytest.approx(1.1)
    assert base["time_to_target_s"] == pytest.approx(24.0)  # fp32 reaches 1.1 at step 6
    assert fast["time_to_target_s"] == pytest.approx(4 + 4 + 1 + 3 + 1 + 1 + 1)  # (1.05 + 0.85) / 2 <= 1.1 at step 7
    assert fast["run_speedup"] == pytest.approx(24.0 / 15.0)
    assert fast["run_wall_speedup"] == pytest.approx(32.0 / 16.0)
    assert fast["bandwidth_mbit"] == 100.0 and fast["model"] == "m" and fast["link_mb_s"] == 12.0


def test_an_optimizer_that_never_reaches_the_target_has_no_run_speedup():
    fp32 = {"numel": 10, "local_steps": 0, "steps": _steps([1.0] * 4, [2.0, 1.0, 0.5, 0.4], ["fp32"] * 4, [40] * 4)}
    stuck = {"numel": 10, "local_steps": 0, "steps": _steps([0.5] * 4, [2.0] * 4, ["warmup"] + ["compressed"] * 3, [1] * 4)}
    rows = network.summarise({"ranks": [{"fp32 all-reduce": fp32, "1-bit LAMB": stuck}]}, model="m", bandwidth=None,
                             link_mb_s=None)
    assert rows[1]["run_speedup"] is None and rows[1]["time_to_target_s"] is None and rows[1]["speedup"] == 2.0


# ----------------------------------------------------------------------- compressor fast paths
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_vectorised_packing_is_the_little_endian_definition(bits):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2 ** bits, (3, 8 * 64), generator=g, dtype=torch.uint8)
    per_byte = 8 // bits
    fields = codes.view(3, -1, per_byte).to(torch.int64)
    reference = sum(fields[..., i] << (bits * i) for i in range(per_byte)).to(torch.uint8)
    assert torch.equal(pack_bits(codes, bits), reference)
    assert torch.equal(unpack_bits(reference, bits), codes)
    if bits == 1:
        assert torch.equal(pack_bits(codes.bool(), 1), reference)  # a bool mask packs without a copy to uint8
        assert torch.equal(unpack_signs(reference), codes.float() * 2 - 1)


# ------------------------------------------------------------------------------- namespaces
@needs_netns
def test_a_link_between_two_namespaces_is_shaped_and_deleted_even_on_failure():
    with pytest.raises(RuntimeError, match="body failed"):
        with netns.NetnsLink() as link:
            assert set(link.names) <= set(netns.namespaces())
            link.shape(100)
            shaped = link.throughput_mb_s(nbytes=3 << 20)
            link.shape(None)
            unshaped = link.throughput_mb_s(nbytes=16 << 20)
            raise RuntimeError("body failed")
    assert not netns.owned_by(os.getpid())
    assert not (set(link.names) & set(netns.namespaces()))
    # 100 Mbit/s is 12.5 MB/s on the wire; TCP/IP headers take ~3 %
    assert 9.0 < shaped < 13.0, shaped
    assert unshaped > 3 * shaped, (unshaped, shaped)


@needs_netns
def test_leftovers_of_dead_processes_are_removed_and_a_live_owners_are_kept():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = f"{netns.PREFIX}{dead.pid}-7-0"
    mine = f"{netns.PREFIX}{os.getpid()}-8-0"
    try:
        for name in (orphan, mine):
            subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=20)
        removed = netns.remove_leftovers()
        assert orphan in removed and orphan not in netns.namespaces()
        assert mine in netns.namespaces()  # its owner (this process) is alive
        assert mine in netns.remove_leftovers(also_owner=os.getpid())
        assert not netns.owned_by(os.getpid())
    finally:
        for name in (orphan, mine):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)


def test_bench_network_skips_in_one_line_where_namespaces_cannot_be_made(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(netns, "unavailable", lambda: "network namespaces need root (run as root)")
    args = argparse.Namespace(models="small_cnn", bandwidths="none", optimizers="onebit_adam", steps=2, warmup=1,
                              micro=8, attack_steps=1, timeout=60.0, out=str(tmp_path))
    result = network.run(args)
    assert result == {"skipped": "network namespaces need root (run as root)"}
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["bench network skipped: network namespaces need root (run as root)"]
    assert not list(tmp_path.iterdir())  # nothing written


@needs_netns
@pytest.mark.slow
@pytest.mark.dist
def test_bench_network_end_to_end_writes_results_and_leaves_no_namespace(cli, tmp_path):
    proc = cli("bench", "network", "--models", "small_cnn", "--bandwidths", "none,100", "--optimizers", "onebit_adam",
               "--steps", "3", "--warmup", "1", "--micro", "16", "--out", str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "network.json").read_text())
    rows = data["results"]
    assert [(r["bandwidth_mbit"], r["optimizer"]) for r in rows] == [
        (None, "fp32 all-reduce"), (None, "1-bit Adam"), (100.0, "fp32 all-reduce"), (100.0, "1-bit Adam")]
    for r in rows:
        for key in ("model", "ms_per_step_fp32", "ms_per_step_compressed", "speedup", "run_speedup"):
            assert key in r
        assert r["model"] == "small_cnn" and r["ms_per_step_compressed"] > 0
    onebit = [r for r in rows if r["optimizer"] == "1-bit Adam"]
    assert all(r["warmup_steps"] == 1 and r["compressed_steps"] == 3 for r in onebit)
    assert all(r["bytes_per_step_fp32"] / r["bytes_per_step_compressed"] > 20 for r in onebit)
    assert 9.0 < data["link_mb_s"]["100.0"] < 13.0
    # over the slow link fp32 pays for its 1.7 MB per step; 1-bit Adam sends 59 kB
    slow = {r["optimizer"]: r for r in rows if r["bandwidth_mbit"] == 100.0}
    assert slow["fp32 all-reduce"]["ms_per_step_fp32"] > 100
    assert (tmp_path / "network.png").stat().st_size > 5000
    # the benchmark's process is gone, and so are its namespaces (only live owners' may exist)
    assert all(netns._alive(int(n.split("-")[1])) for n in netns.namespaces())


# ---------------------------------------------------------------------------- bench simulate

NETWORK_JSON = str(REPO / "bench" / "results" / "network.json")


def _predict(method, **kw):
    args = {"numel": 1 << 20, "world": 8, "compute_ms": 100.0, "overlap_window_ms": 20.0, "bytes_per_s": 1.25e9,
            "latency_s": 10e-6, "codec_bytes_per_s": 6e11, "bucket_bytes": 25e6, "samples_per_step": 2048}
    return simulate.predict(method, **{**args, **kw})


def test_the_ring_model_at_two_ranks_is_the_measured_payload_over_the_bandwidth():
    with open(NETWORK_JSON) as f:
        network = json.load(f)
    methods = {m.label: m for m in simulate.recipe_methods()}
    unshaped = [r for r in network["results"] if r["bandwidth_mbit"] is None]
    assert unshaped
    bandwidth = 12.5e6  # bytes/s: 100 Mbit/s
    for r in unshaped:
        assert simulate.comm_ms(methods[FP32], r["numel"], 2, bandwidth, 0.0) == pytest.approx(
            1000 * r["bytes_per_step_fp32"] / bandwidth)
    # the ring's volume grows to 2 (N - 1) / N of the tensor, plus 2 (N - 1) latency-bound hops
    assert simulate.comm_ms(methods[FP32], 1000, 4, 1e6, 1e-3) == pytest.approx(1000 * (1.5 * 4000 / 1e6 + 6e-3))
    # the compressed all-reduce's bytes are the compressors' arithmetic: exactly what bench network counted
    checks = simulate.check_bytes(network, methods)
    assert {c["optimizer"] for c in checks} >= {"fp32 all-reduce", "1-bit Adam", "DAT 8-bit"}
    assert all(c["model_bytes"] == c["measured_bytes"] for c in checks)
    # and the validation predicts each shaped-link step from the unshaped one
    base, validation = simulate.calibrate(network)
    assert validation and all(abs(v["error_pct"]) < 100 for v in validation)


def test_efficiency_is_one_with_infinite_bandwidth_and_no_latency():
    for world in (2, 64, 1024):
        p = _predict(Method(FP32), world=world, bytes_per_s=math.inf, latency_s=0.0)
        assert p["comm_ms"] == 0.0 and p["efficiency"] == 1.0 and p["step_ms"] == 100.0
        assert p["samples_per_s"] == pytest.approx(2048 / 0.1)
        onebit = _predict(Method("1-bit", 1), world=world, bytes_per_s=math.inf, latency_s=0.0, codec_bytes_per_s=math.inf)
        assert onebit["efficiency"] == 1.0
    assert _predict(Method(FP32), world=1)["efficiency"] == 1.0  # one rank talks to nobody
    slow = _predict(Method(FP32), bytes_per_s=1.25e8)
    assert 0 < slow["efficiency"] < _predict(Method(FP32))["efficiency"] < 1


@pytest.mark.parametrize("window", [0.0, 5.0, 50.0, 1e6])
@pytest.mark.parametrize("gbit", [1, 10, 400])
@pytest.mark.parametrize("bucket", [0.0, 1e6, 25e6, 1e12])
def test_overlap_never_makes_a_step_slower(window, gbit, bucket):
    kw = {"overlap_window_ms": window, "bytes_per_s": gbit * 1e9 / 8, "bucket_bytes": bucket}
    serial, overlapped = _predict(Method(FP32), **kw), _predict(Method("fp32 ov", overlap=True), **kw)
    assert overlapped["comm_ms"] == serial["comm_ms"]
    assert overlapped["step_ms"] <= serial["step_ms"] and overlapped["efficiency"] >= serial["efficiency"]
    # the last bucket is ready only when backward ends: that much is never hidden
    assert overlapped["exposed_comm_ms"] >= serial["comm_ms"] * min(1.0, bucket / (4 * (1 << 20))) - 1e-12
    assert overlapped["exposed_comm_ms"] >= serial["comm_ms"] - window - 1e-12


def test_crossover_is_the_world_size_from_which_it_keeps_paying():
    assert simulate.crossover({2: 0.8, 4: 0.95, 8: 1.02, 16: 1.1, 32: 1.3}) == 8
    assert simulate.crossover({2: 1.2, 4: 0.9, 8: 1.1, 16: 1.2}) == 8  # pays at 2, not at 4: from 8 on
    assert simulate.crossover({2: 0.5, 4: 0.9}) is None
    assert simulate.crossover({2: 1.5, 4: 1.5}) == 2
    assert simulate.crossover({2: 1.05, 4: 1.15}, threshold=1.1) == 4


def test_a_codec_that_costs_what_the_wire_saves_at_n_6_7_pays_off_from_8_ranks():
    # no padding (numel a multiple of 1024 ranks x 256), no latency: 1-bit saves 2 (N-1)/N * numel * (4 - 9/64)
    # bytes of wire per step and costs 86 numel bytes of codec. Pick the codec's speed so that it pays once
    # 2 (N-1)/N >= 1.7, i.e. from N = 6.67: among powers of two, from 8.
    numel, bandwidth = 1 << 20, 1.25e9
    codec_speed = 86 * bandwidth / (1.7 * (4 - 9 / 64))
    speedups = {}
    for world in (2, 4, 8, 16, 32, 1024):
        kw = {"numel": numel, "world": world, "latency_s": 0.0, "bytes_per_s": bandwidth, "codec_bytes_per_s": codec_speed}
        speedups[world] = _predict(Method(FP32), **kw)["step_ms"] / _predict(Method("1-bit", 1), **kw)["step_ms"]
    assert speedups[4] < 1 < speedups[8]
    assert simulate.crossover(speedups) == 8


def test_the_recipe_scenarios_come_from_the_shipped_files_and_say_what_is_assumed():
    cifar = simulate.load_scenario("cifar10_prn18_dat_pgd", None, 256)
    imagenet = simulate.load_scenario("imagenet_r50_dat_pgd", None, 256)
    assert (cifar.global_batch, cifar.attack_steps, cifar.clean_pass, cifar.assumption) == (2048, 10, True, True)
    assert (imagenet.global_batch, imagenet.attack_steps, imagenet.model) == (2048, 4, "resnet50")
    assert "Fast AT" in cifar.compute_source and 0 < cifar.overlap_share < imagenet.overlap_share < 0.5
    measured = simulate.load_scenario("cifar10_prn18_dat_pgd", 512.0, 256)
    assert measured.ms_per_image == 2.0 and not measured.assumption and "measured" in measured.compute_source
    with pytest.raises(ConfigError, match="knows the recipes"):
        simulate.load_scenario("demo", None, 256)
    with pytest.raises(ConfigError, match="RECIPE=MS"):
        simulate._parse_compute("cifar10_prn18_dat_pgd=fast")
    labels = [m.label for m in simulate.recipe_methods()]
    assert labels[:2] == [FP32, "fp32, overlapped"] and "0/1 Adam" in labels


def test_parameter_counts_are_those_of_the_models():
    import timm

    import dat_ds.models  # noqa: F401 - registers preactresnet18 with timm

    for params, model in ((simulate.preactresnet18_params(10), timm.create_model("preactresnet18", num_classes=10)),
                          (simulate.resnet50_params(1000), timm.create_model("resnet50", num_classes=1000))):
        assert params == sum(p.numel() for p in model.parameters())


def test_bench_simulate_writes_predictions_plots_and_a_crossover_table(tmp_path):
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    simulate.add_args(p)
    args = p.parse_args(["--out", str(tmp_path), "--network", NETWORK_JSON, "--ranks", "2,8,1024", "--links", "1,400",
                         "--compute-ms", "imagenet_r50_dat_pgd=1000"])
    result = simulate.run(args)
    saved = json.loads((tmp_path / "simulate.json").read_text())
    assert saved["crossover"] == result["crossover"] and saved["max_abs_error_pct"] is not None
    rows = saved["predictions"]
    assert {r["scaling"] for r in rows} == {"strong", "weak"} and {r["world_size"] for r in rows} == {2, 8, 1024}
    assert all(r["samples_per_s"] > 0 and 0 < r["efficiency"] <= 1 for r in rows)
    r50 = next(s for s in saved["recipes"] if s["recipe"] == "imagenet_r50_dat_pgd")
    assert not r50["assumption"] and r50["ms_per_image"] == pytest.approx(1000 / 256)
    # on a 1 Gbit/s link 1-bit communication pays off against the shipped fp32 all-reduce from N = 2
    onebit = [c for c in saved["crossover"] if c["optimizer"] == "1-bit Adam / LAMB" and c["baseline"] == FP32
              and c["link_gbit"] == 1.0]
    assert onebit and all(c["pays_off_from_world_size"] == 2 for c in onebit)
    for name in ("cifar10_prn18_dat_pgd", "imagenet_r50_dat_pgd"):
        assert (tmp_path / f"simulate_{name}.png").stat().st_size > 5000
