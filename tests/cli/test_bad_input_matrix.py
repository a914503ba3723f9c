"""Every file input kind x every command that takes it x a defect, and every command's numeric flags (issue 29).

One row per (input, command, defect): the command exits with code 2 and prints exactly one line,
``error: <problem>; <fix>``, and the temporary folder (the command's working directory too) is exactly as it
was: no file or folder added, removed or touched. Each input kind has one checker, shared by the commands
that take it (``data.unlabeled.load_pseudo_labels``, ``data.generated.read_shard_info``, ``core.io.read_indices``,
``launch.launcher.read_hostfile``, ``runtime.ds_config.load_ds_json``, ``core.config.load_recipe`` ...); numeric
flags go through the typed fields of the config keys (``core.fields.check_flag``). Rows stop early: torch-free
checks where they exist, the preflight otherwise; nothing trains.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dat_ds import cli
from dat_ds.cli.bench import BENCH_HELP
from dat_ds.core import dist
from tests.helpers import TINY_DS, hashes, snapshot

dist.setup_logging()  # bind the log handler outside capsys: stderr then holds only the error line

TUNE = ["tune", "--recipe", "demo", "--nproc", "1"]


# ----------------------------------------------------------------------------- files in their formats


def put(t: Path, name: str, data: str | bytes) -> str:
    p = t / name
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        p.write_bytes(data)
    else:
        p.write_text(data)
    return str(p)


def folder(t: Path, name: str) -> str:
    (t / name).mkdir(parents=True)
    return str(t / name)


def cut(path: str, keep: float = 0.5) -> str:
    """The file cut short, as an interrupted download or copy leaves it."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return path


def pseudo_file(t: Path, n: int = 8, **arrays) -> str:
    """A pseudo-label .npz (``dat-ds pseudo-label``'s format) with some arrays replaced (None: left out)."""
    a = {"images": np.zeros((n, 28, 28), np.uint8), "labels": np.arange(n) % 10, "confidences": np.ones(n, np.float32)}
    a.update(arrays)
    p = t / "pool.npz"
    np.savez(p, **{k: v for k, v in a.items() if v is not None})
    return str(p)


def shard(t: Path, n: int = 8, compress: bool = False, **arrays) -> str:
    """A folder holding one generated-data shard (DM-Improves-AT's ``image``/``label`` .npz)."""
    a = {"image": np.zeros((n, 28, 28), np.uint8), "label": np.arange(n) % 10, **arrays}
    (t / "gen").mkdir(exist_ok=True)
    (np.savez_compressed if compress else np.savez)(t / "gen" / "s0.npz", **a)
    return str(t / "gen")


def weights(t: Path, model: str = "tiny_cnn") -> str:
    """Real weights of ``model`` for Fashion-MNIST (a teacher that loads), as a .safetensors file."""
    from safetensors.torch import save_file

    from dat_ds.data.embedded import FASHION_SPEC
    from dat_ds.models import create_model

    state = {k: v.contiguous() for k, v in create_model(model, FASHION_SPEC).backbone.state_dict().items()}
    save_file(state, str(t / "w.safetensors"))
    return str(t / "w.safetensors")


def run_with_tag(t: Path, complete: str | None) -> str:
    """A run folder whose one checkpoint has ``complete`` as its complete.json (None: never committed)."""
    tag = t / "runs" / "run" / "checkpoint" / "step000000004"
    tag.mkdir(parents=True)
    (tag.parent / "latest").write_text(tag.name + "\n")
    if complete is not None:
        (tag / "complete.json").write_text(complete)
    return str(t / "runs" / "run")


# ----------------------------------------------------------------------------- the commands


def train(t: Path, *extra: str, command: str = "train") -> list[str]:
    ds = put(t, "ok_ds.json", json.dumps(TINY_DS))
    return [command, "--name", "run", "--output-dir", str(t / "runs"), "--ds-config", ds, "--set", "model.name=tiny_cnn",
            *extra]


def pretrain(t: Path, *extra: str) -> list[str]:
    return train(t, "--set", "objective.name=acl", *extra, command="pretrain")


def unlabeled(path: str) -> list[str]:
    return ["--set", f"data.unlabeled={path}", "--set", "data.unsup_fraction=0.5"]


def teacher(t: Path, *extra: str) -> list[str]:
    """``dat-ds pseudo-label`` with a teacher that loads: what fails is ``extra``'s."""
    return ["pseudo-label", "--weights", weights(t), "--model", "tiny_cnn", "--out", str(t / "out.npz"), *extra]


def robustbench(t: Path, subset: str) -> list[str]:
    return ["eval", "--weights", put(t, "w.pt", b"never read"), "--model", "tiny_cnn", "--eps", "8/255",
            "--protocol", "robustbench", "--subset-file", subset]


def eval_run(t: Path, *extra: str) -> list[str]:
    return ["eval", "--run", str(t), *extra]


def finetune(t: Path, *extra: str) -> list[str]:
    return ["finetune", "--mode", "slf", "--encoder", str(t), *extra]


# (id: input-command-defect, fn(tmp) -> argv, the line after "error: " with {tmp} for the folder)
ROWS = [
    # --- run configs (recipe YAML): train, pretrain, tune, finetune --random-init
    ("recipe-train-folder", lambda t: train(t, "--config", folder(t, "r.yaml")),
     "recipe file '{tmp}/r.yaml' is a folder; pass a YAML file (see recipes/)"),
    ("recipe-pretrain-bad-yaml", lambda t: pretrain(t, "--config", put(t, "r.yaml", "attack: [1\n")),
     "recipe file '{tmp}/r.yaml' is not valid YAML at line 2; fix the syntax"),
    ("recipe-tune-a-list", lambda t: ["tune", "--recipe", put(t, "r.yaml", "- a\n- b\n"), "--nproc", "1"],
     "recipe file '{tmp}/r.yaml' must hold a mapping of config sections"),
    ("recipe-tune-not-utf8", lambda t: ["tune", "--recipe", put(t, "r.yaml", b"\xff\xfe attack"), "--nproc", "1"],
     "recipe file '{tmp}/r.yaml' is not UTF-8 text (byte offset 0); save it as UTF-8"),
    ("recipe-finetune-missing", lambda t: ["finetune", "--mode", "slf", "--random-init", "--config", str(t / "r.yaml"),
                                           "--out", str(t / "o.json")],
     "recipe file '{tmp}/r.yaml' not found; pass an existing YAML file (see recipes/)"),
    ("recipe-finetune-a-list", lambda t: ["finetune", "--mode", "slf", "--random-init", "--config", put(t, "r.yaml", "- a\n"),
                                          "--out", str(t / "o.json")],
     "recipe file '{tmp}/r.yaml' must hold a mapping of config sections"),
    # --- DeepSpeed JSON: train, pretrain, tune
    ("ds-train-an-array", lambda t: train(t, "--ds-config", put(t, "d.json", "[1, 2]")),
     "DeepSpeed config '{tmp}/d.json' must be a JSON object"),
    ("ds-pretrain-empty", lambda t: pretrain(t, "--ds-config", put(t, "d.json", "")),
     "DeepSpeed config '{tmp}/d.json' is not valid JSON (line 1: Expecting value); fix the syntax"),
    ("ds-tune-missing", lambda t: [*TUNE, "--ds-config", str(t / "d.json")],
     "DeepSpeed config '{tmp}/d.json' not found; pass one of ds_configs/*.json with --deepspeed_config"),
    ("ds-tune-folder", lambda t: [*TUNE, "--ds-config", folder(t, "d.json")],
     "DeepSpeed config '{tmp}/d.json' is a folder; pass a JSON file such as ds_configs/zero0_fp32.json"),
    ("ds-tune-an-array", lambda t: [*TUNE, "--ds-config", put(t, "d.json", "[]")],
     "DeepSpeed config '{tmp}/d.json' must be a JSON object"),
    # --- hostfiles: train, pretrain, eval, tune
    ("hostfile-train-missing", lambda t: train(t, "--hostfile", str(t / "hosts")),
     "hostfile '{tmp}/hosts' not found; write one 'host slots=N' line per node"),
    ("hostfile-train-not-utf8", lambda t: train(t, "--hostfile", put(t, "hosts", b"\xffnode slots=2\n")),
     "hostfile '{tmp}/hosts' is not UTF-8 text (byte offset 0); save it as UTF-8"),
    ("hostfile-pretrain-slots-zero", lambda t: pretrain(t, "--hostfile", put(t, "hosts", "node-1 slots=0\n")),
     "hostfile '{tmp}/hosts' line 1 ('node-1 slots=0'): slots=0 must be a whole number >= 1 (the GPUs of that node)"),
    ("hostfile-eval-folder", lambda t: eval_run(t, "--hostfile", folder(t, "hosts")),
     "hostfile '{tmp}/hosts' is a folder; give a file of 'host slots=N' lines, one per node"),
    ("hostfile-eval-bad-line", lambda t: eval_run(t, "--hostfile", put(t, "hosts", "node-1 gpus=2\n")),
     "hostfile '{tmp}/hosts' line 1 ('node-1 gpus=2') is not 'HOST slots=N'; write one node per line, e.g. 'worker-1 slots=8'"),
    ("hostfile-tune-empty", lambda t: [*TUNE, "--hostfile", put(t, "hosts", "# no nodes\n")],
     "hostfile '{tmp}/hosts' lists no host; write one 'host slots=N' line per node"),
    # --- data roots: train, eval, pseudo-label
    ("data-root-train-empty-folder", lambda t: train(t, "--set", "data.name=fashion-mnist-full", "--set", f"data.root={folder(t, 'fm')}"),
     "no Fashion-MNIST IDX files in '{tmp}/fm'; install them with `apt-get install dataset-fashion-mnist` or set data.root to their folder"),
    ("data-root-eval-missing", lambda t: ["eval", "--weights", put(t, "w.pt", b"x"), "--model", "tiny_cnn", "--eps", "0.1",
                                          "--data", "fashion-mnist-full", "--data-root", str(t / "fm")],
     "no Fashion-MNIST IDX files in '{tmp}/fm'; install them with `apt-get install dataset-fashion-mnist` or set data.root to their folder"),
    ("data-root-pseudo-label-missing", lambda t: ["pseudo-label", "--weights", put(t, "w.pt", b"x"), "--model", "tiny_cnn",
                                                  "--pool", "embedded:train[0:8]", "--data", "fashion-mnist-full",
                                                  "--data-root", str(t / "fm"), "--out", str(t / "o.npz")],
     "no Fashion-MNIST IDX files in '{tmp}/fm'; install them with `apt-get install dataset-fashion-mnist` or set data.root to their folder"),
    # --- unlabeled pools, pseudo-label .npz format: train and pretrain (data.unlabeled)
    ("pseudo-file-train-float-images", lambda t: train(t, *unlabeled(pseudo_file(t, images=np.zeros((8, 28, 28), np.float32)))),
     "data.unlabeled '{tmp}/pool.npz' holds float32 images; store uint8 pixels (0-255), NHWC or NHW"),
    ("pseudo-file-train-truncated", lambda t: train(t, *unlabeled(cut(pseudo_file(t, n=64)))),
     "data.unlabeled '{tmp}/pool.npz' is not an .npz archive (empty, truncated or another format); rewrite it with `dat-ds pseudo-label`"),
    ("pseudo-file-pretrain-truncated", lambda t: pretrain(t, *unlabeled(cut(pseudo_file(t, n=64)))),
     "data.unlabeled '{tmp}/pool.npz' is not an .npz archive (empty, truncated or another format); rewrite it with `dat-ds pseudo-label`"),
    ("pseudo-file-train-not-npz", lambda t: train(t, *unlabeled(put(t, "pool.npz", "images, labels\n"))),
     "data.unlabeled '{tmp}/pool.npz' is not an .npz archive (empty, truncated or another format); rewrite it with `dat-ds pseudo-label`"),
    ("pseudo-file-train-2d-labels", lambda t: train(t, *unlabeled(pseudo_file(t, labels=np.zeros((8, 2), np.int64)))),
     "data.unlabeled '{tmp}/pool.npz' labels are int64 (8, 2); expected N integer class indices"),
    ("pseudo-file-pretrain-text-labels", lambda t: pretrain(t, *unlabeled(pseudo_file(t, labels=np.array(["cat"] * 8)))),
     "data.unlabeled '{tmp}/pool.npz' labels are <U3 (8,); expected N integer class indices"),
    ("pseudo-file-train-label-range", lambda t: train(t, *unlabeled(pseudo_file(t, labels=np.full(8, 10)))),
     "data.unlabeled '{tmp}/pool.npz' has label 10 outside [0, 9]; fix the label file or the data set's class count"),
    ("pseudo-file-train-fewer-labels", lambda t: train(t, *unlabeled(pseudo_file(t, labels=np.arange(4)))),
     "data.unlabeled '{tmp}/pool.npz' has 8 images but 4 labels; rewrite it with `dat-ds pseudo-label`"),
    ("pseudo-file-train-confidence-nan", lambda t: train(t, *unlabeled(pseudo_file(t, confidences=np.full(8, np.nan, np.float32)))),
     "data.unlabeled '{tmp}/pool.npz' has confidences outside [0, 1] (or not finite); rewrite it with `dat-ds pseudo-label`"),
    ("pseudo-file-train-image-size", lambda t: train(t, *unlabeled(pseudo_file(t, images=np.zeros((8, 32, 32), np.uint8)))),
     "data.unlabeled '{tmp}/pool.npz' images are 32x32 but the data set declares 28x28; check the data files under data.root"),
    ("pseudo-file-pretrain-empty", lambda t: pretrain(t, *unlabeled(pseudo_file(t, n=0))),
     "data.unlabeled '{tmp}/pool.npz' is empty; rewrite it with `dat-ds pseudo-label`"),
    ("pseudo-file-train-not-npz-suffix", lambda t: train(t, *unlabeled(put(t, "pool.txt", "1 2 3\n"))),
     "data.unlabeled='{tmp}/pool.txt' must be an .npz written by `dat-ds pseudo-label`"),
    ("pseudo-file-train-no-labels", lambda t: train(t, *unlabeled(pseudo_file(t, labels=None))),
     "data.unlabeled '{tmp}/pool.npz' lacks labels; rewrite it with `dat-ds pseudo-label`"),
    # --- unlabeled pools given to pseudo-label (--pool)
    ("pool-pseudo-label-float-images", lambda t: teacher(t, "--pool", pseudo_file(t, images=np.zeros((8, 28, 28), np.float32))),
     "pool file '{tmp}/pool.npz' holds float32 images; store uint8 pixels (0-255), NHWC or NHW"),
    ("pool-pseudo-label-truncated", lambda t: teacher(t, "--pool", cut(pseudo_file(t, n=64))),
     "pool file '{tmp}/pool.npz' is not an .npz archive (empty, truncated or another format); write it again with np.savez(path, images=uint8 NHWC array)"),
    ("pool-pseudo-label-no-images", lambda t: teacher(t, "--pool", pseudo_file(t, images=None)),
     "pool file '{tmp}/pool.npz' has no 'images' array (it has labels, confidences)"),
    ("pool-pseudo-label-folder", lambda t: teacher(t, "--pool", folder(t, "pool.npz")),
     "pool '{tmp}/pool.npz' is neither an existing file nor a spec like embedded:train[1000:]"),
    # --- unlabeled pools, generated .npz shards: train and pretrain
    ("shards-train-compressed", lambda t: train(t, *unlabeled(shard(t, compress=True))),
     "generated-data shard '{tmp}/gen/s0.npz' is compressed (np.savez_compressed) and cannot be memory-mapped; re-save it with np.savez (uncompressed): z = np.load(f); np.savez(out, image=z['image'], label=z['label'])"),
    ("shards-pretrain-truncated", lambda t: pretrain(t, *unlabeled(cut(shard(t, n=64) + "/s0.npz", 0.9).rpartition("/")[0])),
     "generated-data shard '{tmp}/gen/s0.npz' is not an .npz archive (File is not a zip file); write it with np.savez"),
    ("shards-train-float-images", lambda t: train(t, *unlabeled(shard(t, image=np.zeros((8, 28, 28), np.float32)))),
     "generated-data shard '{tmp}/gen/s0.npz' holds float32 images; store uint8 pixels (0-255), NHWC or NHW"),
    ("shards-pretrain-label-range", lambda t: pretrain(t, *unlabeled(shard(t, label=np.full(8, 12)))),
     "generated-data shard '{tmp}/gen/s0.npz' has label 12 outside [0, 9]; fix the shard or the data set's class count"),
    ("shards-train-float-labels", lambda t: train(t, *unlabeled(shard(t, label=np.zeros(8, np.float32)))),
     "generated-data shard '{tmp}/gen/s0.npz' labels are float32 (8,); expected N integer class indices"),
    ("shards-train-image-size", lambda t: train(t, *unlabeled(shard(t, image=np.zeros((8, 32, 32), np.uint8)))),
     "generated-data shard '{tmp}/gen/s0.npz' holds 32x32x1 images but the labeled data set is 28x28x1; generate data of the same size"),
    ("shards-train-empty-folder", lambda t: train(t, *unlabeled(folder(t, "gen"))),
     "data.unlabeled folder '{tmp}/gen' holds no .npz shards; put the generated-data files (np.savez with 'image' uint8 NHWC and 'label') in it"),
    # --- weights: eval, pseudo-label (train's are in test_bad_input.py)
    ("weights-eval-empty", lambda t: ["eval", "--weights", put(t, "w.safetensors", b""), "--model", "tiny_cnn", "--eps", "0.1"],
     "model.weights file '{tmp}/w.safetensors' is neither a safetensors nor a torch file; give a .safetensors file (e.g. from `dat-ds export`) or a .pt state dict"),
    ("weights-eval-other-model", lambda t: ["eval", "--weights", weights(t, "small_cnn"), "--model", "tiny_cnn", "--eps", "0.1"],
     "weights '{tmp}/w.safetensors' do not fit model 'tiny_cnn' (5 of 8 tensors have other shapes, e.g. features.0.weight [32, 1, 3, 3] vs [8, 1, 3, 3]); give weights saved from model 'tiny_cnn' and this data set (class count, channels)"),
    ("weights-pseudo-label-folder", lambda t: ["pseudo-label", "--weights", folder(t, "w.pt"), "--model", "tiny_cnn",
                                               "--pool", "embedded:train[0:8]", "--out", str(t / "o.npz")],
     "--weights '{tmp}/w.pt' not found; give a local .safetensors or .pt file"),
    ("weights-pseudo-label-not-weights", lambda t: ["pseudo-label", "--weights", put(t, "w.pt", "not weights\n"), "--model",
                                                    "tiny_cnn", "--pool", "embedded:train[0:8]", "--out", str(t / "o.npz")],
     "model.weights file '{tmp}/w.pt' is neither a safetensors nor a torch file; give a .safetensors file (e.g. from `dat-ds export`) or a .pt state dict"),
    # --- subset files: eval --protocol robustbench (checked before anything loads)
    ("subset-eval-not-integers", lambda t: robustbench(t, put(t, "s.txt", "1 2 three\n")),
     "--subset-file '{tmp}/s.txt' holds something other than integer indices"),
    ("subset-eval-not-utf8", lambda t: robustbench(t, put(t, "s.txt", b"\xff\xfe1\x002\x00")),
     "--subset-file '{tmp}/s.txt' is not UTF-8 text (byte offset 0); save it as UTF-8"),
    ("subset-eval-folder", lambda t: robustbench(t, folder(t, "s.txt")),
     "--subset-file '{tmp}/s.txt' is a folder; give a text file of test-set indices"),
    ("subset-eval-negative", lambda t: robustbench(t, put(t, "s.txt", "4, -1\n")),
     "--subset-file '{tmp}/s.txt' has index -1 outside the test set (indices start at 0)"),
    ("subset-eval-empty", lambda t: robustbench(t, put(t, "s.txt", "\n")),
     "--subset-file '{tmp}/s.txt' is empty"),
    ("subset-eval-twice", lambda t: robustbench(t, put(t, "s.txt", "3 3\n")),
     "--subset-file '{tmp}/s.txt' lists an index twice; RobustBench's list has distinct indices"),
    # --- checkpoints: eval, export, finetune, pseudo-label, train --resume
    ("checkpoint-eval-uncommitted", lambda t: ["eval", "--run", run_with_tag(t, None)],
     "'{tmp}/runs/run' is not a run folder with a complete checkpoint (looked in '{tmp}/runs/run/checkpoint'); give the folder `dat-ds train` wrote, after at least one checkpoint"),
    ("checkpoint-export-not-a-run", lambda t: ["export", "--run", str(t), "--out", str(t / "m.safetensors")],
     "'{tmp}' is not a run folder with a complete checkpoint (looked in '{tmp}'); give the folder `dat-ds train` wrote, after at least one checkpoint"),
    ("checkpoint-finetune-not-a-run", lambda t: finetune(t),
     "'{tmp}' is not a run folder with a complete checkpoint (looked in '{tmp}'); give the folder `dat-ds train` wrote, after at least one checkpoint"),
    ("checkpoint-pseudo-label-bad-complete-json", lambda t: ["pseudo-label", "--run", run_with_tag(t, "{oops"), "--out",
                                                            str(t / "o.npz")],
     "'{tmp}/runs/run' is not a run folder with a complete checkpoint (looked in '{tmp}/runs/run/checkpoint'); give the folder `dat-ds train` wrote, after at least one checkpoint"),
    ("checkpoint-train-resume-a-file", lambda t: train(t, "--resume", put(t, "f.txt", "x")),
     "no complete checkpoint found for --resume {tmp}/f.txt; give a run folder with a checkpoint/ inside, or start without --resume"),
    # --- numeric flags
    ("flag-eval-eps-nan", lambda t: eval_run(t, "--eps", "nan"),
     "--eps item 'nan' is not a finite number; use e.g. --eps 0.1,8/255"),
    ("flag-eval-eps-negative", lambda t: eval_run(t, "--eps", "0.1,-0.1"),
     "--eps -0.1 is negative; eps is a radius >= 0"),
    ("flag-eval-eps-divide-by-zero", lambda t: eval_run(t, "--eps", "8/0"),
     "--eps item '8/0' is not a finite number; use e.g. --eps 0.1,8/255"),
    ("flag-eval-batch-size-negative", lambda t: eval_run(t, "--batch-size", "-1"),
     "--batch-size=-1 must be >= 1"),
    ("flag-eval-steps-zero", lambda t: eval_run(t, "--steps", "0"),
     "--steps=0 must be >= 1"),
    ("flag-eval-aa-steps-zero", lambda t: eval_run(t, "--aa-steps", "0"),
     "--aa-steps=0 must be >= 1"),
    ("flag-eval-threads-zero", lambda t: eval_run(t, "--threads", "0"),
     "--threads=0 must be >= 1"),
    ("flag-eval-nproc-zero", lambda t: eval_run(t, "--nproc", "0"),
     "--nproc=0 must be >= 1"),
    ("flag-tune-budget-negative", lambda t: [*TUNE, "--budget=-5s"],
     "--budget '-5s' must be a positive duration, e.g. 10m"),
    ("flag-tune-budget-nan", lambda t: [*TUNE, "--budget", "nanm"],
     "--budget 'nanm' must be a positive duration, e.g. 10m"),
    ("flag-tune-nproc-zero", lambda t: ["tune", "--recipe", "demo", "--nproc", "0"],
     "--nproc=0 must be >= 1"),
    ("flag-tune-memory-cap-negative", lambda t: [*TUNE, "--memory-cap-mb", "-1"],
     "--memory-cap-mb=-1 must be > 0"),
    ("flag-pseudo-label-batch-size-zero", lambda t: ["pseudo-label", "--run", str(t), "--out", str(t / "o.npz"), "--batch-size", "0"],
     "--batch-size=0 must be >= 1"),
    ("flag-pseudo-label-out-not-npz", lambda t: ["pseudo-label", "--run", str(t), "--out", str(t / "o.txt")],
     "--out '{tmp}/o.txt' must end in .npz"),
    ("flag-finetune-eps-nan", lambda t: finetune(t, "--eps", "nan"),
     "--eps=nan must be a finite number in [0, 1]; eps is in pixel units, e.g. 8/255"),
    ("flag-finetune-lr-negative", lambda t: finetune(t, "--lr", "-0.1"),
     "--lr=-0.1 must be > 0"),
    ("flag-eval-square-queries-zero", lambda t: eval_run(t, "--attacks", "square", "--square-queries", "0"),
     "--square-queries=0 must be >= 1"),
    ("flag-finetune-epochs-zero", lambda t: finetune(t, "--epochs", "0"),
     "--epochs=0 must be >= 1"),
    ("flag-demo-nproc-zero", lambda t: ["demo", "--nproc", "0", "--output-dir", str(t / "runs")],
     "--nproc=0 must be >= 1"),
    ("flag-pretrain-master-port", lambda t: pretrain(t, "--nproc", "2", "--master-port", "70000"),
     "--master-port=70000 is not a TCP port; use 1..65535 (or leave it out for a free one)"),
    ("flag-bench-step-steps-zero", lambda t: ["bench", "step", "--steps", "0"],
     "--steps=0 must be >= 1"),
    ("flag-bench-step-eps-nan", lambda t: ["bench", "step", "--eps", "nan"],
     "--eps=nan must be a finite number in [0, 1]"),
    ("flag-bench-eval-examples-zero", lambda t: ["bench", "eval", "--examples", "0"],
     "--examples=0 must be >= 1"),
    ("flag-bench-simulate-latency-negative", lambda t: ["bench", "simulate", "--latency-us=-1"],
     "--latency-us=-1 must be >= 0"),
    ("flag-bench-unlabeled-memory-fraction", lambda t: ["bench", "unlabeled-memory", "--unsup-fraction", "1.5"],
     "--unsup-fraction=1.5 must be in [0, 1]"),
    ("flag-bench-scaling-max-ranks-zero", lambda t: ["bench", "scaling", "--max-ranks", "0"],
     "--max-ranks=0 must be >= 1"),
    ("flag-bench-network-timeout-infinite", lambda t: ["bench", "network", "--timeout", "inf"],
     "--timeout=inf must be a finite number > 0"),
]


def test_at_least_forty_rows():
    assert len(ROWS) >= 40
    assert len({row[0] for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row_id,argv,expected", ROWS, ids=[row[0] for row in ROWS])
def test_bad_input(row_id, argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a command's default output (ds_configs/tuned/, eval_out/) would land here
    args = argv(tmp_path)
    before = snapshot(tmp_path), hashes(tmp_path)
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.splitlines() == ["error: " + expected.replace("{tmp}", str(tmp_path))], err
    assert (snapshot(tmp_path), hashes(tmp_path)) == before  # nothing written, removed or touched



@pytest.mark.parametrize("name", BENCH_HELP)
def test_every_benchmark_flag_default_fits_its_field(name):
    """``check_bench_flags`` holds each harness's numeric flags to a field; the defaults must pass it."""
    import argparse

    import benchmarks
    from dat_ds.cli.bench import check_bench_flags

    harness = benchmarks.get_bench(name)
    parser = argparse.ArgumentParser()
    harness.add_args(parser)
    check_bench_flags(harness, parser.parse_args([]))
