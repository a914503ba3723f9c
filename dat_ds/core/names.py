"""Every registered name, as static data: the CLI answers and validates configs without importing torch.

The registries (``dat_ds.attacks.ATTACKS`` and friends) refuse to register a dat-ds name missing here, and
``tests/core/test_registry_names.py`` checks that each tuple equals its registry, so the two cannot drift.
Names registered from outside dat-ds (plugins, tests) are added to ``PLUGINS`` at registration time.
"""

from __future__ import annotations

from .errors import ConfigError

ATTACKS = ("apgd-ce", "apgd-ce-dlr", "apgd-dlr", "autoattack", "fgsm", "fgsm_rs", "nfgsm", "none", "pgd", "square")
EVAL_ATTACKS = tuple(n for n in ATTACKS if n != "none")  # what `dat-ds eval --attacks` may name
EVAL_PROTOCOLS = ("robustbench",)  # dat-ds eval --protocol
DLR_ATTACKS = ("apgd-ce-dlr", "apgd-dlr", "autoattack")  # their DLR loss needs 3 classes or more
EVAL_ONLY_ATTACKS = ("apgd-ce", "apgd-ce-dlr", "apgd-dlr", "autoattack", "square")  # torchattacks: no training use
OBJECTIVES = ("acl", "clean", "dat", "fare", "free", "madry", "mart", "trades")
UNLABELED_OBJECTIVES = ("acl", "fare")  # self-supervised: `dat-ds pretrain` needs one of these
# Fast-AT options (docs/objectives.md): which attacks and objectives each one combines with.
NOISE_ATTACKS = ("nfgsm",)  # take attack.noise_multiplier
REUSE_ATTACKS = ("fgsm", "fgsm_rs", "pgd")  # attack.reuse: they take a start perturbation (init_delta)
REUSE_OBJECTIVES = ("dat", "madry", "mart", "trades")  # one attack per example and batch
STEPS_ATTACKS = ("pgd",)  # attack.steps_schedule: the training attacks with a step count
GRAD_ALIGN_OBJECTIVES = ("dat", "madry")  # objective.grad_align
# State-of-the-art options (docs/objectives.md "Label smoothing, SiLU, eps warm-up").
LABEL_SMOOTHING_OBJECTIVES = ("clean", "dat", "free", "madry", "mart", "trades")  # objective.label_smoothing
EPS_WARMUP_OBJECTIVES = ("dat", "free", "madry", "mart", "trades")  # attack.eps_warmup_epochs
ACTIVATIONS = ("relu", "silu")  # model.act
NORMALIZATIONS = ("auto", "data", "model")  # model.normalization: where the input mean/std come from
AWP_OBJECTIVES = ("dat", "madry", "trades")  # awp: they split into attack + loss (objectives/awp.py)
# attack.zero3_gather: their attacks are eval-mode forwards apart from the training pass (objectives.base.attack_phase)
GATHER_OBJECTIVES = ("acl", "dat", "fare", "madry", "mart", "trades")
KEEP_BEST = ("none", "robust")  # train.keep_best
# train.stop_signals: what a scheduler sends before a stop (SLURM: sbatch --signal=USR1@120; preemption: TERM)
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
CONSISTENCY_OBJECTIVES = ("trades",)  # objective.consistency, objective.cutmix (with TRADES, as DM-Improves-AT)
ACT_MODELS = ("preactresnet18", "wideresnet16_4", "wideresnet28_10", "wideresnet34_10")  # take model.act
MODELS = ("preactresnet18", "small_cnn", "small_cnn_avgpool", "tiny_cnn", "wideresnet16_4", "wideresnet28_10",
          "wideresnet34_10")  # ours; any timm name is also accepted (checked where timm is imported)
# The DeepSpeed JSON's top-level keys (runtime/ds_config.py accepts these): set with --ds-set, never --set.
DEEPSPEED_KEYS = (
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
)
ROOTED_DATASETS = ("cifar10", "cifar100", "hf", "imagefolder")  # read from data.root, which they need
DATASETS = ("cifar10", "cifar100", "fashion-mnist", "fashion-mnist-full", "hf", "imagefolder")
OPTIMIZERS = ("adam", "adamw", "lamb", "lars", "onebitadam", "onebitlamb", "sgd", "zerooneadam")
NORMS = ("l2", "linf")
ATTACK_LOSSES = ("ce", "margin")

# Registry kind (the word in "unknown attack 'x'") -> its static names.
STATIC: dict[str, tuple[str, ...]] = {
    "attack": ATTACKS, "objective": OBJECTIVES, "model": MODELS, "data set": DATASETS,
    "optimizer": OPTIMIZERS, "norm": NORMS, "attack loss": ATTACK_LOSSES,
}
PLUGINS: dict[str, set[str]] = {kind: set() for kind in STATIC}


def known(kind: str) -> list[str]:
    """The names of ``kind`` a config may use here: dat-ds's own plus any registered plugins."""
    return sorted(set(STATIC[kind]) | PLUGINS[kind])


def unknown_message(kind: str, name: object, choices: list[str] | tuple[str, ...]) -> str:
    return f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(choices))}"


def check(kind: str, name: str) -> str:
    """``name`` if it is a known ``kind``, else the one-line ConfigError listing the choices."""
    if name not in STATIC[kind] and name not in PLUGINS[kind]:
        raise ConfigError(unknown_message(kind, name, known(kind)))
    return name
