"""The measuring ranks of ``dat-ds tune`` and ``dat-ds bench engine --vs``: one launch, many points.

Started through the one launcher as ``train`` is (the rank entry ``cli.tune_rank`` runs ``main``). The ranks
import torch and DeepSpeed once and then serve requests: the caller writes ``req-<n>.json`` into
``--exchange``; rank 0 reads it and hands it to the other ranks; every rank builds the recipe's run with
that request's DeepSpeed JSON through ``runtime.Trainer`` (data, model, objective, attack and engine
exactly as ``dat-ds train`` builds them), trains ``warmup + steps`` optimizer steps of its first epoch
without evaluation, and rank 0 writes ``res-<n>.json``: each timed step's time (the slowest rank's,
with the device synchronised, as ``benchmarks/worker.py`` times steps), samples/s = global batch / median.

After ``probe`` timed steps the ranks agree (one ``all_gather``) whether to go on: a point over the memory
cap, slower than ``prune_below`` or past the deadline stops there. A rank that runs out of device memory
(or fails otherwise) writes ``fail-<n>-<rank>.json`` and exits; the caller records the point and starts
new ranks for the next one.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ..core.requests import TuneWorkerRequest
from ..runtime.callbacks import Callback, StopTraining

log = logging.getLogger(__name__)
POLL_S = 0.05


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class _Timer(Callback):
    """A trainer callback: stamps every optimizer step; decides, with the other ranks, whether to go on."""

    def __init__(self, req: dict[str, Any], accum: int, global_batch: int):
        self.req, self.accum, self.global_batch = req, accum, global_batch
        self.micro_steps = 0
        self.stamps: list[float] = []
        self.peak_rss = _rss_mb()
        self.verdict: str | None = None

    def durations(self) -> list[float]:
        w = self.req["warmup"]
        t = self.stamps[w - 1:] if w > 0 else self.stamps
        return [b - a for a, b in zip(t, t[1:])]

    def agree(self) -> dict[str, Any]:
        """Every rank's timings and memory; the same answer on every rank."""
        from ..core import dist

        ranks = dist.all_gather_object({"d": self.durations(), "rss": self.peak_rss, "late": time.time() > self.req["deadline"]})
        n = min(len(r["d"]) for r in ranks)
        steps = [max(r["d"][i] for r in ranks) for i in range(n)]
        return {"step_s": steps, "rss_mb": max(r["rss"] for r in ranks), "late": any(r["late"] for r in ranks)}

    def on_step(self, trainer, state) -> None:
        from ..core import dist

        self.micro_steps += 1
        if self.micro_steps % self.accum:
            return
        dist.accelerator().synchronize()  # kernels are async on GPUs: a step ends when its work has finished
        self.stamps.append(time.perf_counter())
        self.peak_rss = max(self.peak_rss, _rss_mb())
        timed = len(self.stamps) - self.req["warmup"]
        if timed == self.req["probe"] and timed < self.req["steps"]:
            seen = self.agree()
            cap = self.req.get("rss_cap_mb")
            if cap and seen["rss_mb"] > cap:
                self.verdict = "oom"
            elif seen["late"]:
                self.verdict = "late"
            elif self.req.get("prune_below") and seen["step_s"] and \
                    self.global_batch / statistics.median(seen["step_s"]) < self.req["prune_below"]:
                self.verdict = "pruned"
            if self.verdict:
                raise StopTraining(self.verdict)
        if timed >= self.req["steps"]:
            raise StopTraining("done")


def measure(req: dict[str, Any], request: TuneWorkerRequest, exchange: Path) -> dict[str, Any] | None:
    """One point on every rank; rank 0 returns its result."""
    import torch

    from ..core import dist
    from ..core.config import build_config
    from ..runtime import ds_config
    from ..runtime.trainer import Trainer

    t0 = time.perf_counter()
    n = req["n"]
    accum = ds_config.prepare(req["ds_config"], dist.world_size()).grad_accum
    micro_steps = (req["warmup"] + req["steps"]) * accum  # the loader stops here even if no verdict comes
    cfg = build_config(request.recipe, [*request.overrides, *req["sets"], f"deepspeed_config={req['ds_config']}",
                                     "train.epochs=1", f"train.max_steps_per_epoch={micro_steps}",
                                     f"train.log_every={10**9}", f"output_dir={exchange / 'runs'}", f"name=p{n}"])
    cuda = dist.accelerator().device_name() != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = None
    try:
        trainer = Trainer(cfg)
        trainer.setup()
        s = trainer.run.settings
        timer = _Timer(req, s.grad_accum, s.global_batch)
        trainer.callbacks = [timer]
        try:
            trainer.train_epoch()
        except StopTraining:
            pass
        seen = timer.agree()
        if timer.verdict is None:
            cap = req.get("rss_cap_mb")
            timer.verdict = "oom" if cap and seen["rss_mb"] > cap else "done"
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else seen["rss_mb"]
        status = {"done": "ok", "pruned": "pruned", "oom": "oom", "late": "error"}[timer.verdict]
        median = statistics.median(seen["step_s"]) if seen["step_s"] else None
        result = {"status": status, "step_s": seen["step_s"],
                  "samples_per_s": s.global_batch / median if median else None, "peak_mem_mb": peak,
                  "global_batch": s.global_batch, "micro_batch": s.micro_batch, "grad_accum": s.grad_accum,
                  "world_size": dist.world_size(), "threads_per_rank": torch.get_num_threads(),
                  "message": {"oom": f"resident memory {seen['rss_mb']:.0f} MB over the cap {req.get('rss_cap_mb')} MB",
                              "late": "stopped at the budget's end", "pruned": "slower than the best after "
                              f"{req['probe']} timed steps"}.get(timer.verdict, "")}
    except BaseException as e:  # out of memory or anything else: say so, then fail (the caller starts new ranks)
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        fail = {"status": "oom" if oom else "error", "message": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        from ..core.io import atomic_write_json

        atomic_write_json(exchange / f"fail-{n}-{dist.rank()}.json", fail)
        raise
    finally:
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    result["wall_s"] = time.perf_counter() - t0
    return result if dist.is_main_process() else None


def main(request: TuneWorkerRequest) -> int:
    import warnings

    from ..core import dist
    from ..core.io import atomic_write_json

    dist.setup_logging(logging.WARNING)  # one line per point is the caller's job
    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's use of deprecated torch calls, per point
    sys.stdout = open(os.devnull, "w")  # no per-point progress bars under the caller's own
    dist.init_distributed()
    exchange = Path(request.exchange)
    n = 0
    while True:
        req = None
        if dist.is_main_process():
            path = exchange / f"req-{n}.json"
            while not path.exists():
                time.sleep(POLL_S)
            req = json.loads(path.read_text())
        req = dist.all_gather_object(req)[0]
        if req["op"] == "quit":
            return 0
        req["n"] = n
        result = measure(req, request, exchange)
        if result is not None:
            atomic_write_json(exchange / f"res-{n}.json", result)
        dist.barrier()
        n += 1
