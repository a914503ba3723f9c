"""``dat-ds bench unlabeled-memory``: resident memory of the training data path vs the number of generated images.

Writes ``--max-images`` synthetic generated images as uncompressed ``.npz`` shards (DM-Improves-AT's format)
into a temporary folder, then for each ``--sizes`` entry starts a fresh process that builds the mixed
training loader over the first N images (a folder of links to the first shards) and draws ``--steps``
micro-batches at ``data.unsup_fraction``, reading ``/proc/self/status`` before and after. Memory-mapped
shards should keep resident memory flat; loading the pool whole would cost N x H x W x C bytes (shown for
comparison, not allocated). The folder is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="100000,300000,1000000", help="generated-pool sizes to measure (comma list)")
    p.add_argument("--shape", default="32,32,3", help="image H,W,C (default 32,32,3: CIFAR; 28,28,1 needs 4x less disk)")
    p.add_argument("--shard-size", type=int, default=100_000, help="images per shard (default 100000)")
    p.add_argument("--steps", type=int, default=200, help="micro-batches drawn per size (default 200)")
    p.add_argument("--micro-batch", type=int, default=256, help="micro-batch size (default 256)")
    p.add_argument("--unsup-fraction", type=float, default=0.7, help="data.unsup_fraction (default 0.7, DM's)")
    p.add_argument("--tmp-dir", default=None, help="where to write the shards (default: the system temp folder)")


def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile in bytes (Linux)."""
    out: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _write_shards(folder: Path, total: int, shard_size: int, shape: tuple[int, ...]) -> list[Path]:
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for s, start in enumerate(range(0, total, shard_size)):
        n = min(shard_size, total - start)
        path = folder / f"gen{s:04d}.npz"
        np.savez(path, image=rng.integers(0, 256, size=(n, *shape), dtype=np.uint8),
                 label=rng.integers(0, 10, size=n, dtype=np.int64))
        paths.append(path)
    return paths


def _child(spec: str, shape: tuple[int, int, int], steps: int, micro_batch: int, unsup_fraction: float) -> dict[str, Any]:
    """One measurement, in a fresh process: build the mixed loader over ``spec`` and draw ``steps`` batches."""
    import numpy as np
    import torch

    from dat_ds.core.config import build_config
    from dat_ds.data.embedded import ArrayDataset
    from dat_ds.data.loaders import build_train_loader

    h, w, c = shape
    labeled = ArrayDataset(np.zeros((4096, h, w, c), np.uint8), np.zeros(4096, np.int64))  # same for every size
    cfg = build_config(overrides=[f"data.unlabeled={spec}", f"data.unsup_fraction={unsup_fraction}"])
    torch.zeros(1)  # torch's lazy start-up allocations happen before the baseline
    before = _status()
    factory = build_train_loader(cfg, labeled, micro_batch=micro_batch, rank=0, world_size=1)
    built = _status()
    drawn, epoch, checksum = 0, 0, 0.0
    while drawn < steps:
        for x, _ in factory.loader(epoch):
            checksum += float(x[-1].sum())  # touch the generated rows
            drawn += 1
            if drawn >= steps:
                break
        epoch += 1
    after = _status()
    shards = factory.dataset.generated.shards
    return {"pool_images": len(shards), "shards": len(shards.infos), "before": before, "after_build": built,
            "after_steps": after, "steps": drawn, "max_shards_mapped": shards.stats.max_open,
            "maps_opened": shards.stats.opened, "pages_released": shards.stats.released,
            "generated_per_batch": factory.unlabeled_per_batch}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dat_ds.core.errors import ConfigError

    from . import checkout_env, write_result
    from .common import show_table

    sizes = sorted(int(s) for s in args.sizes.split(","))
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 3 or min(sizes) < 1 or args.steps < 1 or args.shard_size < 1:
        raise ConfigError("bench unlabeled-memory needs --shape H,W,C, sizes >= 1, --steps >= 1, --shard-size >= 1")
    odd = [n for n in sizes if n % args.shard_size and n != max(sizes)]
    if odd:  # checked before any shard is written
        raise ConfigError(f"size {odd[0]} is not a multiple of --shard-size {args.shard_size}")
    need = max(sizes) * int(shape[0] * shape[1] * shape[2])
    tmp_root = Path(args.tmp_dir or tempfile.gettempdir())
    free = shutil.disk_usage(tmp_root).free
    if need > free * 0.8:
        raise ConfigError(f"bench unlabeled-memory needs {need / 1e9:.1f} GB of disk under {str(tmp_root)!r} but "
                          f"{free / 1e9:.1f} GB are free; lower --sizes or use --shape 28,28,1 or --tmp-dir")
    results = []
    with tempfile.TemporaryDirectory(prefix="dat-ds-genmem-", dir=tmp_root) as tmp:
        paths = _write_shards(Path(tmp) / "all", max(sizes), args.shard_size, shape)
        log.info("wrote %d images in %d shards (%.2f GB)", max(sizes), len(paths), need / 1e9)
        for n in sizes:
            sub = Path(tmp) / f"n{n}"
            sub.mkdir()
            for p in paths[:-(-n // args.shard_size)]:
                (sub / p.name).symlink_to(p)
            cmd = [sys.executable, "-m", "benchmarks.unlabeled_memory", str(sub), args.shape, str(args.steps),
                   str(args.micro_batch), str(args.unsup_fraction)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                                  env={**os.environ, **checkout_env()})
            if proc.returncode != 0:
                raise RuntimeError(f"measurement for {n} images failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["bytes_if_loaded_whole"] = n * int(shape[0] * shape[1] * shape[2])
            results.append(r)
            log.info("%d images: peak RSS %.0f MB (anon %.0f MB, file %.0f MB)", n, r["after_steps"]["VmHWM"] / 2**20,
                     r["after_steps"]["RssAnon"] / 2**20, r["after_steps"]["RssFile"] / 2**20)
    peaks = [r["after_steps"]["VmHWM"] for r in results]
    growth = (peaks[-1] - peaks[0]) / 2**20
    out = {"shape": list(shape), "shard_size": args.shard_size, "steps": args.steps, "micro_batch": args.micro_batch,
           "unsup_fraction": args.unsup_fraction, "results": results,
           "peak_rss_growth_mb": growth, "pool_growth_mb": (sizes[-1] - sizes[0]) * need / max(sizes) / 2**20,
           "goal": "peak resident memory grows by < 5% of the pool's own growth (memory-mapped, never loaded whole)",
           "goal_met": growth < 0.05 * (sizes[-1] - sizes[0]) * need / max(sizes) / 2**20}
    path = write_result(args.out, "unlabeled-memory", out)
    mb = 2**20
    show_table(f"bench unlabeled-memory: {args.steps} micro-batches of {args.micro_batch} "
               f"({results[0]['generated_per_batch']} generated), images {'x'.join(map(str, shape))}",
               ["generated images", "shards", "peak RSS MB", "RSS after MB", "anon MB", "file-backed MB",
                "most shards mapped", "if loaded whole MB"],
               [[r["pool_images"], r["shards"], r["after_steps"]["VmHWM"] / mb, r["after_steps"]["VmRSS"] / mb,
                 r["after_steps"]["RssAnon"] / mb, r["after_steps"]["RssFile"] / mb, r["max_shards_mapped"],
                 r["bytes_if_loaded_whole"] / mb] for r in results])
    log.info("wrote %s", path)
    return out


if __name__ == "__main__":  # the measured child process
    spec_, shape_, steps_, micro_, frac_ = sys.argv[1:6]
    print(json.dumps(_child(spec_, tuple(int(v) for v in shape_.split(",")), int(steps_), int(micro_), float(frac_))))
