"""What a command asks for, as typed data: ``cli/`` builds these from the command line, and ``launch/`` and
``evaluation/`` take them (never an ``argparse.Namespace``).

Frozen and torch-free, so the command line can build one before any heavy import. A request holds what
the user said, as text where the text is what error messages quote (``eps="8/255"``); ``launch.validate``
checks it (one-line ``ConfigError``), and derived values come back as a new request
(``dataclasses.replace``). Launcher options (``--nproc``, ``--hostfile``, ``--master-port``) stay with the
command that starts ranks: a rank's request never holds them. The defaults are the command line's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainRequest:
    """``dat-ds train`` / ``pretrain`` / ``demo`` and every training rank (``python -m dat_ds.train``)."""

    config: str | None = None  # recipe path or a shipped recipe's name; None: the defaults
    deepspeed_config: str | None = None  # overrides the recipe's
    overrides: tuple[str, ...] = ()  # --set KEY=VALUE, in order
    name: str | None = None  # the named flags win over --set (launch.validate.named_flags)
    epochs: int | None = None
    output_dir: str | None = None
    resume: str | None = None  # "auto" or a folder
    overwrite: bool = False
    allow_world_size_change: bool = False
    dry_run: bool = False
    trust_pickle: bool = False
    ds_overrides: tuple[str, ...] = ()  # --ds-set KEY=VALUE: DeepSpeed JSON keys, in order


@dataclass(frozen=True)
class TuneWorkerRequest:
    """The measuring ranks of ``dat-ds tune`` (``python -m dat_ds.cli.tune_rank``): where requests arrive, and the
    recipe and overrides every point starts from."""

    exchange: str  # folder of req-<n>.json / res-<n>.json
    recipe: str | None = None
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvalRequest:
    """``dat-ds eval`` and every evaluation rank (``python -m dat_ds.evaluate``)."""

    # what to evaluate: a run folder (weights: ema | raw, which of its weights), or a weights file + model
    run: str | None = None
    tag: str | None = None
    weights: str | None = None
    model: str | None = None
    data: str | None = None
    data_root: str | None = None
    # the attacks, as given: comma lists (checked by launch.validate, parsed by evaluation.run)
    attacks: str = "pgd"
    eps: str | None = None  # None: the run's attack.eps
    norm: str = "linf"
    steps: int = 20
    restarts: int = 1
    loss: str = "ce"
    aa_steps: int = 100
    aa_queries: int = 5000
    apgd_steps: int = 100
    square_queries: int = 1000
    # how
    max_examples: int | None = None
    batch_size: int = 256
    seed: int = 0
    threads: int | None = None
    sanity: bool = False
    per_class: bool = False  # print each class's accuracies (eval.json always holds them)
    out: str | None = None
    # RobustBench protocol
    protocol: str | None = None
    subset_file: str | None = None
    entry_name: str | None = None
