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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import resources
from ..core.errors import ConfigError
from ..optim.specs import check_optimizer_params

KNOWN_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "scheduler", "fp16", "bf16", "amp", "zero_optimization", "gradient_clipping", "prescale_gradients",
    "gradient_predivide_factor", "sparse_gradients", "steps_per_print", "wall_clock_breakdown", "dump_state",
    "tensorboard", "csv_monitor", "wandb", "comet", "flops_profiler", "activation_checkpointing",
    "communication_data_type", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "memory_breakdown", "elasticity", "data_types", "checkpoint", "aio", "autotuning", "compile", "timers",
    "load_universal_checkpoint", "use_node_local_storage", "torch_autocast", "seed", "comms_logger",
    "data_efficiency", "compression_training", "weight_quantization", "pipeline", "disable_allgather",
    "graph_harvesting", "mics_shard_size", "mics_hierarchical_params_gather", "monitor_config",
    "gradient_compression",  # dat-ds: DAT's quantized gradient all-reduce (dat_ds.comm.gradient); stripped
})
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


def resolve_path(path: str | Path) -> Path:
    """A path as given if it exists, else the shipped ``ds_configs/<name>.json`` (``zero2_fp32`` works too)."""
    return resources.ds_config(path)


def load_ds_json(path: str | Path) -> dict[str, Any]:
    p = resolve_path(path)
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config {str(path)!r} not found; pass one of ds_configs/*.json with --deepspeed_config")
    try:
        data = json.loads(p.read_text())
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


def prepare(path: str | Path, world_size: int, data: dict[str, Any] | None = None) -> EngineSettings:
    data = copy.deepcopy(data if data is not None else load_ds_json(path))
    unknown = sorted(set(data) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in DeepSpeed config {str(path)!r}; check the spelling against the DeepSpeed config docs")
    zero = data.get("zero_optimization", {}) or {}
    if not isinstance(zero, dict):
        raise ConfigError('DeepSpeed config "zero_optimization" must be an object')
    bad_zero = sorted(set(zero) - ZERO_KEYS)
    if bad_zero:
        raise ConfigError(f"unknown key {bad_zero[0]!r} in DeepSpeed config zero_optimization; check the spelling")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage={stage!r} must be 0, 1, 2 or 3")
    bf16 = bool((data.get("bf16") or {}).get("enabled", False))
    fp16 = bool((data.get("fp16") or {}).get("enabled", False))
    if bf16 and fp16:
        raise ConfigError("DeepSpeed config enables both bf16 and fp16; enable one")
    autocast = (data.get("torch_autocast") or {})
    autocast_bf16 = bool(autocast.get("enabled", False)) and str(autocast.get("dtype", "bfloat16")).endswith("bfloat16")
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
    if entry.compresses and stage > 0:
        raise ConfigError(
            f"optimizer {optimizer['type']!r} does its own compressed communication and cannot run with ZeRO stage {stage}; "
            "use zero_optimization.stage 0"
        )
    if entry.compresses and accum > 1:
        raise ConfigError(
            f"optimizer {optimizer['type']!r} communicates at every micro-step; set gradient_accumulation_steps to 1"
        )
    if optimizer_name in ("lamb", "lars") and (stage > 0 or precision in ("bf16", "fp16")):
        # ZeRO 1-3 and DeepSpeed's bf16/fp16 optimizers hand the optimizer one flat tensor per parameter
        # group, so LAMB/LARS would compute one trust ratio for the whole model instead of one per layer.
        raise ConfigError(
            f"optimizer {optimizer['type']!r} needs per-layer tensors but ZeRO stage {stage} / {precision} flattens them; "
            'use zero_optimization.stage 0 with "torch_autocast": {"enabled": true, "dtype": "bfloat16"} for bf16'
        )
    if entry.compresses and precision not in ("fp32", "bf16-autocast"):
        raise ConfigError(
            f"optimizer {optimizer['type']!r} keeps its own fp32 state and needs the fp32 engine; disable {precision}"
        )
    gradient_compression = data.pop("gradient_compression", None)
    if gradient_compression is not None:
        from ..comm.spec import check_gradient_compression

        gradient_compression = check_gradient_compression(gradient_compression)
        conflict = ("optimizer " + repr(optimizer["type"]) + " already compresses its own communication" if entry.compresses
                    else f"ZeRO stage {stage}" if stage > 0 else f"gradient_accumulation_steps={accum}" if accum > 1
                    else precision if precision != "fp32" else None)
        if conflict:
            raise ConfigError(f"gradient_compression replaces DeepSpeed's gradient all-reduce and cannot run with "
                              f"{conflict}; use a plain optimizer, ZeRO 0, no accumulation and fp32, or drop it")
    clip = data.get("gradient_clipping", 0)
    if not isinstance(clip, (int, float)) or clip < 0:
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
