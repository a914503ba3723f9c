"""Benchmark for docs/objectives.md: robust objectives, pseudo-labelled data (RST) and ACL pre-training.

Runs the exact `dat-ds` commands it prints, one after the other, on the embedded Fashion-MNIST subset,
and writes every result to ``<out>/results.json`` as soon as it is known (so a cut-short run keeps
what finished). Sizes are kept small for a shared 2-core CPU; raise ``--epochs-scale`` for better numbers.

    uv run python scripts/bench_objectives.py --out runs/bench-objectives --groups acl,rst,objectives

Groups:
  objectives  DAT-PGD vs TRADES vs MART (vs Free-AT) at the same eps, same epochs, same PGD steps
  rst         1,000 labeled: labeled-only DAT vs DAT on labeled + 9,000 pseudo-labelled (same optimizer steps)
  acl         ACL pre-training + ALF vs a randomly initialised encoder + ALF (and SLF for both)
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Bench:
    def __init__(self, out: Path, nproc: int, eval_examples: int, attack_steps: int, overrides: list[str]):
        self.out, self.nproc, self.overrides = out, nproc, overrides
        self.eval_examples, self.attack_steps = eval_examples, attack_steps
        self.results_path = out / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.is_file() else {}

    def run(self, key: str, *args: str) -> None:
        shown = "uv run dat-ds " + " ".join(shlex.quote(a) for a in args)
        print(f"\n### {key}\n$ {shown}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "dat_ds.cli", *args], cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"{key} failed with exit code {proc.returncode}")
        self.record(key, {"command": shown, "wall_seconds": round(time.perf_counter() - t0, 1)})

    def record(self, key: str, values: dict) -> None:
        self.results.setdefault(key, {}).update(values)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results_path.write_text(json.dumps(self.results, indent=2) + "\n")

    def common(self) -> list[str]:
        return ["--nproc", str(self.nproc), "--output-dir", str(self.out), "--overwrite",
                "--set", f"eval.max_examples={self.eval_examples}", "--set", "train.log_every=50", *self.sets()]

    def sets(self) -> list[str]:
        return [a for o in self.overrides for a in ("--set", o)]

    def train_result(self, key: str, name: str) -> None:
        final = json.loads((self.out / name / "summary.json").read_text())["final"]
        self.record(key, {k: final.get(k) for k in ("clean_acc", "robust_acc", "robust_attack", "eval_count",
                                                    "train_seconds")} | {"epochs": final["epoch"]})


def objectives(b: Bench, epochs: int, with_free: bool) -> None:
    recipes = {"dat": "recipes/demo.yaml", "trades": "recipes/trades_embedded.yaml", "mart": "recipes/mart_embedded.yaml"}
    for obj, recipe in recipes.items():
        name = f"bench-{obj}"
        b.run(obj, "train", "--config", recipe, "--name", name, "--epochs", str(epochs), *b.common(),
              "--set", f"attack.steps={b.attack_steps}", "--set", f"eval.every_epochs={epochs}")
        b.train_result(obj, name)
    if with_free:  # m = 4 replays, epochs divided by m (at least 1)
        b.run("free", "train", "--config", "recipes/free_embedded.yaml", "--name", "bench-free",
              "--epochs", str(max(1, epochs // 2)), *b.common(), "--set", f"eval.every_epochs={max(1, epochs // 2)}")
        b.train_result("free", "bench-free")


def rst(b: Bench, rst_epochs: int, teacher_epochs: int, labeled: int = 1000, micro_batch: int = 64) -> None:
    b.run("rst_teacher", "train", "--config", "recipes/demo.yaml", "--name", "bench-teacher",
          "--epochs", str(teacher_epochs),
          *b.common(), "--set", "objective.name=clean", "--set", f"data.train_subset={labeled}",
          "--set", "eval.attack=none", "--set", f"eval.every_epochs={teacher_epochs}")
    b.train_result("rst_teacher", "bench-teacher")
    pl = b.out / "pseudo_labels.npz"
    b.run("rst_pseudo_label", "pseudo-label", "--run", str(b.out / "bench-teacher"), "--out", str(pl))
    import numpy as np

    with np.load(pl, allow_pickle=False) as z:
        b.record("rst_pseudo_label", {"pseudo_label_accuracy": json.loads(str(z["meta"]))["pseudo_label_accuracy"],
                                      "count": int(len(z["labels"]))})
    b.run("rst", "train", "--config", "recipes/rst_embedded.yaml", "--name", "bench-rst", "--epochs", str(rst_epochs),
          *b.common(), "--set", f"data.unlabeled={pl}", "--set", f"attack.steps={b.attack_steps}",
          "--set", f"eval.every_epochs={rst_epochs}")
    b.train_result("rst", "bench-rst")
    # Same number of optimizer steps for the labeled-only baseline (RST's epoch spans labeled + pool).
    global_batch = micro_batch * b.nproc
    rst_steps = rst_epochs * (10_000 // global_batch)
    labeled_epochs = max(1, round(rst_steps / (labeled // global_batch)))
    b.run("labeled_only", "train", "--config", "recipes/demo.yaml", "--name", "bench-labeled",
          "--epochs", str(labeled_epochs), *b.common(), "--set", f"data.train_subset={labeled}",
          "--set", f"attack.steps={b.attack_steps}", "--set", f"eval.every_epochs={labeled_epochs}")
    b.train_result("labeled_only", "bench-labeled")
    b.record("rst", {"optimizer_steps": rst_steps})
    b.record("labeled_only", {"optimizer_steps": labeled_epochs * (labeled // global_batch)})


def acl(b: Bench, pretrain_epochs: int, finetune_epochs: int) -> None:
    b.run("acl_pretrain", "pretrain", "--config", "recipes/acl_pretrain_embedded.yaml", "--name", "bench-acl",
          "--epochs", str(pretrain_epochs), *b.common())
    encoder = str(b.out / "bench-acl")
    for mode in ("alf", "slf"):
        for source, flags in (("acl", ["--encoder", encoder]),
                              ("random", ["--random-init", "--config", "recipes/acl_pretrain_embedded.yaml",
                                          *b.sets()])):
            key = f"{mode}_{source}"
            out = b.out / f"{key}.json"
            b.run(key, "finetune", "--mode", mode, *flags, "--epochs", str(finetune_epochs),
                  "--eval-examples", str(b.eval_examples), "--out", str(out))
            r = json.loads(out.read_text())
            b.record(key, {k: r[k] for k in ("clean_acc", "robust_acc", "robust_attack", "eval_count", "train_attack",
                                            "train_seconds")})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench-objectives")
    p.add_argument("--groups", default="objectives,rst,acl")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--eval-examples", type=int, default=500)
    p.add_argument("--attack-steps", type=int, default=3, help="PGD steps of the training attacks")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the DAT/TRADES/MART runs")
    p.add_argument("--rst-epochs", type=int, default=2)
    p.add_argument("--teacher-epochs", type=int, default=20, help="clean training of the RST teacher on 1,000 labels")
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--with-free", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every training run (e.g. model.name=tiny_cnn)")
    args = p.parse_args()
    b = Bench(Path(args.out), args.nproc, args.eval_examples, args.attack_steps, args.overrides)
    for group in args.groups.split(","):
        if group == "objectives":
            objectives(b, args.epochs, args.with_free)
        elif group == "rst":
            rst(b, args.rst_epochs, args.teacher_epochs)
        elif group == "acl":
            acl(b, args.pretrain_epochs, args.finetune_epochs)
        else:
            raise SystemExit(f"unknown group {group!r}; use objectives, rst, acl")
    print(json.dumps(b.results, indent=2))


if __name__ == "__main__":
    main()
