"""``dat-ds bench network``: two namespaces behind a shaped link, the speedup arithmetic, the fast packers.

The namespace tests need root and iproute2 and skip with the reason otherwise; every namespace they make
is deleted by the test itself (and by conftest's session finalizer if a test was killed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from dat_ds.bench import netns
from dat_ds.bench import network
from dat_ds.comm.compressors import pack_bits, unpack_bits, unpack_signs
from dat_ds.core.errors import ConfigError

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
