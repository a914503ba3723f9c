"""The ``measure(point, prune_below)`` of the tuner's search, on real ranks.

``EngineMeasure`` keeps one launch of the measuring ranks (``tune.worker``) per layout (ranks x threads)
alive and sends it one request per point, so torch and DeepSpeed are imported once per layout, not once
per point. A point that kills its ranks (out of memory) is recorded and the next point gets new ranks.

How the ranks start is passed in (``StartRanks``; ``cli.tune.start_ranks`` is the one launcher's): the
tuner sits below the launch layer and imports nothing of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from ..core.io import atomic_write_json
from . import search
from .search import Point, Result

WARMUP, STEPS, PROBE = 2, 5, 2  # optimizer steps per point: warm-up, timed (median), agreement after PROBE


class StartRanks(Protocol):
    """Runs the measuring ranks (``tune.worker`` with ``argv``) on ``nproc`` ranks per node until they exit;
    returns None when they exited cleanly, else one line saying why not."""

    def __call__(self, argv: list[str], *, nproc: int, hostfile: str | None,
                 env: dict[str, str] | None) -> str | None: ...


class Server:
    """One launch of the measuring ranks for one layout; ``request()`` sends a point, waits for its result."""

    def __init__(self, exchange: Path, start_ranks: StartRanks, *, recipe: str | None, sets: list[str], ranks: int,
                 threads: int, hostfile: str | None):
        self.dir = Path(tempfile.mkdtemp(prefix=f"layout-{ranks}x{threads}-", dir=exchange))
        self.n = 0
        self.failure: str | None = None
        self.done = threading.Event()
        argv = ["--exchange", str(self.dir)] + (["--recipe", recipe] if recipe else [])
        for s in sets:
            argv += ["--set", s]
        env = {"DAT_DS_THREADS_PER_RANK": str(threads)} if threads else None
        import psutil

        before = {c.pid for c in psutil.Process().children()}

        def run() -> None:
            try:
                self.failure = start_ranks(argv, nproc=ranks, hostfile=hostfile, env=env)
            except Exception as e:  # noqa: BLE001 -- reported with the point that was running
                self.failure = f"{type(e).__name__}: {e}"
            finally:
                self.done.set()

        self.thread = threading.Thread(target=run, name=f"tune-ranks-{ranks}x{threads}", daemon=True)
        self.thread.start()
        self.launcher_pid: int | None = None
        for _ in range(50):  # the DeepSpeed launcher this launch started: its process group is the whole run
            new = [c.pid for c in psutil.Process().children() if c.pid not in before]
            if new:
                self.launcher_pid = new[0]
                break
            time.sleep(0.02)

    def request(self, req: dict[str, Any], *, wait_until: float) -> dict[str, Any]:
        n = self.n
        self.n += 1
        atomic_write_json(self.dir / f"req-{n}.json", req)
        res = self.dir / f"res-{n}.json"
        while not res.exists():
            if self.done.is_set():
                fails = sorted(self.dir.glob(f"fail-{n}-*.json"))
                if fails:
                    return json.loads(fails[0].read_text())
                return {"status": "error", "message": self.failure or "the ranks exited"}
            if time.time() > wait_until:
                self.kill()
                return {"status": "error", "message": "no result before the budget's end; the ranks were stopped"}
            time.sleep(0.05)
        return json.loads(res.read_text())

    def kill(self) -> None:
        import signal

        if self.launcher_pid is not None and not self.done.is_set():
            try:
                os.killpg(self.launcher_pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        self.done.wait(30)

    def close(self, wait: bool = True) -> None:
        """Tell the ranks to exit; ``wait=False`` at the very end: they go within a second, and also when
        this process is gone (``launch.status.watch_cli``)."""
        if not self.done.is_set():
            atomic_write_json(self.dir / f"req-{self.n}.json", {"op": "quit"})
            if wait and not self.done.wait(30):
                self.kill()


class EngineMeasure:
    """``measure(point, prune_below) -> Result`` on real ranks; one live launch at a time."""

    def __init__(self, start_ranks: StartRanks, *, recipe: str | None, sets: list[str], hostfile: str | None,
                 base_json: dict[str, Any], start: Point, optimizer_family: str, lr_rule: str, deadline: float,
                 rss_cap_mb: float | None, exchange: Path, hard_end: float | None = None, warmup: int = WARMUP,
                 steps: int = STEPS, probe: int = PROBE):
        self.start_ranks = start_ranks
        self.recipe, self.sets, self.hostfile = recipe, sets, hostfile
        self.base, self.start, self.family, self.lr_rule = base_json, start, optimizer_family, lr_rule
        self.deadline, self.rss_cap_mb, self.exchange = deadline, rss_cap_mb, exchange
        self.hard_end = hard_end if hard_end is not None else deadline + 60  # then the ranks are stopped
        self.warmup, self.steps, self.probe = warmup, steps, probe
        self.server: Server | None = None
        self.layout: tuple[int, int] | None = None

    def ds_json(self, p: Point) -> dict[str, Any]:
        return search.point_ds_json(self.base, self.start, p, optimizer_family=self.family, lr_rule=self.lr_rule)

    def _server(self, layout: tuple[int, int]) -> Server:
        if self.server is not None and (self.layout != layout or self.server.done.is_set()):
            self.server.close()
            self.server = None
        if self.server is None:
            self.server = Server(self.exchange, self.start_ranks, recipe=self.recipe, sets=self.sets, ranks=layout[0],
                                 threads=layout[1], hostfile=self.hostfile)
            self.layout = layout
        return self.server

    def run_json(self, layout: tuple[int, int], ds: dict[str, Any], sets: list[str], *, steps: int,
                 prune_below: float | None = None) -> Result:
        t0 = time.time()
        fresh = self.server is None or self.layout != layout or self.server.done.is_set()
        server = self._server(layout)
        measured = json.loads(json.dumps(ds))
        params = measured.get("optimizer", {}).get("params", {})
        for k in ("freeze_step", "var_freeze_step"):  # time the compressed stage, not the warm-up one
            if k in params:
                params[k] = self.warmup
        digest = hashlib.sha1(json.dumps(measured, sort_keys=True).encode()).hexdigest()[:12]
        path = server.dir / f"point-{digest}.json"
        atomic_write_json(path, measured)
        req = {"op": "measure", "ds_config": str(path), "sets": sets, "warmup": self.warmup, "steps": steps,
               "probe": min(self.probe, steps), "prune_below": prune_below, "rss_cap_mb": self.rss_cap_mb,
               "deadline": self.deadline}
        out = server.request(req, wait_until=self.hard_end)
        total = time.time() - t0
        own = out.get("wall_s", total)  # the ranks' own time for the point; the rest was their start
        return Result(status=out.get("status", "error"), samples_per_s=out.get("samples_per_s"),
                      step_s=out.get("step_s", []), wall_s=own, peak_mem_mb=out.get("peak_mem_mb"),
                      message=out.get("message", ""), startup_s=max(0.0, total - own) if fresh else 0.0)

    def __call__(self, p: Point, prune_below: float | None) -> Result:
        sets = [f"model.channels_last={str(p.channels_last).lower()}", f"data.num_workers={p.workers}"]
        return self.run_json(p.layout, self.ds_json(p), sets, steps=self.steps, prune_below=prune_below)

    def close(self, wait: bool = True) -> None:
        if self.server is not None:
            self.server.close(wait)
            self.last, self.server = self.server, None

    def wait_closed(self, timeout: float) -> None:
        last = getattr(self, "last", None)
        if last is not None:
            last.done.wait(timeout)
