"""``dat-ds bench time-to-robust``: the methods it measures, its judgement, its reuse of earlier runs.

The judgement is tested as pure functions on made-up curves; the benchmark itself runs end to end on a
tiny size (slow: it starts ``dat-ds train`` and ``dat-ds eval`` ranks several times).
"""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import time_to_robust as ttr
from dat_ds.core.config import build_config, replace
from dat_ds.core.errors import ConfigError
from tests.helpers import REPO, harness_defaults

RECIPES = REPO / "dat_ds" / "recipes"


# ----------------------------------------------------------------------------- the methods


def test_demo_fast_is_a_method_the_bench_measures():
    """demo_fast.yaml trains what ``bench time-to-robust`` measured for one of its methods, nothing else."""
    fast = build_config(RECIPES / "demo_fast.yaml")
    demo = build_config(RECIPES / "demo.yaml")
    assert (fast.data, fast.model, fast.train.epochs, fast.attack.eps) == (demo.data, demo.model, demo.train.epochs,
                                                                         demo.attack.eps)
    assert fast.monitor.every_steps > 0  # a single-step method: watch for catastrophic overfitting
    matches = []
    for name, method in ttr.METHODS.items():
        as_benched = build_config(RECIPES / "demo.yaml", list(method.overrides))
        if (as_benched.attack, as_benched.objective, as_benched.optim) == (fast.attack, fast.objective, fast.optim):
            matches.append(name)
    assert matches == ["nfgsm_onecycle"]  # measured: fastest to train, AutoAttack = the DAT-PGD-5 demo's


# ----------------------------------------------------------------------------- the judgement


def _curve(points):
    """(seconds, PGD-20) per epoch -> the bench's curve rows; seconds cumulative."""
    return [{"epoch": e, "train_seconds": s, "robust_acc": r} for e, (s, r) in enumerate(points, start=1)]


def test_next_epoch_to_score_skips_epochs_below_the_target_and_stops_at_the_first_pass():
    curve = _curve([(10, 0.40), (20, 0.62), (30, 0.66), (40, 0.70)])
    target = 0.60
    # the final epoch's AutoAttack 0.69 is 1 pp under its PGD-20: epoch 1 (0.40 - 0.01) cannot pass, epoch 2 may
    assert ttr.next_epoch_to_score(curve, {4: 0.69}, target) == 2
    assert ttr.next_epoch_to_score(curve, {4: 0.69, 2: 0.59}, target) == 3  # epoch 2 failed under AA
    assert ttr.next_epoch_to_score(curve, {4: 0.69, 2: 0.59, 3: 0.61}, target) is None  # found: epoch 3
    assert ttr.next_epoch_to_score(curve, {4: 0.69, 2: 0.61}, target) is None
    assert ttr.next_epoch_to_score(_curve([(10, 0.5), (20, 0.55)]), {2: 0.5}, target) is None  # never reaches it


def test_next_epoch_to_score_predicts_autoattack_from_the_smallest_gap_seen():
    """An earlier epoch is scored only if its PGD-20 minus the method's smallest PGD-20 - AA gap reaches the target."""
    curve = _curve([(10, 0.62), (20, 0.64), (30, 0.66), (40, 0.68)])
    target = 0.60
    assert ttr.next_epoch_to_score(curve, {4: 0.63}, target) == 3  # gap 0.05: epochs 1 and 2 predicted below
    assert ttr.next_epoch_to_score(curve, {4: 0.63, 3: 0.59}, target) is None  # gap stays 0.05 (min of 0.05, 0.07)
    assert ttr.next_epoch_to_score(curve, {4: 0.67}, target) == 1  # gap 0.01: every epoch may pass
    # AutoAttack above PGD-20 (reported as aa_above_pgd20) never lowers the bar below PGD-20 itself
    assert ttr.next_epoch_to_score(_curve([(10, 0.59), (20, 0.61)]), {2: 0.62}, target) is None


def test_judge_ratios_come_from_autoattack_scored_epochs_only():
    curves = {
        "pgd10": _curve([(100, 0.50), (200, 0.60), (300, 0.65)]),
        "fast": _curve([(20, 0.55), (40, 0.66), (60, 0.67)]),  # PGD-20 says epoch 2; AutoAttack says epoch 3
        "masked": _curve([(15, 0.90), (30, 0.95), (45, 0.97)]),  # PGD-20 looks great, AutoAttack does not
        "slow": _curve([(150, 0.5), (300, 0.6), (450, 0.645)]),
    }
    autoattack = {"pgd10": {3: 0.63}, "fast": {2: 0.615, 3: 0.625}, "masked": {1: 0.1, 2: 0.1, 3: 0.2},
                  "slow": {3: 0.621}}
    j = ttr.judge(curves, autoattack)
    assert j["reference_final_autoattack"] == 0.63 and j["target_autoattack"] == pytest.approx(0.62)
    assert j["reference_train_seconds"] == 300
    m = j["methods"]
    assert m["pgd10"]["ratio_to_reference"] == 1.0 and m["pgd10"]["epoch_to_target"] == 3
    assert (m["fast"]["epoch_to_target"], m["fast"]["seconds_to_target"]) == (3, 60)
    assert m["fast"]["ratio_to_reference"] == pytest.approx(0.2)
    assert m["masked"]["seconds_to_target"] is None and m["masked"]["ratio_to_reference"] is None
    assert m["slow"]["ratio_to_reference"] == pytest.approx(1.5)
    assert m["fast"]["scored_epochs"] == [2, 3]


def _score(epoch, aa, pgd50, sanity=True):
    return {"epoch": epoch, "tag": f"epoch{epoch - 1:04d}", "count": 100, "clean_acc": 0.8, "autoattack_acc": aa,
            "autoattack_label": "AutoAttack@0.1", "autoattack_seconds": 1.0, "pgd50x5_acc": pgd50,
            "pgd50x5_label": "PGD-50x5@0.1", "sanity_pass": sanity, "sanity": [], "eval_seconds": 1.0}


def _curve_rows(points):
    return [{**p, "monitor_seconds": 0.0, "optimizer_steps": 10 * p["epoch"], "clean_acc": 0.8,
             "robust_attack": "PGD-20@0.1", "monitor_min_pgd_acc": 0.5, "monitor_max_gap": 0.05,
             "monitor_overfit": False} for p in _curve(points)]


@pytest.fixture
def bench_args():
    return harness_defaults(ttr)


def test_the_winner_needs_pgd50_and_sanity_to_hold_at_the_target_checkpoint(bench_args):
    args = bench_args
    curves = {"pgd10": _curve_rows([(100, 0.6), (200, 0.66)]), "nfgsm": _curve_rows([(20, 0.66), (40, 0.67)]),
              "fgsm_rs": _curve_rows([(15, 0.66), (30, 0.67)]), "pgd5": _curve_rows([(50, 0.66), (99, 0.67)])}
    scores = {"pgd10": {2: _score(2, 0.64, 0.65)},
              "nfgsm": {1: _score(1, 0.635, 0.64), 2: _score(2, 0.64, 0.65)},
              "fgsm_rs": {1: _score(1, 0.64, 0.65, sanity=False), 2: _score(2, 0.64, 0.65, sanity=False)},
              "pgd5": {1: _score(1, 0.64, 0.62), 2: _score(2, 0.64, 0.65)}}
    out = ttr.build_result(curves, scores, args)
    s = out["summary"]
    assert out["judgement"]["target_autoattack"] == pytest.approx(0.63)
    assert s["fgsm_rs"]["ratio_to_reference"] == pytest.approx(0.075) and s["fgsm_rs"]["sanity_at_target"] is False
    assert s["pgd5"]["pgd50x5_at_target"] == 0.62  # PGD-50 x 5 below the target at epoch 1: not a win
    assert s["nfgsm"]["ratio_to_reference"] == pytest.approx(0.1)
    assert out["winner"] == "nfgsm" and out["goal_met"] is True
    assert s["nfgsm"]["aa_above_pgd20"] == []
    json.dumps(out)  # the JSON the bench writes


def test_summarize_report_refuses_a_weakened_autoattack():
    row = {"attack": "autoattack", "label": "AutoAttack-n_queries20@0.1", "eps": 0.1, "steps": None, "restarts": 1,
           "extra": {"n_queries": 20}, "robust_acc": 0.7, "seconds": 1.0}
    pgd = {"attack": "pgd", "label": "PGD-50x5@0.1", "eps": 0.1, "steps": 50, "restarts": 5, "extra": {},
           "robust_acc": 0.7, "seconds": 1.0}
    report = {"results": [row, pgd], "count": 10, "clean_acc": 0.9, "sanity": [], "seconds": 2.0}
    with pytest.raises(RuntimeError, match="standard AutoAttack"):
        ttr.summarize_report(report, 1, "epoch0001")
    report["results"][0] = {**row, "label": "AutoAttack@0.1", "extra": {}}
    out = ttr.summarize_report(report, 1, "epoch0001")
    assert (out["autoattack_acc"], out["pgd50x5_acc"], out["sanity_pass"]) == (0.7, 0.7, False)  # no checks: no pass


def test_reuse_takes_only_a_finished_run_of_the_same_config(tmp_path, bench_args):
    """--reuse (finishing an interrupted bench): a run folder counts only with this argv's config, all epochs."""
    argv = ttr.train_argv("nfgsm", ttr.METHODS["nfgsm"], bench_args, tmp_path)
    run = tmp_path / "nfgsm"
    assert not ttr.finished_run(run, argv, bench_args.epochs)  # nothing there
    cfg = build_config(ttr.BASE_RECIPE, argv[argv.index("--overwrite") + 1:][1::2],
                       flags={"name": "nfgsm", "output_dir": str(tmp_path), "train": {"epochs": bench_args.epochs}})
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "summary.json").write_text(json.dumps({"history": [{"epoch": e} for e in range(1, 7)]}))
    assert ttr.finished_run(run, argv, 6)
    assert not ttr.finished_run(run, argv, 7)  # stopped early
    (run / "config.yaml").write_text(replace(cfg, dist=replace(cfg.dist, timeout_s=120.0)).to_yaml())
    assert ttr.finished_run(run, argv, 6)  # how long a collective waits for a dead peer: not a different run
    other = ttr.train_argv("nfgsm", ttr.METHODS["nfgsm"], argparse.Namespace(**{**vars(bench_args), "eps": 0.2}),
                           tmp_path)
    assert not ttr.finished_run(run, other, 6)  # another eps: another run


def test_reuse_takes_only_an_evaluation_of_the_same_attacks_on_the_same_images(tmp_path, bench_args):
    aa = {"attack": "autoattack", "label": "AutoAttack@0.1", "eps": 0.1, "steps": None, "restarts": 1, "extra": {},
          "robust_acc": 0.6, "seconds": 1.0}
    pgd = {"attack": "pgd", "label": "PGD-50x5@0.1", "eps": 0.1, "steps": 50, "restarts": 5, "extra": {},
           "robust_acc": 0.62, "seconds": 1.0}
    check = {"name": "pgd_steps", "status": "pass"}
    path = tmp_path / "eval.json"
    assert ttr.reusable_eval(path, bench_args) is None
    report = {"results": [aa, pgd], "count": bench_args.eval_examples, "clean_acc": 0.8, "sanity": [check],
              "seconds": 9.0}
    path.write_text(json.dumps(report))
    done = ttr.summarize_report(ttr.reusable_eval(path, bench_args), 6, "epoch0006")
    assert (done["autoattack_acc"], done["pgd50x5_acc"], done["sanity_pass"]) == (0.6, 0.62, True)
    for changed in ({"count": 500}, {"sanity": []}, {"results": [aa]},
                    {"results": [{**aa, "label": "AutoAttack-n_queries20@0.1", "extra": {"n_queries": 20}}, pgd]}):
        path.write_text(json.dumps({**report, **changed}))
        assert ttr.reusable_eval(path, bench_args) is None, changed
    # the archive under --out (what a retrained run on a fresh machine can reuse): only for the same weights
    kept = tmp_path / "kept.json"
    assert ttr.archived_eval(kept, "ab" * 32, bench_args) is None
    kept.write_text(json.dumps({"method": "nfgsm", "tag": "epoch0006", "weights_sha256": "ab" * 32, "eval": report}))
    assert ttr.archived_eval(kept, "ab" * 32, bench_args) == report
    assert ttr.archived_eval(kept, "cd" * 32, bench_args) is None  # other weights: evaluate again
    kept.write_text(json.dumps({"weights_sha256": "ab" * 32, "eval": {**report, "count": 500}}))
    assert ttr.archived_eval(kept, "ab" * 32, bench_args) is None  # same weights, other images


def test_weights_sha256_tells_bit_identical_weights_apart(tmp_path):
    """The archive's key: equal for the same weights, different after one bit of one weight changes."""
    import torch

    from dat_ds.data import build_dataset
    from dat_ds.evaluation.loading import MODEL_STATES, trained_model
    from dat_ds.runtime.checkpoint import COMPLETE

    run = tmp_path / "run"
    cfg = build_config(ttr.BASE_RECIPE, ["train.epochs=1"], flags={"name": "run", "output_dir": str(tmp_path)})
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    model = trained_model(cfg, build_dataset(cfg.data, "test")[1])
    tag_dir = run / "checkpoint" / "epoch0001"
    tag_dir.mkdir(parents=True)

    def save(state):  # a checkpoint as dat-ds commits one: the model states, then complete.json with their size
        torch.save({"module": state, "global_step": 1}, tag_dir / MODEL_STATES)
        size = (tag_dir / MODEL_STATES).stat().st_size
        (tag_dir / COMPLETE).write_text(json.dumps({"global_step": 1, "files": {MODEL_STATES: size}}))

    state = {k: v.clone() for k, v in model.state_dict().items()}
    save(state)
    first = ttr.weights_sha256(run, "epoch0001")
    assert first == ttr.weights_sha256(run, "epoch0001") and len(first) == 64
    key = next(k for k, v in state.items() if v.is_floating_point())
    flat = state[key].view(-1)
    flat[0] = torch.nextafter(flat[0], flat[0] + 1)  # one ulp
    save(state)
    assert ttr.weights_sha256(run, "epoch0001") != first


def test_methods_always_include_the_reference_and_refuse_unknown_names():
    assert ttr.selected_methods("nfgsm,pgd10,nfgsm") == ["pgd10", "nfgsm"]
    assert set(ttr.METHODS) == {"pgd10", "pgd5", "fgsm_rs", "nfgsm", "free", "atta_pgd2", "nfgsm_onecycle"}
    with pytest.raises(ConfigError, match="unknown method 'pgd7'"):
        ttr.selected_methods("pgd7")


@pytest.mark.parametrize("name", list(ttr.METHODS))
def test_every_bench_method_passes_the_start_up_validation_for_two_ranks(name, tmp_path, bench_args):
    from dat_ds import cli as dat_cli

    argv = ttr.train_argv(name, ttr.METHODS[name], bench_args, tmp_path)
    assert dat_cli.main(["train", *argv, "--nproc", "2", "--dry-run"]) == 0
    cfg = build_config(ttr.BASE_RECIPE, argv[argv.index("--overwrite") + 1:][1::2])
    assert cfg.train.keep_last == bench_args.epochs and cfg.monitor.every_steps == 40 and cfg.eval.every_epochs == 1


@pytest.mark.slow
def test_bench_time_to_robust_end_to_end_tiny(tmp_path):
    """Two methods, 2 epochs of 256 images, one rank, AutoAttack cut to 2 iterations (--quick-eval) on 32 images.

    Standard AutoAttack costs minutes per batch of 256 on this CPU whatever the batch holds (Square's 5,000
    queries run one after another), which is what the real measurement pays."""
    from benchmarks import get_bench

    bench = get_bench("time-to-robust")
    p = argparse.ArgumentParser()
    bench.add_args(p)
    args = p.parse_args(["--out", str(tmp_path / "out"), "--epochs", "2", "--eval-examples", "32", "--methods",
                         "pgd10,nfgsm", "--nproc", "1", "--train-examples", "256", "--monitor-every", "2",
                         "--runs-dir", str(tmp_path / "runs"), "--quick-eval"])
    bench.run(args)
    data = json.loads((tmp_path / "out" / "time_to_robust.json").read_text())
    assert data["benchmark"] == "time_to_robust" and "machine" in data
    assert set(data["summary"]) == {"pgd10", "nfgsm"} and data["judgement"]["reference"] == "pgd10"
    for name, curve in data["curves"].items():
        assert [c["epoch"] for c in curve] == [1, 2]
        assert all(c["robust_attack"] == "PGD-20@0.1" and c["train_seconds"] > 0 for c in curve)
        assert curve[1]["train_seconds"] > curve[0]["train_seconds"]
        assert all(c["monitor_max_gap"] is not None for c in curve)  # the monitor ran every epoch
        final = data["scores"][name]["2"]
        assert final["count"] == 32 and final["autoattack_label"] == "AutoAttack-aa_steps2-n_queries20@0.1"
        assert final["pgd50x5_label"] == "PGD-50x5@0.1" and len(final["sanity"]) >= 5
        assert final["autoattack_acc"] <= final["pgd50x5_acc"] + 1e-9
    assert data["autoattack_standard"] is False and data["goal_met"] is False  # --quick-eval never passes
    assert data["judge"].startswith("NOT STANDARD AutoAttack")
    ref = data["summary"]["pgd10"]
    assert ref["ratio_to_reference"] == 1.0
    assert data["judgement"]["target_autoattack"] == pytest.approx(ref["final_autoattack"] - 0.01)
    assert (tmp_path / "out" / "time_to_robust.png").stat().st_size > 1000
    assert (tmp_path / "runs" / "nfgsm" / "checkpoint" / "epoch0001").is_dir()  # keep_last kept every epoch
    kept = json.loads((tmp_path / "out" / ttr.ARCHIVE / "nfgsm" / "eval-epoch0002.json").read_text())
    assert kept["weights_sha256"] == ttr.weights_sha256(tmp_path / "runs" / "nfgsm", "epoch0002")
    assert kept["eval"]["count"] == 32 and kept["tag"] == "epoch0002"  # every scored eval.json, kept under --out
