"""Load and validate the DeepSpeed JSON once, at start-up.

The JSON owns engine settings: batch sizes, precision, ZeRO, optimizer (built by dat-ds, see
``dat_ds.optim``), scheduler, clipping and monitors. We check what DeepSpeed would only discover
mid-run -- unknown keys, batch arithmetic, impossible combinations -- and report each as one line.
Nothing here imports torch: the optimizer and compression facts are frozen data (``optim/specs.py``,
``comm/spec.py``), so the CLI validates a JSON before any heavy import or rank start.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import names, resources
from ..core.errors import ConfigError
from ..core.io import read_user_text
from ..optim.specs import check_optimizer_params, check_scheduler

KNOWN_KEYS = frozenset(names.DEEPSPEED_KEYS)
# Keys of "zero_optimization" we pass through; a typo there silently changes memory use in DeepSpeed.
ZERO_KEYS = frozenset({
    "stage", "allgather_partitions", "allgather_bucket_size", "overlap_comm", "reduce_scatter",
    "reduce_bucket_size", "contiguous_gradients", "offload_param", "offload_optimizer", "stage3_max_live_parameters",
    "stage3_max_reuse_distance", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
    "stage3_gather_16bit_weights_on_model_save", "sub_group_size", "round_robin_gradients", "elastic_checkpoint",
    "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_gradients", "ignore_unused_parameters",
    "load_from_fp32_weights", "mics_shard_size", "memory_efficient_linear", "use_multi_rank_bucket_allreduce",
    "stage3_model_persistence_threshold", "cpu_offload", "log_trace_cache_warnings", "module_granularity_threshold",
})

# The JSON type of every value DeepSpeed reads; a wrong one fails deep inside DeepSpeed or, worse, not at
# all ("enabled": "false" is a true string). "optimizer", "scheduler" and "gradient_compression" have
# their own checks; batch sizes are checked with the batch arithmetic.
OBJECT, NUMBER, INTEGER, BOOL, STRING = "an object", "a number", "an integer", "true or false", "a string"
TOP_TYPES: dict[str, str] = {
    **dict.fromkeys(("fp16", "bf16", "amp", "zero_optimization", "tensorboard", "csv_monitor", "wandb", "comet",
                     "flops_profiler", "activation_checkpointing", "elasticity", "data_types", "checkpoint", "aio",
                     "autotuning", "compile", "timers", "torch_autocast", "comms_logger", "data_efficiency",
                     "compression_training", "weight_quantization", "pipeline", "monitor_config"), OBJECT),
    **dict.fromkeys(("gradient_clipping", "gradient_predivide_factor"), NUMBER),
    **dict.fromkeys(("steps_per_print", "mics_shard_size"), INTEGER),
    **dict.fromkeys(("prescale_gradients", "sparse_gradients", "wall_clock_breakdown", "dump_state",
                     "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "memory_breakdown",
                     "load_universal_checkpoint", "use_node_local_storage", "disable_allgather", "graph_harvesting",
                     "mics_hierarchical_params_gather"), BOOL),
    "communication_data_type": STRING,
}
# Fields inside sections, by the same kinds (fields not listed are passed on unchecked).
SECTION_TYPES: dict[str, dict[str, str]] = {
    "fp16": {"enabled": BOOL, "auto_cast": BOOL, "loss_scale": NUMBER, "initial_scale_power": INTEGER,
             "loss_scale_window": INTEGER, "hysteresis": INTEGER, "consecutive_hysteresis": BOOL,
             "min_loss_scale": INTEGER},  # DeepSpeed 0.19 takes whole numbers only
    "bf16": {"enabled": BOOL, "immediate_grad_update": BOOL},
    "torch_autocast": {"enabled": BOOL, "dtype": STRING},
    "zero_optimization": {
        "stage": INTEGER,
        **dict.fromkeys(("allgather_partitions", "overlap_comm", "reduce_scatter", "contiguous_gradients",
                         "round_robin_gradients", "elastic_checkpoint", "ignore_unused_parameters",
                         "load_from_fp32_weights", "stage3_gather_16bit_weights_on_model_save", "zero_quantized_weights",
                         "zero_quantized_gradients", "memory_efficient_linear", "use_multi_rank_bucket_allreduce",
                         "cpu_offload", "log_trace_cache_warnings", "mics_hierarchical_params_gather"), BOOL),
        **dict.fromkeys(("allgather_bucket_size", "reduce_bucket_size", "stage3_max_live_parameters",
                         "stage3_max_reuse_distance", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                         "stage3_model_persistence_threshold", "sub_group_size", "zero_hpz_partition_size",
                         "mics_shard_size", "module_granularity_threshold"), NUMBER),
    },
}
NULLABLE = frozenset({"zero_optimization.offload_param", "zero_optimization.offload_optimizer"})

# Why a setup that communicates itself (a compressing optimizer, gradient_compression) cannot run with
# some engine settings; each goes into that setting's one-line error. Checked in DeepSpeed 0.19's code
# (runtime/engine.py, runtime/zero/stage_1_and_2.py); docs/compression.md, "Beyond DeepSpeed's limits".
ZERO_OWNS_REDUCTION = ("ZeRO reduce-scatters flat gradient buckets inside its own optimizer, with no communication "
                       "hook to put a compressed all-reduce in its place")
ENGINE_16BIT_WRAPS = ("DeepSpeed's bf16/fp16 engine keeps 16-bit weights and gradients, flat with ZeRO, and steps "
                      "its own optimizer wrapper, holding fp32 master copies, around the client optimizer")
USE_AUTOCAST = 'for bf16 use "torch_autocast": {"enabled": true, "dtype": "bfloat16"} (fp32 weights, bf16 compute)'
GRADSCALER_SKIPS = ("its GradScaler skips the optimizer step when this rank's local gradient overflows, so the "
                    "ranks would disagree on entering the all-reduce and hang")


def _type_ok(value: Any, kind: str) -> bool:
    if kind == OBJECT:
        return isinstance(value, dict)
    if kind == BOOL:
        return isinstance(value, bool)
    if kind == STRING:
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) if kind == INTEGER else True


def check_types(data: dict[str, Any]) -> None:
    """Every section and field DeepSpeed reads has its JSON type; numbers are finite."""
    for key, value in data.items():
        kind = TOP_TYPES.get(key)
        if kind is not None and not _type_ok(value, kind):
            raise ConfigError(f"DeepSpeed config {key}={json.dumps(value)} must be {kind}")
        if kind == NUMBER and not math.isfinite(value):
            raise ConfigError(f"DeepSpeed config {key}={json.dumps(value)} must be a finite number")
        if kind != OBJECT:
            continue
        fields = SECTION_TYPES.get(key, {"enabled": BOOL})  # every feature section switches on with "enabled"
        for name, field_value in value.items():
            where = f"{key}.{name}"
            field_kind = fields.get(name)
            if field_kind is None:
                if where in NULLABLE and field_value is not None and not isinstance(field_value, dict):
                    raise ConfigError(f"DeepSpeed config {where}={json.dumps(field_value)} must be an object or null")
                continue
            if not _type_ok(field_value, field_kind):
                raise ConfigError(f"DeepSpeed config {where}={json.dumps(field_value)} must be {field_kind}")
            if field_kind == NUMBER and not math.isfinite(field_value):
                raise ConfigError(f"DeepSpeed config {where}={json.dumps(field_value)} must be a finite number")
            if field_kind == NUMBER and field_value < 0:
                raise ConfigError(f"DeepSpeed config {where}={json.dumps(field_value)} must be >= 0")


@dataclass(frozen=True)
class EngineSettings:
    """What the trainer needs to know from the JSON, resolved for this world size."""

    ds_config: dict[str, Any]  # what goes to deepspeed.initialize (no "optimizer": we build it)
    optimizer: dict[str, Any]  # the JSON's optimizer section
    micro_batch: int
    grad_accum: int
    global_batch: int
    zero_stage: int
    precision: str  # fp32 | bf16 | fp16 | bf16-autocast (fp32 weights, bf16 compute)
    has_scheduler: bool  # the JSON brings its own DeepSpeed scheduler
    compresses: bool  # the optimizer does its own compressed communication
    gradient_compression: dict[str, Any] | None = None  # e.g. {"type": "dat_quantizer", "bits": 8, "block": 256}

    @property
    def saved_json(self) -> dict[str, Any]:
        """The JSON as the run folder and every checkpoint keep it: ``ds_config`` with its optimizer section."""
        return {**self.ds_config, "optimizer": self.optimizer}


def resolve_path(path: str | Path) -> Path:
    """A path as given if it exists, else the shipped ``ds_configs/<name>.json`` (``zero2_fp32`` works too)."""
    return resources.ds_config(path)


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` keeps the last of two equal keys; DeepSpeed's own loader refuses them, and so do we."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def load_ds_json(path: str | Path) -> dict[str, Any]:
    p = resolve_path(path)
    if p.is_dir():
        raise ConfigError(f"DeepSpeed config {str(path)!r} is a folder; pass a JSON file such as ds_configs/zero0_fp32.json")
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config {str(path)!r} not found; pass one of ds_configs/*.json with --deepspeed_config")
    text = read_user_text(p, f"DeepSpeed config {str(path)!r}", save_as="UTF-8 JSON")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        raise ConfigError(f"DeepSpeed config {str(path)!r} has the key {e.args[0]!r} twice in one object; keep one "
                          "(DeepSpeed refuses duplicate keys in a config file)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {str(path)!r} is not valid JSON (line {e.lineno}: {e.msg}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {str(path)!r} must be a JSON object")
    return data


def _positive_int(data: dict, key: str) -> int | None:
    if key not in data or data[key] == "auto":
        return None
    v = data[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"DeepSpeed config {key}={v!r} must be a positive integer")
    return v


def resolve_batch(data: dict[str, Any], world_size: int) -> tuple[int, int, int]:
    """train_batch_size = micro x accum x world; fill in the missing one or fail naming the numbers."""
    tbs = _positive_int(data, "train_batch_size")
    micro = _positive_int(data, "train_micro_batch_size_per_gpu")
    accum = _positive_int(data, "gradient_accumulation_steps")
    if tbs is None and micro is None:
        raise ConfigError("DeepSpeed config needs train_micro_batch_size_per_gpu (or train_batch_size)")
    if tbs is None:
        accum = accum or 1
        return micro, accum, micro * accum * world_size
    if micro is None:
        accum = accum or 1
        if tbs % (accum * world_size):
            raise ConfigError(
                f"train_batch_size={tbs} is not divisible by gradient_accumulation_steps={accum} x world_size={world_size}; "
                "change train_batch_size or give train_micro_batch_size_per_gpu"
            )
        return tbs // (accum * world_size), accum, tbs
    if accum is None:
        if tbs % (micro * world_size):
            raise ConfigError(
                f"train_batch_size={tbs} is not divisible by train_micro_batch_size_per_gpu={micro} x world_size={world_size}; "
                "change one of them"
            )
        return micro, tbs // (micro * world_size), tbs
    if micro * accum * world_size != tbs:
        raise ConfigError(
            f"batch arithmetic fails: train_batch_size={tbs} != micro {micro} x accumulation {accum} x world_size {world_size}; "
            "drop train_batch_size to let it follow"
        )
    return micro, accum, tbs


def apply_overrides(data: dict[str, Any], overrides: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``["optimizer.params.lr=0.2", ...]`` applied in order to a copy of ``data`` (values are YAML scalars, as
    ``--set``'s); sections are created as needed, and ``prepare`` then validates the result like a file."""
    import yaml

    out = copy.deepcopy(data)
    for item in overrides:
        key, _, raw = item.partition("=")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.setdefault(part, {}), dict):
                raise ConfigError(f"--ds-set {item!r}: {part!r} is not a section of the DeepSpeed JSON")
            node = node[part]
        node[parts[-1]] = value
    return out


# The JSON's monitor blocks (DeepSpeed's MonitorMaster): the package each needs, and whether it writes files.
MONITORS = {"tensorboard": ("tensorboard", True), "csv_monitor": (None, True), "wandb": ("wandb", False),
            "comet": ("comet_ml", False)}


def check_monitors(data: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Enabled monitor blocks: their package is installed (else one line naming the extra to install), and the
    ones that write files write them into the run folder (``<run>/monitor``) unless ``output_path`` says where."""
    import importlib.util

    out = copy.deepcopy(data)
    for block, (package, writes_files) in MONITORS.items():
        section = out.get(block)
        if not isinstance(section, dict) or section.get("enabled") is not True:
            continue
        if package is not None and importlib.util.find_spec(package) is None:
            extra = f"'dat-ds[{block}]'" if block in ("tensorboard", "wandb") else package
            raise ConfigError(f"DeepSpeed config enables {block!r}, but the {package} package is not installed; "
                              f"pip install {extra}, or set {block}.enabled=false")
        if writes_files and not section.get("output_path"):
            section["output_path"] = str(run_dir / "monitor")
            section.setdefault("job_name", "dat-ds")
    return out


def prepare_run(cfg, world_size: int) -> EngineSettings:
    """The run config's DeepSpeed JSON with its ``deepspeed_overrides`` and monitors (``check_monitors``),
    validated for ``world_size``."""
    data = apply_overrides(load_ds_json(cfg.deepspeed_config), cfg.deepspeed_overrides)
    return prepare(cfg.deepspeed_config, world_size, data=check_monitors(data, cfg.run_dir))


def prepare(path: str | Path, world_size: int, data: dict[str, Any] | None = None) -> EngineSettings:
    data = copy.deepcopy(data if data is not None else load_ds_json(path))
    unknown = sorted(set(data) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in DeepSpeed config {str(path)!r}; check the spelling against the DeepSpeed config docs")
    check_types(data)
    zero = data.get("zero_optimization", {})
    bad_zero = sorted(set(zero) - ZERO_KEYS)
    if bad_zero:
        raise ConfigError(f"unknown key {bad_zero[0]!r} in DeepSpeed config zero_optimization; check the spelling")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage={stage!r} must be 0, 1, 2 or 3")
    bf16 = data.get("bf16", {}).get("enabled", False)  # check_types: sections are objects, "enabled" a bool
    fp16 = data.get("fp16", {}).get("enabled", False)
    if bf16 and fp16:
        raise ConfigError("DeepSpeed config enables both bf16 and fp16; enable one")
    autocast = data.get("torch_autocast", {})
    autocast_dtype = autocast.get("dtype", "bfloat16")  # DeepSpeed's DtypeEnum spellings
    autocast_bf16 = autocast.get("enabled", False) and autocast_dtype in ("bfloat16", "torch.bfloat16", "bf16")
    autocast_fp16 = autocast.get("enabled", False) and autocast_dtype in ("float16", "torch.float16", "fp16", "half")
    if autocast_bf16 and (bf16 or fp16):
        raise ConfigError("DeepSpeed config enables torch_autocast together with bf16/fp16; choose one precision mode")
    precision = "bf16" if bf16 else "fp16" if fp16 else "bf16-autocast" if autocast_bf16 else "fp32"
    micro, accum, global_batch = resolve_batch(data, world_size)
    data["train_micro_batch_size_per_gpu"] = micro
    data["gradient_accumulation_steps"] = accum
    data["train_batch_size"] = global_batch
    optimizer = data.pop("optimizer", None)
    if optimizer is None:
        raise ConfigError(f'DeepSpeed config {str(path)!r} has no "optimizer" section; add e.g. {{"type": "AdamW", "params": {{"lr": 1e-3}}}}')
    optimizer_name, entry = check_optimizer_params(optimizer)
    # Gradient accumulation is fine for every compressing setup: DeepSpeed calls the client optimizer's
    # step() only at the accumulation boundary, and with its backward all-reduce off (runtime/build.py)
    # the micro-batches' gradients (each loss scaled by 1/accum) add up locally in param.grad, so ours
    # communicates once per optimizer step. What stays refused is what hides the gradients from us:
    if entry.compresses and stage > 0:
        raise ConfigError(
            f"optimizer {optimizer['type']!r} does its own compressed communication and cannot run with ZeRO stage {stage} "
            f"({ZERO_OWNS_REDUCTION}); use zero_optimization.stage 0"
        )
    if entry.compresses and precision in ("bf16", "fp16"):
        raise ConfigError(f"optimizer {optimizer['type']!r} keeps its own fp32 state and cannot run with {precision}: "
                          f"{ENGINE_16BIT_WRAPS}; {USE_AUTOCAST}")
    if entry.compresses and autocast_fp16:
        raise ConfigError(f"optimizer {optimizer['type']!r} cannot run with torch_autocast float16: {GRADSCALER_SKIPS}; "
                          'use "dtype": "bfloat16"')
    if optimizer_name in ("lamb", "lars") and (stage > 0 or precision in ("bf16", "fp16")):
        # ZeRO 1-3 and DeepSpeed's bf16/fp16 optimizers hand the optimizer one flat tensor per parameter
        # group, so LAMB/LARS would compute one trust ratio for the whole model instead of one per layer.
        raise ConfigError(
            f"optimizer {optimizer['type']!r} needs per-layer tensors but ZeRO stage {stage} / {precision} flattens them; "
            'use zero_optimization.stage 0 with "torch_autocast": {"enabled": true, "dtype": "bfloat16"} for bf16'
        )
    gradient_compression = data.pop("gradient_compression", None)
    if gradient_compression is not None:
        from ..comm.spec import check_gradient_compression

        gradient_compression = check_gradient_compression(gradient_compression)
        fix = "drop gradient_compression"
        if entry.compresses:
            conflict = f"optimizer {optimizer['type']!r}, which already compresses its own communication"
            fix = "use a plain optimizer such as AdamW, or " + fix
        elif stage > 0:
            conflict, fix = f"ZeRO stage {stage} ({ZERO_OWNS_REDUCTION})", "use zero_optimization.stage 0, or " + fix
        elif precision in ("bf16", "fp16"):
            conflict, fix = f"{precision} ({ENGINE_16BIT_WRAPS})", USE_AUTOCAST + ", or " + fix
        elif autocast_fp16:
            conflict, fix = f"torch_autocast float16 ({GRADSCALER_SKIPS})", 'use "dtype": "bfloat16", or ' + fix
        else:
            conflict = None
        if conflict:
            raise ConfigError(f"gradient_compression replaces DeepSpeed's gradient all-reduce and cannot run with "
                              f"{conflict}; {fix}")
    if "scheduler" in data:
        check_scheduler(data["scheduler"])
    clip = data.get("gradient_clipping", 0)  # check_types: a finite number
    if clip < 0:
        raise ConfigError(f"gradient_clipping={clip!r} must be a number >= 0 (0 disables)")
    if stage > 0:
        # Our optimizers are client optimizers; ZeRO partitions any torch optimizer's state correctly.
        data.setdefault("zero_allow_untested_optimizer", True)
    data.setdefault("steps_per_print", 10**9)  # we log ourselves; DeepSpeed's per-step prints are noise
    return EngineSettings(
        ds_config=data, optimizer=optimizer, micro_batch=micro, grad_accum=accum, global_batch=global_batch,
        zero_stage=stage, precision=precision, has_scheduler="scheduler" in data, compresses=entry.compresses,
        gradient_compression=gradient_compression,
    )
