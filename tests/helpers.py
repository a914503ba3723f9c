"""What tests in several folders share, one definition each (fixtures live in ``conftest.py``).

Imported as ``from tests.helpers import ...``: ``tests`` is a package, so test modules with the same name may
sit in different folders, and a 2-rank worker pickled from a test module is found again by its rank.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import importlib.util
import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dat_ds.core.requests import EvalRequest

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- commands a test starts

HEAVY = ("torch", "deepspeed", "timm", "numpy", "torchvision", "torchattacks", "matplotlib", "datasets")

# Runs `dat-ds ARGV` with heavy imports and process starts forbidden; reports what it loaded.
GUARD = f"""
import importlib.abc, subprocess, sys
HEAVY = {HEAVY!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"the fast path imported {{name}}")
sys.meta_path.insert(0, Block())
def no_process(*a, **k):
    raise AssertionError(f"the fast path started a process: {{a[0] if a else k}}")
subprocess.Popen = subprocess.call = subprocess.run = no_process
from dat_ds.cli import main
code = main(sys.argv[1:])
sys.exit(code)
"""


def fast_cli(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    """``dat-ds ARGV`` in a fresh interpreter where importing torch (or the other heavy packages) or starting a
    process fails: what the command line promises to answer without either."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DAT_DS_VERBOSE", None)
    return subprocess.run([sys.executable, "-c", GUARD, *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)

# What torch.distributed reads from the environment. In-process tests initialise a world of one, which sets
# these in this process for the tests after them; a command a test starts must not inherit them (it would
# reuse that world's rendezvous port and fail with EADDRINUSE).
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def command_env(**extra: str) -> dict[str, str]:
    """The environment for a ``dat-ds`` command a test starts itself: a fresh command, not a rank."""
    return {**{k: v for k, v in os.environ.items() if k not in DIST_ENV}, **extra}


def run_cli(*args: str, cwd: Path | str | None = None, timeout: float = 600, env: dict | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    """``dat-ds ARGS`` in a fresh interpreter (the way users run it); returns the completed process."""
    full_env = command_env(**(env or {}))
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.run([sys.executable, "-m", "dat_ds.cli", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"dat-ds {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def launch_two_rank_train(args: list[str]) -> subprocess.Popen:
    """``dat-ds train --nproc 2 ARGS`` started in the background, its output piped."""
    return subprocess.Popen([sys.executable, "-m", "dat_ds.cli", "train", "--nproc", "2", *args], cwd=REPO,
                            env=command_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_process(parent, local_rank: int, timeout: float = 300):
    """The ``psutil.Process`` of ``local_rank`` among ``parent``'s descendants, once it has started."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in parent.children(recursive=True):
            try:
                if f"--local_rank={local_rank}" in p.cmdline():
                    return p
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.2)
    raise AssertionError(f"rank {local_rank} never started")


def wait_for_tag(root: Path, proc: subprocess.Popen, timeout: float = 400) -> str:
    """The newest complete checkpoint tag under ``root``, once there is one (``proc`` must still run)."""
    from dat_ds.runtime import checkpoint

    deadline = time.time() + timeout
    while time.time() < deadline:
        tags = [t for _, t in checkpoint.complete_tags(root)] if root.is_dir() else []
        if tags:
            return tags[-1]
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    raise AssertionError("no checkpoint appeared")


def eval_args(*argv: str) -> EvalRequest:
    """``dat-ds eval ARGV`` parsed into the request a rank builds from it (nothing checked yet)."""
    from dat_ds.cli.args import eval_args_parser, eval_request

    return eval_request(eval_args_parser().parse_args(list(argv)))


def harness_defaults(harness) -> argparse.Namespace:
    """A benchmark harness's arguments at their defaults."""
    parser = argparse.ArgumentParser()
    harness.add_args(parser)
    return parser.parse_args([])


# ----------------------------------------------------------------------------- tiny runs

TINY_DS = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": 0.002, "weight_decay": 0.0001}},
           "zero_optimization": {"stage": 0}}


def write_ds(folder: Path, **changes) -> Path:
    cfg = json.loads(json.dumps(TINY_DS))
    cfg.update(changes)
    path = Path(folder) / "ds.json"
    path.write_text(json.dumps(cfg))
    return path


def tiny_args(out: Path, name: str, ds: Path, *extra: str, subset: int = 96, epochs: int = 2,
              save_every: int = 4) -> list[str]:
    """A run that takes seconds: tiny_cnn, PGD-1, a few steps per epoch, eval on 16 images."""
    return ["--name", name, "--output-dir", str(out), "--ds-config", str(ds), "--epochs", str(epochs),
            "--set", "model.name=tiny_cnn", "--set", f"data.train_subset={subset}", "--set", "attack.steps=1",
            # PGD-1: these runs test what surrounds the evaluation; apgd-ce-dlr (the default) costs ~4 s more a run
            "--set", "eval.attack=pgd", "--set", "eval.steps=1", "--set", "eval.max_examples=16", "--set", "eval.batch_size=16",
            "--set", f"train.save_every_steps={save_every}", "--set", "train.keep_last=20", "--set", "train.log_every=1",
            *extra]


def tiny_problem(seed: int = 0, *, features: int = 6, hidden: int = 16, classes: int = 3, n: int = 64):
    """A seeded two-layer MLP and a classification problem for it: (model, x, y)."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(n, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return model, x, y


# ----------------------------------------------------------------------------- checkpoints and folders


def model_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(tag_dir) / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]


def latest_model_states(run: Path) -> dict:
    """The whole ``mp_rank_00_model_states.pt`` of a run's latest checkpoint (weights and objective state)."""
    tag = (run / "checkpoint" / "latest").read_text().strip()
    return torch.load(run / "checkpoint" / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"tensor {k} differs (max abs diff {(a[k] - b[k]).abs().max().item()})"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under ``folder``: proves nothing was written."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (and the folder list): equal means byte-identical."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(Path(folder).rglob("*"))}


def write_committed_tag(folder: Path, files: dict[str, bytes], *, hashed: bool = True, tag: str = "step000000001",
                        global_step: int = 1) -> Path:
    """``folder/tag``: a committed checkpoint folder (torch-free) whose complete.json records ``files``, their sizes
    and (unless ``hashed`` is False, as before dat-ds recorded hashes) their SHA-256."""
    tag_dir = Path(folder) / tag
    tag_dir.mkdir(parents=True)
    for name, data in files.items():
        (tag_dir / name).write_bytes(data)
    mark = {"tag": tag, "global_step": global_step, "epoch": 0, "files": {k: len(v) for k, v in files.items()}}
    if hashed:
        mark["sha256"] = {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
    (tag_dir / "complete.json").write_text(json.dumps(mark))
    return tag_dir


class Crash(Exception):
    """Stands in for a node dying (right after a checkpoint was committed, or while a run starts)."""


@contextlib.contextmanager
def crash_after_save(tag: str):
    """Inside the block ``checkpoint.save`` raises :class:`Crash` right after committing ``tag``; the real
    save is back on exit."""
    from dat_ds.runtime import checkpoint

    real_save = checkpoint.save

    def save_then_crash(engine, root, saved_tag, **kw):
        out = real_save(engine, root, saved_tag, **kw)
        if saved_tag == tag:
            raise Crash(saved_tag)
        return out

    checkpoint.save = save_then_crash
    try:
        yield
    finally:
        checkpoint.save = real_save


# ----------------------------------------------------------------------------- 2 ranks in the test's processes


def join_two_rank_world(rank: int, port: int, **extra: str) -> None:
    """The torch.distributed variables of rank ``rank`` of a world of 2 on this host (plus ``extra``), set in
    a process that ``spawn_two_ranks`` started."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), **extra)


def spawn_two_ranks(worker, *args) -> None:
    """``worker(rank, port, *args)`` in 2 fresh processes that meet at a free port; returns when both ended."""
    import torch.multiprocessing as mp

    from dat_ds.core.dist import free_port

    mp.spawn(worker, args=(free_port(), *args), nprocs=2, join=True)


# ----------------------------------------------------------------------------- compressing DeepSpeed JSONs

# name -> (ds_configs file, optimizer params changed so the compressed stage starts at optimizer step 3)
COMPRESSED_SETUPS = {
    "onebit_adam": ("onebit_adam.json", {"freeze_step": 2}),
    "zero_one_adam": ("zero_one_adam.json", {"var_freeze_step": 2, "var_update_scaler": 1, "local_step_scaler": 2}),
    "onebit_lamb": ("onebit_lamb.json", {"freeze_step": 2}),
    "dat_8bit": ("dat_8bit.json", {}),
}


def compressed_setup(name: str, *, setups: dict = COMPRESSED_SETUPS, optimizer_params: dict | None = None,
                     **changes) -> dict:
    """The shipped JSON of setup ``name``, its optimizer params updated, then its top-level keys."""
    file, params = setups[name]
    data = json.loads((REPO / "ds_configs" / file).read_text())
    data["optimizer"].setdefault("params", {}).update({**params, **(optimizer_params or {})})
    data.update(changes)
    return data


def write_compressed_setup(folder: Path, name: str, *, stem: str | None = None, **kwargs) -> Path:
    """``compressed_setup(name, **kwargs)`` written to ``folder/<stem or name>.json``."""
    path = Path(folder) / f"{stem or name}.json"
    path.write_text(json.dumps(compressed_setup(name, **kwargs)))
    return path


# ----------------------------------------------------------------------------- data files in their formats

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def foolbox_images(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """The 20 real CIFAR-10 (``cifar10``) or CIFAR-100 (``cifar100``) test images that the foolbox wheel ships."""
    from PIL import Image

    foolbox_data = Path(importlib.util.find_spec("foolbox").origin).parent / "data"  # no import: foolbox is slow to load
    files = sorted(foolbox_data.glob(f"{prefix}_*.png"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    labels = np.array([int(re.search(r"_(\d+)\.png$", f.name).group(1)) for f in files], dtype=np.int64)
    return images, labels


def write_python_release(root: Path, images: np.ndarray, labels: np.ndarray, cifar100: bool = False) -> Path:
    """The official python layout: pickled dicts with b'data' (N x 3072, channel-major) and labels."""
    flat = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    if cifar100:
        folder, key = root / "cifar-100-python", b"fine_labels"
        parts = {"train": slice(None), "test": slice(None)}
    else:
        folder, key = root / "cifar-10-batches-py", b"labels"
        parts = {f"data_batch_{i + 1}": slice(4 * i, 4 * i + 4) for i in range(5)} | {"test_batch": slice(None)}
    folder.mkdir(parents=True)
    for name, sl in parts.items():
        batch = {b"batch_label": name.encode(), key: labels[sl].tolist(), b"data": flat[sl],
                 b"filenames": [f"{i}.png".encode() for i in range(len(labels[sl]))]}
        if cifar100:
            batch[b"coarse_labels"] = [0] * len(labels[sl])
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def write_hf(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """The same split as HF ``save_to_disk`` (``root/hf_disk``) and as parquet files (``root/hf_parquet``)."""
    import datasets
    from PIL import Image

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CIFAR10_CLASSES))})
    split = datasets.Dataset.from_dict({"img": [Image.fromarray(im) for im in images], "label": labels.tolist()},
                                       features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(root / "hf_disk"))
    (root / "hf_parquet" / "plain_text").mkdir(parents=True)
    for name in ("train", "test"):
        split.to_parquet(str(root / "hf_parquet" / "plain_text" / f"{name}-00000-of-00001.parquet"))


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def idx_root(tmp: Path, images: np.ndarray | None = None, labels: np.ndarray | None = None, n: int = 64) -> Path:
    """A fashion-mnist-full folder with n random 28x28 images; override the train images/labels."""
    root = tmp / "fmnist"
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    good_x, good_y = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
    write_idx(root / "train-images-idx3-ubyte.gz", good_x if images is None else images)
    write_idx(root / "train-labels-idx1-ubyte.gz", good_y if labels is None else labels)
    write_idx(root / "t10k-images-idx3-ubyte.gz", good_x)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", good_y)
    return root
