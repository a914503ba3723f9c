"""Label-side evaluation of a (pre-trained) encoder: SLF, ALF and AFF (the ACL/DynACL protocol).

- ``slf``: standard linear fine-tuning: a linear head on the frozen encoder, clean cross-entropy;
- ``alf``: adversarial linear fine-tuning: the same head trained on PGD examples (the encoder stays frozen);
- ``aff``: adversarial full fine-tuning: encoder + head trained with PGD-AT (Madry).

Each reports clean and PGD-20 accuracy on the test split through ``evaluate``. It runs in one process
with plain torch (a linear probe on 10-class data needs no DeepSpeed) on the accelerator's device; the
attack is the run's ``cfg.attack`` (eps, PGD steps, norm) unless overridden.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import AttackSpec, eval_mode
from ..core import dist
from ..core.config import RunConfig, replace
from ..core.errors import ConfigError
from ..data import build_dataset
from ..objectives.fare import FareModel
from ..objectives.ssl_model import ContrastiveModel, LinearProbe, build_encoder
from .evaluate import evaluate
from .loading import load_run

log = logging.getLogger(__name__)

# mode -> (encoder frozen, adversarial training examples)
MODES: dict[str, tuple[bool, bool]] = {"slf": (True, False), "alf": (True, True), "aff": (False, True)}
DEFAULT_LR = {"slf": 0.01, "alf": 0.01, "aff": 0.001}  # Adam: a linear head takes a larger step than a full network


@dataclass(frozen=True)
class FinetuneSettings:
    mode: str
    epochs: int = 5
    lr: float | None = None  # None: DEFAULT_LR[mode]
    batch_size: int = 128
    eps: float | None = None  # None: the run's attack.eps
    attack_steps: int | None = None  # PGD steps of the training attack; None: the run's attack.steps
    train_subset: int | None = None  # labeled examples used for fine-tuning; None: the run's data setting
    eval_examples: int | None = None  # first N test examples; None: all
    eval_steps: int = 20
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"--mode {self.mode!r} is unknown; use one of {', '.join(MODES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("--epochs and --batch-size must be >= 1")


def encoder_from_run(run_dir) -> tuple[RunConfig, nn.Module, Any]:
    """The encoder a ``dat-ds pretrain`` run trained: ACL's (without its projection head) or FARE's f (not f_0)."""
    loaded = load_run(run_dir)
    if not isinstance(loaded.model, (ContrastiveModel, FareModel)):
        raise ConfigError(f"run {str(run_dir)!r} trained objective {loaded.cfg.objective.name!r}, not a self-supervised "
                          "encoder; give a `dat-ds pretrain` run folder (objective acl or fare)")
    return loaded.cfg, loaded.model.encoder, loaded.spec


def feature_dim(encoder: nn.Module, spec) -> int:
    """The size of ``encoder``'s representation (ACL's ``FEATURE_DIM``, a FARE encoder's ``num_features``)."""
    weight = next(encoder.parameters())
    x = torch.zeros(1, spec.in_chans, spec.img_size, spec.img_size, device=weight.device)
    with eval_mode(encoder), torch.no_grad():
        return encoder(x).shape[1]


def random_encoder(cfg: RunConfig, seed: int = 0) -> tuple[nn.Module, Any]:
    """A randomly initialised encoder of the same architecture: the baseline pre-training must beat."""
    _, spec = build_dataset(cfg.data, "test")
    torch.manual_seed(seed)
    return build_encoder(cfg.model.name, spec, normalization=cfg.model.normalization,
                         pretrained=cfg.model.weights is not None), spec


def finetune(cfg: RunConfig, encoder: nn.Module, spec, settings: FinetuneSettings) -> dict[str, Any]:
    frozen, adversarial = MODES[settings.mode]
    eps = cfg.attack.eps if settings.eps is None else settings.eps
    steps = cfg.attack.steps if settings.attack_steps is None else settings.attack_steps
    # The run's step size belongs to the run's eps; another eps takes PGD's standard step.
    step_size = cfg.attack.step_size if settings.eps is None else None
    train_attack = AttackSpec("pgd", eps=eps, steps=steps, step_size=step_size, norm=cfg.attack.norm)
    lr = DEFAULT_LR[settings.mode] if settings.lr is None else settings.lr
    data_cfg = cfg.data if settings.train_subset is None else _with_subset(cfg, settings.train_subset)
    train_set, _ = build_dataset(data_cfg, "train")
    test_set, _ = build_dataset(cfg.data, "test")

    device = dist.device()
    torch.manual_seed(settings.seed)
    model = LinearProbe(encoder, spec.num_classes, feature_dim(encoder, spec), frozen=frozen).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    loader = torch.utils.data.DataLoader(train_set, batch_size=settings.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(settings.seed),
                                         pin_memory=device.type != "cpu")
    generator = torch.Generator(device=device).manual_seed(settings.seed + 1)
    t0 = time.perf_counter()
    for epoch in range(settings.epochs):
        # Sums stay on the device; read once per epoch, so no step waits for the accelerator.
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        count = 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if adversarial:
                x = train_attack.run(model, x, y, generator)
            model.train()
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            count += len(y)
        log.info("finetune %s epoch %d/%d: loss %.4f, train acc %.4f", settings.mode, epoch + 1, settings.epochs,
                 float(loss_sum) / max(count, 1), int(correct) / max(count, 1))
    train_seconds = time.perf_counter() - t0
    spec_eval = AttackSpec(attack="pgd", eps=eps, steps=settings.eval_steps, norm=cfg.attack.norm)
    result = evaluate(model, test_set, [spec_eval], seed=settings.seed, max_examples=settings.eval_examples)
    return {"mode": settings.mode, "clean_acc": result.clean_acc, "robust_acc": result.robust_acc(spec_eval.label),
            "robust_attack": spec_eval.label, "eval_count": result.count, "train_examples": len(train_set),
            "epochs": settings.epochs, "lr": lr, "train_attack": train_attack.label if adversarial else "none",
            "train_seconds": train_seconds}


def _with_subset(cfg: RunConfig, n: int):

    return replace(cfg.data, train_subset=n, unlabeled=None)
