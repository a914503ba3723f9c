"""``dat-ds bench startup``: how long the command line takes before it does anything, vs ``import torch``.

Measured, each as a fresh ``python -m dat_ds.cli`` process (what ``dat-ds`` runs):

* ``dat-ds --help``;
* a one-line config error (``dat-ds train --set attack.eps=2``: exit 2);
* an eval error (``dat-ds eval --run <run> --attacks bogus --nproc 2``: exit 2, ideally before any rank);
* the demo's time to its first training step: from starting ``dat-ds demo`` (1 epoch, 2 steps, a step
  record every step) to the first ``"kind": "step"`` record in its ``metrics.jsonl``.

Next to each, ``python -c "import torch"`` in the same run, the arms interleaved round by round so a
busy machine slows them alike; medians are reported with the ratio to ``import torch``. Goal: ``--help``
and a config error take <= 0.3x ``import torch`` (they should not import torch at all).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import write_result
from .common import show_table

log = logging.getLogger(__name__)

GOAL_RATIO = 0.3
IMPORT_TORCH = [sys.executable, "-c", "import torch"]


def cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "dat_ds.cli", *argv]


def quick_commands(run_dir: str) -> dict[str, tuple[list[str], int]]:
    """name -> (command, expected exit code)."""
    return {
        "--help": (cli("--help"), 0),
        "config error": (cli("train", "--set", "attack.eps=2"), 2),
        "eval error": (cli("eval", "--run", run_dir, "--attacks", "bogus", "--nproc", "2"), 2),
    }


def time_command(cmd: list[str], timeout: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
    return {"seconds": seconds, "exit_code": proc.returncode, "last_line": lines[-1][:300] if lines else ""}


def demo_first_step(out_dir: Path, steps: int, timeout: float) -> dict[str, Any]:
    """Start ``dat-ds demo`` and time its first output line, first step record and exit."""
    cmd = cli("demo", "--epochs", "1", "--output-dir", str(out_dir), "--set", f"train.max_steps_per_epoch={steps}",
              "--set", "train.log_every=1", "--set", "eval.max_examples=32")
    metrics = out_dir / "demo" / "metrics.jsonl"
    first_output: list[float] = []
    tail: list[str] = []

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def read() -> None:
        for line in proc.stdout:
            if not first_output:
                first_output.append(time.perf_counter() - t0)
            tail.append(line.rstrip())
            del tail[:-20]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    first_step = None
    while proc.poll() is None and time.perf_counter() - t0 < timeout:
        if first_step is None and metrics.is_file() and '"kind": "step"' in metrics.read_text():
            first_step = time.perf_counter() - t0
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
    rc = proc.wait()
    total = time.perf_counter() - t0
    reader.join(timeout=5)
    if first_step is None and metrics.is_file() and '"kind": "step"' in metrics.read_text():
        first_step = total  # the run finished between two polls
    return {"first_step_s": first_step, "first_output_s": first_output[0] if first_output else None,
            "total_s": total, "exit_code": rc, "run_dir": str(out_dir / "demo"),
            "last_line": next((ln for ln in reversed(tail) if ln.strip()), "")[:300]}


def summarize(samples: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "rounds": len(samples)}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the quick commands (default 5)")
    p.add_argument("--demo-rounds", type=int, default=1, help="demo launches (default 1; each trains 2 steps)")
    p.add_argument("--demo-steps", type=int, default=2, help="training steps of each demo launch")
    p.add_argument("--run", default=None, help="run folder for the eval error (default: the demo's own run)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dat_ds.core.errors import ConfigError

    if args.rounds < 1 or args.demo_rounds < 0:
        raise ConfigError("bench startup needs --rounds >= 1 and --demo-rounds >= 0")
    torch_samples: list[float] = []
    demos: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dat-ds-startup-") as tmp:
        time_command(IMPORT_TORCH, 300)  # warm the file cache; not measured
        for i in range(args.demo_rounds):
            torch_samples.append(time_command(IMPORT_TORCH, 300)["seconds"])
            demos.append(demo_first_step(Path(tmp) / f"demo{i}", args.demo_steps, timeout=900))
            log.info("demo launch %d: first step after %s s (exit %d)", i + 1, demos[-1]["first_step_s"],
                     demos[-1]["exit_code"])
        run_dir = args.run or (demos[0]["run_dir"] if demos else str(Path(tmp) / "no-such-run"))
        commands = quick_commands(run_dir)
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name in commands}
        for cmd, _ in commands.values():  # one unmeasured pass warms each command's imports
            time_command(cmd, 300)
        for i in range(args.rounds):
            torch_samples.append(time_command(IMPORT_TORCH, 300)["seconds"])
            for name, (cmd, _) in commands.items():
                samples[name].append(time_command(cmd, 300))
            log.info("round %d/%d: import torch %.2f s, %s", i + 1, args.rounds, torch_samples[-1],
                     ", ".join(f"{name} {s[-1]['seconds']:.2f} s" for name, s in samples.items()))
    baseline = summarize(torch_samples)
    base = baseline["median_s"]
    results: dict[str, dict[str, Any]] = {}
    for name, (cmd, expected) in commands.items():
        timing = summarize([s["seconds"] for s in samples[name]])
        last = samples[name][-1]
        shown = ["dat-ds", *("RUN" if a == run_dir else a for a in cmd[3:])]
        results[name] = {"command": shown, **timing, "ratio_to_import_torch": timing["median_s"] / base,
                         "exit_code": last["exit_code"], "expected_exit_code": expected,
                         "exit_code_ok": all(s["exit_code"] == expected for s in samples[name]),
                         "last_line": last["last_line"]}
    demo: dict[str, Any] | None = None
    if demos:
        firsts = [d["first_step_s"] for d in demos if d["first_step_s"] is not None]
        demo = {"command": ["dat-ds", "demo", "--epochs", "1", "--set", f"train.max_steps_per_epoch={args.demo_steps}",
                            "--set", "train.log_every=1", "--set", "eval.max_examples=32"],
                "launches": [{k: v for k, v in d.items() if k != "run_dir"} for d in demos],
                "first_step_median_s": statistics.median(firsts) if firsts else None,
                "ratio_to_import_torch": statistics.median(firsts) / base if firsts else None,
                "exit_code_ok": all(d["exit_code"] == 0 for d in demos)}
    goal_ratios = [results[k]["ratio_to_import_torch"] for k in ("--help", "config error")]
    out = {"import_torch": baseline, "commands": results, "demo_first_step": demo, "rounds": args.rounds,
           "eval_run": "the demo's run" if args.run is None else args.run,
           "goal": f"--help and a config error take <= {GOAL_RATIO} x `import torch`",
           "goal_met": all(r <= GOAL_RATIO for r in goal_ratios)}
    path = write_result(args.out, "startup", out)
    rows = [["python -c 'import torch'", base, 1.0, 0, "-"]]
    rows += [[" ".join(r["command"]), r["median_s"], r["ratio_to_import_torch"], r["exit_code"],
              (f"<= {GOAL_RATIO}: {'met' if r['ratio_to_import_torch'] <= GOAL_RATIO else 'MISSED'}"
               if name in ("--help", "config error") else "-")] for name, r in results.items()]
    if demo is not None:
        rows.append(["dat-ds demo: first step", demo["first_step_median_s"], demo["ratio_to_import_torch"],
                     demos[-1]["exit_code"], "-"])
    show_table(f"bench startup: median wall time of {args.rounds} interleaved rounds, vs `import torch`",
               ["command", "seconds", "x import torch", "exit code", "goal"], rows)
    log.info("wrote %s", path)
    return out
