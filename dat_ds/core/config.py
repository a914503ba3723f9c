"""The run config: one typed, frozen document for the experiment.

Precedence: dataclass defaults -> recipe file (YAML) -> CLI overrides (``--set attack.eps=0.1``).
Unknown keys and bad values raise ``ConfigError`` naming the key and what is allowed. The DeepSpeed
JSON (``deepspeed_config``) owns engine settings -- batch sizes, precision, ZeRO, optimizer,
compression -- and is validated separately (``dat_ds.runtime.ds_config``). Registered names are
checked here against the static lists of ``core/names.py`` (no torch); a model name that is not ours may
be a timm name, which the launcher's preflight checks with timm.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import names
from .errors import ConfigError
from .io import read_user_text


@dataclass(frozen=True)
class DataConfig:
    name: str = "fashion-mnist"  # registered data set; the default is the embedded subset
    root: str | None = None  # folder/file for on-disk data sets (CIFAR, HF, ImageFolder)
    train_subset: int | None = None  # keep the first N training examples (class-balanced order)
    num_workers: int = 0  # DataLoader workers per rank; 0 keeps CPU cores for the attack
    augment: bool = False  # random crop + flip (CIFAR/ImageNet recipes turn it on)
    image_size: int | None = None  # ImageFolder/HF crop size; None = data set default
    unlabeled: str | None = None  # pseudo-label .npz (`dat-ds pseudo-label`), or generated .npz shards (file or folder)
    unsup_fraction: float = 0.5  # share of each batch drawn from the unlabeled pool (RST uses 0.5)
    trust_pickle: bool = False  # legacy pickle files run code when loaded: refuse unless asked
    on_corrupt: str = "abort"  # abort | skip: an ImageFolder/HF image that does not decode while training


@dataclass(frozen=True)
class ModelConfig:
    name: str = "small_cnn"  # registered CIFAR/small model or any timm name
    weights: str | None = None  # local weights file (no hub downloads)
    channels_last: bool = False  # NHWC memory format; helps convnets on GPUs
    act: str = "relu"  # relu | silu: preactresnet/wideresnet activation (SiLU: DM-Improves-AT, Gowal et al.)


@dataclass(frozen=True)
class AttackConfig:
    """The attack that generates training examples (the inner maximisation)."""

    name: str = "pgd"  # pgd | fgsm_rs | fgsm | nfgsm | none
    eps: float = 0.1  # radius of the threat model, in pixel units ([0, 1] images)
    step_size: float | None = None  # None: the attack's standard step (dat_ds.attacks.default_step_size)
    steps: int = 5
    norm: str = "linf"  # linf | l2
    restarts: int = 1
    noise_multiplier: float | None = None  # nfgsm: noise uniform in k*eps before its step; None: k = 2 (the paper's)
    reuse: bool = False  # ATTA: start each example's attack from its own last perturbation (pgd/fgsm_rs/fgsm)
    reuse_max_bytes: int = 4 * 2**30  # per-rank memory for reuse: 1 byte per pixel value of the rank's shard
    steps_schedule: tuple[int, ...] = ()  # [first, last]: PGD steps ramped linearly over the run's steps
    eps_warmup_epochs: float = 0.0  # eps (and step size) ramp linearly from ~0 over these epochs; eval: full eps


@dataclass(frozen=True)
class CutMixConfig:
    """CutMix with soft labels (Yun et al. 2019; with TRADES as in Gowal et al. 2021 and DM-Improves-AT)."""

    alpha: float = 1.0  # box area ~ Beta(alpha, alpha) (1.0: uniform, the published setting)
    prob: float = 1.0  # share of batches that are mixed


@dataclass(frozen=True)
class ConsistencyConfig:
    """Consistency regularisation (Tack et al., AAAI 2022): JS divergence between two views' adversarial predictions."""

    weight: float = 1.0  # lambda of + lambda * JS(f(x_adv, view 1), f(x_adv, view 2))
    temperature: float = 0.5  # softmax temperature of the JS term


@dataclass(frozen=True)
class ObjectiveConfig:
    name: str = "dat"  # registered objective
    clean_weight: float = 0.5  # lambda in CE(adv) + lambda * CE(clean); 0 is Madry PGD-AT
    beta: float = 6.0  # TRADES / MART regulariser weight
    replays: int = 4  # Free-AT: replays of each minibatch (epochs are divided by this)
    grad_align: float = 0.0  # GradAlign lambda: + lambda * (1 - cos(grad_x CE(x), grad_x CE(x + eta))); 0 is off
    temperature: float = 0.5  # NT-Xent temperature for contrastive objectives
    label_smoothing: float = 0.0  # every CE term of the supervised objectives (not the attack's); 0.1 in DM-Improves-AT
    consistency: ConsistencyConfig | None = None  # trades: two views + JS consistency of their adversarial predictions
    cutmix: CutMixConfig | None = None  # trades: CutMix with soft labels; null: off, {} on with the defaults


@dataclass(frozen=True)
class OptimConfig:
    """LR scaling and schedule; the optimizer and its base LR live in the DeepSpeed JSON."""

    lr_scaling: str = "none"  # none | linear | sqrt: scale the JSON lr by global_batch / base_batch_size
    base_batch_size: int = 256  # the batch size at which the JSON lr is right
    warmup_epochs: float = 0.0  # linear warmup from 0 (DAT uses 5 at large batch)
    schedule: str = "constant"  # constant | multistep | cosine | onecycle
    milestones: tuple[float, ...] = ()  # epochs at which multistep multiplies the LR by gamma
    gamma: float = 0.1
    onecycle_peak: float = 0.4  # onecycle: LR 0 -> JSON lr at this fraction of the run -> 0 (Wong et al.: 2/5)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    log_every: int = 20  # steps between JSONL step records
    max_steps_per_epoch: int | None = None  # cut epochs short (smoke tests)
    save_every_steps: int = 0  # mid-epoch checkpoints every N steps (0: per epoch only)
    keep_last: int = 3  # checkpoints kept on disk
    nan_policy: str = "abort"  # abort | skip: what a non-finite loss or gradient does
    save_on_signal: bool = False  # SIGTERM/SIGINT: end the step, write a final checkpoint if it fits the grace period
    keep_best: str = "none"  # none | robust: keep the checkpoint with the best PGD accuracy on a validation split
    val_examples: int = 1000  # keep_best=robust: training examples held out (seeded) as that validation split
    tf32: bool = True  # CUDA: TF32 tensor cores for fp32 matmuls/convolutions (Ampere+; 10-bit mantissa, fp32 range)
    deterministic: bool = False  # CUDA: deterministic kernels, no cuDNN autotuning: bit-exact resumes, at a speed cost


@dataclass(frozen=True)
class MonitorConfig:
    """Catastrophic-overfitting watch: FGSM vs PGD accuracy on a fixed held-out batch."""

    every_steps: int = 0  # 0 disables
    batch_size: int = 256
    policy: str = "warn"  # warn | stop | rollback
    gap: float = 0.2  # FGSM acc - PGD acc above this (with PGD acc collapsing) flags overfitting


@dataclass(frozen=True)
class EvalConfig:
    attack: str = "pgd"
    eps: float | None = None  # None: the training eps
    steps: int = 20
    restarts: int = 1
    step_size: float | None = None  # None: the attack's standard step (dat_ds.attacks.default_step_size)
    max_examples: int | None = None  # evaluate on the first N test examples
    batch_size: int = 256
    every_epochs: int = 1  # robust evaluation cadence (the last epoch is always evaluated)


@dataclass(frozen=True)
class EMAConfig:
    """Weight EMA (``dat_ds.runtime.ema``); the section absent or ``ema: null`` turns it off, ``ema: {}`` on."""

    decay: float = 0.995  # ema = decay * ema + (1 - decay) * weights (DM-Improves-AT 0.995; Gowal et al. up to 0.999)
    warmup: bool = True  # dynamic decay min(decay, (1 + t) / (10 + t)), t = EMA updates so far
    every: int = 1  # optimizer steps between EMA updates


@dataclass(frozen=True)
class AWPConfig:
    """Adversarial weight perturbation (Wu et al. 2020, ``dat_ds.objectives.awp``); absent or ``awp: null``: off."""

    gamma: float = 0.005  # each layer's perturbation norm / weight norm (authors: 0.01 with PGD-AT, 0.005 with TRADES)
    warmup_epochs: float = 0.0  # no perturbation before this epoch (authors: 0 with PGD-AT, 10 with TRADES)


@dataclass(frozen=True)
class DistConfig:
    """How the ranks talk to each other (the backend itself comes from DeepSpeed's accelerator)."""

    # Seconds a collective may wait for a peer before it fails: a peer whose link went down, or that died or
    # hung, ends the run with one line after this long. Must exceed the longest legitimate wait (rank 0 writing
    # a checkpoint, a rank's first step compiling kernels; 10 min, NCCL's own default): lower it for small models.
    timeout_s: float = 600.0


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    deepspeed_config: str = "ds_configs/zero0_fp32.json"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    ema: EMAConfig | None = None  # weight EMA, evaluated and exported next to the raw weights; None: off
    awp: AWPConfig | None = None  # adversarial weight perturbation around madry/dat/trades; None: off

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def replace(section: Any, **changes: Any) -> Any:
    """A copy of a config (or one of its sections) with ``changes``, validated like a new one."""
    out = dataclasses.replace(section, **changes)
    if isinstance(out, RunConfig):
        validate(out)
    return out


def default_of(section: type, name: str) -> Any:
    """The default of one field of a config section, e.g. ``default_of(EvalConfig, "steps")``."""
    return {f.name: f.default for f in dataclasses.fields(section)}[name]


CHOICES: dict[str, tuple[str, ...]] = {
    "attack.norm": ("linf", "l2"),
    "optim.lr_scaling": ("none", "linear", "sqrt"),
    "optim.schedule": ("constant", "multistep", "cosine", "onecycle"),
    "train.nan_policy": ("abort", "skip"),
    "data.on_corrupt": ("abort", "skip"),
    "monitor.policy": ("warn", "stop", "rollback"),
    "model.act": names.ACTIVATIONS,
    "train.keep_best": names.KEEP_BEST,
}


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        (elem, _ellipsis) = typing.get_args(hint)
        return tuple(_coerce(key, v, elem) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
    if hint is float:  # every float setting passes here, so this is the one non-finite check
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # allow "8/255"
            try:
                num, _, den = value.partition("/")
                number = float(num) / float(den) if den else float(num)
            except (ValueError, ZeroDivisionError):
                pass
        if number is None:
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {hint} for {key}")


def _optional_section(hint: Any) -> type | None:
    """``Section | None`` -> ``Section``; anything else -> None."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"section {prefix.rstrip('.')!r}" if prefix else "the run config"
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r} in {where}; allowed: {', '.join(sorted(names))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        hint = hints[name]
        section = _optional_section(hint)
        if section is not None:  # an optional section (``ema``): null turns it off
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"config key {prefix + name!r} must be a mapping of its fields, or null for off")
            kwargs[name] = None if value is None else _build(section, value, prefix + name + ".")
        elif dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {prefix + name!r} must be a mapping of its fields")
            kwargs[name] = _build(hint, value, prefix + name + ".")
        else:
            kwargs[name] = _coerce(prefix + name, value, hint)
    return cls(**kwargs)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``attack.eps=0.1`` -> ``{"attack": {"eps": 0.1}}`` (values parsed as YAML scalars)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"bad override {item!r}; expected KEY=VALUE, e.g. --set attack.eps=0.1")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line = key, line


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader's own "unhashable key" error follows
            if key in seen:
                raise DuplicateKeyError(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe file {str(p)!r} not found; pass an existing YAML file (see recipes/)")
    text = read_user_text(p, f"recipe file {str(p)!r}")
    try:
        data = yaml.load(text, Loader=StrictLoader) or {}
    except DuplicateKeyError as e:
        raise ConfigError(f"recipe file {str(p)!r} has the key {e.key!r} twice (line {e.line}); "
                          "keep one (YAML would silently use the last)") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"recipe file {str(p)!r} is not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe file {str(p)!r} must hold a mapping of config sections")
    data.pop("paper", None)  # recipes document published numbers; they are not settings
    data.pop("expected", None)
    return data


def build_config(
    recipe: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
    flags: dict[str, Any] | None = None,
) -> RunConfig:
    """defaults <- ``base`` <- recipe <- ``--set`` overrides (YAML scalars) <- ``flags``.

    ``flags`` holds typed values from named CLI options (``--name``, ``--epochs``, ...) as a nested
    dict, merged as they are: ``--name "exp #3"`` is that string, not YAML text with a comment.
    """
    values: dict[str, Any] = dict(base or {})
    if recipe is not None:
        values = _deep_merge(values, load_recipe(recipe))
    for item in overrides:
        values = _deep_merge(values, parse_override(item))
    values = _deep_merge(values, flags or {})
    cfg = _build(RunConfig, values)
    validate(cfg)
    return cfg


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    cfg = _build(RunConfig, values)
    validate(cfg)
    return cfg


def parse_eps(text: str) -> list[float]:
    """``"0.05,0.1"`` or ``"2/255,8/255"`` -> radii >= 0 (the caller bounds L-inf radii by 1)."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            num, _, den = item.partition("/")
            value = float(num) / float(den) if den else float(num)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"--eps item {item!r} is not a number; use e.g. --eps 0.1,8/255") from None
        if value < 0:
            raise ConfigError(f"--eps {item} is negative; eps is a radius >= 0")
        out.append(value)
    if not out:
        raise ConfigError("--eps is empty; give at least one value, e.g. --eps 0.1")
    return out


def check_names(cfg: RunConfig) -> None:
    """Every registered name the config uses exists (models: only ours here; timm names need timm)."""
    names.check("objective", cfg.objective.name)
    names.check("attack", cfg.attack.name)
    names.check("attack", cfg.eval.attack)
    names.check("data set", cfg.data.name)


def validate(cfg: RunConfig) -> None:
    flat = _plain(dataclasses.asdict(cfg))
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        if flat[section][name] not in allowed:
            raise ConfigError(f"config key {key!r} is {flat[section][name]!r}; allowed: {', '.join(allowed)}")
    a = cfg.attack
    if not 0.0 <= a.eps <= 1.0:
        raise ConfigError(f"attack.eps={a.eps} is outside [0, 1]; eps is in pixel units, e.g. 8/255")
    if a.steps < 1:
        raise ConfigError(f"attack.steps={a.steps} must be >= 1")
    if a.restarts < 1:
        raise ConfigError(f"attack.restarts={a.restarts} must be >= 1")
    if a.step_size is not None and a.step_size <= 0:
        raise ConfigError(f"attack.step_size={a.step_size} must be > 0 (or null for the standard step)")
    validate_fast_at(cfg)
    validate_sota_options(cfg)
    validate_awp_and_best(cfg)
    e = cfg.eval
    if e.eps is not None and not 0.0 <= e.eps <= 1.0:
        raise ConfigError(f"eval.eps={e.eps} is outside [0, 1]; eps is in pixel units, e.g. 8/255")
    if e.step_size is not None and e.step_size <= 0:
        raise ConfigError(f"eval.step_size={e.step_size} must be > 0 (or null for the standard step)")
    if e.max_examples is not None and e.max_examples < 1:
        raise ConfigError(f"eval.max_examples={e.max_examples} must be >= 1 (or null for the whole test set)")
    for key, value in (("eval.steps", e.steps), ("eval.restarts", e.restarts), ("eval.batch_size", e.batch_size),
                       ("eval.every_epochs", e.every_epochs), ("train.epochs", cfg.train.epochs),
                       ("train.log_every", cfg.train.log_every), ("train.keep_last", cfg.train.keep_last),
                       ("optim.base_batch_size", cfg.optim.base_batch_size), ("objective.replays", cfg.objective.replays),
                       ("monitor.batch_size", cfg.monitor.batch_size)):
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
    if cfg.objective.clean_weight < 0:
        raise ConfigError(f"objective.clean_weight={cfg.objective.clean_weight} must be >= 0 (0 is Madry PGD-AT)")
    if cfg.objective.beta < 0:
        raise ConfigError(f"objective.beta={cfg.objective.beta} must be >= 0")
    if cfg.objective.temperature <= 0:
        raise ConfigError(f"objective.temperature={cfg.objective.temperature} must be > 0")
    if not 0.0 <= cfg.data.unsup_fraction < 1.0:
        raise ConfigError(f"data.unsup_fraction={cfg.data.unsup_fraction} must be in [0, 1)")
    if cfg.data.train_subset is not None and cfg.data.train_subset < 1:
        raise ConfigError(f"data.train_subset={cfg.data.train_subset} must be >= 1 (or null for all)")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers} must be >= 0")
    if cfg.train.save_every_steps < 0:
        raise ConfigError(f"train.save_every_steps={cfg.train.save_every_steps} must be >= 0")
    if cfg.train.max_steps_per_epoch is not None and cfg.train.max_steps_per_epoch < 1:
        raise ConfigError(f"train.max_steps_per_epoch={cfg.train.max_steps_per_epoch} must be >= 1")
    if cfg.optim.warmup_epochs < 0:
        raise ConfigError(f"optim.warmup_epochs={cfg.optim.warmup_epochs} must be >= 0")
    if cfg.optim.gamma <= 0:
        raise ConfigError(f"optim.gamma={cfg.optim.gamma} must be > 0 (the LR is multiplied by it)")
    if any(m < 0 for m in cfg.optim.milestones):
        raise ConfigError(f"optim.milestones={list(cfg.optim.milestones)} must be epochs >= 0")
    if cfg.monitor.every_steps < 0:
        raise ConfigError(f"monitor.every_steps={cfg.monitor.every_steps} must be >= 0 (0 disables)")
    if not 0.0 <= cfg.monitor.gap <= 1.0:
        raise ConfigError(f"monitor.gap={cfg.monitor.gap} must be in [0, 1] (a difference of accuracies)")
    if cfg.optim.schedule == "multistep" and not cfg.optim.milestones:
        raise ConfigError("optim.schedule=multistep needs optim.milestones, e.g. [75, 90, 95]")
    if list(cfg.optim.milestones) != sorted(cfg.optim.milestones):
        raise ConfigError(f"optim.milestones={list(cfg.optim.milestones)} must be increasing")
    if not 0.0 < cfg.optim.onecycle_peak < 1.0:
        raise ConfigError(f"optim.onecycle_peak={cfg.optim.onecycle_peak:g} must be in (0, 1): the fraction of the "
                          "run at which the one-cycle LR peaks (0.4 in Wong et al. 2020)")
    if cfg.optim.schedule == "onecycle" and cfg.optim.warmup_epochs > 0:
        raise ConfigError(f"optim.schedule=onecycle ramps the LR up itself (to optim.onecycle_peak); remove "
                          f"optim.warmup_epochs={cfg.optim.warmup_epochs:g} or set it to 0")
    if not 1.0 <= cfg.dist.timeout_s <= 86400.0:
        raise ConfigError(f"dist.timeout_s={cfg.dist.timeout_s:g} must be in [1, 86400] seconds: how long a "
                          f"collective waits for a peer before the run stops (default {default_of(DistConfig, 'timeout_s'):g})")
    if cfg.ema is not None:
        if not 0.0 < cfg.ema.decay < 1.0:
            raise ConfigError(f"ema.decay={cfg.ema.decay:g} must be in (0, 1), e.g. 0.995 (or ema: null for no EMA)")
        if cfg.ema.every < 1:
            raise ConfigError(f"ema.every={cfg.ema.every} must be >= 1 optimizer steps")
    check_run_name(cfg.name)
    if not cfg.output_dir.strip():
        raise ConfigError("output_dir is empty; give a folder for the runs, e.g. --output-dir runs")
    check_names(cfg)


def validate_sota_options(cfg: RunConfig) -> None:
    """Label smoothing, the SiLU models and the eps warm-up: ranges and what each applies to."""
    o, a, m = cfg.objective, cfg.attack, cfg.model
    if not 0.0 <= o.label_smoothing < 1.0:
        raise ConfigError(f"objective.label_smoothing={o.label_smoothing:g} must be in [0, 1) (0.1 in DM-Improves-AT)")
    if o.label_smoothing > 0 and o.name not in names.LABEL_SMOOTHING_OBJECTIVES:
        raise ConfigError(f"objective.label_smoothing applies to the objectives "
                          f"{', '.join(names.LABEL_SMOOTHING_OBJECTIVES)}, not objective.name={o.name!r}")
    if m.act != "relu" and m.name not in names.ACT_MODELS:
        raise ConfigError(f"model.act={m.act} applies to the models {', '.join(names.ACT_MODELS)}, not "
                          f"model.name={m.name!r}; remove it or choose one of those")
    if m.act != "relu" and o.name in names.UNLABELED_OBJECTIVES:  # its encoder (and fine-tuning) build with ReLU
        raise ConfigError(f"model.act={m.act} is not supported by the self-supervised objective {o.name!r}; "
                          "remove model.act")
    if a.eps_warmup_epochs < 0:
        raise ConfigError(f"attack.eps_warmup_epochs={a.eps_warmup_epochs:g} must be >= 0 (0 is off)")
    if o.consistency is not None:
        if o.name not in names.CONSISTENCY_OBJECTIVES:
            raise ConfigError(f"objective.consistency applies to the objectives {', '.join(names.CONSISTENCY_OBJECTIVES)}, "
                              f"not objective.name={o.name!r}; remove it (or objective.consistency: null)")
        if o.consistency.weight < 0:
            raise ConfigError(f"objective.consistency.weight={o.consistency.weight:g} must be >= 0")
        if o.consistency.temperature <= 0:
            raise ConfigError(f"objective.consistency.temperature={o.consistency.temperature:g} must be > 0 (0.5 in "
                              "Tack et al.)")
        if a.reuse:
            raise ConfigError("objective.consistency attacks two new views of each image every batch, whose "
                              "perturbations attack.reuse cannot keep per example; turn one of them off")
    if o.cutmix is not None:
        if o.name not in names.CONSISTENCY_OBJECTIVES:
            raise ConfigError(f"objective.cutmix applies to the objectives {', '.join(names.CONSISTENCY_OBJECTIVES)}, "
                              f"not objective.name={o.name!r}; remove it (or objective.cutmix: null)")
        if o.cutmix.alpha <= 0:
            raise ConfigError(f"objective.cutmix.alpha={o.cutmix.alpha:g} must be > 0 (1.0 in Gowal et al.)")
        if not 0.0 < o.cutmix.prob <= 1.0:
            raise ConfigError(f"objective.cutmix.prob={o.cutmix.prob:g} must be in (0, 1]")
        if o.consistency is not None:
            raise ConfigError("objective.cutmix and objective.consistency are two ways of mixing a batch (as in "
                              "DM-Improves-AT); use one of them")
        if a.reuse:
            raise ConfigError("objective.cutmix attacks new mixed images every batch, whose perturbations attack.reuse "
                              "cannot keep per example; turn one of them off")
    if a.eps_warmup_epochs > 0 and o.name not in names.EPS_WARMUP_OBJECTIVES:
        raise ConfigError(f"attack.eps_warmup_epochs applies to the objectives "
                          f"{', '.join(names.EPS_WARMUP_OBJECTIVES)}, not objective.name={o.name!r}")


def validate_awp_and_best(cfg: RunConfig) -> None:
    """AWP's range and what it wraps; keep_best's validation split (Rice et al. 2020)."""
    w, o, t = cfg.awp, cfg.objective, cfg.train
    if w is not None:
        if not 0.0 < w.gamma <= 1.0:
            raise ConfigError(f"awp.gamma={w.gamma:g} must be in (0, 1]: the perturbation's norm relative to each "
                              "layer's weights (0.01 with PGD-AT, 0.005 with TRADES in Wu et al. 2020)")
        if w.warmup_epochs < 0:
            raise ConfigError(f"awp.warmup_epochs={w.warmup_epochs:g} must be >= 0 (0: from the first step)")
        if o.name not in names.AWP_OBJECTIVES:
            raise ConfigError(f"awp applies to the objectives {', '.join(names.AWP_OBJECTIVES)}, not "
                              f"objective.name={o.name!r}; remove awp (or awp: null)")
        if o.grad_align > 0:
            raise ConfigError("awp and objective.grad_align do not combine (GradAlign's double backprop would run "
                              "twice per step); use one of them")
        if t.nan_policy == "skip":  # a skipped step never reaches after_backward, which removes the perturbation
            raise ConfigError("awp needs train.nan_policy=abort: a step that nan_policy=skip drops would keep its "
                              "weight perturbation")
    if t.keep_best != "none":
        if t.val_examples < 1:
            raise ConfigError(f"train.val_examples={t.val_examples} must be >= 1 (the validation split of keep_best)")
        if o.name in names.UNLABELED_OBJECTIVES:
            raise ConfigError(f"train.keep_best={t.keep_best} measures robust accuracy of a classifier; the "
                              f"self-supervised objective {o.name!r} trains none, remove it")
        if cfg.data.train_subset is not None and cfg.data.train_subset <= t.val_examples:
            raise ConfigError(f"data.train_subset={cfg.data.train_subset} leaves nothing to train on after the "
                              f"validation split of train.val_examples={t.val_examples}; lower train.val_examples")


def check_engine(cfg: RunConfig, zero_stage: int) -> None:
    """Run-config options that depend on the DeepSpeed JSON, checked where both are known (``launch.validate``
    and the trainer)."""
    if cfg.awp is not None and zero_stage == 3:
        raise ConfigError("awp perturbs each layer's whole weight tensor, which ZeRO-3 partitions over the ranks; "
                          "use zero_optimization.stage 0, 1 or 2 with awp, or remove awp")


def validate_fast_at(cfg: RunConfig) -> None:
    """N-FGSM's noise, perturbation reuse, the attack-step schedule and GradAlign: ranges and combinations."""
    a, o = cfg.attack, cfg.objective
    if a.noise_multiplier is not None:
        if a.name not in names.NOISE_ATTACKS:
            raise ConfigError(f"attack.noise_multiplier={a.noise_multiplier:g} applies to attack.name=nfgsm only, "
                              f"not {a.name!r}; remove it or set attack.name=nfgsm")
        if a.noise_multiplier < 0:
            raise ConfigError(f"attack.noise_multiplier={a.noise_multiplier:g} must be >= 0 (2 in the N-FGSM paper)")
    if a.reuse:
        if a.name not in names.REUSE_ATTACKS:
            raise ConfigError(f"attack.reuse needs an attack that starts from a perturbation ({', '.join(names.REUSE_ATTACKS)}),"
                              f" not attack.name={a.name!r}")
        if o.name not in names.REUSE_OBJECTIVES:
            raise ConfigError(f"attack.reuse applies to the objectives {', '.join(names.REUSE_OBJECTIVES)}, not "
                              f"objective.name={o.name!r}")
        if cfg.data.unlabeled:
            raise ConfigError("attack.reuse keeps one perturbation per training example and cannot follow the "
                              "pseudo-labelled pool of data.unlabeled; turn one of them off")
    if a.reuse_max_bytes < 1:
        raise ConfigError(f"attack.reuse_max_bytes={a.reuse_max_bytes} must be >= 1")
    if a.steps_schedule:
        if a.name not in names.STEPS_ATTACKS:
            raise ConfigError(f"attack.steps_schedule applies to attacks with steps ({', '.join(names.STEPS_ATTACKS)}), "
                              f"not attack.name={a.name!r}")
        if len(a.steps_schedule) != 2 or min(a.steps_schedule) < 1:
            raise ConfigError(f"attack.steps_schedule={list(a.steps_schedule)} must be [first, last], two step "
                              "counts >= 1, e.g. [1, 5]")
    if o.grad_align < 0:
        raise ConfigError(f"objective.grad_align={o.grad_align:g} must be >= 0 (0 turns GradAlign off)")
    if o.grad_align > 0 and o.name not in names.GRAD_ALIGN_OBJECTIVES:
        raise ConfigError(f"objective.grad_align applies to the objectives {', '.join(names.GRAD_ALIGN_OBJECTIVES)}, "
                          f"not objective.name={o.name!r}")


# A run name is a folder name on every file system and in every shell, used verbatim.
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
RUN_NAME_RULE = "1-128 letters, digits, '-', '_' or '.', not starting with '.'"


def check_run_name(name: str) -> None:
    if not RUN_NAME.fullmatch(name):
        raise ConfigError(f"name={name!r} is not a valid run name; use {RUN_NAME_RULE} (e.g. exp-3)")
