"""Bad inputs: each gives exactly one stderr line ``error: <problem>; <fix>``, exit code 2, and no outputs.

Table-driven: a case is (id, args builder, expected error line). Everything runs in-process through
``dat_ds.cli.main`` and is caught before any rank, engine or run folder exists.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from dat_ds import cli
from dat_ds.attacks import ATTACKS
from dat_ds.core import dist
from dat_ds.core.config import AttackConfig, RunConfig
from dat_ds.data import DATASETS
from dat_ds.models import MODELS
from dat_ds.objectives import OBJECTIVES
from dat_ds.optim import OPTIMIZERS
from tests.helpers import TINY_DS, idx_root, snapshot

dist.setup_logging()  # bind the log handler outside capsys: stderr then holds only the error line

FIELDS = lambda cls: ", ".join(sorted(cls.model_fields))  # noqa: E731


def ds_file(tmp: Path, text: str | None = None, **changes) -> Path:
    cfg = json.loads(json.dumps(TINY_DS))
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    p = tmp / "bad_ds.json"
    p.write_text(text if text is not None else json.dumps(cfg))
    return p


def recipe(tmp: Path, text: str) -> Path:
    p = tmp / "recipe.yaml"
    p.write_text(text)
    return p


def fake_checkpoint(tmp: Path, model: str, world_size: int = 1, **fits) -> Path:
    """A committed checkpoint of another model: the mismatch is caught from complete.json alone."""
    tag = tmp / "runs" / "run" / "checkpoint" / "step000000004"
    tag.mkdir(parents=True)
    (tag / "complete.json").write_text(json.dumps({
        "tag": tag.name, "global_step": 4, "epoch": 0, "world_size": world_size, "files": {},
        "fits": {"model.name": model, "data.name": "fashion-mnist", "optimizer": "AdamW", "zero_stage": 0, **fits}}))
    (tag.parent / "latest").write_text(tag.name + "\n")
    return tag


def names(reg) -> str:
    return ", ".join(reg.names())


# Each case: (id, fn(tmp) -> extra argv, expected line with {tmp} for the temp folder)
PATH_CASES = [  # checked by --dry-run too: existence only, nothing decoded
    ("cifar-root-unset", lambda t: ["--set", "data.name=cifar10"],
     "data.root is not set; data.name=cifar10 reads its files from a folder: give it with --set data.root=DIR"),
    ("cifar-root-missing", lambda t: ["--set", "data.name=cifar10", "--set", f"data.root={t}/absent"],
     "data.root '{tmp}/absent' does not exist; check the path"),
    ("imagefolder-root-missing", lambda t: ["--set", "data.name=imagefolder", "--set", f"data.root={t}/imgs"],
     "data.root '{tmp}/imgs' does not exist; check the path"),
    ("weights-missing", lambda t: ["--set", f"model.weights={t}/w.safetensors"],
     "model.weights '{tmp}/w.safetensors' does not exist; check the path"),
    ("weights-a-folder", lambda t: ["--set", f"model.weights={t}"],
     "model.weights '{tmp}' is not a file; give a .safetensors or .pt weights file"),
    ("unlabeled-missing", lambda t: ["--set", f"data.unlabeled={t}/pool.npz"],
     "data.unlabeled '{tmp}/pool.npz' does not exist; check the path"),
]

CASES = [*PATH_CASES,
    ("engine-key-in-set", lambda t: ["--set", "optimizer.params.lr=0.2"],
     f"unknown config key 'optimizer' in the run config; allowed: {FIELDS(RunConfig)}; 'optimizer' is a DeepSpeed JSON "
     "key: give it with --ds-set instead of --set (e.g. --ds-set optimizer.params.lr=0.2), or in the JSON"),
    ("ds-set-not-a-deepspeed-key", lambda t: ["--ds-set", "atack.eps=0.1"],
     "--ds-set 'atack.eps=0.1' is not KEY=VALUE with a DeepSpeed JSON key, e.g. --ds-set optimizer.params.lr=0.2"),
    ("ds-set-bad-value", lambda t: ["--ds-set", "optimizer.params.lr=abc"], "optimizer 'AdamW' lr='abc' must be a number"),
    ("typo-in-section", lambda t: ["--set", "attack.epz=0.1"],
     f"unknown config key 'attack.epz' in section 'attack'; allowed: {FIELDS(AttackConfig)}"),
    ("typo-top-level", lambda t: ["--set", "sed=1"],
     f"unknown config key 'sed' in the run config; allowed: {FIELDS(RunConfig)}"),
    ("typo-in-recipe", lambda t: ["--config", str(recipe(t, "attack: {name: pgd, stesp: 3}\n"))],
     f"unknown config key 'attack.stesp' in section 'attack'; allowed: {FIELDS(AttackConfig)}"),
    ("section-not-mapping", lambda t: ["--set", "attack=pgd"], "config key 'attack' must be a mapping of its fields"),
    ("int-wrong-type", lambda t: ["--set", "attack.steps=abc"], "config key 'attack.steps' must be an integer, got 'abc'"),
    ("int-given-float", lambda t: ["--set", "train.epochs=1.5"], "config key 'train.epochs' must be an integer, got 1.5"),
    ("bool-wrong-type", lambda t: ["--set", "data.augment=maybe"], "config key 'data.augment' must be true or false, got 'maybe'"),
    ("float-wrong-type", lambda t: ["--set", "attack.eps=big"], "config key 'attack.eps' must be a number, got 'big'"),
    ("eps-negative", lambda t: ["--set", "attack.eps=-0.1"], "attack.eps=-0.1 must be in [0, 1]; eps is in pixel units, e.g. 8/255"),
    ("eps-above-one", lambda t: ["--set", "attack.eps=8"], "attack.eps=8 must be in [0, 1]; eps is in pixel units, e.g. 8/255"),
    ("eps-not-a-number", lambda t: ["--set", "attack.eps=.nan"], "config key 'attack.eps' must be a finite number, got nan"),
    ("clean-weight-infinite", lambda t: ["--set", "objective.clean_weight=.inf"],
     "config key 'objective.clean_weight' must be a finite number, got inf"),
    ("step-size-nan-text", lambda t: ["--set", "attack.step_size=nan"], "config key 'attack.step_size' must be a finite number, got 'nan'"),
    ("eval-max-examples-zero", lambda t: ["--set", "eval.max_examples=0"],
     "eval.max_examples=0 must be >= 1 (or null for the whole test set)"),
    ("name-with-comment-char", lambda t: ["--name", "exp #3"],
     "name='exp #3' is not a valid run name; use 1-128 letters, digits, '-', '_' or '.', not starting with '.' (e.g. exp-3)"),
    ("name-starts-with-dot", lambda t: ["--name", ".."],
     "name='..' is not a valid run name; use 1-128 letters, digits, '-', '_' or '.', not starting with '.' (e.g. exp-3)"),
    ("recipe-duplicate-key", lambda t: ["--config", str(recipe(t, "attack:\n  eps: 0.1\n  eps: 0.2\n"))],
     "recipe file '{tmp}/recipe.yaml' has the key 'eps' twice (line 3); keep one (YAML would silently use the last)"),
    ("master-port-out-of-range", lambda t: ["--nproc", "2", "--master-port", "70000"],
     "--master-port=70000 is not a TCP port; use 1..65535 (or leave it out for a free one)"),
    ("master-port-zero", lambda t: ["--master-port", "0"],
     "--master-port=0 is not a TCP port; use 1..65535 (or leave it out for a free one)"),
    ("attack-steps-zero", lambda t: ["--set", "attack.steps=0"], "attack.steps=0 must be >= 1"),
    ("epochs-zero", lambda t: ["--epochs", "0"], "train.epochs=0 must be >= 1"),
    ("eval-steps-zero", lambda t: ["--set", "eval.steps=0"], "eval.steps=0 must be >= 1"),
    ("bad-nan-policy", lambda t: ["--set", "train.nan_policy=ignore"], "config key 'train.nan_policy' is 'ignore'; allowed: abort, skip"),
    ("stop-signal-unknown", lambda t: ["--set", "train.save_on_signal=true", "--set", "train.stop_signals=[SIGUSR1, SIGHUP]"],
     "config key 'train.stop_signals' is 'SIGHUP'; allowed: SIGTERM, SIGINT, SIGUSR1, SIGUSR2"),
    ("stop-signal-short-name", lambda t: ["--set", "train.save_on_signal=true", "--set", "train.stop_signals=[USR1]"],
     "config key 'train.stop_signals' is 'USR1'; allowed: SIGTERM, SIGINT, SIGUSR1, SIGUSR2"),
    ("stop-signals-not-a-list", lambda t: ["--set", "train.save_on_signal=true", "--set", "train.stop_signals=SIGUSR1"],
     "config key 'train.stop_signals' must be a list, got 'SIGUSR1'"),
    ("stop-signals-empty", lambda t: ["--set", "train.save_on_signal=true", "--set", "train.stop_signals=[]"],
     "train.stop_signals is empty; list one or more of SIGTERM, SIGINT, SIGUSR1, SIGUSR2, e.g. [SIGUSR1]"),
    ("stop-signals-without-save-on-signal", lambda t: ["--set", "train.stop_signals=[SIGUSR1]"],
     "train.stop_signals=[SIGUSR1] needs train.save_on_signal=true (without it every signal stops the run at once "
     "and SIGUSR1/SIGUSR2 kill it)"),
    ("stop-signals-term-without-int", lambda t: ["--set", "train.save_on_signal=true", "--set", "train.stop_signals=[SIGUSR1, SIGTERM]"],
     "train.stop_signals=[SIGUSR1, SIGTERM] lists SIGTERM without SIGINT: a launched run's ranks get Ctrl-C as "
     "SIGTERM, so list both or neither"),
    ("bad-normalization", lambda t: ["--set", "model.normalization=imagenet"],
     "config key 'model.normalization' is 'imagenet'; allowed: auto, data, model"),
    ("normalization-model-without-statistics", lambda t: ["--set", "model.normalization=model"],
     "model.normalization=model: model 'tiny_cnn' declares no input mean/std (only timm models with a pretrained_cfg "
     "do); use model.normalization=data or auto"),
    ("normalization-model-other-channels", lambda t: ["--set", "model.name=test_resnet", "--set", "model.normalization=model"],
     "model.normalization=model: the timm pretrained_cfg of model 'test_resnet' has mean/std for 3 channels, the data 1; "
     "use model.normalization=data (or auto)"),
    ("bad-override-syntax", lambda t: ["--set", "attack.eps"], "bad override 'attack.eps'; expected KEY=VALUE, e.g. --set attack.eps=0.1"),
    ("unknown-attack", lambda t: ["--set", "attack.name=pgdd"], lambda: f"unknown attack 'pgdd'; choose one of: {names(ATTACKS)}"),
    ("unknown-eval-attack", lambda t: ["--set", "eval.attack=autoattak"], lambda: f"unknown attack 'autoattak'; choose one of: {names(ATTACKS)}"),
    ("unknown-objective", lambda t: ["--set", "objective.name=madri"], lambda: f"unknown objective 'madri'; choose one of: {names(OBJECTIVES)}"),
    ("unknown-model", lambda t: ["--set", "model.name=resnet_9000"],
     lambda: f"unknown model 'resnet_9000'; use one of {names(MODELS)} or a timm model name (see `timm.list_models()`)"),
    ("unknown-dataset", lambda t: ["--set", "data.name=mnist-fashion"], lambda: f"unknown data set 'mnist-fashion'; choose one of: {names(DATASETS)}"),
    ("unknown-optimizer", lambda t: ["--ds-config", str(ds_file(t, optimizer={"type": "Adamm", "params": {"lr": 0.001}}))],
     lambda: f"unknown optimizer type 'Adamm' in the DeepSpeed config; choose one of: {names(OPTIMIZERS)} (case-insensitive)"),
    ("optimizer-unknown-param", lambda t: ["--ds-config", str(ds_file(t, optimizer={"type": "AdamW", "params": {"lr": 0.001}, "parms": {}}))],
     """unknown key 'parms' in DeepSpeed config "optimizer"; allowed: type, params"""),
    ("batch-does-not-divide", lambda t: ["--nproc", "2", "--ds-config", str(ds_file(t, train_batch_size=33, train_micro_batch_size_per_gpu=None))],
     "train_batch_size=33 is not divisible by gradient_accumulation_steps=1 x world_size=2; change train_batch_size or give train_micro_batch_size_per_gpu"),
    ("batch-arithmetic", lambda t: ["--ds-config", str(ds_file(t, train_batch_size=100))],
     "batch arithmetic fails: train_batch_size=100 != micro 16 x accumulation 1 x world_size 1; drop train_batch_size to let it follow"),
    ("micro-batch-zero", lambda t: ["--ds-config", str(ds_file(t, train_micro_batch_size_per_gpu=0))],
     "DeepSpeed config train_micro_batch_size_per_gpu=0 must be a positive integer"),
    ("zero-with-onebit", lambda t: ["--ds-config", str(ds_file(t, optimizer={"type": "OneBitAdam", "params": {"lr": 0.001}}, zero_optimization={"stage": 2}))],
     "optimizer 'OneBitAdam' does its own compressed communication and cannot run with ZeRO stage 2 (ZeRO reduce-scatters "
     "flat gradient buckets inside its own optimizer, with no communication hook to put a compressed all-reduce in its "
     "place); use zero_optimization.stage 0"),
    ("ds-unknown-key", lambda t: ["--ds-config", str(ds_file(t, train_micro_batch_size=16))],
     "unknown key 'train_micro_batch_size' in DeepSpeed config '{tmp}/bad_ds.json'; check the spelling against the DeepSpeed config docs"),
    ("ds-unknown-zero-key", lambda t: ["--ds-config", str(ds_file(t, zero_optimization={"stage": 0, "overlap_com": True}))],
     "unknown key 'overlap_com' in DeepSpeed config zero_optimization; check the spelling"),
    ("ds-bad-zero-stage", lambda t: ["--ds-config", str(ds_file(t, zero_optimization={"stage": 4}))],
     "zero_optimization.stage=4 must be 0, 1, 2 or 3"),
    ("ds-malformed-json", lambda t: ["--ds-config", str(ds_file(t, text='{"train_micro_batch_size_per_gpu": 16,'))],
     "DeepSpeed config '{tmp}/bad_ds.json' is not valid JSON (line 1: Expecting property name enclosed in double quotes); fix the syntax"),
    ("ds-missing", lambda t: ["--ds-config", str(t / "nope.json")],
     "DeepSpeed config '{tmp}/nope.json' not found; pass one of ds_configs/*.json with --deepspeed_config"),
    ("ds-no-optimizer", lambda t: ["--ds-config", str(ds_file(t, optimizer=None))],
     """DeepSpeed config '{tmp}/bad_ds.json' has no "optimizer" section; add e.g. {"type": "AdamW", "params": {"lr": 1e-3}}"""),
    ("ds-section-not-object", lambda t: ["--ds-config", str(ds_file(t, bf16=True))], "DeepSpeed config bf16=true must be an object"),
    ("ds-enabled-is-a-string", lambda t: ["--ds-config", str(ds_file(t, bf16={"enabled": "false"}))],
     'DeepSpeed config bf16.enabled="false" must be true or false'),
    ("ds-zero-stage-bool", lambda t: ["--ds-config", str(ds_file(t, zero_optimization={"stage": True}))],
     "DeepSpeed config zero_optimization.stage=true must be an integer"),
    ("ds-bucket-size-string", lambda t: ["--ds-config", str(ds_file(t, zero_optimization={"stage": 2, "reduce_bucket_size": "5e8"}))],
     'DeepSpeed config zero_optimization.reduce_bucket_size="5e8" must be a number'),
    ("ds-clipping-nan", lambda t: ["--ds-config", str(ds_file(t, text=json.dumps({**TINY_DS, "gradient_clipping": float("nan")})))],
     "DeepSpeed config gradient_clipping=NaN must be a finite number"),
    ("ds-clipping-negative", lambda t: ["--ds-config", str(ds_file(t, gradient_clipping=-1))],
     "gradient_clipping=-1 must be a number >= 0 (0 disables)"),
    ("ds-unknown-scheduler", lambda t: ["--ds-config", str(ds_file(t, scheduler={"type": "WarmupLr", "params": {}}))],
     "unknown scheduler type 'WarmupLr' in the DeepSpeed config; choose one of DeepSpeed's LRRangeTest, OneCycle, "
     "WarmupLR, WarmupDecayLR, WarmupCosineLR or torch's ConstantLR, CosineAnnealingLR, CosineAnnealingWarmRestarts, "
     "CyclicLR, ExponentialLR, LinearLR, MultiStepLR, OneCycleLR, PolynomialLR, StepLR (case matters)"),
    ("ds-scheduler-unknown-param", lambda t: ["--ds-config", str(ds_file(t, scheduler={"type": "WarmupLR", "params": {"warmup_steps": 10}}))],
     "unknown parameter 'warmup_steps' for scheduler 'WarmupLR'; allowed: last_batch_iteration, warmup_max_lr, "
     "warmup_min_lr, warmup_num_steps, warmup_type"),
    ("optimizer-lr-zero", lambda t: ["--ds-config", str(ds_file(t, optimizer={"type": "AdamW", "params": {"lr": 0}}))],
     "optimizer 'AdamW' lr=0 must be > 0"),
    ("optimizer-lr-infinite", lambda t: ["--ds-config", str(ds_file(t, text=json.dumps({**TINY_DS, "optimizer": {"type": "AdamW", "params": {"lr": float("inf")}}})))],
     "optimizer 'AdamW' lr=inf must be a finite number"),
    ("optimizer-beta-one", lambda t: ["--ds-config", str(ds_file(t, optimizer={"type": "Adam", "params": {"lr": 0.001, "betas": [0.9, 1.0]}}))],
     "optimizer 'Adam' betas=[0.9, 1.0]: each beta must be in [0, 1)"),
    ("optimizer-eps-zero", lambda t: ["--ds-config", str(ds_file(t, optimizer={"type": "AdamW", "params": {"lr": 0.001, "eps": 0}}))],
     "optimizer 'AdamW' eps=0 must be > 0"),
    ("optimizer-weight-decay-negative", lambda t: ["--ds-config", str(ds_file(t, optimizer={"type": "AdamW", "params": {"lr": 0.001, "weight_decay": -0.1}}))],
     "optimizer 'AdamW' weight_decay=-0.1 must be >= 0"),
    ("optimizer-momentum-one", lambda t: ["--ds-config", str(ds_file(t, optimizer={"type": "SGD", "params": {"lr": 0.1, "momentum": 1.0}}))],
     "optimizer 'SGD' momentum=1.0 must be in [0, 1)"),
    ("optimizer-flag-not-bool", lambda t: ["--ds-config", str(ds_file(t, optimizer={"type": "SGD", "params": {"lr": 0.1, "nesterov": "yes"}}))],
     "optimizer 'SGD' nesterov='yes' must be true or false"),
    ("ds-duplicate-key", lambda t: ["--ds-config", str(ds_file(t, text='{"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 0, "stage": 2}}'))],
     "DeepSpeed config '{tmp}/bad_ds.json' has the key 'stage' twice in one object; keep one (DeepSpeed refuses duplicate keys in a config file)"),
    ("ds-not-utf8", lambda t: ["--ds-config", str(_bytes_at(t / "bad_ds.json", b'{"optimizer": "caf\xe9"}'))],
     "DeepSpeed config '{tmp}/bad_ds.json' is not UTF-8 text (byte offset 18); save it as UTF-8 JSON"),
    ("ds-is-a-folder", lambda t: ["--ds-config", str(_folder_at(t / "ds_dir.json"))],
     "DeepSpeed config '{tmp}/ds_dir.json' is a folder; pass a JSON file such as ds_configs/zero0_fp32.json"),
    ("ds-fp16-on-cpu", lambda t: _fp16_on_cpu(t),
     "DeepSpeed config enables fp16, which DeepSpeed's cpu accelerator does not support on this machine; set "
     "fp16.enabled to false (fp32 runs everywhere)"),
    ("ds-fp16-on-cpu-dry-run", lambda t: [*_fp16_on_cpu(t), "--dry-run"],
     "DeepSpeed config enables fp16, which DeepSpeed's cpu accelerator does not support on this machine; set "
     "fp16.enabled to false (fp32 runs everywhere)"),
    ("hf-two-copies", lambda t: ["--set", "data.name=hf", "--set", f"data.root={_hf_two_copies(t)}"],
     "'{tmp}/hf' holds train files in 2 folders (hf_disk/train, hf_parquet/plain_text): more than one copy or "
     "configuration of the data set; point data.root at the one to use"),
    ("recipe-malformed-yaml", lambda t: ["--config", str(recipe(t, "attack: {name: pgd\nmodel: [\n"))],
     "recipe file '{tmp}/recipe.yaml' is not valid YAML at line 2; fix the syntax"),
    ("recipe-not-mapping", lambda t: ["--config", str(recipe(t, "- a\n- b\n"))],
     "recipe file '{tmp}/recipe.yaml' must hold a mapping of config sections"),
    ("recipe-missing", lambda t: ["--config", str(t / "nope.yaml")],
     "recipe file '{tmp}/nope.yaml' not found; pass an existing YAML file (see recipes/)"),
    ("data-folder-missing", lambda t: ["--set", "data.name=fashion-mnist-full", "--set", f"data.root={t}/absent"],
     "no Fashion-MNIST IDX files in '{tmp}/absent'; install them with `apt-get install dataset-fashion-mnist` or set data.root to their folder"),
    ("data-file-empty", lambda t: _full(t, empty=True),
     "'{tmp}/fmnist/train-images-idx3-ubyte.gz' is not a uint8 IDX file; point data.root at the Fashion-MNIST IDX files"),
    ("data-file-corrupt-gzip", lambda t: _full(t, garbage=True),
     "cannot read IDX file '{tmp}/fmnist/train-images-idx3-ubyte.gz' (Not a gzipped file (b'\\x00\\x01')); re-download or reinstall it"),
    ("data-file-truncated", lambda t: _full(t, truncate=True),
     "IDX file '{tmp}/fmnist/train-images-idx3-ubyte.gz' is truncated or corrupt (1000 bytes, want 50176)"),
    ("images-wrong-size", lambda t: _full(t, images=np.zeros((64, 32, 32))),
     "data set 'fashion-mnist-full' (train split) images are 32x32 but the data set declares 28x28; check the data files under data.root"),
    ("images-wrong-channels", lambda t: _full(t, images=np.zeros((64, 28, 28, 3))),
     "data set 'fashion-mnist-full' (train split) images have shape (3, 28, 28) but 1 channel(s) are expected ((1, 28, 28)); check the data files under data.root"),
    ("labels-out-of-range", lambda t: _full(t, labels=np.r_[np.zeros(63), 12]),
     "data set 'fashion-mnist-full' (train split) has label 12 outside [0, 9]; fix the label file or the data set's class count"),
    ("labels-count-mismatch", lambda t: _full(t, labels=np.zeros(10)),
     "cannot load data set 'fashion-mnist-full' (train split) (AssertionError: Size mismatch between tensors); check the files under data.root='{tmp}/fmnist'"),
    ("train-one-class", lambda t: _full(t, labels=np.full(64, 3)),
     "data set 'fashion-mnist-full' (train split) has one class only (label 3 on all 64 examples); a classifier needs "
     "at least two: check the label file and data.train_subset"),
    ("weights-not-a-weights-file", lambda t: ["--set", f"model.weights={_text_at(t / 'w.pt')}"],
     "model.weights file '{tmp}/w.pt' is neither a safetensors nor a torch file; give a .safetensors file (e.g. from "
     "`dat-ds export`) or a .pt state dict"),
    ("weights-damaged-safetensors", lambda t: ["--set", f"model.weights={_weights(t, 'tiny_cnn', truncate=True)}"],
     "model.weights file '{tmp}/w.safetensors' is a damaged safetensors file (Error while deserializing header: "
     "incomplete metadata, file not fully covered); export it again (`dat-ds export`)"),
    ("weights-other-width", lambda t: ["--set", f"model.weights={_weights(t, 'small_cnn')}"],
     "weights '{tmp}/w.safetensors' do not fit model 'tiny_cnn' (5 of 8 tensors have other shapes, e.g. features.0.weight "
     "[32, 1, 3, 3] vs [8, 1, 3, 3]); give weights saved from model 'tiny_cnn' and this data set (class count, channels)"),
    ("weights-other-architecture", lambda t: ["--set", f"model.weights={_weights(t, 'test_resnet', suffix='.pt')}"],
     "weights '{tmp}/w.pt' do not fit model 'tiny_cnn' (missing 6 keys, e.g. ['features.0.weight', 'features.0.bias'], "
     "unexpected 90, e.g. ['conv1.0.weight', 'conv1.1.weight']); give weights saved from model 'tiny_cnn' or set model.name to theirs"),
    ("resume-other-world-size", lambda t: [*_ckpt(t, "tiny_cnn"), "--resume", "auto", "--nproc", "2"],
     "checkpoint '{tmp}/runs/run/checkpoint/step000000004' was saved with 1 rank(s), but this run has 2; resume with "
     "--nproc 1, or pass --allow-world-size-change (not bit-identical), or start a new run with another --name"),
    ("resume-other-world-size-zero1", lambda t: [*_ckpt(t, "tiny_cnn", zero_stage=1), "--resume", "auto", "--nproc", "2",
                                                 "--allow-world-size-change"],
     "checkpoint '{tmp}/runs/run/checkpoint/step000000004' was saved with ZeRO-1 on 1 rank(s): its optimizer state is "
     "partitioned per rank and cannot be re-sharded to 2; resume with --nproc 1"),
    ("resume-other-world-size-onebit", lambda t: [*_ckpt(t, "tiny_cnn", optimizer="OneBitAdam"), "--resume", "auto",
                                                  "--nproc", "2", "--allow-world-size-change"],
     "checkpoint '{tmp}/runs/run/checkpoint/step000000004' was saved with OneBitAdam on 1 rank(s): its per-rank "
     "compression state cannot be re-sharded to 2; resume with --nproc 1"),
    ("subset-too-large", lambda t: ["--set", "data.train_subset=20000"],
     "data.train_subset=20000 is larger than the training set (10000 examples)"),
    ("checkpoint-other-model", lambda t: [*_ckpt(t, "small_cnn"), "--resume", "auto"],
     "checkpoint '{tmp}/runs/run/checkpoint/step000000004' was saved with model.name='small_cnn', but this run has 'tiny_cnn'; resume with --set model.name=small_cnn, or start a new run with another --name"),
    ("resume-from-nothing", lambda t: ["--resume", str(t / "elsewhere")],
     "no complete checkpoint found for --resume {tmp}/elsewhere; give a run folder with a checkpoint/ inside, or start without --resume"),
    ("run-exists", lambda t: _ckpt(t, "tiny_cnn"),
     "run folder '{tmp}/runs/run' already holds a run; pass --resume auto to continue it, --overwrite to replace it, or --name NEW"),
    ("output-dir-is-file", lambda t: [*_file_at(t / "runs" / "run"), "--name", "run"],
     "output path '{tmp}/runs/run' is a file; choose another output_dir or name"),
    ("output-dir-under-file", lambda t: ["--output-dir", str(_file_at(t / "blocker")[1]) + "/sub"],
     "output path '{tmp}/blocker/sub/run' lies under the file '{tmp}/blocker'; choose another --output-dir"),
    ("nproc-zero", lambda t: ["--nproc", "0"], "--nproc=0 must be >= 1"),
    ("unlabeled-nan-labels", lambda t: ["--set", f"data.unlabeled={_pool(t, labels=np.r_[np.zeros(7), np.nan])}"],
     "data.unlabeled '{tmp}/pool.npz' label 7 is nan; labels must be integer class indices"),
    ("unlabeled-pickle-untrusted", lambda t: ["--set", f"data.unlabeled={_pickle_pool(t)}"],
     "'{tmp}/pool.pkl' is a pickle file, which can run code when loaded; convert it to .npz (`dat-ds pseudo-label --pool FILE.npz ...`) or set data.trust_pickle=true if you trust its source"),
]


def _full(t: Path, *, empty=False, garbage=False, truncate=False, images=None, labels=None) -> list[str]:
    root = idx_root(t, images=images, labels=labels)
    img = root / "train-images-idx3-ubyte.gz"
    if empty:
        with gzip.open(img, "wb"):
            pass
    if garbage:
        img.write_bytes(b"\x00\x01not gzip at all")
    if truncate:
        raw = gzip.decompress(img.read_bytes())
        with gzip.open(img, "wb") as f:
            f.write(raw[:16 + 1000])
    return ["--set", "data.name=fashion-mnist-full", "--set", f"data.root={root}"]


def _text_at(path: Path) -> Path:
    path.write_text("these are not weights\n")
    return path


def _weights(t: Path, model: str, *, suffix: str = ".safetensors", truncate: bool = False) -> Path:
    """The weights of ``model`` (built for Fashion-MNIST) as the user would pass them in model.weights."""
    import torch
    from safetensors.torch import save_file

    from dat_ds.data.embedded import FASHION_SPEC
    from dat_ds.models import create_model

    state = {k: v.contiguous() for k, v in create_model(model, FASHION_SPEC).backbone.state_dict().items()}
    path = t / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    if truncate:
        path.write_bytes(path.read_bytes()[:-100])
    return path


def _bytes_at(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _folder_at(path: Path) -> Path:
    path.mkdir()
    return path


def _fp16_on_cpu(t: Path) -> list[str]:
    """fp16 where DeepSpeed's accelerator says it cannot run it (its CPU accelerator without oneDNN fp16)."""
    acc = dist.accelerator()
    if acc.device_name() != "cpu" or acc.is_fp16_supported():
        pytest.skip("this machine's accelerator runs fp16")
    return ["--ds-config", str(ds_file(t, fp16={"enabled": True}))]


def _hf_two_copies(t: Path) -> Path:
    """A save_to_disk copy and a parquet copy of one HF data set under one data.root (each read, 40 of 20 examples)."""
    import datasets

    from tests.helpers import write_hf

    datasets.disable_progress_bars()  # stderr holds the error line only
    try:
        write_hf(t / "hf", np.zeros((20, 32, 32, 3), np.uint8), np.arange(20) % 10)
    finally:
        datasets.enable_progress_bars()
    return t / "hf"


def _ckpt(t: Path, model: str, **fits) -> list[str]:
    fake_checkpoint(t, model, **fits)
    return ["--name", "run"]


def _file_at(path: Path) -> list[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a folder")
    return ["--output-dir", str(path.parent)] if path.name == "run" else ["--output-dir", str(path)]


def _pool(t: Path, labels: np.ndarray) -> Path:
    p = t / "pool.npz"
    np.savez(p, images=np.zeros((len(labels), 28, 28), np.uint8), labels=labels)
    return p


def _pickle_pool(t: Path) -> Path:
    import pickle

    p = t / "pool.pkl"
    p.write_bytes(pickle.dumps({"data": np.zeros((4, 28, 28), np.uint8), "extrapolated_targets": [0, 1, 2, 3]}))
    return p


def base_args(t: Path) -> list[str]:
    ds = t / "ok_ds.json"
    ds.write_text(json.dumps(TINY_DS))
    return ["train", "--name", "run", "--output-dir", str(t / "runs"), "--ds-config", str(ds),
            "--set", "model.name=tiny_cnn"]


def test_at_least_thirty_cases():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id,extra,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case_id, extra, expected, tmp_path, capsys):
    argv = base_args(tmp_path)
    argv += extra(tmp_path)  # may create files (and the run folder, for the run-exists cases)
    before = snapshot(tmp_path / "runs")
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    if callable(expected):  # registry listings: read when the test runs (other tests may register more)
        expected = expected()
    assert lines[0] == "error: " + expected.replace("{tmp}", str(tmp_path))
    assert snapshot(tmp_path / "runs") == before  # no partial outputs


@pytest.mark.parametrize("case_id,extra,expected", PATH_CASES, ids=[c[0] for c in PATH_CASES])
def test_dry_run_checks_that_inputs_exist(case_id, extra, expected, tmp_path, capsys):
    """--dry-run said "config OK" for a CIFAR-10 root that did not exist."""
    rc = cli.main([*base_args(tmp_path), *extra(tmp_path), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and err.splitlines() == ["error: " + expected.replace("{tmp}", str(tmp_path))], err


def test_step_larger_than_eps_is_a_warning_not_an_error(tmp_path, caplog):
    from dat_ds.core.config import build_config
    from dat_ds.launch.preflight import preflight

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(TINY_DS))
    cfg = build_config(None, ["attack.eps=0.05", "attack.step_size=0.2", f"deepspeed_config={ds}",
                              f"output_dir={tmp_path}", "model.name=tiny_cnn"])
    with caplog.at_level(logging.WARNING, logger="dat_ds"):
        preflight(cfg)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "attack.step_size=0.2 is larger than attack.eps=0.05; every step overshoots the eps-ball and is projected "
        "back (did you mean a step in pixel units, e.g. eps/4?)"]
    assert not (tmp_path / "run").exists()


def _exported(t: Path, *names: str) -> list[str]:
    """A run folder (never read: the path check comes first) and existing files in the export folder."""
    (t / "runs" / "run").mkdir(parents=True)
    for name in names:
        (t / "export").mkdir(exist_ok=True)
        (t / "export" / name).write_text("old")
    return ["export", "--run", str(t / "runs" / "run"), "--out", str(t / "export" / "model.safetensors")]


def _uncommitted_run(t: Path) -> list[str]:
    """A run whose only save never reached its commit (a ``.tmp-*`` folder)."""
    (t / "runs" / "run" / "checkpoint" / ".tmp-step000000004").mkdir(parents=True)
    return ["verify", str(t / "runs" / "run")]


VERIFY_FIX = "give a run folder such as runs/demo, its checkpoint/ folder or one checkpoint folder in it"

# Commands other than train: (id, fn(tmp) -> the whole argv, expected line); same assertions, and the
# export folder must be untouched too.
COMMAND_CASES = [
    ("verify-missing-run", lambda t: ["verify", str(t / "runs" / "none")], f"'{{tmp}}/runs/none' does not exist; {VERIFY_FIX}"),
    ("verify-a-file", lambda t: ["verify", str(ds_file(t))], f"'{{tmp}}/bad_ds.json' is not a folder; {VERIFY_FIX}"),
    ("verify-not-a-run", lambda t: ["verify", str(t)],
     f"'{{tmp}}' is not a run: it has no checkpoint/ folder and no complete.json; {VERIFY_FIX}"),
    ("verify-nothing-committed", _uncommitted_run,
     "'{tmp}/runs/run' has no committed checkpoint yet (none in checkpoint/ has its complete.json); verify it once a "
     "save has committed"),
    ("export-weights-exist", lambda t: _exported(t, "model.safetensors"),
     "'{tmp}/export/model.safetensors' already exists; pass --force to replace it, or choose another --out"),
    ("export-meta-exists", lambda t: _exported(t, "model.json"),
     "'{tmp}/export/model.json' already exists; pass --force to replace it, or choose another --out"),
    ("eval-max-examples-negative", lambda t: ["eval", "--run", str(t), "--max-examples", "-3"],
     "--max-examples=-3 must be >= 1"),
    ("eval-master-port-negative", lambda t: ["eval", "--run", str(t), "--nproc", "2", "--master-port", "-1"],
     "--master-port=-1 is not a TCP port; use 1..65535 (or leave it out for a free one)"),
    ("eval-eps-infinite", lambda t: ["eval", "--run", str(t), "--eps", "0.1,inf"],
     "--eps item 'inf' is not a finite number; use e.g. --eps 0.1,8/255"),
    ("finetune-lr-infinite", lambda t: ["finetune", "--mode", "slf", "--encoder", str(t), "--lr", "inf"],
     "--lr=inf must be a finite number > 0"),
    ("finetune-lr-nan", lambda t: ["finetune", "--mode", "slf", "--encoder", str(t), "--lr", "nan"],
     "--lr=nan must be a finite number > 0"),
    ("tune-memory-cap-infinite", lambda t: ["tune", "--recipe", "demo", "--nproc", "1", "--memory-cap-mb", "inf"],
     "--memory-cap-mb=inf must be a finite number > 0"),
]


@pytest.mark.parametrize("case_id,argv,expected", COMMAND_CASES, ids=[c[0] for c in COMMAND_CASES])
def test_bad_command_input(case_id, argv, expected, tmp_path, capsys):
    args = argv(tmp_path)
    before = snapshot(tmp_path)
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.splitlines() == ["error: " + expected.replace("{tmp}", str(tmp_path))], err
    assert snapshot(tmp_path) == before  # nothing written, nothing replaced


def test_export_library_call_refuses_to_overwrite_before_reading_the_run(tmp_path):
    from dat_ds.core.errors import ConfigError
    from dat_ds.evaluation.export import export

    out = tmp_path / "model.safetensors"
    out.write_bytes(b"old")
    (tmp_path / "run").mkdir()  # no checkpoint: reading it would be a different error
    with pytest.raises(ConfigError, match="already exists; pass --force to replace it"):
        export(tmp_path / "run", out)
    assert out.read_bytes() == b"old"
    with pytest.raises(ConfigError, match="is not a run folder with a complete checkpoint"):  # force: on to the run
        export(tmp_path / "run", out, force=True)
    assert out.read_bytes() == b"old"  # a failed export leaves the old file as it was


def test_nproc_above_the_cores_is_one_warning_on_the_cpu_accelerator(tmp_path, caplog, capsys):
    """More CPU ranks than cores runs (oversubscribed), so it is a WARNING naming the cores, said once before
    any rank starts; here a bad data set stops the command right after, so nothing starts at all."""
    import os

    cores = len(os.sched_getaffinity(0))
    argv = [*base_args(tmp_path), "--nproc", str(cores + 1), *_full(tmp_path, labels=np.zeros(64))]
    with caplog.at_level(logging.WARNING, logger="dat_ds"):
        assert cli.main(argv) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"--nproc {cores + 1} starts more ranks than the {cores} CPU core(s) available to this process; "
                        f"they will share cores and run slower (--nproc {cores} or fewer avoids it)"]
    assert capsys.readouterr().err.splitlines()[0].startswith("error: data set 'fashion-mnist-full' (train split) has one class")
    assert not (tmp_path / "runs").exists()


class _FakeGPUs:
    """DeepSpeed's accelerator interface, as much of it as ``check_nproc`` reads: a machine with 2 GPUs."""

    def device_name(self):
        return "cuda"

    def device_count(self):
        return 2


def test_nproc_above_the_gpus_is_an_error():
    from dat_ds.core.errors import ConfigError
    from dat_ds.launch.preflight import check_nproc

    assert check_nproc(2, _FakeGPUs()) is None
    with pytest.raises(ConfigError) as e:
        check_nproc(3, _FakeGPUs())
    assert str(e.value) == ("--nproc 3 is more than the 2 cuda device(s) on this machine; use --nproc 2 or fewer "
                            "(one rank per device)")


def test_data_set_checks_read_every_label_of_an_array_but_count_classes_only_when_they_have_all():
    """An in-memory set is checked whole (a bad label at the end is found); a data set that only yields
    items (a plugin's) is checked through its first one, and never called one-class from that one label."""
    import torch

    from dat_ds.core.errors import ConfigError
    from dat_ds.data.embedded import FASHION_SPEC, ArrayDataset
    from dat_ds.data.transforms import TransformDataset
    from dat_ds.launch.preflight import check_dataset

    images = np.zeros((5, 28, 28), np.uint8)
    with pytest.raises(ConfigError, match="has label 10 outside"):
        check_dataset(TransformDataset(ArrayDataset(images, np.r_[0, 1, 2, 3, 10]), lambda x: x), FASHION_SPEC, "d")
    with pytest.raises(ConfigError, match="holds float32 images; store uint8"):
        check_dataset(ArrayDataset(images.astype(np.float32), np.arange(5)), FASHION_SPEC, "d")

    class Items(torch.utils.data.Dataset):  # no arrays to read: only its items
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(1, 28, 28), 4

    check_dataset(Items(), FASHION_SPEC, "d", min_classes=2)
    with pytest.raises(ConfigError, match="has one class only"):
        check_dataset(ArrayDataset(images, np.full(5, 4)), FASHION_SPEC, "d", min_classes=2)


# ----------------------------------------------------------------------------- data.on_corrupt


def _image_folder(t: Path) -> Path:
    """train/{a,b}/ with 16 PNGs each (28x28 RGB), val/{a,b}/ with 8; one training PNG cut in half: it opens
    (the header is whole) but does not decode. Not the first file: only decoding every image finds it."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = t / "folder"
    for split, n in (("train", 16), ("val", 8)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(root / split / c / f"{i:02d}.png")
    bad = root / "train" / "b" / "05.png"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return bad


def _folder_args(t: Path, *extra: str) -> list[str]:
    from tests.helpers import tiny_args, write_ds

    return tiny_args(t / "runs", "folder", write_ds(t), "--set", "data.name=imagefolder", "--set",
                     f"data.root={t / 'folder'}", "--set", "data.image_size=28",
                     "--set", "eval.attack=pgd", *extra, subset=32, epochs=1)  # 2 classes: no DLR


@pytest.mark.parametrize("workers, met", [(0, "at start-up"), (0, "in training"), (2, "in training")])
def test_corrupt_image_aborts_with_its_path_in_one_line(tmp_path, capsys, monkeypatch, workers, met):
    """data.on_corrupt=abort (default): exit 2 and one line naming the file. A small split has every image
    decoded before anything starts; in a large one (here: the limit set to 0) the file is met while
    training, also in a DataLoader worker, with the same line."""
    from dat_ds.launch import preflight

    if met == "in training":
        monkeypatch.setattr(preflight, "DECODE_ALL_UP_TO", 0)
    bad = _image_folder(tmp_path)
    rc = cli.main(["train", *_folder_args(tmp_path, "--set", f"data.num_workers={workers}")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert [ln for ln in err if ln.startswith("error:")] == err[-1:] and not [ln for ln in err if "Traceback" in ln]
    assert err[-1].startswith(f"error: corrupt image {str(bad)!r} (") and err[-1].endswith(
        "); replace or remove it, or set data.on_corrupt=skip to train without such files"), err[-1]
    root = tmp_path / "runs" / "folder" / "checkpoint"
    assert not root.exists() or not any(root.iterdir())  # no checkpoint was saved after it
    if met == "at start-up":
        assert not (tmp_path / "runs" / "folder").exists()  # refused before the run folder was made


def test_ranks_on_the_host_whose_preflight_decoded_the_images_do_not_decode_them_again(tmp_path, monkeypatch):
    """`dat-ds train` decodes a small split once and tells its ranks on this host (DECODED_ENV = hostname)."""
    import socket

    from dat_ds.core.config import DataConfig
    from dat_ds.data import build_dataset
    from dat_ds.data.corrupt import CorruptImageError
    from dat_ds.launch import preflight

    _image_folder(tmp_path)
    ds, spec = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "folder"), image_size=28), "train")
    monkeypatch.setenv(preflight.DECODED_ENV, "another-host")  # a hostfile's other node: decodes its own copy
    with pytest.raises(CorruptImageError, match="05.png"):
        preflight.check_dataset(ds, spec, "training data")
    monkeypatch.setenv(preflight.DECODED_ENV, socket.gethostname())
    preflight.check_dataset(ds, spec, "training data")  # decoded by the command already: not again


def test_corrupt_image_is_skipped_counted_and_reported_once_per_epoch(tmp_path, caplog):
    bad = _image_folder(tmp_path)
    with caplog.at_level(logging.INFO, logger="dat_ds"):
        rc = cli.main(["train", *_folder_args(tmp_path, "--set", "data.on_corrupt=skip", "--set", "data.num_workers=2")])
    assert rc == 0, caplog.text[-3000:]
    lines = [r.getMessage() for r in caplog.records if "corrupt image(s)" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith(
        f"epoch 1/1: skipped 1 corrupt image(s) (data.on_corrupt=skip), each replaced by the next one that "
        f"decodes; e.g. {str(bad)!r}"), lines
    rows = [json.loads(ln) for ln in (tmp_path / "runs" / "folder" / "metrics.jsonl").read_text().splitlines()]
    assert [r["corrupt_skipped"] for r in rows if r["kind"] == "epoch"] == [1]


def test_a_corrupt_image_in_a_worker_keeps_its_one_line():
    """How torch re-raises a worker's exception: ``type(e)(text with the worker's traceback)``."""
    from torch.utils.data._utils import ExceptionWrapper

    from dat_ds.data.corrupt import CorruptImageError

    try:
        raise CorruptImageError("corrupt image 'x.png' (OSError: truncated); replace or remove it")
    except CorruptImageError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(CorruptImageError) as e:
        wrapped.reraise()
    assert str(e.value) == "corrupt image 'x.png' (OSError: truncated); replace or remove it"
