"""``dat-ds bench gpu-smoke``: everything that only a GPU can show, on one CUDA device, in <= 8 minutes.

Checks, each recorded as ok / failed (with the error) / skipped (with why) in ``bench/gpu_smoke.json``:

* **speed**: samples/s of DAT-PGD-10 on PreActResNet-18 at 32x32 (random CIFAR-sized images), the
  DeepSpeed-engine trainer vs a plain PyTorch loop doing the same work (``benchmarks.worker``, both
  arms started by ``launch()``, one rank);
* **ds_configs**: every ``ds_configs/*.json`` that fits one rank trains the demo for two optimizer steps
  with an end-of-run PGD evaluation (``dat_ds.launch.train.main``, what ``dat-ds train`` runs on one
  rank), which covers bf16 and ZeRO-3;
* **attacks in bf16 / fp16**: every registered attack on a bf16 (fp16) PreActResNet-18, called through
  ``attacks.attack_view`` as the trainer calls it, returns 16-bit images in [0, 1] within the eps-ball;
* **fp16 training**: ZeRO-1 with DeepSpeed's dynamic fp16 loss scaling from 2^16 (the first steps overflow on
  purpose and are skipped), an in-training AutoAttack evaluation on the fp16 weights;
* **ZeRO-3 AutoAttack**: ZeRO-3 bf16 training with an in-training AutoAttack evaluation (weights gathered once,
  ``runtime.replica``: ranks may attack different amounts);
* **AutoAttack eval**: ``dat-ds eval --attacks autoattack --max-examples 200`` on the zero0 run
  (``dat_ds.launch.evaluate.main``, what ``dat-ds eval`` runs on one rank);
* **SSL**: pretrain (ACL, two steps), finetune (ALF) from it, pseudo-label with the zero0 run as teacher.

Refuses with a one-line ConfigError when DeepSpeed's accelerator is not CUDA. ``scripts/gpu_smoke.sh``
runs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from . import CHECKOUT, write_result
from .common import show_table

log = logging.getLogger(__name__)

REPO = CHECKOUT
DEMO = REPO / "recipes" / "demo.yaml"
ACL = REPO / "recipes" / "acl_pretrain_embedded.yaml"
# Short runs: two optimizer steps, a step record each, a small end-of-run evaluation.
SHORT = ["train.log_every=1", "eval.max_examples=64", "eval.steps=2", "optim.schedule=constant",
         "optim.warmup_epochs=0"]
# Small budgets for the attacks' own iteration knobs (passed only to attacks that declare them).
SMALL_KNOBS = {"steps": 5, "aa_steps": 10, "apgd_steps": 10, "n_queries": 100}
BF16_SPACING = 2.0 ** -7  # bf16 spacing just below 1.0: the rounding an image in [0, 1] may see


def require_cuda() -> None:
    from dat_ds.core import dist
    from dat_ds.core.errors import ConfigError

    name = dist.accelerator().device_name()
    if name != "cuda":
        raise ConfigError(f"bench gpu-smoke needs a CUDA device but DeepSpeed's accelerator is {name!r}; "
                          "run scripts/gpu_smoke.sh on a machine with a GPU")


class Checks:
    """Runs named checks within a time budget; a failure is recorded and the next check runs."""

    def __init__(self, budget_s: float):
        self.t0, self.budget_s = time.perf_counter(), budget_s
        self.results: dict[str, dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        import gc

        import torch

        if time.perf_counter() - self.t0 > self.budget_s:
            self.results[name] = {"status": "skipped", "why": f"time budget of {self.budget_s:.0f} s spent"}
            return None
        t = time.perf_counter()
        try:
            info = fn()
            entry = {"status": "ok", **info}
        except Skip as e:
            entry = {"status": "skipped", "why": str(e)}
        except Exception as e:  # noqa: BLE001 - recorded per check; the smoke test goes on
            log.exception("gpu-smoke check %s failed", name)
            entry = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:1000]}
        entry["seconds"] = time.perf_counter() - t
        self.results[name] = entry
        log.info("gpu-smoke %s: %s (%.1f s)", name, entry["status"], entry["seconds"])
        gc.collect()
        torch.cuda.empty_cache()
        return entry if entry["status"] == "ok" else None


class Skip(Exception):
    """A check that does not apply here (e.g. a ds_config that needs more than one rank)."""


# ----------------------------------------------------------------------------- the checks


def speed(steps: int, micro: int, repeats: int) -> dict[str, Any]:
    import statistics

    from .engine import launch_worker

    kw = dict(steps=steps, micro=micro, model="preactresnet18", attack_steps=10,
              extra=["--synthetic", "3x32", "--deepspeed_config", str(REPO / "ds_configs" / "zero0_fp32.json")])
    runs: dict[str, list[dict[str, Any]]] = {"deepspeed": [], "ddp": []}
    for _ in range(repeats):
        for arm in runs:
            runs[arm].append(launch_worker(arm, 1, **kw))
    sps = {arm: statistics.median(r["samples_per_s"] for r in rs) for arm, rs in runs.items()}
    same = all(a["forward_passes_rank0"] == b["forward_passes_rank0"] for a, b in zip(runs["deepspeed"], runs["ddp"]))
    return {"workload": f"DAT-PGD-10, preactresnet18, 32x32x3, batch {micro}, {steps} timed steps, fp32",
            "samples_per_s": {"dat-ds (DeepSpeed engine)": sps["deepspeed"], "plain PyTorch loop": sps["ddp"]},
            "dat_ds_over_plain": sps["deepspeed"] / sps["ddp"], "same_work": same, "runs": runs}


def train_short(name: str, recipe: Path, out_dir: Path, extra: list[str], optimizer_steps: int = 2,
                ds_config: str | None = None) -> dict[str, Any]:
    """A short ``dat-ds train`` on this process's one rank; returns its summary's final row."""
    from dat_ds.cli.args import train_args_parser, train_request
    from dat_ds.core.config import build_config
    from dat_ds.launch import train
    from dat_ds.runtime import ds_config as dsc

    path = ds_config
    accum = dsc.prepare(path or build_config(str(recipe), []).deepspeed_config, 1).grad_accum
    argv = ["--config", str(recipe), "--name", name, "--output-dir", str(out_dir), "--epochs", "1", "--overwrite"]
    if path is not None:
        argv += ["--deepspeed_config", path]
    for s in [*SHORT, f"train.max_steps_per_epoch={optimizer_steps * accum}", *extra]:
        argv += ["--set", s]
    summary = train.main(train_request(train_args_parser().parse_args(argv)))
    final = summary["final"] or {}
    loss = final.get("train_loss")
    if loss is None or not math.isfinite(loss):
        raise RuntimeError(f"train loss is {loss!r} after {optimizer_steps} steps")
    return {"run_dir": str(out_dir / name), "micro_steps": optimizer_steps * accum,
            **{k: final.get(k) for k in ("train_loss", "clean_acc", "robust_acc", "eval_count")}}


def ds_config_check(path: Path, out_dir: Path) -> Callable[[], dict[str, Any]]:
    def check() -> dict[str, Any]:
        from dat_ds.core.errors import ConfigError
        from dat_ds.runtime import ds_config

        try:
            settings = ds_config.prepare(str(path), 1)
        except ConfigError as e:
            raise Skip(f"does not fit one rank: {e}") from None
        info = train_short(path.stem, DEMO, out_dir, [], ds_config=str(path))
        return {"precision": settings.precision, "zero_stage": settings.zero_stage, **info}

    return check


def attacks_16bit(images: int, dtype_name: str) -> dict[str, Any]:
    import torch

    from dat_ds.attacks import ATTACKS, NFGSM_NOISE_MULTIPLIER, attack_view
    from dat_ds.attacks.registry import attack_parameters
    from dat_ds.core import dist
    from dat_ds.data.base import DataSpec
    from dat_ds.models import create_model

    device, eps, dtype = dist.device(), 8 / 255, getattr(torch, dtype_name)
    torch.manual_seed(0)
    model = attack_view(create_model("preactresnet18", DataSpec(3, 10, 32, (0.5,) * 3, (0.5,) * 3)).to(device, dtype).eval())
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(images, 3, 32, 32, device=device, generator=g).to(dtype)
    y = torch.randint(0, 10, (images,), device=device, generator=g)
    out, bad = {}, []
    for name in ATTACKS.names():
        if name == "none":
            continue
        params = attack_parameters(name)
        kwargs = {k: v for k, v in SMALL_KNOBS.items() if k in params}
        reach = NFGSM_NOISE_MULTIPLIER + 1 if name == "nfgsm" else 1  # N-FGSM: noise k*eps plus a step, unprojected
        t = time.perf_counter()
        try:
            x_adv = ATTACKS.get(name)(model, x, y, eps=eps, generator=torch.Generator(device=device).manual_seed(1),
                                      **kwargs)
            delta = (x_adv.float() - x.float()).abs().max().item()
            ok = (x_adv.dtype == dtype and x_adv.shape == x.shape and bool(torch.isfinite(x_adv).all())
                  and x_adv.min().item() >= 0 and x_adv.max().item() <= 1 and delta <= reach * eps + BF16_SPACING)
            with torch.no_grad():
                acc = (model(x_adv).argmax(1) == y).float().mean().item()
            out[name] = {"ok": ok, "dtype": str(x_adv.dtype), "max_perturbation": delta, "robust_acc": acc,
                         "seconds": time.perf_counter() - t, "knobs": kwargs}
        except Exception as e:  # noqa: BLE001 - one attack failing must not hide the others
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
        if not out[name]["ok"]:
            bad.append(name)
    if bad:
        raise RuntimeError(f"attacks failing in {dtype_name}: {', '.join(bad)}; details: {json.dumps(out)[:1500]}")
    return {"eps": eps, "images": images, "attacks": out}


FP16_ZERO1 = {"train_micro_batch_size_per_gpu": 64, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 0.002, "weight_decay": 0.0001}},
              "fp16": {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2},
              "zero_optimization": {"stage": 1}}
AUTOATTACK_IN_TRAINING = ["eval.attack=autoattack", "eval.steps=10", "eval.max_examples=64"]


def train_with_autoattack(name: str, ds: dict[str, Any] | str, out_dir: Path, optimizer_steps: int) -> dict[str, Any]:
    """A short run whose end-of-run evaluation is AutoAttack (on the fp16 weights, or ZeRO-3's gathered ones)."""
    path = ds if isinstance(ds, str) else str(out_dir / f"{name}.json")
    if not isinstance(ds, str):
        out_dir.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(ds))
    info = train_short(name, DEMO, out_dir, AUTOATTACK_IN_TRAINING, optimizer_steps=optimizer_steps, ds_config=path)
    rows = [json.loads(line) for line in (Path(info["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("kind") == "step"]
    return {**info, "overflow_steps": steps[-1].get("overflow_steps") if steps else None,
            "loss_scale": steps[-1].get("loss_scale") if steps else None}


def autoattack_eval(run_dir: str, examples: int, out_dir: Path) -> dict[str, Any]:
    """``dat-ds eval --run RUN --attacks autoattack --max-examples N`` on this one rank."""
    from dat_ds.cli.args import eval_args_parser, eval_request
    from dat_ds.launch import evaluate

    request = eval_request(eval_args_parser().parse_args(["--run", run_dir, "--attacks", "autoattack", "--max-examples",
                                                          str(examples), "--out", str(out_dir)]))
    report = evaluate.main(request)  # the CLI's validation pass, then the evaluation
    r = report["results"][0]
    if r["count"] != examples:
        raise RuntimeError(f"AutoAttack evaluated {r['count']} examples, not {examples}")
    return {"attack": r["label"], "examples": r["count"], "robust_acc": r["robust_acc"], "attack_seconds": r["seconds"]}


def finetune_alf(encoder_run: str, examples: int) -> dict[str, Any]:
    from dat_ds.evaluation.finetune import FinetuneSettings, encoder_from_run, finetune

    cfg, encoder, spec = encoder_from_run(encoder_run)
    settings = FinetuneSettings(mode="alf", epochs=1, train_subset=512, eval_examples=examples, attack_steps=2,
                                eval_steps=5)
    result = finetune(cfg, encoder, spec, settings)
    return {k: result.get(k) for k in ("clean_acc", "robust_acc", "train_examples", "train_seconds")}


def pseudo_label_pool(teacher_run: str, out: Path) -> dict[str, Any]:
    from dat_ds.evaluation.loading import load_run
    from dat_ds.evaluation.pseudo_label import pseudo_label

    loaded = load_run(teacher_run)  # the one run loader; pseudo_label moves the model to the accelerator
    data = pseudo_label(loaded.model, "embedded:train[1000:]", out, teacher=f"run:{teacher_run}")
    return {"images": len(data), **{k: data.meta.get(k) for k in ("mean_confidence", "pseudo_label_accuracy")}}


# ----------------------------------------------------------------------------- the command


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget-s", type=float, default=450, help="skip the remaining checks after this (default 450)")
    p.add_argument("--bench-steps", type=int, default=20, help="timed steps of each samples/s launch (default 20)")
    p.add_argument("--bench-micro", type=int, default=128, help="batch of the samples/s launches (default 128)")
    p.add_argument("--bench-repeats", type=int, default=2, help="launches per arm, alternating (default 2)")
    p.add_argument("--attack-images", type=int, default=16, help="images each bf16 attack perturbs (default 16)")
    p.add_argument("--eval-examples", type=int, default=200, help="images AutoAttack evaluates (default 200)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    require_cuda()  # before anything is started or written
    t0 = time.perf_counter()
    checks = Checks(args.budget_s)
    with tempfile.TemporaryDirectory(prefix="dat-ds-gpu-smoke-") as tmp:
        runs = Path(tmp) / "runs"
        # Launched ranks first: this process then owns the CUDA device alone for the in-process checks.
        checks.run("speed", lambda: speed(args.bench_steps, args.bench_micro, args.bench_repeats))
        for path in sorted((REPO / "ds_configs").glob("*.json")):
            checks.run(f"ds_config {path.stem}", ds_config_check(path, runs))
        checks.run("attacks bf16", lambda: attacks_16bit(args.attack_images, "bfloat16"))
        checks.run("attacks fp16", lambda: attacks_16bit(args.attack_images, "float16"))
        checks.run("train fp16 + autoattack", lambda: train_with_autoattack("fp16", FP16_ZERO1, runs, 8))
        checks.run("train zero3 + autoattack", lambda: train_with_autoattack(
            "zero3_aa", str(REPO / "ds_configs" / "zero3_bf16.json"), runs, 2))
        teacher = str(runs / "zero0_fp32")
        if checks.results.get("ds_config zero0_fp32", {}).get("status") == "ok":
            checks.run("eval autoattack", lambda: autoattack_eval(teacher, args.eval_examples, Path(tmp) / "eval"))
            checks.run("pseudo-label", lambda: pseudo_label_pool(teacher, Path(tmp) / "pseudo.npz"))
        pretrain = checks.run("pretrain acl", lambda: train_short("acl", ACL, runs, []))
        if pretrain is not None:
            checks.run("finetune alf", lambda: finetune_alf(pretrain["run_dir"], args.eval_examples))
    for name in ("eval autoattack", "pseudo-label", "finetune alf"):
        checks.results.setdefault(name, {"status": "skipped", "why": "the run it needs failed"})
    results = checks.results
    configs = {k: v for k, v in results.items() if k.startswith("ds_config ")}
    from dat_ds.core import dist

    out = {"device": dist.accelerator().device_name(), "device_name": _device_name(),
           "seconds": time.perf_counter() - t0, "checks": results,
           "bf16_ok": any(v.get("precision") == "bf16" and v["status"] == "ok" for v in configs.values()),
           "zero3_ok": any(v.get("zero_stage") == 3 and v["status"] == "ok" for v in configs.values()),
           "failed": [k for k, v in results.items() if v["status"] == "failed"],
           "goal": "no check fails; total <= 480 s"}
    out["goal_met"] = not out["failed"] and out["seconds"] <= 480
    path = write_result(args.out, "gpu_smoke", out)
    rows = [[name, r["status"], r.get("seconds"), _detail(r)] for name, r in results.items()]
    show_table(f"bench gpu-smoke on {out['device_name']}: {out['seconds']:.0f} s", ["check", "status", "seconds",
                                                                                   "detail"], rows)
    speed_result = results.get("speed", {})
    if speed_result.get("status") == "ok":
        show_table("DAT-PGD-10, PreActResNet-18, 32x32: samples/s", ["arm", "samples/s"],
                   [[k, v] for k, v in speed_result["samples_per_s"].items()] +
                   [["dat-ds / plain", speed_result["dat_ds_over_plain"]]])
    log.info("wrote %s", path)
    return out


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"


def _detail(r: dict[str, Any]) -> str:
    if r["status"] == "failed":
        return r["error"][:120]
    if r["status"] == "skipped":
        return r["why"][:120]
    keys = ("precision", "zero_stage", "train_loss", "robust_acc", "overflow_steps", "loss_scale", "dat_ds_over_plain",
            "images", "examples")
    return ", ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in keys if k in r)
