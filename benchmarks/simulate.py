"""``dat-ds bench simulate``: past this machine by a cost model, checked on ``bench network``, run for the recipes.

One step of one rank = compute + the optimizer's codec (compression arithmetic) + the communication
that is not hidden behind compute::

    step_ms   = compute_ms + codec_ms + exposed_ms
    fp32      = ring all-reduce of 4 n bytes:    2 (N-1)/N * 4 n / bandwidth + 2 (N-1) * latency
    compressed = all-to-all + all-gather (the 1-bit Adam all-reduce of ``comm/allreduce.py``) of the
                 compressed tensor: 2 (N-1) * payload_bytes(padded n / N) / bandwidth + 2 (N-1) * latency

``payload_bytes`` is the compressors' own arithmetic (``m * bits / 8`` plus one fp32 scale per block), so
the byte count of a step is exact; it is checked against the bytes ``bench network`` measured. The
links are flat: every rank has one link of the given speed to a non-blocking fabric (no NVLink island,
no congestion); the ring has 2 (N-1) latency-bound hops (NCCL's trees would have fewer at large N).

**Overlap.** DeepSpeed ZeRO 0 (the shipped recipes) all-reduces the gradients in the backward epilogue,
after autograd has finished (``engine._backward_epilogue -> allreduce_gradients``), and our compressing
optimizers communicate in ``step()``: no overlap, ``exposed = comm``. Torch DDP (and ZeRO 2's
``overlap_comm`` for its reduce-scatter) all-reduces buckets while the training backward still runs; the
line "fp32, overlapped" models that: ``exposed = max(comm - window, comm * last bucket / all bytes)``,
``window`` = the training backward's share of the compute (the attack's passes come before it and
cannot hide anything). The last bucket (``--bucket-mb``, DDP's 25) is ready only when backward ends.

**Compute.** Per-rank compute scales linearly with the per-rank batch (optimistic at a few images per
GPU, where a real accelerator is underused). Without ``--compute-ms`` it is an *assumption*, not a
measurement: a published throughput of the recipe's model on a published GPU (``ANCHORS``, from
REFERENCES.md), rescaled by the number of passes: a forward is 1 unit, a backward for the weights 2,
an attack step's backward for the input only 1. Strong scaling keeps the recipe's global batch (its
JSON fixes ``train_batch_size``); weak scaling keeps ``--per-rank-batch`` images per rank.

**Validation** on ``bench network`` (N = 2, measured link rates): ``base_ms`` (compute + codec on this
CPU) is the unshaped link's step minus its wire time; the same formula then predicts every shaped-link
step, and each prediction's error is reported (also for the wire time alone: shaped minus unshaped).
No torch here except through ``write_result``'s machine description.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dat_ds.comm.spec import fp32_allreduce_bytes, padded_numel, payload_bytes

from .common import show_table

FP32 = "fp32 all-reduce"  # bench network's label too: calibration rows are matched on it
FP32_OVERLAP = "fp32, overlapped"
DAT8 = "DAT 8-bit"
ONEBIT = "1-bit Adam / LAMB"
ZERO_ONE = "0/1 Adam"
MEASURED_LABELS = {"1-bit Adam": ONEBIT, "1-bit LAMB": ONEBIT}  # bench network label -> method label

# Bytes the codec moves through device memory per element of the flat gradient, counted pass by pass in
# comm/allreduce.py: flatten and copy back (16), worker error add/sub (24), encode (6 sign / 20 quantize:
# the random numbers of the unbiased rounding), decode for the error feedback (12), decode the received
# rows and average (16), decode the gathered result (12 / 13). DAT's quantizer has no error feedback.
CODEC_BYTES_PER_ELEMENT = {1: 86.0, 8: 66.0}
DDP_BUCKET_MB = 25.0  # torch DDP's bucket_cap_mb
FORWARD, BACKWARD, INPUT_BACKWARD = 1.0, 2.0, 1.0  # cost units of a pass (see the module docstring)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--network", default="bench/results/network.json", help="bench network's result to check the model on")
    p.add_argument("--recipes", default=",".join(RECIPE_NAMES), help=f"recipes to predict (default {','.join(RECIPE_NAMES)})")
    p.add_argument("--ranks", default="2,4,8,16,32,64,128,256,512,1024", help="world sizes (default 2 ... 1024)")
    p.add_argument("--links", default="1,10,25,100,400", help="link bandwidths in Gbit/s (default 1,10,25,100,400)")
    p.add_argument("--latency-us", type=float, default=10.0, help="per-message latency in microseconds (default 10)")
    p.add_argument("--compute-ms", default="", help="measured per-rank compute of one step at --per-rank-batch images, "
                   "RECIPE=MS[,RECIPE=MS]; a recipe not named uses the published-throughput assumption")
    p.add_argument("--per-rank-batch", type=int, default=256,
                   help="images per rank for weak scaling and for --compute-ms (default 256: the recipes' 8-GPU layout)")
    p.add_argument("--codec-gb-s", type=float, default=600.0,
                   help="device memory bandwidth the codec achieves, GB/s (default 600: the anchor GPUs' class)")
    p.add_argument("--bucket-mb", type=float, default=DDP_BUCKET_MB, help="last all-reduce bucket of the overlapped "
                   "fp32 line, MB (default 25: DDP)")
    p.add_argument("--pays-off", type=float, default=1.0,
                   help="step speedup over fp32 that counts as paying off in the crossover table (default 1.0)")


# ----------------------------------------------------------------------------------- the cost model
@dataclass(frozen=True)
class Method:
    """How one optimizer puts a step's gradient (or momentum) on the wire."""

    label: str
    bits: int = 32            # 32: an fp32 ring all-reduce; otherwise the compressor's bits per element
    block: int = 256          # elements per fp32 scale
    sync_every: int = 1       # 0/1 Adam: one synchronisation per local_step_clipper steps, local steps between
    overlap: bool = False     # buckets all-reduced during the training backward (DDP), not after it


def wire_bytes(method: Method, numel: int, world: int) -> float:
    """Bytes one rank sends per step (averaged over a 0/1 Adam sync period), as ``comm/backend.py`` counts them."""
    if world <= 1:
        return 0.0
    if method.bits == 32:
        sent = fp32_allreduce_bytes(numel, world)
    else:
        m = padded_numel(numel, world, method.block) // world
        sent = 2 * (world - 1) * payload_bytes(m, method.bits, method.block)  # all-to-all + all-gather rows
    return sent / method.sync_every


def comm_ms(method: Method, numel: int, world: int, bytes_per_s: float, latency_s: float) -> float:
    """Wire time of one step: the bytes over the link plus 2 (N - 1) latency-bound messages."""
    if world <= 1:
        return 0.0
    return 1000 * (wire_bytes(method, numel, world) / bytes_per_s + 2 * (world - 1) * latency_s / method.sync_every)


def codec_ms(method: Method, numel: int, world: int, codec_bytes_per_s: float) -> float:
    if world <= 1 or method.bits == 32:
        return 0.0
    return 1000 * CODEC_BYTES_PER_ELEMENT[method.bits] * numel / codec_bytes_per_s / method.sync_every


def exposed_ms(comm: float, window_ms: float, last_bucket_fraction: float) -> float:
    """Communication left on the critical path when all but the last bucket can hide behind ``window_ms``."""
    return max(comm - window_ms, comm * min(1.0, last_bucket_fraction))


def predict(method: Method, *, numel: int, world: int, compute_ms: float, overlap_window_ms: float,
            bytes_per_s: float, latency_s: float, codec_bytes_per_s: float, bucket_bytes: float,
            samples_per_step: int) -> dict[str, float]:
    """One rank's step: its parts, the step time, samples/s of the whole job, scaling efficiency."""
    comm = comm_ms(method, numel, world, bytes_per_s, latency_s)
    hidden_behind = overlap_window_ms if method.overlap else 0.0
    exposed = exposed_ms(comm, hidden_behind, bucket_bytes / (4 * numel)) if method.overlap else comm
    codec = codec_ms(method, numel, world, codec_bytes_per_s)
    step = compute_ms + codec + exposed
    return {"compute_ms": compute_ms, "codec_ms": codec, "comm_ms": comm, "exposed_comm_ms": exposed,
            "step_ms": step, "samples_per_s": 1000 * samples_per_step / step if step > 0 else math.inf,
            "efficiency": compute_ms / step if step > 0 else 1.0}


def crossover(speedups: dict[int, float], threshold: float = 1.0) -> int | None:
    """Smallest world size from which the speedup stays >= ``threshold`` for every larger one; None if never."""
    found = None
    for world in sorted(speedups, reverse=True):
        if speedups[world] < threshold:
            break
        found = world
    return found


# ------------------------------------------------------------------------------- compute per recipe
def work_units(attack_steps: int, clean_pass: bool) -> float:
    """Cost of one image's training step in forward units: attack steps, then the training pass(es)."""
    return attack_steps * (FORWARD + INPUT_BACKWARD) + (1 + clean_pass) * (FORWARD + BACKWARD)


def backward_share(attack_steps: int, clean_pass: bool) -> float:
    """Fraction of the compute that is the training backward: what an overlapped all-reduce can hide behind."""
    return (1 + clean_pass) * BACKWARD / work_units(attack_steps, clean_pass)


@dataclass(frozen=True)
class Anchor:
    """A published training throughput, the source of the default compute assumption."""

    images_per_s: float     # per GPU
    attack_steps: int       # of the published run (its training pass has no clean term)
    gpu: str
    source: str

    def ms_per_image(self, attack_steps: int, clean_pass: bool) -> float:
        return 1000 / self.images_per_s * work_units(attack_steps, clean_pass) / work_units(self.attack_steps, False)


def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k


def preactresnet18_params(num_classes: int = 10, width: int = 64) -> int:
    """Parameters of ``models.cifar.preactresnet18`` counted from its architecture (tests compare with torch)."""
    total, cin = _conv(3, width, 3), width
    for i, blocks in enumerate((2, 2, 2, 2)):
        planes = width * 2**i
        for j in range(blocks):
            total += 2 * cin + _conv(cin, planes, 3) + 2 * planes + _conv(planes, planes, 3)
            if (i > 0 and j == 0) or cin != planes:
                total += _conv(cin, planes, 1)
            cin = planes
    return total + 2 * cin + cin * num_classes + num_classes


def resnet50_params(num_classes: int = 1000) -> int:
    """Parameters of timm's (= torchvision's) ``resnet50`` counted from its architecture."""
    total, cin = _conv(3, 64, 7) + 2 * 64, 64
    for i, blocks in enumerate((3, 4, 6, 3)):
        planes = 64 * 2**i
        out = 4 * planes
        for j in range(blocks):
            total += _conv(cin, planes, 1) + _conv(planes, planes, 3) + _conv(planes, out, 1) + 2 * (2 * planes + out)
            if j == 0:
                total += _conv(cin, out, 1) + 2 * out
            cin = out
    return total + cin * num_classes + num_classes


@dataclass(frozen=True)
class RecipeModel:
    params: int
    anchor: Anchor


RECIPE_MODELS: dict[str, RecipeModel] = {
    # Fast AT: PRN-18, FGSM-RS, 15 epochs of CIFAR-10's 50,000 images in 12 min on one RTX 2080 Ti.
    "cifar10_prn18_dat_pgd": RecipeModel(preactresnet18_params(10), Anchor(
        15 * 50_000 / (12 * 60), 1, "RTX 2080 Ti, mixed precision",
        "Fast AT (Wong et al. 2020): PRN-18 CIFAR-10 15 epochs of FGSM-RS in 12 min on one RTX 2080 Ti")),
    # PGD-3 AT of ResNet-50 on ImageNet: ~1.6 h per epoch on 4 V100 (~56 images/s per GPU).
    "imagenet_r50_dat_pgd": RecipeModel(resnet50_params(1000), Anchor(
        56.0, 3, "V100", "PGD-3 ImageNet ResNet-50 AT ~1.6 h/epoch on 4x V100 (~56 images/s per GPU)")),
}
RECIPE_NAMES = tuple(RECIPE_MODELS)


@dataclass(frozen=True)
class Scenario:
    recipe: str
    model: str
    params: int
    global_batch: int
    attack_steps: int
    clean_pass: bool
    ms_per_image: float      # per-rank compute per image
    compute_source: str      # "measured (--compute-ms)" or the anchor it is derived from
    assumption: bool
    overlap_share: float


def load_scenario(name: str, measured_ms: float | None, per_rank_batch: int) -> Scenario:
    """The recipe's model, batch and attack from its shipped files; compute measured or assumed."""
    from dat_ds.core import resources
    from dat_ds.core.config import build_config
    from dat_ds.core.errors import ConfigError

    if name not in RECIPE_MODELS:
        raise ConfigError(f"bench simulate knows the recipes {', '.join(RECIPE_NAMES)}, not {name!r}")
    cfg = build_config(str(resources.recipe(f"recipes/{name}.yaml")), [])
    raw = json.loads(resources.ds_config(cfg.deepspeed_config).read_text())
    clean = cfg.objective.name == "dat" and cfg.objective.clean_weight > 0
    known = RECIPE_MODELS[name]
    if measured_ms is not None:
        ms, source, assumed = measured_ms / per_rank_batch, f"measured: {measured_ms:g} ms at {per_rank_batch}/rank", False
    else:
        a = known.anchor
        ms = a.ms_per_image(cfg.attack.steps, clean)
        source = f"assumed from {a.source}, rescaled by passes ({a.gpu})"
        assumed = True
    return Scenario(name, cfg.model.name, known.params, int(raw["train_batch_size"]), cfg.attack.steps, clean, ms,
                    source, assumed, backward_share(cfg.attack.steps, clean))


def recipe_methods() -> list[Method]:
    """The lines of the plots, with bits, block and 0/1 Adam's sync period from the shipped ds_configs."""
    from dat_ds.comm.spec import DEFAULT_BLOCK, check_gradient_compression
    from dat_ds.core import resources

    dat = check_gradient_compression(json.loads(resources.ds_config("dat_8bit.json").read_text())["gradient_compression"])
    zero_one = json.loads(resources.ds_config("zero_one_adam.json").read_text())["optimizer"]["params"]
    return [Method(FP32), Method(FP32_OVERLAP, overlap=True), Method(DAT8, dat["bits"], dat["block"]),
            Method(ONEBIT, 1, DEFAULT_BLOCK), Method(ZERO_ONE, 1, DEFAULT_BLOCK, sync_every=int(zero_one["local_step_clipper"]))]


# ------------------------------------------------------------------------- validation on bench network
def calibrate(network: dict[str, Any]) -> tuple[dict[tuple[str, str], dict[str, float]], list[dict[str, Any]]]:
    """(model, optimizer) -> base_ms and payload from the unshaped rows; the shaped rows' prediction errors."""
    rows = network["results"]
    unshaped_rate = 1e6 * network["link_mb_s"]["None"]
    base: dict[tuple[str, str], dict[str, float]] = {}
    unshaped_ms: dict[tuple[str, str], float] = {}
    for r in rows:
        if r["bandwidth_mbit"] is None and r["ms_per_step_compressed"] is not None:
            payload = r["bytes_per_step_compressed"] if r["bytes_per_step_compressed"] is not None else r["bytes_per_step_fp32"]
            key = (r["model"], r["optimizer"])
            unshaped_ms[key] = r["ms_per_step_compressed"]
            base[key] = {"numel": r["numel"], "payload_bytes": payload,
                         "base_ms": r["ms_per_step_compressed"] - 1000 * payload / unshaped_rate}
    checks = []
    for r in rows:
        key = (r["model"], r["optimizer"])
        if r["bandwidth_mbit"] is None or key not in base or r["ms_per_step_compressed"] is None:
            continue
        b = base[key]
        wire = 1000 * b["payload_bytes"] / (1e6 * r["link_mb_s"])
        predicted = b["base_ms"] + wire
        measured = r["ms_per_step_compressed"]
        wire_measured = measured - unshaped_ms[key]
        wire_predicted = wire - 1000 * b["payload_bytes"] / unshaped_rate
        checks.append({"model": r["model"], "optimizer": r["optimizer"], "bandwidth_mbit": r["bandwidth_mbit"],
                       "measured_ms": measured, "predicted_ms": predicted,
                       "error_pct": 100 * (predicted - measured) / measured,
                       "wire_measured_ms": wire_measured, "wire_predicted_ms": wire_predicted,
                       "wire_error_pct": 100 * (wire_predicted - wire_measured) / wire_measured if wire_measured else None})
    return base, checks


def check_bytes(network: dict[str, Any], methods: dict[str, Method]) -> list[dict[str, Any]]:
    """The model's bytes per step at N = 2 next to the bytes bench network counted."""
    out = []
    for r in network["results"]:
        if r["bandwidth_mbit"] is not None:
            continue
        label = FP32 if r["optimizer"] == FP32 else MEASURED_LABELS.get(r["optimizer"], r["optimizer"])
        if label not in methods or label == ZERO_ONE:  # 0/1 Adam's local steps send nothing: not a per-step count
            continue
        measured = r["bytes_per_step_fp32"] if label == FP32 else r["bytes_per_step_compressed"]
        out.append({"model": r["model"], "optimizer": r["optimizer"], "measured_bytes": measured,
                    "model_bytes": wire_bytes(methods[label], r["numel"], 2)})
    return out


# ------------------------------------------------------------------------------------------- output
def _parse_list(text: str, cast, what: str) -> list:
    from dat_ds.core.errors import ConfigError

    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{what}: {text!r} is not a comma-separated list of numbers") from None
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"--{what}: give positive values, e.g. 2,8,64")
    return values


def _parse_compute(text: str) -> dict[str, float]:
    from dat_ds.core.errors import ConfigError

    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if not sep or name not in RECIPE_MODELS or ms <= 0:
            raise ConfigError(f"--compute-ms: {item!r} must be RECIPE=MS with RECIPE one of {', '.join(RECIPE_NAMES)}")
        out[name] = ms
    return out


def _plot(scenario: Scenario, rows: list[dict[str, Any]], links: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dat_ds.core.io import save_figure

    scalings = list(dict.fromkeys(r["scaling"] for r in rows))
    fig, axes = plt.subplots(len(scalings), len(links), figsize=(3.3 * len(links), 3.0 * len(scalings)),
                             squeeze=False, sharex=True, sharey=True)
    for i, scaling in enumerate(scalings):
        for ax, gbit in zip(axes[i], links):
            for label in dict.fromkeys(r["optimizer"] for r in rows):
                pts = sorted((r["world_size"], r["efficiency"]) for r in rows
                             if r["scaling"] == scaling and r["link_gbit"] == gbit and r["optimizer"] == label)
                style = {"color": "#7f7f7f"} if label == FP32 else ({"color": "#7f7f7f", "linestyle": "--"}
                                                                    if label == FP32_OVERLAP else {})
                ax.plot(*zip(*pts), marker=".", label=label, **style)
            ax.set_xscale("log", base=2)
            worlds = sorted({r["world_size"] for r in rows})
            ax.set_xticks(worlds[::2], [str(n) for n in worlds[::2]])
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            batch = next(r["per_rank_batch"] * r["world_size"] for r in rows if r["scaling"] == scaling)
            what = f"batch {batch}" if scaling == "strong" else f"{next(r['per_rank_batch'] for r in rows if r['scaling'] == scaling)}/rank"
            ax.set_title(f"{gbit:g} Gbit/s, {scaling} ({what})", fontsize=9)
            if i == len(scalings) - 1:
                ax.set_xlabel("ranks N")
        axes[i][0].set_ylabel("scaling efficiency")
    axes[0][0].legend(fontsize=7, loc="lower left")
    kind = "assumed" if scenario.assumption else "measured"
    fig.suptitle(f"{scenario.recipe}: {scenario.model} ({scenario.params / 1e6:.1f} M params), "
                 f"compute {scenario.ms_per_image:.2f} ms/image/rank ({kind})", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def _fmt_n(n: int | None, ranks: list[int]) -> str:
    if n is None:
        return f"never (N <= {max(ranks)})"
    return f"N >= {n}" if n > min(ranks) else f"all N >= {n}"


def read_network(path: Path) -> dict[str, Any]:
    """``bench network``'s result, which must hold the unshaped link the model is calibrated on."""
    from dat_ds.core.errors import ConfigError

    if not path.is_file():
        raise ConfigError(f"{path} not found; run `dat-ds bench network` first (it must include the unshaped link)")
    network = json.loads(path.read_text())
    if "None" not in network.get("link_mb_s", {}):
        raise ConfigError(f"{path} has no unshaped-link rows to calibrate on; run bench network with --bandwidths none,...")
    return network


def predict_recipes(scenarios: list[Scenario], methods: list[Method], *, ranks: list[int], links: list[float],
                    per_rank_batch: int, latency_s: float, codec_bytes_per_s: float,
                    bucket_bytes: float) -> list[dict[str, Any]]:
    """One row per recipe, scaling (strong: the recipe's global batch; weak: ``per_rank_batch``), world size,
    link and method, with its speedup over the fp32 all-reduce, plain and overlapped."""
    predictions: list[dict[str, Any]] = []
    for sc in scenarios:
        for scaling in ("strong", "weak"):
            for world in ranks:
                if scaling == "strong" and sc.global_batch % world:
                    continue  # DeepSpeed needs train_batch_size = micro x accumulation x world
                per_rank = sc.global_batch // world if scaling == "strong" else per_rank_batch
                compute = sc.ms_per_image * per_rank
                for gbit in links:
                    row_methods = {}
                    for m in methods:
                        row_methods[m.label] = predict(
                            m, numel=sc.params, world=world, compute_ms=compute,
                            overlap_window_ms=sc.overlap_share * compute, bytes_per_s=gbit * 1e9 / 8, latency_s=latency_s,
                            codec_bytes_per_s=codec_bytes_per_s, bucket_bytes=bucket_bytes,
                            samples_per_step=per_rank * world)
                    for label, p in row_methods.items():
                        predictions.append({
                            "recipe": sc.recipe, "scaling": scaling, "optimizer": label, "link_gbit": gbit,
                            "world_size": world, "per_rank_batch": per_rank, **p,
                            "speedup_vs_fp32": row_methods[FP32]["step_ms"] / p["step_ms"],
                            "speedup_vs_fp32_overlapped": row_methods[FP32_OVERLAP]["step_ms"] / p["step_ms"]})
    return predictions


def crossovers_of(predictions: list[dict[str, Any]], scenarios: list[Scenario], methods: list[Method],
                  links: list[float], pays_off: float) -> list[dict[str, Any]]:
    """For each compressed method, recipe, scaling, baseline and link: the world size from which it pays off."""
    crossovers = []
    for sc in scenarios:
        for scaling in ("strong", "weak"):
            for m in methods[2:]:
                for baseline, key in ((FP32, "speedup_vs_fp32"), (FP32_OVERLAP, "speedup_vs_fp32_overlapped")):
                    for gbit in links:
                        speedups = {p["world_size"]: p[key] for p in predictions
                                    if p["recipe"] == sc.recipe and p["scaling"] == scaling
                                    and p["optimizer"] == m.label and p["link_gbit"] == gbit}
                        crossovers.append({"recipe": sc.recipe, "scaling": scaling, "optimizer": m.label,
                                           "baseline": baseline, "link_gbit": gbit,
                                           "pays_off_from_world_size": crossover(speedups, pays_off),
                                           "max_speedup": max(speedups.values())})
    return crossovers


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dat_ds.core.errors import ConfigError

    from . import write_result

    path = Path(args.network)
    network = read_network(path)
    ranks = sorted(_parse_list(args.ranks, int, "ranks"))
    links = _parse_list(args.links, float, "links")
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    measured_compute = _parse_compute(args.compute_ms)
    if args.per_rank_batch < 1 or args.codec_gb_s <= 0 or args.bucket_mb < 0:
        raise ConfigError("bench simulate needs --per-rank-batch >= 1, --codec-gb-s > 0 and --bucket-mb >= 0")
    t0 = time.perf_counter()
    methods = recipe_methods()

    # 1. The model on what was measured: bench network's two namespaces.
    base, checks = calibrate(network)
    bytes_check = check_bytes(network, {m.label: m for m in methods})

    # 2. The recipes.
    scenarios = [load_scenario(n, measured_compute.get(n), args.per_rank_batch) for n in names]
    predictions = predict_recipes(scenarios, methods, ranks=ranks, links=links, per_rank_batch=args.per_rank_batch,
                                  latency_s=args.latency_us * 1e-6, codec_bytes_per_s=args.codec_gb_s * 1e9,
                                  bucket_bytes=args.bucket_mb * 1e6)
    crossovers = crossovers_of(predictions, scenarios, methods, links, args.pays_off)

    errors = [abs(c["error_pct"]) for c in checks]
    result = {
        "source": str(path), "latency_us": args.latency_us, "codec_gb_s": args.codec_gb_s, "bucket_mb": args.bucket_mb,
        "per_rank_batch": args.per_rank_batch, "pays_off_speedup": args.pays_off,
        "calibration": [{"model": m, "optimizer": o, **v} for (m, o), v in base.items()],
        "validation": checks, "max_abs_error_pct": max(errors) if errors else None, "bytes_check": bytes_check,
        "methods": [asdict(m) for m in methods], "recipes": [asdict(s) for s in scenarios],
        # 4 decimals: the model's inputs are assumptions to a few per cent; more digits only grow the file
        "predictions": [{k: round(v, 4) if isinstance(v, float) else v for k, v in p.items()} for p in predictions],
        "crossover": crossovers, "seconds": time.perf_counter() - t0,
        "note": ("calibration[].base_ms is this CPU's compute + codec (validation only); the predictions use "
                 "recipes[].ms_per_image: an assumption from a published throughput unless --compute-ms gave it"),
    }
    out = Path(args.out)
    write_result(out, "simulate", result)
    for sc in scenarios:
        _plot(sc, [p for p in predictions if p["recipe"] == sc.recipe], links, out / f"simulate_{sc.recipe}.png")
    _show_tables(checks, bytes_check, scenarios, methods, predictions, crossovers, ranks=ranks, links=links,
                 pays_off=args.pays_off)
    return result


def _show_tables(checks: list[dict[str, Any]], bytes_check: list[dict[str, Any]], scenarios: list[Scenario],
                 methods: list[Method], predictions: list[dict[str, Any]], crossovers: list[dict[str, Any]], *,
                 ranks: list[int], links: list[float], pays_off: float) -> None:
    """The validation, bytes, recipes, crossover and scaling tables."""
    show_table("bench simulate: validation on the namespace link (predicted vs measured ms/step, N = 2)",
               ["model", "optimizer", "link Mbit/s", "measured", "predicted", "error", "wire meas.", "wire pred.",
                "wire error"],
               [[c["model"], c["optimizer"], f"{c['bandwidth_mbit']:g}", f"{c['measured_ms']:.0f}",
                 f"{c['predicted_ms']:.0f}", f"{c['error_pct']:+.1f} %", f"{c['wire_measured_ms']:.0f}",
                 f"{c['wire_predicted_ms']:.0f}",
                 "-" if c["wire_error_pct"] is None else f"{c['wire_error_pct']:+.0f} %"] for c in checks])
    show_table("bench simulate: bytes per step at N = 2, model vs bench network",
               ["model", "optimizer", "measured", "model"],
               [[b["model"], b["optimizer"], f"{b['measured_bytes']:,.0f}", f"{b['model_bytes']:,.0f}"] for b in bytes_check])
    show_table("bench simulate: recipes", ["recipe", "params", "global batch", "PGD steps", "ms/image/rank", "source",
                                           "overlap window"],
               [[s.recipe, f"{s.params:,}", s.global_batch, s.attack_steps, f"{s.ms_per_image:.2f}", s.compute_source,
                 f"{100 * s.overlap_share:.0f} % of compute"] for s in scenarios])
    show_table(f"bench simulate: pays off (step speedup >= {pays_off:g}) from ... ranks on",
               ["recipe", "scaling", "optimizer", "vs", *[f"{g:g} Gb/s" for g in links]],
               [[sc.recipe, scaling, m.label, baseline,
                 *[_fmt_n(next(c["pays_off_from_world_size"] for c in crossovers
                               if c["recipe"] == sc.recipe and c["scaling"] == scaling and c["optimizer"] == m.label
                               and c["baseline"] == baseline and c["link_gbit"] == g), ranks) for g in links]]
                for sc in scenarios for scaling in ("strong", "weak") for m in methods[2:] for baseline in (FP32, FP32_OVERLAP)])
    show_ns = [n for n in (8, 64, 1024) if n in ranks] or ranks[-1:]
    show_table("bench simulate: samples/s and scaling efficiency (strong scaling, the recipes' global batch)",
               ["recipe", "link", "optimizer", *[f"N={n}" for n in show_ns]],
               [[sc.recipe, f"{g:g} Gb/s", m.label,
                 *[next((f"{p['samples_per_s']:,.0f}/s  {p['efficiency']:.2f}" for p in predictions
                         if p["recipe"] == sc.recipe and p["scaling"] == "strong" and p["optimizer"] == m.label
                         and p["link_gbit"] == g and p["world_size"] == n), "-") for n in show_ns]]
                for sc in scenarios for g in links for m in methods])
