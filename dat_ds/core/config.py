"""The run config: one typed, frozen document for the experiment.

Precedence: field defaults -> recipe file (YAML) -> CLI overrides (``--set attack.eps=0.1``) -> named flags.
Each section is a frozen pydantic model (``core.fields.Section``): unknown keys, wrong types and values out
of range raise ``ConfigError`` naming the key and the fix, and a config cannot exist unvalidated (a copy
goes through ``replace``, which validates it again). Rules that tie settings together are validators
of the model that holds them. The DeepSpeed JSON (``deepspeed_config``) owns engine settings -- batch
sizes, precision, ZeRO, optimizer, compression -- and is validated separately (``dat_ds.runtime.ds_config``).
Registered names are checked against the static lists of ``core/names.py`` (no torch); a model name that is
not ours may be a timm name, which the launcher's preflight checks with timm.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from . import names
from .dist import DEFAULT_TIMEOUT_S
from .errors import ConfigError
from .fields import Bool, Float, Int, Positive, Radius, Section, Str, fix, parse_number
from .io import read_user_text

PixelEps = Annotated[Radius, Field(le=1)]  # an L-inf/L2 radius of the run config, in pixel units ([0, 1] images)
EPS_UNITS = "; eps is in pixel units, e.g. 8/255"  # the fix for an eps out of range, as key or flag
EPS_FIX = fix(EPS_UNITS)


class DataConfig(Section):
    section: typing.ClassVar[str] = "data"
    name: Str = "fashion-mnist"  # registered data set; the default is the embedded subset
    root: Str | None = None  # folder/file for on-disk data sets (CIFAR, HF, ImageFolder)
    train_subset: Positive | None = Field(None, **fix(" (or null for all)"))  # keep the first N training examples (class-balanced order)
    num_workers: Int = Field(0, ge=0)  # DataLoader workers per rank; 0 keeps CPU cores for the attack
    augment: Bool = False  # random crop + flip (CIFAR/ImageNet recipes turn it on)
    image_size: Positive | None = None  # ImageFolder/HF crop size; None = data set default
    unlabeled: Str | None = None  # pseudo-label .npz (`dat-ds pseudo-label`), or generated .npz shards (file or folder)
    unsup_fraction: Float = Field(0.5, ge=0, lt=1)  # share of each batch drawn from the unlabeled pool (RST uses 0.5)
    trust_pickle: Bool = False  # legacy pickle files run code when loaded: refuse unless asked
    on_corrupt: Literal["abort", "skip"] = "abort"  # an ImageFolder/HF image that does not decode while training


class ModelConfig(Section):
    section: typing.ClassVar[str] = "model"
    name: Str = "small_cnn"  # registered CIFAR/small model or any timm name
    weights: Str | None = None  # local weights file (no hub downloads)
    channels_last: Bool = False  # NHWC memory format; helps convnets on GPUs
    # weights with another class count (an ImageNet checkpoint, a CIFAR-10 run): false starts the head fresh
    strict_head: Bool = False
    act: Literal[names.ACTIVATIONS] = "relu"  # preactresnet/wideresnet activation (SiLU: DM-Improves-AT, Gowal et al.)
    # Input mean/std inside the model: "data" the data set's; "model" the timm model's pretrained_cfg (what its
    # pretrained weights expect); "auto" the model's when model.weights is set and it declares them, else the data's
    normalization: Literal[names.NORMALIZATIONS] = "auto"
    grad_checkpointing: Bool = False  # recompute activations in backward: less memory for a bigger batch or model


class AttackConfig(Section):
    """The attack that generates training examples (the inner maximisation)."""

    section: typing.ClassVar[str] = "attack"
    name: Str = "pgd"  # pgd | fgsm_rs | fgsm | nfgsm | none
    eps: PixelEps = Field(0.1, **EPS_FIX)  # radius of the threat model, in pixel units ([0, 1] images)
    # None: the attack's standard step (dat_ds.attacks.default_step_size)
    step_size: Float | None = Field(None, gt=0, **fix(" (or null for the standard step)"))
    steps: Positive = 5
    norm: Literal["linf", "l2"] = "linf"
    restarts: Positive = 1
    # nfgsm: noise uniform in k*eps before its step; None: k = 2 (the paper's)
    noise_multiplier: Float | None = Field(None, ge=0, **fix(" (2 in the N-FGSM paper)"))
    reuse: Bool = False  # ATTA: start each example's attack from its own last perturbation (pgd/fgsm_rs/fgsm)
    reuse_max_bytes: Positive = 4 * 2**30  # per-rank memory for reuse: 1 byte per pixel value of the rank's shard
    steps_schedule: tuple[Positive, ...] = ()  # [first, last]: PGD steps ramped linearly over the run's steps
    eps_warmup_epochs: Float = Field(0.0, ge=0, **fix(" (0 is off)"))  # eps (and step size) ramp from ~0; eval: full eps
    # ZeRO-3: attack a copy of the full weights gathered once per step (one all-gather, not 1-2 per attack step), freed
    # before the training forward. auto: when the copy fits zero3_gather_budget_gb; always; never (the engine's
    # module). ZeRO 0-2 hold full weights already: auto and never change nothing there, always is an error.
    zero3_gather: Literal["auto", "always", "never"] = "auto"
    # auto's limit on the copy, in GB per rank; null: half the free memory of the smallest rank at start-up (free
    # accelerator memory; on CPU the host's available RAM divided by its ranks)
    zero3_gather_budget_gb: Float | None = Field(None, gt=0, **fix(" (or null for half the free memory)"))

    @field_validator("steps_schedule")
    @classmethod
    def _first_last(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if v and len(v) != 2:
            raise ConfigError(f"attack.steps_schedule={list(v)} must be [first, last], two step counts >= 1, e.g. [1, 5]")
        return v


class CutMixConfig(Section):
    """CutMix with soft labels (Yun et al. 2019; with TRADES as in Gowal et al. 2021 and DM-Improves-AT)."""

    section: typing.ClassVar[str] = "objective.cutmix"
    alpha: Float = Field(1.0, gt=0, **fix(" (1.0 in Gowal et al.)"))  # box area ~ Beta(alpha, alpha) (1.0: uniform)
    prob: Float = Field(1.0, gt=0, le=1)  # share of batches that are mixed


class ConsistencyConfig(Section):
    """Consistency regularisation (Tack et al., AAAI 2022): JS divergence between two views' adversarial predictions."""

    section: typing.ClassVar[str] = "objective.consistency"
    weight: Float = Field(1.0, ge=0)  # lambda of + lambda * JS(f(x_adv, view 1), f(x_adv, view 2))
    temperature: Float = Field(0.5, gt=0, **fix(" (0.5 in Tack et al.)"))  # softmax temperature of the JS term


class ObjectiveConfig(Section):
    section: typing.ClassVar[str] = "objective"
    name: Str = "dat"  # registered objective
    clean_weight: Float = Field(0.5, ge=0, **fix(" (0 is Madry PGD-AT)"))  # lambda in CE(adv) + lambda * CE(clean)
    beta: Float = Field(6.0, ge=0)  # TRADES / MART regulariser weight
    replays: Positive = 4  # Free-AT: replays of each minibatch (epochs are divided by this)
    # GradAlign lambda: + lambda * (1 - cos(grad_x CE(x), grad_x CE(x + eta))); 0 is off
    grad_align: Float = Field(0.0, ge=0, **fix(" (0 turns GradAlign off)"))
    temperature: Float = Field(0.5, gt=0)  # NT-Xent temperature for contrastive objectives
    # every CE term of the supervised objectives (not the attack's); 0.1 in DM-Improves-AT
    label_smoothing: Float = Field(0.0, ge=0, lt=1, **fix(" (0.1 in DM-Improves-AT)"))
    consistency: ConsistencyConfig | None = None  # trades: two views + JS consistency of their adversarial predictions
    cutmix: CutMixConfig | None = None  # trades: CutMix with soft labels; null: off, {} on with the defaults

    @model_validator(mode="after")
    def _one_mix(self) -> ObjectiveConfig:
        if self.cutmix is not None and self.consistency is not None:
            raise ConfigError("objective.cutmix and objective.consistency are two ways of mixing a batch (as in "
                              "DM-Improves-AT); use one of them")
        return self


class OptimConfig(Section):
    """LR scaling and schedule; the optimizer and its base LR live in the DeepSpeed JSON."""

    section: typing.ClassVar[str] = "optim"
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"  # scale the JSON lr by global_batch / base_batch_size
    base_batch_size: Positive = 256  # the batch size at which the JSON lr is right
    warmup_epochs: Float = Field(0.0, ge=0)  # linear warmup from 0 (DAT uses 5 at large batch)
    schedule: Literal["constant", "multistep", "cosine", "onecycle"] = "constant"
    milestones: tuple[Annotated[Float, Field(ge=0)], ...] = ()  # epochs at which multistep multiplies the LR by gamma
    gamma: Float = Field(0.1, gt=0, **fix(" (the LR is multiplied by it)"))
    # onecycle: LR 0 -> JSON lr at this fraction of the run -> 0 (Wong et al.: 2/5)
    onecycle_peak: Float = Field(0.4, gt=0, lt=1, **fix(": the fraction of the run at which the one-cycle LR peaks "
                                                         "(0.4 in Wong et al. 2020)"))

    @model_validator(mode="after")
    def _schedule(self) -> OptimConfig:
        if self.schedule == "multistep" and not self.milestones:
            raise ConfigError("optim.schedule=multistep needs optim.milestones, e.g. [75, 90, 95]")
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"optim.milestones={list(self.milestones)} must be increasing")
        if self.schedule == "onecycle" and self.warmup_epochs > 0:
            raise ConfigError(f"optim.schedule=onecycle ramps the LR up itself (to optim.onecycle_peak); remove "
                              f"optim.warmup_epochs={self.warmup_epochs:g} or set it to 0")
        return self


class TrainConfig(Section):
    section: typing.ClassVar[str] = "train"
    epochs: Positive = 10
    log_every: Positive = 20  # steps between JSONL step records
    max_steps_per_epoch: Positive | None = None  # cut epochs short (smoke tests)
    save_every_steps: Int = Field(0, ge=0)  # mid-epoch checkpoints every N steps (0: per epoch only)
    keep_last: Positive = 3  # checkpoints kept on disk
    nan_policy: Literal["abort", "skip"] = "abort"  # what a non-finite loss or gradient does
    save_on_signal: Bool = False  # a stop signal: end the step, write a final checkpoint if it fits the grace period
    # the signals save_on_signal acts on (exit 128 + the signal: 143 TERM, 130 INT, 138 USR1, 140 USR2); an
    # unlisted one keeps its default (TERM/INT: stop at once; USR1/USR2: the process dies, no final save)
    stop_signals: tuple[Literal[names.STOP_SIGNALS], ...] = ("SIGTERM", "SIGINT")
    keep_best: Literal[names.KEEP_BEST] = "none"  # robust: keep the checkpoint with the best PGD accuracy on validation
    # keep_best=robust: training examples held out (seeded) as that validation split
    val_examples: Positive = Field(1000, **fix(" (the validation split of keep_best)"))
    tf32: Bool = True  # CUDA: TF32 tensor cores for fp32 matmuls/convolutions (Ampere+; 10-bit mantissa, fp32 range)
    deterministic: Bool = False  # CUDA: deterministic kernels, no cuDNN autotuning: bit-exact resumes, at a speed cost

    @model_validator(mode="after")
    def _stop_signals(self) -> TrainConfig:
        listed, given = set(self.stop_signals), f"train.stop_signals=[{', '.join(self.stop_signals)}]"
        if not listed:
            raise ConfigError(f"train.stop_signals is empty; list one or more of {', '.join(names.STOP_SIGNALS)}, "
                              "e.g. [SIGUSR1]")
        if listed != {"SIGTERM", "SIGINT"} and not self.save_on_signal:
            raise ConfigError(f"{given} needs train.save_on_signal=true (without it every signal stops the run at "
                              "once and SIGUSR1/SIGUSR2 kill it)")
        if len(listed & {"SIGTERM", "SIGINT"}) == 1:  # launch() passes Ctrl-C on as SIGTERM, as DeepSpeed does
            one, other = ("SIGTERM", "SIGINT") if "SIGTERM" in listed else ("SIGINT", "SIGTERM")
            raise ConfigError(f"{given} lists {one} without {other}: a launched run's ranks get Ctrl-C as SIGTERM, "
                              "so list both or neither")
        return self


class MonitorConfig(Section):
    """Catastrophic-overfitting watch: FGSM vs PGD accuracy on a fixed held-out batch."""

    section: typing.ClassVar[str] = "monitor"
    every_steps: Int = Field(0, ge=0, **fix(" (0 disables)"))  # 0 disables
    batch_size: Positive = 256
    policy: Literal["warn", "stop", "rollback"] = "warn"
    # FGSM acc - PGD acc above this (with PGD acc collapsing) flags overfitting
    gap: Float = Field(0.2, ge=0, le=1, **fix(" (a difference of accuracies)"))


class EvalConfig(Section):
    section: typing.ClassVar[str] = "eval"
    # APGD-CE then APGD-DLR, `steps` iterations each: within 1 pp of standard AutoAttack on every model measured
    # (docs/evaluation.md), where PGD-20 was up to 2 pp above it; pgd and any other attack may be named
    attack: Str = "apgd-ce-dlr"
    eps: PixelEps | None = Field(None, **EPS_FIX)  # None: the training eps
    steps: Positive = 20
    restarts: Positive = 1
    # None: the attack's standard step (dat_ds.attacks.default_step_size)
    step_size: Float | None = Field(None, gt=0, **fix(" (or null for the standard step)"))
    max_examples: Positive | None = Field(None, **fix(" (or null for the whole test set)"))  # the first N test examples
    batch_size: Positive = 256
    every_epochs: Positive = 1  # robust evaluation cadence (the last epoch is always evaluated)


class EMAConfig(Section):
    """Weight EMA (``dat_ds.runtime.ema``); the section absent or ``ema: null`` turns it off, ``ema: {}`` on."""

    section: typing.ClassVar[str] = "ema"
    # ema = decay * ema + (1 - decay) * weights (DM-Improves-AT 0.995; Gowal et al. up to 0.999)
    decay: Float = Field(0.995, gt=0, lt=1, **fix(", e.g. 0.995 (or ema: null for no EMA)"))
    warmup: Bool = True  # dynamic decay min(decay, (1 + t) / (10 + t)), t = EMA updates so far
    every: Positive = Field(1, **fix(" optimizer steps"))  # optimizer steps between EMA updates


class AWPConfig(Section):
    """Adversarial weight perturbation (Wu et al. 2020, ``dat_ds.objectives.awp``); absent or ``awp: null``: off."""

    section: typing.ClassVar[str] = "awp"
    # each layer's perturbation norm / weight norm (authors: 0.01 with PGD-AT, 0.005 with TRADES)
    gamma: Float = Field(0.005, gt=0, le=1, **fix(": the perturbation's norm relative to each layer's weights (0.01 "
                                                   "with PGD-AT, 0.005 with TRADES in Wu et al. 2020)"))
    # no perturbation before this epoch (authors: 0 with PGD-AT, 10 with TRADES)
    warmup_epochs: Float = Field(0.0, ge=0, **fix(" (0: from the first step)"))


class DistConfig(Section):
    """How the ranks talk to each other (the backend itself comes from DeepSpeed's accelerator)."""

    section: typing.ClassVar[str] = "dist"
    # Seconds a collective may wait for a peer before it fails: a peer whose link went down, or that died or
    # hung, ends the run with one line after this long. Must exceed the longest legitimate wait (rank 0 writing
    # a checkpoint, a rank's first step compiling kernels; 10 min, NCCL's own default): lower it for small models.
    timeout_s: Float = Field(DEFAULT_TIMEOUT_S, ge=1, le=86400, **fix(" seconds: how long a collective waits for a peer before "
                                                           "the run stops (default 600)"))


# A run name is a folder name on every file system and in every shell, used verbatim.
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
RUN_NAME_RULE = "1-128 letters, digits, '-', '_' or '.', not starting with '.'"


def check_run_name(name: str) -> None:
    if not RUN_NAME.fullmatch(name):
        raise ConfigError(f"name={name!r} is not a valid run name; use {RUN_NAME_RULE} (e.g. exp-3)")


class RunConfig(Section):
    # an unknown key that is the DeepSpeed JSON's: say where it goes
    hints: typing.ClassVar[dict[str, str]] = {
        key: f"; {key!r} is a DeepSpeed JSON key: give it with --ds-set instead of --set (e.g. --ds-set "
             "optimizer.params.lr=0.2), or in the JSON"
        for key in names.DEEPSPEED_KEYS}
    name: Str = "run"
    seed: Int = 0
    output_dir: Str = "runs"
    deepspeed_config: Str = "ds_configs/zero0_fp32.json"
    # KEY=VALUE changes to that JSON, in order (--ds-set optimizer.params.lr=0.2): validated with it, saved with the run
    deepspeed_overrides: tuple[Str, ...] = ()
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    dist: DistConfig = Field(default_factory=DistConfig)
    ema: EMAConfig | None = None  # weight EMA, evaluated and exported next to the raw weights; None: off
    awp: AWPConfig | None = None  # adversarial weight perturbation around madry/dat/trades; None: off

    @field_validator("name")
    @classmethod
    def _run_name(cls, v: str) -> str:
        check_run_name(v)
        return v

    @field_validator("deepspeed_overrides")
    @classmethod
    def _key_value(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            key, sep, _ = item.partition("=")
            if not sep or not key.strip() or key.split(".")[0] not in names.DEEPSPEED_KEYS:
                raise ConfigError(f"--ds-set {item!r} is not KEY=VALUE with a DeepSpeed JSON key, e.g. --ds-set "
                                  "optimizer.params.lr=0.2")
        return v

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, v: str) -> str:
        if not v.strip():
            raise ConfigError("output_dir is empty; give a folder for the runs, e.g. --output-dir runs")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> RunConfig:
        validate_fast_at(self)
        validate_sota_options(self)
        validate_awp_and_best(self)
        check_names(self)
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def replace(section: Section, **changes: Any) -> Any:
    """A copy of a config (or one of its sections) with ``changes``, validated like a new one."""
    return section.model_copy(update=changes)


def default_of(section: type[Section], name: str) -> Any:
    """The default of one field of a config section, e.g. ``default_of(EvalConfig, "steps")``."""
    return section.model_fields[name].default


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
    if p.is_dir():
        raise ConfigError(f"recipe file {str(p)!r} is a folder; pass a YAML file (see recipes/)")
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
    return RunConfig.build(values)


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    return RunConfig.build(values)


def parse_eps(text: str) -> list[float]:
    """``"0.05,0.1"`` or ``"2/255,8/255"`` -> radii >= 0 (the caller bounds L-inf radii by 1)."""
    from pydantic_core import PydanticCustomError

    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            value = parse_number(item)
        except PydanticCustomError:
            raise ConfigError(f"--eps item {item!r} is not a finite number; use e.g. --eps 0.1,8/255") from None
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


def validate_sota_options(cfg: RunConfig) -> None:
    """Label smoothing, the SiLU models, the model's own normalisation and the eps warm-up: ranges and what each
    applies to."""
    o, a, m = cfg.objective, cfg.attack, cfg.model
    if o.label_smoothing > 0 and o.name not in names.LABEL_SMOOTHING_OBJECTIVES:
        raise ConfigError(f"objective.label_smoothing applies to the objectives "
                          f"{', '.join(names.LABEL_SMOOTHING_OBJECTIVES)}, not objective.name={o.name!r}")
    if m.act != "relu" and m.name not in names.ACT_MODELS:
        raise ConfigError(f"model.act={m.act} applies to the models {', '.join(names.ACT_MODELS)}, not "
                          f"model.name={m.name!r}; remove it or choose one of those")
    if m.normalization == "model" and m.name in names.MODELS:  # timm names: checked where timm builds them
        raise ConfigError(f"model.normalization=model: model {m.name!r} declares no input mean/std (only timm models "
                          "with a pretrained_cfg do); use model.normalization=data or auto")
    if m.act != "relu" and o.name == "acl":  # its encoder (and fine-tuning) build with ReLU; fare's is the model
        raise ConfigError(f"model.act={m.act} is not supported by the self-supervised objective {o.name!r}; "
                          "remove model.act")
    for key, section, attacked in (("consistency", o.consistency, "two new views of each image"),
                                   ("cutmix", o.cutmix, "new mixed images")):
        if section is not None and o.name not in names.CONSISTENCY_OBJECTIVES:
            raise ConfigError(f"objective.{key} applies to the objectives {', '.join(names.CONSISTENCY_OBJECTIVES)}, "
                              f"not objective.name={o.name!r}; remove it (or objective.{key}: null)")
        if section is not None and a.reuse:
            raise ConfigError(f"objective.{key} attacks {attacked} every batch, whose perturbations attack.reuse "
                              "cannot keep per example; turn one of them off")
    if a.eps_warmup_epochs > 0 and o.name not in names.EPS_WARMUP_OBJECTIVES:
        raise ConfigError(f"attack.eps_warmup_epochs applies to the objectives "
                          f"{', '.join(names.EPS_WARMUP_OBJECTIVES)}, not objective.name={o.name!r}")


def validate_awp_and_best(cfg: RunConfig) -> None:
    """AWP's range and what it wraps; keep_best's validation split (Rice et al. 2020)."""
    w, o, t = cfg.awp, cfg.objective, cfg.train
    if w is not None:
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
    gather = cfg.attack.zero3_gather
    if gather == "always" and zero_stage != 3:
        raise ConfigError(f"attack.zero3_gather=always gathers ZeRO-3's partitioned weights, but zero_optimization.stage "
                          f"is {zero_stage}, where every rank holds them whole already; use auto or never")
    if gather == "always" and cfg.objective.name not in names.GATHER_OBJECTIVES:
        raise ConfigError(f"attack.zero3_gather=always: objective.name={cfg.objective.name!r} runs no attack of its "
                          f"own to gather weights for (free reuses the training pass's input gradient); gathered "
                          f"attacks apply to {', '.join(names.GATHER_OBJECTIVES)}; use auto or never")
    if gather == "always" and cfg.attack.name == "none":
        raise ConfigError("attack.zero3_gather=always with attack.name=none: there is no attack to gather weights "
                          "for; use auto or never")


def validate_fast_at(cfg: RunConfig) -> None:
    """N-FGSM's noise, perturbation reuse, the attack-step schedule and GradAlign: ranges and combinations."""
    a, o = cfg.attack, cfg.objective
    if a.noise_multiplier is not None:
        if a.name not in names.NOISE_ATTACKS:
            raise ConfigError(f"attack.noise_multiplier={a.noise_multiplier:g} applies to attack.name=nfgsm only, "
                              f"not {a.name!r}; remove it or set attack.name=nfgsm")
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
    if a.steps_schedule:
        if a.name not in names.STEPS_ATTACKS:
            raise ConfigError(f"attack.steps_schedule applies to attacks with steps ({', '.join(names.STEPS_ATTACKS)}), "
                              f"not attack.name={a.name!r}")
    if o.grad_align > 0 and o.name not in names.GRAD_ALIGN_OBJECTIVES:
        raise ConfigError(f"objective.grad_align applies to the objectives {', '.join(names.GRAD_ALIGN_OBJECTIVES)}, "
                          f"not objective.name={o.name!r}")
