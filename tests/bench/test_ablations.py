"""``dat-ds bench ablations`` (issue 15): the paired statistics, the worst-case scoring, the variants' configs.

The statistics and the scoring are pure functions tested on made-up numbers; the benchmark itself runs end
to end on a tiny size (slow: it starts ``dat-ds train`` and ``dat-ds eval`` ranks several times).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import pytest

from benchmarks import ablations as ab
from dat_ds.core.config import build_config
from dat_ds.core.errors import ConfigError
from tests.helpers import harness_defaults


@pytest.fixture
def bench_args():
    return harness_defaults(ab)


def test_t_quantiles_are_students_and_never_narrower_between_table_entries():
    assert ab.t95(2) == pytest.approx(4.303) and ab.t95(1) == pytest.approx(12.706)
    assert ab.t95(12) == ab.t95(10)  # not in the table: the smaller dof's, a wider interval
    assert ab.t95(1000) == 1.96 and math.isinf(ab.t95(0))


def test_paired_effect_is_the_mean_difference_per_seed_with_its_t_interval():
    base = {0: 0.60, 1: 0.62, 2: 0.58}
    better = {0: 0.65, 1: 0.66, 2: 0.64}  # +0.05, +0.04, +0.06: consistent, helped
    e = ab.paired_effect(better, base)
    assert e["seeds"] == [0, 1, 2] and e["diff"] == pytest.approx(0.05)
    se = statistics.stdev([0.05, 0.04, 0.06]) / math.sqrt(3)
    assert e["se"] == pytest.approx(se) and e["ci95"] == pytest.approx([0.05 - 4.303 * se, 0.05 + 4.303 * se])
    assert e["verdict"] == "helped"
    assert ab.paired_effect({0: 0.55, 1: 0.57, 2: 0.52}, base)["verdict"] == "hurt"
    noisy = ab.paired_effect({0: 0.66, 1: 0.60, 2: 0.59}, base)  # +0.06, -0.02, +0.01
    assert noisy["verdict"] == "no clear effect" and noisy["ci95"][0] < 0 < noisy["ci95"][1]
    # pairs only: a seed the baseline lacks is not compared; one pair gives no interval
    assert ab.paired_effect({0: 0.7, 5: 0.9}, base)["verdict"] == "one seed: no interval"
    assert ab.paired_effect({7: 0.7}, base)["verdict"] == "not measured"


def test_worst_case_counts_an_image_robust_only_if_no_attack_fooled_it():
    report = {"count": 4, "clean_acc": 1.0, "results": [
        {"attack": "apgd-ce", "label": "APGD-CE@0.1", "robust_acc": 0.75, "correct": "1110"},
        {"attack": "apgd-dlr", "label": "APGD-DLR@0.1", "robust_acc": 0.75, "correct": "0111"},
        {"attack": "pgd", "label": "PGD-20@0.1", "robust_acc": 0.0, "correct": "0000"}]}  # not one of ATTACKS
    out = ab.worst_case(report)
    assert out["robust_acc"] == 0.5 and out["per_attack"] == {"APGD-CE@0.1": 0.75, "APGD-DLR@0.1": 0.75}
    with pytest.raises(RuntimeError, match="no apgd-dlr row"):
        ab.worst_case({**report, "results": report["results"][:1]})
    short = [{**report["results"][0], "correct": "111"}, report["results"][1]]
    with pytest.raises(RuntimeError, match="different images"):
        ab.worst_case({**report, "results": short})


def test_summary_pairs_every_variant_with_the_baseline_of_the_same_seed():
    def score(clean, robust):
        return {"clean_acc": clean, "robust_acc": robust, "pgd20_acc": robust + 0.01, "train_seconds": 10.0}

    scores = {"trades": {0: score(0.8, 0.60), 1: score(0.8, 0.62), 2: score(0.8, 0.58)},
              "ema": {0: score(0.81, 0.65), 1: score(0.82, 0.66), 2: score(0.80, 0.64)}}
    s = ab.summarize(scores)
    assert s["trades"]["robust_acc"] == pytest.approx(0.60) and "robust_effect" not in s["trades"]
    assert s["ema"]["robust_effect"]["diff"] == pytest.approx(0.05) and s["ema"]["robust_effect"]["verdict"] == "helped"
    assert s["ema"]["clean_effect"]["diff"] == pytest.approx(0.01)
    assert s["ema"]["robust_acc_se"] == pytest.approx(statistics.stdev([0.65, 0.66, 0.64]) / math.sqrt(3))


def test_variants_and_seeds_are_checked_and_the_baseline_always_runs():
    assert ab.selected("ema,ema,awp", ab.VARIANTS, "variant") == ["trades", "ema", "awp"]
    with pytest.raises(ConfigError, match="unknown variant 'swa'"):
        ab.selected("swa", ab.VARIANTS, "variant")
    assert ab.parse_seeds("2, 0,2") == [2, 0]
    for bad in ("a,b", ",", ""):
        with pytest.raises(ConfigError, match="--seeds"):
            ab.parse_seeds(bad)


@pytest.mark.parametrize("name", list(ab.VARIANTS))
def test_every_variant_is_the_baseline_plus_exactly_its_option(name, tmp_path, bench_args):
    def config(variant):
        argv = ab.train_argv(variant, 3, bench_args, tmp_path)
        return build_config(ab.BASE_RECIPE, argv[argv.index("--overwrite") + 1:][1::2])

    cfg, base = config(name), config(ab.BASELINE)
    assert cfg.seed == 3 and cfg.objective.name == "trades" and cfg.attack.steps == 5
    assert cfg.eval.every_epochs == bench_args.epochs  # scored once, at the end
    changed = {k for k in ("ema", "awp") if getattr(cfg, k) != getattr(base, k)}
    changed |= {f"objective.{k}" for k in ("label_smoothing", "cutmix", "consistency")
                if getattr(cfg.objective, k) != getattr(base.objective, k)}
    expected = {"trades": set(), "ema": {"ema"}, "awp": {"awp"}, "label_smoothing": {"objective.label_smoothing"},
                "cutmix": {"objective.cutmix"}, "consistency": {"objective.consistency"},
                "sota": {"ema", "awp", "objective.label_smoothing"}}[name]
    assert changed == expected


def test_every_variant_passes_the_start_up_validation_for_two_ranks(tmp_path, bench_args):
    from dat_ds import cli as dat_cli

    for name in ab.VARIANTS:
        assert dat_cli.main(["train", *ab.train_argv(name, 0, bench_args, tmp_path), "--nproc", "2", "--dry-run"]) == 0
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_reuse_takes_only_an_evaluation_with_the_same_attacks_iterations_and_images(tmp_path, bench_args):
    row = {"attack": "apgd-ce", "steps": None, "restarts": 1, "extra": {}}  # as dat-ds eval writes it: 100 iterations
    report = {"count": bench_args.eval_examples, "results": [row, {**row, "attack": "apgd-dlr"}]}
    path = tmp_path / "eval.json"
    assert ab.usable_eval(path, bench_args) is None
    path.write_text(json.dumps(report))
    assert ab.usable_eval(path, bench_args) == report
    fewer = {**row, "attack": "apgd-dlr", "extra": {"apgd_steps": 10}}
    for changed in ({"count": 500}, {"results": [row]}, {"results": [row, fewer]},
                    {"results": [row, {**row, "attack": "apgd-dlr", "restarts": 3}]}):
        path.write_text(json.dumps({**report, **changed}))
        assert ab.usable_eval(path, bench_args) is None, changed


@pytest.mark.slow
def test_bench_ablations_end_to_end_tiny(tmp_path):
    """Two variants x two seeds, one epoch of 256 images, one rank, APGD with 5 iterations on 32 images."""
    from benchmarks import get_bench

    bench = get_bench("ablations")
    p = argparse.ArgumentParser()
    bench.add_args(p)
    args = p.parse_args(["--out", str(tmp_path / "out"), "--epochs", "1", "--seeds", "0,1", "--variants", "ema",
                         "--train-examples", "256", "--eval-examples", "32", "--apgd-steps", "5", "--nproc", "1",
                         "--runs-dir", str(tmp_path / "runs")])
    bench.run(args)
    data = json.loads((tmp_path / "out" / "ablations.json").read_text())
    assert data["benchmark"] == "ablations" and set(data["summary"]) == {"trades", "ema"}
    assert "not AutoAttack" in data["robust_attack"]
    for variant, per_seed in data["scores"].items():
        assert set(per_seed) == {"0", "1"}
        for r in per_seed.values():
            assert r["count"] == 32 and r["robust_acc"] <= min(r["per_attack"].values()) + 1e-9
            assert r["weights"] == ("ema" if variant == "ema" else "raw")
    assert data["scores"]["trades"]["0"] != data["scores"]["trades"]["1"]  # the seed changes the run
    assert data["summary"]["ema"]["robust_effect"]["seeds"] == [0, 1]
    assert (tmp_path / "out" / "ablations.png").stat().st_size > 1000
