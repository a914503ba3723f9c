"""The search of ``dat-ds tune``: pure (no torch, no processes); the measurement is passed in.

A point is one engine + launch setting (micro-batch, ZeRO stage, precision, communication, channels_last,
data-loader workers, ranks x threads, global batch). ``search()`` walks the space with a callable
``measure(point, prune_below) -> Result`` that times real steps (``measure.EngineMeasure``) or, in the
tests, a formula:

1. the starting point (the JSON as given), the reference every speedup is stated against;
2. micro-batch: powers of two up from the JSON's, until one does not fit (out of memory, or over the
   resident-memory cap on CPU) -- every larger one is then pruned unmeasured -- or is slower; then down
   until one is slower. Accumulation follows, so the global batch stays what the JSON says;
3. one pass over each other dimension at the best point so far (coordinate search);
4. successive halving of the best few: each round re-measures the survivors and the start one after
   the other and keeps the better half (by the median of each point's measurements), so the winner is
   not the luckiest single measurement and the speedup is stated from side-by-side numbers.

A point whose first timed steps are already ``margin`` slower than the best is stopped early by the
measurement (``prune_below``): it cannot win. Measured points go to a cache (``cache[key]``), so an
interrupted tune resumes where it stopped. The clock is passed in too: the search stops before a
measurement that would not fit in the budget.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, MutableMapping, Sequence

OK, PRUNED, OOM, INVALID, ERROR = "ok", "pruned", "oom", "invalid", "error"


@dataclass(frozen=True)
class Point:
    micro: int  # per-rank micro-batch
    accum: int  # gradient accumulation steps: micro x accum x world = global_batch
    global_batch: int
    zero: int = 0  # ZeRO stage
    precision: str = "fp32"  # fp32 | bf16 | fp16 | bf16-autocast
    comm: str = "none"  # none | dat8 | OneBitAdam | ZeroOneAdam | OneBitLamb
    channels_last: bool = False  # run config: model.channels_last
    workers: int = 0  # run config: data.num_workers
    ranks: int = 1  # ranks per node
    threads: int = 0  # torch threads per rank (0: the launcher's default, cores / ranks)

    @property
    def layout(self) -> tuple[int, int]:
        return self.ranks, self.threads

    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def label(self) -> str:
        parts = [f"mb{self.micro}x{self.accum}", f"z{self.zero}", self.precision]
        if self.comm != "none":
            parts.append(self.comm)
        if self.channels_last:
            parts.append("cl")
        if self.workers:
            parts.append(f"w{self.workers}")
        parts.append(f"{self.ranks}r" + (f"x{self.threads}t" if self.threads else ""))
        return " ".join(parts)


@dataclass
class Result:
    status: str  # ok | pruned (slower than the best after its first steps) | oom | invalid | error
    samples_per_s: float | None = None
    step_s: list[float] = field(default_factory=list)  # the timed optimizer steps (slowest rank each)
    wall_s: float = 0.0  # what measuring the point cost on running ranks
    startup_s: float = 0.0  # starting the ranks first (imports, rendezvous), when this point needed new ones
    peak_mem_mb: float | None = None
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Result":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass(frozen=True)
class Space:
    """The values each dimension may take; the first value of each is the starting JSON's."""

    micro: Sequence[int]  # candidate micro-batches (powers of two), ascending
    zero: Sequence[int] = (0,)
    precision: Sequence[str] = ("fp32",)
    comm: Sequence[str] = ("none",)
    channels_last: Sequence[bool] = (False,)
    workers: Sequence[int] = (0,)
    layout: Sequence[tuple[int, int]] = ((1, 0),)  # (ranks, threads)
    global_batch: Sequence[int] = ()  # empty: the JSON's only (no --allow-batch-change)
    nodes: int = 1  # world size = ranks x nodes


def with_micro(p: Point, micro: int, nodes: int = 1) -> Point | None:
    """``p`` at another micro-batch with accumulation derived so the global batch stays; None if it cannot."""
    world = p.ranks * nodes
    if micro < 1 or p.global_batch % (micro * world):
        return None
    return dataclasses.replace(p, micro=micro, accum=p.global_batch // (micro * world))


def refit(p: Point, nodes: int = 1, micro_options: Sequence[int] = ()) -> Point | None:
    """``p`` after a change of layout or global batch: the same micro-batch if it divides, else the largest
    candidate that does."""
    same = with_micro(p, p.micro, nodes)
    if same is not None:
        return same
    for m in sorted(micro_options, reverse=True):
        if m < p.micro:
            fit = with_micro(p, m, nodes)
            if fit is not None:
                return fit
    return None


@dataclass
class Outcome:
    start: Point
    best: Point
    start_sps: float | None
    best_sps: float | None
    measured: list[tuple[Point, Result]]  # every point in the order measured (cached ones included)
    stopped_by_budget: bool
    confirm_rounds: list[list[tuple[Point, float]]]

    @property
    def speedup(self) -> float | None:
        if not self.start_sps or not self.best_sps:
            return None
        return self.best_sps / self.start_sps

    @property
    def default_is_best(self) -> bool:
        return self.best == self.start


Measure = Callable[[Point, "float | None"], Result]


class Budget:
    """Seconds left of the tune, on the clock it is given (a fake one in the tests)."""

    def __init__(self, seconds: float, clock: Callable[[], float]):
        self.seconds, self.clock, self.t0 = seconds, clock, clock()

    def left(self) -> float:
        return self.seconds - (self.clock() - self.t0)


def search(start: Point, space: Space, measure: Measure, *, budget: Budget, cache: MutableMapping[str, dict] | None = None,
           validate: Callable[[Point], str | None] = lambda p: None, margin: float = 0.15, min_gain: float = 0.03,
           finalists: int = 4, on_result: Callable[[Point, Result, bool], None] | None = None,
           on_plan: Callable[[int], None] | None = None) -> Outcome:
    """Find the point with the most samples/s; see the module docstring.

    ``validate(point)``: why a point cannot run (the DeepSpeed-JSON validation), or None. ``margin``: a
    point this much slower than the best after its first timed steps is stopped. ``min_gain``: a point
    must beat the best by this much to replace it (noise). ``on_result(point, result, cached)`` after
    each point; ``on_plan(n)``: the number of points planned changed to ``n``.
    """
    return _Search(start, space, measure, budget, {} if cache is None else cache, validate, margin, min_gain,
                   finalists, on_result, on_plan).run()


class _OutOfBudget(Exception):
    pass


class _Search:
    def __init__(self, start, space, measure, budget, cache, validate, margin, min_gain, finalists, on_result, on_plan):
        self.start, self.space, self.measure, self.budget, self.cache = start, space, measure, budget, cache
        self.validate, self.margin, self.min_gain, self.finalists = validate, margin, min_gain, finalists
        self.on_result, self.on_plan = on_result or (lambda *a: None), on_plan or (lambda n: None)
        self.results: dict[Point, Result] = {}
        self.measured: list[tuple[Point, Result]] = []
        self.oom_at: dict[Point, int] = {}  # point with micro=0 (the rest of its settings) -> smallest micro that did not fit
        self.walls: list[float] = []
        self.startups: list[float] = []
        self.last_layout: tuple[int, int] | None = None
        self.best: Point | None = None
        self.planned = 0
        self.stopped_by_budget = False

    # -- bookkeeping
    def plan(self, n: int) -> None:
        self.planned += n
        self.on_plan(self.planned)

    def sps(self, p: Point) -> float | None:
        r = self.results.get(p)
        return r.samples_per_s if r is not None and r.status == OK else None

    def best_sps(self) -> float | None:
        return self.sps(self.best) if self.best is not None else None

    def _estimate(self, p: Point) -> float:
        """What measuring ``p`` will cost: recent points, plus a start of new ranks for another layout."""
        cost = max(self.walls[-5:]) if self.walls else 0.0  # engines of other ZeRO stages build slower
        if p.layout != self.last_layout and self.startups:
            cost += statistics.median(self.startups)
        return cost

    def evaluate(self, p: Point, *, tag: str = "", prune: bool = True) -> Result:
        key = p.key() + tag
        if not tag and p in self.results:
            return self.results[p]
        family = dataclasses.replace(p, micro=0, accum=0)
        why = self.validate(p)
        if why is not None:
            result, cached = Result(INVALID, message=why), False
        elif family in self.oom_at and p.micro >= self.oom_at[family]:
            result, cached = Result(OOM, message=f"micro-batch {self.oom_at[family]} already did not fit"), False
        elif key in self.cache:
            result, cached = Result.from_json(self.cache[key]), True
        else:
            if self.budget.left() < self._estimate(p):
                self.stopped_by_budget = True
                raise _OutOfBudget
            best = self.best_sps()
            floor = best * (1 - self.margin) if (prune and best) else None
            result, cached = self.measure(p, floor), False
            self.walls.append(result.wall_s)
            if result.startup_s:
                self.startups.append(result.startup_s)
            self.last_layout = p.layout if result.status in (OK, PRUNED) else None  # a failed point ends its ranks
            if result.status not in (INVALID,):
                self.cache[key] = result.to_json()
        if result.status == OOM:
            self.oom_at[family] = min(p.micro, self.oom_at.get(family, p.micro))
        if not tag:
            self.results[p] = result
            self.measured.append((p, result))
        self.on_result(p, result, cached)
        return result

    def consider(self, p: Point) -> tuple[Result, bool]:
        """Measure ``p``; make it the best if it beats the best by ``min_gain``."""
        result = self.evaluate(p)
        s, best = self.sps(p), self.best_sps()
        if s is not None and (best is None or s > best * (1 + self.min_gain)):
            self.best = p
            return result, True
        return result, False

    # -- phases
    def run(self) -> Outcome:
        rounds: list[list[tuple[Point, float]]] = []
        self.plan(1)
        try:
            self.consider(self.start)
            self.sweep_micro()
            for name in ("zero", "channels_last", "workers", "precision", "comm", "global_batch", "layout"):
                self.sweep(name)
            rounds = self.confirm(rounds)
        except _OutOfBudget:
            pass
        best = self.best if self.best is not None else self.start
        start_sps, best_sps = self.sps(self.start), self.sps(best)
        if rounds:  # the last round's numbers: measured alternating, side by side
            last = dict(rounds[-1])
            start_sps, best_sps = last.get(self.start, start_sps), last.get(best, best_sps)
        return Outcome(self.start, best, start_sps, best_sps, self.measured, self.stopped_by_budget, rounds)

    def sweep_micro(self) -> None:
        """Up from the JSON's micro-batch until one does not fit or is not faster, then down likewise."""
        options = sorted(set(self.space.micro))
        for direction in (1, -1):
            base = self.best or self.start
            todo = [m for m in options if m > base.micro] if direction > 0 else \
                [m for m in reversed(options) if m < base.micro]
            self.plan(len(todo))
            for i, m in enumerate(todo):
                p = with_micro(base, m, self.space.nodes)
                if p is None:
                    self.plan(-1)
                    continue
                result, improved = self.consider(p)
                if result.status == INVALID:
                    continue
                if result.status == OOM and direction < 0:
                    continue  # smaller ones may fit
                if not improved and self.best is not None:  # OOM going up, or not faster: stop this way
                    self.plan(-(len(todo) - i - 1))
                    break

    def sweep(self, name: str) -> None:
        if self.best is None:
            return
        values = list(getattr(self.space, name))
        current = self.best.layout if name == "layout" else getattr(self.best, name)
        alternatives = [v for v in values if v != current]
        self.plan(len(alternatives))
        anchor = self.best
        for v in alternatives:
            if name == "layout":
                p = dataclasses.replace(anchor, ranks=v[0], threads=v[1])
            else:
                p = dataclasses.replace(anchor, **{name: v})
            p = refit(p, self.space.nodes, self.space.micro) if name in ("layout", "global_batch") else p
            if p is None:
                self.plan(-1)
                continue
            self.consider(p)

    def confirm(self, rounds: list[list[tuple[Point, float]]]) -> list[list[tuple[Point, float]]]:
        """Successive halving of the best few, each round side by side with the start (the reference)."""
        ranked = sorted((p for p in self.results if self.sps(p) is not None and p != self.start),
                        key=lambda p: -self.sps(p))
        others = ranked[:max(1, self.finalists - 1)]
        has_start = self.sps(self.start) is not None
        if not others or (len(others) == 1 and not has_start):
            return rounds
        history: dict[Point, list[float]] = {p: [self.sps(p)] for p in [*others, self.start] if self.sps(p)}
        n_round = 0
        while True:
            n_round += 1
            arms = others + ([self.start] if has_start else [])
            self.plan(len(arms))
            # grouped by layout: one launch per layout and round (a launch costs more than a point)
            for p in sorted(arms, key=lambda p: (p.layout != self.start.layout, p.layout)):
                r = self.evaluate(p, tag=f"#confirm{n_round}", prune=False)
                if r.status == OK and r.samples_per_s:
                    history[p].append(r.samples_per_s)
            scores = [(p, statistics.median(history[p])) for p in arms]
            rounds.append(scores)
            others = sorted(others, key=lambda p: -dict(scores)[p])
            top, top_score = others[0], dict(scores)[others[0]]
            start_score = dict(scores).get(self.start)
            self.best = top if start_score is None or top_score > start_score * (1 + self.min_gain) else self.start
            if len(others) == 1:
                return rounds
            others = others[:math.ceil(len(others) / 2)]


def planned_points(space: Space) -> int:
    """An upper bound on the points one search measures (for the progress bar before it starts)."""
    dims = (space.zero, space.channels_last, space.workers, space.precision, space.comm, space.global_batch,
            space.layout)
    return 1 + len(space.micro) + sum(max(0, len(d) - 1) for d in dims)


def parse_budget(text: str) -> float:
    """``10m``, ``90s``, ``1.5h`` or plain seconds -> seconds."""
    from ..core.errors import ConfigError

    t = str(text).strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None)
    number = t[:-1] if scale else t
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise ConfigError(f"--budget {text!r} is not a duration; write e.g. 10m, 90s or 1h") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"--budget {text!r} must be a positive duration, e.g. 10m")
    return seconds


def powers_of_two(limit: int, also: Iterable[int] = ()) -> list[int]:
    """1, 2, 4, ... up to ``limit``, plus ``also`` (e.g. the JSON's own micro-batch)."""
    out = {1 << i for i in range(max(1, limit).bit_length()) if (1 << i) <= limit}
    out |= {a for a in also if 1 <= a <= limit}
    return sorted(out)


# ----------------------------------------------------------------------------- points as DeepSpeed JSON

ONEBIT_FAMILY = {"adam": ("OneBitAdam", "ZeroOneAdam"), "adamw": ("OneBitAdam", "ZeroOneAdam"),
                 "lamb": ("OneBitLamb",)}
# The shipped ds_configs/onebit_*.json / zero_one_adam.json settings for what Adam/LAMB lack.
ONEBIT_PARAMS = {
    "OneBitAdam": {"freeze_step": 100},
    "ZeroOneAdam": {"var_freeze_step": 100, "var_update_scaler": 16, "local_step_scaler": 100, "local_step_clipper": 4},
    "OneBitLamb": {"freeze_step": 100, "max_coeff": 10.0, "min_coeff": 0.01, "coeff_beta": 0.9, "factor_max": 4.0,
                   "factor_min": 0.5, "factor_threshold": 0.1},
}
_KEPT_OPTIMIZER_PARAMS = ("lr", "betas", "eps", "weight_decay")


def json_precision(ds: Mapping[str, Any]) -> str:
    if ds.get("bf16", {}).get("enabled", False):
        return "bf16"
    if ds.get("fp16", {}).get("enabled", False):
        return "fp16"
    autocast = ds.get("torch_autocast", {})
    if autocast.get("enabled", False) and str(autocast.get("dtype", "bfloat16")).endswith("bfloat16"):
        return "bf16-autocast"
    return "fp32"


def json_comm(ds: Mapping[str, Any], compresses: bool) -> str:
    if compresses:
        return str(ds["optimizer"]["type"])
    gc = ds.get("gradient_compression")
    return f"dat{gc.get('bits', 8)}" if isinstance(gc, dict) else "none"


def point_ds_json(base: Mapping[str, Any], start: Point, p: Point, *, optimizer_family: str,
                  lr_rule: str = "none") -> dict[str, Any]:
    """The DeepSpeed JSON of point ``p``: ``base`` (the starting JSON, point ``start``) with ``p``'s changes.

    Everything the point does not change stays as the JSON said. ``optimizer_family``: the registered name
    of the starting optimizer (``adamw``, ``lamb``, ...). ``lr_rule``: the run config's ``optim.lr_scaling``;
    with ``none``, a changed global batch scales the JSON's lr linearly (Goyal et al.), otherwise the
    runtime rescales it from ``optim.base_batch_size`` and the JSON's lr stays.
    """
    batch = {"train_batch_size": p.global_batch, "train_micro_batch_size_per_gpu": p.micro,
             "gradient_accumulation_steps": p.accum}
    d = {**batch, **{k: v for k, v in json.loads(json.dumps(base)).items() if k not in batch}}  # batch keys first
    d["zero_optimization"] = {**d.get("zero_optimization", {}), "stage": p.zero}
    if p.precision != start.precision:
        for k in ("bf16", "fp16", "torch_autocast"):
            d.pop(k, None)
        if p.precision in ("bf16", "bf16-autocast"):
            if optimizer_family in ("lamb", "lars") or p.precision == "bf16-autocast":  # per-layer tensors
                d["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
            else:
                d["bf16"] = {"enabled": True}
        elif p.precision == "fp16":
            d["fp16"] = {"enabled": True}
    if p.comm != start.comm:
        d.pop("gradient_compression", None)
        params = dict(d["optimizer"].get("params", {}))
        if p.comm.startswith("dat"):
            d["gradient_compression"] = {"type": "dat_quantizer", "bits": int(p.comm[3:]), "block": 256}
        if p.comm in ONEBIT_PARAMS:
            kept = {k: params[k] for k in _KEPT_OPTIMIZER_PARAMS if k in params}
            d["optimizer"] = {"type": p.comm, "params": {**kept, **ONEBIT_PARAMS[p.comm], "cuda_aware": False,
                                                           "comm_backend_name": "nccl"}}
        elif start.comm in ONEBIT_PARAMS:  # back from a 1-bit optimizer to its plain counterpart
            kept = {k: params[k] for k in _KEPT_OPTIMIZER_PARAMS if k in params}
            d["optimizer"] = {"type": "Lamb" if start.comm == "OneBitLamb" else "AdamW", "params": kept}
    if p.global_batch != start.global_batch and lr_rule == "none":
        params = d["optimizer"].setdefault("params", {})
        if "lr" in params:
            params["lr"] = params["lr"] * p.global_batch / start.global_batch
    return d


def lr_note(start: Point, best: Point, lr_rule: str, base_batch: int, lr: float | None) -> str | None:
    """What happens to the learning rate when the tuned global batch differs from the JSON's; None if it does not."""
    if best.global_batch == start.global_batch:
        return None
    ratio = best.global_batch / start.global_batch
    if lr_rule == "none":
        return (f"global batch {start.global_batch} -> {best.global_batch}: the recipe has no LR scaling rule "
                f"(optim.lr_scaling=none), so the tuned JSON's lr is scaled linearly x{ratio:.3g}"
                + (f" to {lr * ratio:.4g}" if lr is not None else ""))
    factor = ratio if lr_rule == "linear" else math.sqrt(ratio)
    return (f"global batch {start.global_batch} -> {best.global_batch}: the recipe's {lr_rule} LR scaling "
            f"(base batch {base_batch}) changes the effective lr x{factor:.3g} at run time; the JSON's lr is unchanged")
