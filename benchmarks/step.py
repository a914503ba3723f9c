"""``dat-ds bench step``: cost of one PGD-k adversarial-training step / one clean step, ours vs naive.

*Ours* takes attack gradients w.r.t. the input only (``torch.autograd.grad``), so no parameter gradient
is computed during the k attack iterations. *Naive* is the textbook loop: ``loss.backward()`` inside the
attack, which also back-propagates into every weight, then zeroes those gradients. Both arms run the
same forward and backward passes (counted, see ``tests/bench/test_bench.py``), on the same model and batch,
with BatchNorm in eval mode during the attack; only the wasted weight-gradient work differs.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dat_ds.core.io import save_bar_plot

from . import write_result
from .common import interleaved_timing, show_table

if TYPE_CHECKING:
    import torch

    from dat_ds.data.base import DataSpec

log = logging.getLogger(__name__)

CASES = {
    # name: (model, (channels, classes, image size), batch)
    "small_cnn-28x28x1": ("small_cnn", (1, 10, 28), 128),
    "resnet18-32x32x3": ("resnet18", (3, 10, 32), 32),
}


def case_spec(name: str) -> DataSpec:
    from dat_ds.data.base import DataSpec

    chans, classes, size = CASES[name][1]
    return DataSpec(chans, classes, size, (0.5,) * chans, (0.5,) * chans)


def clean_step(model, opt, x, y) -> None:
    import torch.nn.functional as F

    model.train()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def at_step_ours(model, opt, x, y, *, eps: float, steps: int, generator: torch.Generator) -> None:
    from dat_ds.attacks import pgd

    x_adv = pgd(model, x, y, eps=eps, steps=steps, generator=generator)
    clean_step(model, opt, x_adv, y)


def at_step_naive(model, opt, x, y, *, eps: float, steps: int, generator: torch.Generator) -> None:
    """The textbook loop: back-propagate into the parameters at every attack iteration."""
    import torch
    import torch.nn.functional as F

    from dat_ds.attacks import eval_mode

    alpha = 2.5 * eps / steps
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype)
    x_adv = (x + (2 * noise - 1) * eps).clamp(0, 1)
    with eval_mode(model):
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), y)
            opt.zero_grad(set_to_none=False)
            loss.backward()  # fills every parameter's .grad too: the waste
            x_adv = torch.min(torch.max(x_adv + alpha * x_adv.grad.sign(), x - eps), x + eps).clamp(0, 1)
    clean_step(model, opt, x_adv.detach(), y)


def run_case(name: str, *, steps: int, eps: float, rounds: int, batch: int | None = None) -> dict[str, Any]:
    import torch

    from dat_ds.models import create_model

    model_name, _, default_batch = CASES[name]
    spec = case_spec(name)
    batch = batch or default_batch
    torch.manual_seed(0)
    model = create_model(model_name, spec)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.rand(batch, spec.in_chans, spec.img_size, spec.img_size)
    y = torch.randint(0, spec.num_classes, (batch,))
    g = torch.Generator().manual_seed(0)
    timings = interleaved_timing({
        "clean": lambda: clean_step(model, opt, x, y),
        "ours": lambda: at_step_ours(model, opt, x, y, eps=eps, steps=steps, generator=g),
        "naive": lambda: at_step_naive(model, opt, x, y, eps=eps, steps=steps, generator=g),
    }, rounds=rounds)
    clean = timings["clean"]["median_s"]
    return {"case": name, "model": model_name, "batch": batch, "pgd_steps": steps, "threads": torch.get_num_threads(),
            "timings": timings, "ours_over_clean": timings["ours"]["median_s"] / clean,
            "naive_over_clean": timings["naive"]["median_s"] / clean,
            "ours_over_naive": timings["ours"]["median_s"] / timings["naive"]["median_s"]}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=7, help="PGD steps k (default 7)")
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--batch", type=int, default=None, help="override each case's batch size")


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = [run_case(c, steps=args.steps, eps=args.eps, rounds=args.rounds, batch=args.batch)
               for c in args.cases.split(",")]
    out = {"goal": "ours_over_naive <= 0.85", "results": results,
           "goal_met": all(r["ours_over_naive"] <= 0.85 for r in results)}
    path = write_result(args.out, "step", out)
    save_bar_plot(Path(args.out) / "step.png", [f"{r['case']}\n{arm}" for r in results for arm in ("ours", "naive")],
                  [r[f"{arm}_over_clean"] for r in results for arm in ("ours", "naive")],
                  ylabel="AT step / clean step", title=f"PGD-{args.steps} AT step cost (lower is better)")
    show_table(f"bench step: PGD-{args.steps} AT step cost relative to a clean step",
               ["case", "batch", "clean s", "ours / clean", "naive / clean", "ours / naive"],
               [[r["case"], r["batch"], r["timings"]["clean"]["median_s"], r["ours_over_clean"], r["naive_over_clean"],
                 r["ours_over_naive"]] for r in results])
    log.info("wrote %s", path)
    return out
