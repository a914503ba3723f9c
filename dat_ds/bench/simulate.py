"""``dat-ds bench simulate``: past this machine by a cost model, calibrated and checked on ``bench network``.

The model (alpha-beta, no compute/communication overlap: our compressing optimizers communicate in
``step()``, after backward):

    step_ms(N, link) = base_ms + wire_bytes(N) / bandwidth + 2 (N - 1) * latency
    wire_bytes(N)    = 2 (N - 1) / N * payload      (ring all-reduce for fp32; all-to-all + all-gather of
                                                      the compressed payload for DAT 8-bit and the 1-bit ones)

``payload`` is the measured bytes per step of one rank at N = 2 (where 2 (N - 1) / N = 1). ``base_ms`` is
the step with no wire time: compute plus the optimizer's own arithmetic (compression included), taken
from the unshaped link of ``bench network`` (minus that link's small wire time). Validation: the same
formula predicts each shaped-link step time of ``network.json`` from the measured link rate; the error
of each prediction is reported. Then it predicts step time and scaling efficiency
(``base_ms / step_ms``: 1.0 is perfect linear scaling) for N ranks on links of 1-400 Gbit/s.
No torch here.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .common import show_table


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--network", default="bench/results/network.json", help="bench network's result to calibrate on")
    p.add_argument("--ranks", default="2,8,32,128,1024", help="world sizes to predict (default 2,8,32,128,1024)")
    p.add_argument("--links", default="1,10,100,400", help="link bandwidths in Gbit/s (default 1,10,100,400)")
    p.add_argument("--latency-us", type=float, default=10.0, help="per-message latency in microseconds (default 10)")


def wire_ms(payload_bytes: float, world: int, bytes_per_s: float, latency_s: float) -> float:
    """Communication time of one step for one rank: ring volume over the link plus per-message latency."""
    if world <= 1:
        return 0.0
    return 1000 * (2 * (world - 1) / world * payload_bytes / bytes_per_s + 2 * (world - 1) * latency_s)


def calibrate(network: dict[str, Any]) -> tuple[dict[tuple[str, str], dict[str, float]], list[dict[str, Any]]]:
    """(model, optimizer) -> base_ms and payload from the unshaped rows; the shaped rows' prediction errors."""
    rows = network["results"]
    unshaped_rate = 1e6 * network["link_mb_s"]["None"]
    base: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        if r["bandwidth_mbit"] is None and r["ms_per_step_compressed"] is not None:
            payload = r["bytes_per_step_compressed"] if r["bytes_per_step_compressed"] is not None else r["bytes_per_step_fp32"]
            base[(r["model"], r["optimizer"])] = {
                "payload_bytes": payload,
                "base_ms": r["ms_per_step_compressed"] - wire_ms(payload, 2, unshaped_rate, 0.0)}
    checks = []
    for r in rows:
        key = (r["model"], r["optimizer"])
        if r["bandwidth_mbit"] is None or key not in base or r["ms_per_step_compressed"] is None:
            continue
        b = base[key]
        predicted = b["base_ms"] + wire_ms(b["payload_bytes"], 2, 1e6 * r["link_mb_s"], 0.0)
        measured = r["ms_per_step_compressed"]
        checks.append({"model": r["model"], "optimizer": r["optimizer"], "bandwidth_mbit": r["bandwidth_mbit"],
                       "measured_ms": measured, "predicted_ms": predicted,
                       "error_pct": 100 * (predicted - measured) / measured})
    return base, checks


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..core.errors import ConfigError
    from . import write_result

    path = Path(args.network)
    if not path.is_file():
        raise ConfigError(f"{path} not found; run `dat-ds bench network` first (it must include the unshaped link)")
    network = json.loads(path.read_text())
    if "None" not in network.get("link_mb_s", {}):
        raise ConfigError(f"{path} has no unshaped-link rows to calibrate on; run bench network with --bandwidths none,...")
    ranks = [int(v) for v in args.ranks.split(",")]
    links = [float(v) for v in args.links.split(",")]
    t0 = time.perf_counter()
    base, checks = calibrate(network)
    latency = args.latency_us * 1e-6
    predictions = []
    for (model, optimizer), b in base.items():
        for gbit in links:
            for world in ranks:
                comm = wire_ms(b["payload_bytes"], world, gbit * 1e9 / 8, latency)
                step = b["base_ms"] + comm
                predictions.append({"model": model, "optimizer": optimizer, "link_gbit": gbit, "world_size": world,
                                    "base_ms": b["base_ms"], "comm_ms": comm, "step_ms": step,
                                    "efficiency": b["base_ms"] / step})
    errors = [abs(c["error_pct"]) for c in checks]
    result = {"source": str(path), "latency_us": args.latency_us, "calibration": [
        {"model": m, "optimizer": o, **v} for (m, o), v in base.items()], "validation": checks,
        "max_abs_error_pct": max(errors) if errors else None, "predictions": predictions,
        "seconds": time.perf_counter() - t0,
        "note": "base_ms is this machine's compute (CPU); scale it to your accelerator's step time for real clusters"}
    write_result(Path(args.out), "simulate", result)
    show_table("bench simulate: validation on the namespace link (predicted vs measured ms/step)",
               ["model", "optimizer", "link Mbit/s", "measured", "predicted", "error"],
               [[c["model"], c["optimizer"], f"{c['bandwidth_mbit']:g}", f"{c['measured_ms']:.0f}",
                 f"{c['predicted_ms']:.0f}", f"{c['error_pct']:+.1f} %"] for c in checks])
    show_table(f"bench simulate: scaling efficiency (latency {args.latency_us:g} us)",
               ["model", "optimizer", *[f"N={n} @ {g:g} Gb/s" for g in links[:2] for n in (ranks[0], ranks[-1])]],
               [[m, o, *[f"{next(p['efficiency'] for p in predictions if p['model'] == m and p['optimizer'] == o and p['link_gbit'] == g and p['world_size'] == n):.2f}"
                         for g in links[:2] for n in (ranks[0], ranks[-1])]] for (m, o) in base])
    return result
