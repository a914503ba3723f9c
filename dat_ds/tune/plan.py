"""``dat-ds plan``: the per-GPU memory of a recipe for each ZeRO stage and micro-batch, predicted without a GPU.

Pure accounting, no torch: the model's facts (parameter count, the bytes autograd saves per sample) come
from ``footprint.py``, which traces one forward on fake tensors; the engine's from the DeepSpeed JSON. The
memory of one rank at the peak of a training step is

    model states (ZeRO stage)  +  engine buffers  +  max(training pass, attack pass)  [+ gathered copy]

- **model states** (Rajbhandari et al., ZeRO, 2020: 2 + 2 + K bytes per parameter in mixed precision): the
  weights in the engine's precision, their gradients, and the optimizer's fp32 states (Adam/AdamW/LAMB:
  2 states; SGD/LARS with momentum: 1) plus an fp32 master copy where the weights are 16-bit. ZeRO-1 splits
  the optimizer states (and master) over the N ranks, ZeRO-2 the gradients too, ZeRO-3 the weights too.
  DeepSpeed's own ZeRO-1/2 optimizer also keeps an fp32 master partition and an fp32 gradient partition in
  fp32 runs (it clones the flat weights), which is counted.
- **engine buffers**: ZeRO-1/2's gradient bucket (``reduce_bucket_size`` elements, two with
  ``overlap_comm``), DeepSpeed bf16's fp32 gradient accumulator; ZeRO-3's gathered working set (the largest
  layer plus the prefetch bucket) and the parameters under ``stage3_param_persistence_threshold`` it keeps whole.
- **training pass**: what autograd saves for backward in each forward that keeps its graph (the objective's:
  Madry 1, DAT with a clean term 2, TRADES 2, ...) at the micro-batch, plus backward's working gradient
  (the largest saved activation once; twice overstated the measured peak of small_cnn by 35 %).
- **attack pass**: one forward + input-gradient pass at a time, in eval mode (no weight gradients); its graph
  is freed before the training pass, so only the larger of the two counts.
- **gathered attack copy** (option, for ZeRO-3 with attacks on gathered weights): the full weights once more
  in the compute precision.
- **allowance** (GPU predictions only): ``CUDA_ALLOWANCE`` for the CUDA context, cuDNN/cuBLAS workspaces and
  the caching allocator's fragmentation, which ``torch.cuda.max_memory_allocated`` does not show.

The fastest setting that fits: the lowest ZeRO stage, then the largest micro-batch. A higher stage adds
communication to every step (ZeRO-3 an all-gather of the weights per forward, the attack's included); a
larger micro-batch means fewer accumulation steps and fuller kernels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

GiB = 2**30
CUDA_ALLOWANCE = 2 * GiB  # CUDA context (~0.5 GiB), library workspaces, allocator fragmentation: per GPU

# Optimizer state bytes per parameter (fp32 tensors), by registered optimizer family.
STATE_BYTES = {"adam": 8, "adamw": 8, "lamb": 8, "onebitadam": 8, "zerooneadam": 8, "onebitlamb": 8,
               "sgd": 4, "lars": 4}
# The 1-bit family keeps an error-feedback buffer per parameter (worker side) on top of Adam's states.
ERROR_FEEDBACK_BYTES = {"onebitadam": 4, "zerooneadam": 4, "onebitlamb": 4}
# DeepSpeed 0.19's ZeRO defaults (runtime/zero/config.py), used where the JSON does not set them.
REDUCE_BUCKET = 500_000_000
PREFETCH_BUCKET = 50_000_000
PERSISTENCE_THRESHOLD = 100_000
STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class Footprint:
    """The model's facts, in bytes where not a count (``footprint.measure`` traces them on fake tensors)."""

    params: int  # parameter count
    buffer_bytes: int  # BatchNorm statistics, normalisation constants: whole on every rank, every stage
    largest_layer: int  # parameters of the largest single module (ZeRO-3 gathers one or two at a time)
    persistent_params: int  # parameters in tensors under ZeRO-3's persistence threshold (kept whole)
    weight_bytes: int  # bytes per weight element in the engine (2 under DeepSpeed bf16/fp16, else 4)
    train_per_sample: int  # saved for backward by one training forward (train mode), per sample
    train_fixed: int  # ... the part that does not grow with the batch (autocast's 16-bit weight copies)
    attack_per_sample: int  # saved by one attack forward (eval mode, gradient w.r.t. the input only)
    attack_fixed: int
    largest_saved_per_sample: int  # the largest single saved tensor, per sample: backward's working gradients
    input_per_sample: int  # one input image in fp32 (x, x_adv and the input gradient are three)

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Engine:
    """What the DeepSpeed JSON and the run config say about memory (``engine_of`` reads them)."""

    world: int  # ranks that share the ZeRO partitions
    precision: str  # fp32 | bf16 | fp16 | bf16-autocast
    optimizer: str  # registered family: adamw, lamb, sgd, ...
    momentum: bool = True  # SGD/LARS: a momentum buffer (momentum > 0)
    reduce_bucket: int = REDUCE_BUCKET  # zero_optimization.reduce_bucket_size, elements
    contiguous_gradients: bool = True
    overlap_comm: bool = False  # ZeRO-1/2: a second bucket
    prefetch_bucket: int = PREFETCH_BUCKET  # ZeRO-3: stage3_prefetch_bucket_size, elements
    train_forwards: int = 1  # forwards per micro-batch whose graph backward needs (the objective's)
    attack: bool = True  # the objective runs a training attack before its forwards
    gathered_attack: bool = False  # ZeRO-3: attacks run on a full gathered copy of the weights (attack.zero3_gather)
    allowance: int = CUDA_ALLOWANCE  # 0 for a CPU prediction

    @property
    def mixed(self) -> bool:
        """DeepSpeed holds 16-bit weights and an fp32 master copy (bf16/fp16 engines; autocast keeps fp32 weights)."""
        return self.precision in ("bf16", "fp16")

    @property
    def compute_bytes(self) -> int:
        """Bytes per weight element as the forward uses them (a gathered attack copy's)."""
        return 4 if self.precision == "fp32" else 2


@dataclass(frozen=True)
class Prediction:
    stage: int
    micro: int
    accum: int
    parts: dict[str, int]  # component -> bytes per rank
    allowed: str | None = None  # why this stage cannot run the recipe's optimizer/precision; None if it can

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def fits(self, capacity: int) -> bool:
        return self.allowed is None and self.total <= capacity

    def to_json(self, capacity: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"zero": self.stage, "micro_batch": self.micro, "grad_accum": self.accum,
                               "parts": dict(self.parts), "total_bytes": self.total, "not_allowed": self.allowed}
        if capacity is not None:
            out["fits"] = self.fits(capacity)
        return out


# ----------------------------------------------------------------------------- model states


def model_states(fp: Footprint, eng: Engine, stage: int) -> dict[str, int]:
    """Bytes per rank of the weights, gradients and optimizer states (master copy included) at ZeRO ``stage``."""
    psi, n, w = fp.params, eng.world, fp.weight_bytes
    states = STATE_BYTES.get(eng.optimizer, 8)
    if eng.optimizer in ("sgd", "lars") and not eng.momentum:
        states = 0
    states += ERROR_FEEDBACK_BYTES.get(eng.optimizer, 0)
    # DeepSpeed's ZeRO optimizer clones the flat weights into an fp32 partition whatever the precision; at
    # stage 0 only the 16-bit engines keep an fp32 master, whole (DeepSpeed's FP16_Optimizer, bf16 too).
    master = 4 if (stage > 0 or eng.mixed) else 0
    shard = n if stage > 0 else 1
    weights = psi * w / (n if stage == 3 else 1)
    grads = psi * w / (n if stage >= 2 else 1)
    # The optimizer's view of the gradients: an fp32 partition beside the weights' own gradients (ZeRO 1-3),
    # the 16-bit engines' flat fp32 gradients at stage 0 (made at the step; counted as if they lived throughout).
    fp32_grads = 0.0
    if stage > 0:
        fp32_grads = psi * 4 / n
    elif eng.mixed:
        fp32_grads = psi * 4
    return {"weights": int(weights), "gradients": int(grads + fp32_grads),
            "optimizer": int(psi * (master + states) / shard)}


def engine_buffers(fp: Footprint, eng: Engine, stage: int) -> int:
    """DeepSpeed's working buffers at ``stage`` (buffers of the model itself included), bytes per rank."""
    out = fp.buffer_bytes
    w = fp.weight_bytes
    if stage in (1, 2) and eng.contiguous_gradients:
        bucket_bytes = 4 if stage == 1 else w  # ZeRO-1 stages the fp32 accumulator, ZeRO-2 the weights' dtype
        # allocated whole (torch.empty(reduce_bucket_size)), however small the model
        out += eng.reduce_bucket * bucket_bytes * (2 if eng.overlap_comm else 1)
    if stage == 3:
        gathered = min(fp.params, fp.largest_layer + eng.prefetch_bucket)
        out += gathered * w + fp.persistent_params * w * (eng.world - 1) // eng.world
        if eng.contiguous_gradients:  # ZeRO-3's gradient bucket, also allocated whole (stage3.py: ipg_buckets)
            out += eng.reduce_bucket * w
    return out


# ----------------------------------------------------------------------------- activations


def training_pass(fp: Footprint, eng: Engine, micro: int) -> int:
    """Bytes the training forwards save for backward, plus backward's working gradients and the inputs."""
    saved = eng.train_forwards * micro * fp.train_per_sample + fp.train_fixed
    return saved + micro * fp.largest_saved_per_sample + 3 * micro * fp.input_per_sample


def attack_pass(fp: Footprint, eng: Engine, micro: int) -> int:
    """One forward + input-gradient pass of the attack (they run one after another, each graph freed)."""
    if not eng.attack:
        return 0
    saved = micro * fp.attack_per_sample + fp.attack_fixed
    return saved + micro * fp.largest_saved_per_sample + 3 * micro * fp.input_per_sample


def predict(fp: Footprint, eng: Engine, stage: int, micro: int, accum: int = 1, allowed: str | None = None) -> Prediction:
    parts = model_states(fp, eng, stage)
    parts["buffers"] = engine_buffers(fp, eng, stage)
    train, attack = training_pass(fp, eng, micro), attack_pass(fp, eng, micro)
    copy = fp.params * eng.compute_bytes if (eng.gathered_attack and eng.attack and stage == 3) else 0
    # the copy lives through the attack's passes and is freed before the training forward: the peak is the larger of
    # (attack + copy) and the training pass; "activations" is what the peak holds beyond the copy
    parts["gathered_copy"] = copy
    parts["activations"] = max(train, attack + copy) - copy
    parts["allowance"] = eng.allowance
    return Prediction(stage=stage, micro=micro, accum=accum, parts=parts, allowed=allowed)


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    predictions: tuple[Prediction, ...]
    capacity: int  # bytes per GPU
    engine: Engine
    footprint: Footprint

    def fastest(self) -> Prediction | None:
        """The lowest ZeRO stage that fits, at its largest micro-batch that fits (see the module's rule)."""
        fitting = [p for p in self.predictions if p.fits(self.capacity)]
        return min(fitting, key=lambda p: (p.stage, -p.micro), default=None)

    def to_json(self) -> dict[str, Any]:
        best = self.fastest()
        return {"capacity_bytes": self.capacity, "engine": dataclasses.asdict(self.engine),
                "footprint": self.footprint.to_json(),
                "rule": "fastest = the lowest ZeRO stage that fits, then its largest micro-batch that fits",
                "fastest": best.to_json(self.capacity) if best else None,
                "predictions": [p.to_json(self.capacity) for p in self.predictions]}


def micro_batches(global_batch: int, world: int, also: Sequence[int] = ()) -> list[int]:
    """Powers of two up to the largest micro-batch that needs no accumulation, which divide the global batch
    into whole accumulation steps; plus ``also`` (the JSON's own)."""
    limit = max(1, global_batch // world)
    out = {1 << i for i in range(limit.bit_length()) if (1 << i) <= limit and global_batch % ((1 << i) * world) == 0}
    out |= {m for m in also if 1 <= m <= limit and global_batch % (m * world) == 0}
    return sorted(out)


def make_plan(fp: Footprint, eng: Engine, *, capacity: int, global_batch: int, micros: Sequence[int],
              stage_allowed: Mapping[int, str | None]) -> Plan:
    rows = [predict(fp, eng, stage, m, global_batch // (m * eng.world), allowed=stage_allowed.get(stage))
            for stage in STAGES for m in micros]
    return Plan(predictions=tuple(rows), capacity=capacity, engine=eng, footprint=fp)


# ----------------------------------------------------------------------------- from the configs


def train_forwards(objective: str, *, clean_weight: float, grad_align: float, consistency: bool) -> int:
    """Forwards per micro-batch whose graph the objective's backward needs."""
    n = {"madry": 1, "clean": 1, "free": 1, "trades": 2, "mart": 2, "acl": 3}.get(objective, 1)
    if objective == "dat":
        n = 2 if clean_weight > 0 else 1
    if objective == "trades" and consistency:
        n *= 2  # two augmented views, each clean + adversarial
    if grad_align > 0:
        n += 2  # GradAlign's two input-gradient passes with create_graph (double backprop)
    return n


def gathers_attacks(cfg, copy_bytes: int, capacity: int) -> bool:
    """Whether ZeRO-3 runs this config's attacks on a gathered copy (``attack.zero3_gather``): always; auto when the
    copy fits ``attack.zero3_gather_budget_gb``, or, with no budget, half the GPU (the run's rule is half the free
    memory at start-up, which the plan does not know: an upper bound); never."""
    from ..core import names

    a = cfg.attack
    if a.zero3_gather == "never" or a.name == "none" or cfg.objective.name not in names.GATHER_OBJECTIVES:
        return False
    budget = a.zero3_gather_budget_gb * 1e9 if a.zero3_gather_budget_gb is not None else capacity / 2
    return a.zero3_gather == "always" or copy_bytes <= budget


def engine_of(cfg, settings, world: int, *, gathered_attack: bool, gpu: bool) -> Engine:
    """``Engine`` from a run config and ``runtime.ds_config.EngineSettings``."""
    from ..optim.specs import check_optimizer_params

    family, _ = check_optimizer_params(settings.optimizer)
    params = settings.optimizer.get("params") or {}
    zero = settings.ds_config.get("zero_optimization", {})
    o = cfg.objective
    return Engine(world=world, precision=settings.precision, optimizer=family,
                  momentum=family not in ("sgd", "lars") or float(params.get("momentum", 0.0)) > 0,
                  reduce_bucket=int(zero.get("reduce_bucket_size", REDUCE_BUCKET)),
                  contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
                  overlap_comm=bool(zero.get("overlap_comm", False)),
                  prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", PREFETCH_BUCKET)),
                  train_forwards=train_forwards(o.name, clean_weight=o.clean_weight, grad_align=o.grad_align,
                                                consistency=o.consistency is not None),
                  attack=cfg.attack.name != "none" and o.name not in ("clean", "free"),
                  gathered_attack=gathered_attack, allowance=CUDA_ALLOWANCE if gpu else 0)


def persistence_threshold(settings) -> int:
    return int(settings.ds_config.get("zero_optimization", {}).get("stage3_param_persistence_threshold",
                                                                    PERSISTENCE_THRESHOLD))


# ----------------------------------------------------------------------------- a recipe's plan

# The data's shape without reading it: (channels, classes, image size) by data set; None: from the run config.
DATA_SHAPES = {"cifar10": (3, 10, 32), "cifar100": (3, 100, 32), "fashion-mnist": (1, 10, 28),
               "fashion-mnist-full": (1, 10, 28), "imagefolder": (3, None, 224), "hf": (3, None, 224)}


@dataclass(frozen=True)
class PlanRequest:
    """What ``dat-ds plan`` asks for, validated by the CLI (torch-free)."""

    cfg: Any  # RunConfig, --set applied
    ds_path: str
    ds_json: dict[str, Any]
    world: int  # GPUs in all (gpus x nodes)
    capacity: int  # bytes per GPU
    gpu: bool = True  # add the CUDA allowance
    num_classes: int = 1000  # ImageFolder/HF data read from no folder here
    micro_batches: tuple[int, ...] = ()  # empty: powers of two up to global batch / world


def data_shape(cfg, num_classes: int) -> tuple[int, int, int]:
    chans, classes, size = DATA_SHAPES.get(cfg.data.name, (3, None, 224))
    return chans, classes or num_classes, cfg.data.image_size or size


def stage_settings(req: PlanRequest) -> dict[int, tuple[Any, str | None]]:
    """Each ZeRO stage's ``EngineSettings`` from the JSON with only the stage changed, or why it is refused."""
    from ..core.errors import ConfigError
    from ..runtime import ds_config

    out: dict[int, tuple[Any, str | None]] = {}
    base = ds_config.prepare(req.ds_path, req.world, data=req.ds_json)
    for stage in STAGES:
        data = {**req.ds_json, "zero_optimization": {**req.ds_json.get("zero_optimization", {}), "stage": stage}}
        try:
            out[stage] = (ds_config.prepare(req.ds_path, req.world, data=data), None)
        except ConfigError as e:
            out[stage] = (base, str(e))
    return out


def plan_recipe(req: PlanRequest) -> Plan:
    """Trace the recipe's model (torch: fake tensors) and predict every ZeRO stage x micro-batch."""
    from ..data.base import DataSpec
    from . import footprint

    stages = stage_settings(req)
    settings = stages[0][0]
    chans, classes, size = data_shape(req.cfg, req.num_classes)
    spec = DataSpec(in_chans=chans, num_classes=classes, img_size=size, mean=(0.5,) * chans, std=(0.5,) * chans)
    model = footprint.meta_model(req.cfg, spec)
    fp = footprint.measure(model, in_chans=chans, img_size=size, precision=settings.precision,
                           persistence_threshold=persistence_threshold(settings))
    eng = engine_of(req.cfg, settings, req.world, gpu=req.gpu, gathered_attack=False)
    copy_bytes = fp.params * eng.compute_bytes  # what predict() counts for the copy
    eng = dataclasses.replace(eng, gathered_attack=gathers_attacks(req.cfg, copy_bytes, req.capacity))
    micros = list(req.micro_batches) or micro_batches(settings.global_batch, req.world, also=[settings.micro_batch])
    return make_plan(fp, eng, capacity=req.capacity, global_batch=settings.global_batch, micros=micros,
                     stage_allowed={s: why for s, (_, why) in stages.items()})
