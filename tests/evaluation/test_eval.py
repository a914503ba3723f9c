"""`dat-ds eval`: argument parsing, checkpoint loading, sanity checks, and exact 1-rank == 2-rank results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dat_ds.attacks import STANDARD_STAGES, AttackSpec
from dat_ds.core import dist
from dat_ds.core.config import parse_eps
from dat_ds.core.errors import ConfigError
from dat_ds.evaluation import run as eval_run
from dat_ds.evaluation import sanity
from dat_ds.evaluation.evaluate import evaluate
from dat_ds.launch.validate import check_eval_request
from tests.helpers import eval_args

EVAL_FLAGS = ["--attacks", "pgd,fgsm,apgd-ce", "--eps", "0.05,0.1", "--steps", "3", "--apgd-steps", "3",
              "--max-examples", "80", "--batch-size", "16", "--threads", "1"]


def test_parse_eps_accepts_fractions():
    assert parse_eps("8/255, 0.1") == [8 / 255, 0.1]
    with pytest.raises(ConfigError, match="not a finite number"):
        parse_eps("eight")
    for text in ("inf", "0.1,nan", "1/0"):  # non-finite radii were accepted (and attacked with) before
        with pytest.raises(ConfigError, match=r"--eps item .* is not a finite number; use e.g. --eps 0.1,8/255"):
            parse_eps(text)
    with pytest.raises(ConfigError, match="empty"):
        parse_eps(",")


def test_check_args_one_line_errors():
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        check_eval_request(eval_args())
    with pytest.raises(ConfigError, match="--model"):
        check_eval_request(eval_args("--weights", "w.pt"))
    with pytest.raises(ConfigError, match="above 1"):
        check_eval_request(eval_args("--weights", "w.pt", "--model", "small_cnn", "--eps", "8"))


def test_build_specs_labels_are_unique():
    specs = eval_run.build_specs(eval_args("--attacks", "pgd,fgsm,autoattack,square", "--restarts", "2"), [0.1, 8 / 255])
    labels = [s.label for s in specs]
    assert len(set(labels)) == len(labels) == 8
    assert "PGD-20x2@0.1" in labels and "AutoAttack@0.03137" in labels
    with pytest.raises(ConfigError, match="unknown attack"):
        eval_run.build_specs(eval_args("--attacks", "pgdd"), [0.1])
    # Each flag reaches the attacks that take it; the attack's own default otherwise.
    specs = eval_run.build_specs(eval_args("--attacks", "pgd,autoattack,square", "--steps", "7", "--aa-steps", "3"), [0.1])
    assert [s.label for s in specs] == ["PGD-7@0.1", "AutoAttack-aa_steps3@0.1", "Square@0.1"]
    assert [s.kwargs(None).keys() - {"eps", "generator"} for s in specs] == [{"steps"}, {"aa_steps"}, set()]


@pytest.mark.parametrize("argv,message", [
    (["--attacks", "square", "--restarts", "5"],
     "--restarts 5 does not apply to --attacks square: square takes eps, norm, n_queries"),
    (["--attacks", "autoattack", "--steps", "10"],
     "--steps 10 does not apply to --attacks autoattack: autoattack takes eps, norm, n_classes, aa_steps, n_queries"),
    (["--attacks", "fgsm,square", "--loss", "margin", "--restarts", "2"],
     "--restarts 2 does not apply to --attacks fgsm,square: fgsm takes"),
    (["--attacks", "pgd", "--aa-queries", "10"],
     "--aa-queries 10 does not apply to --attacks pgd (it is for autoattack): pgd takes"),
])
def test_flags_an_attack_does_not_take_are_refused(argv, message):
    """Before any model loads (main calls attack_options first) and as one line."""
    with pytest.raises(ConfigError) as e:
        eval_run.attack_options(eval_args(*argv))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    with pytest.raises(ConfigError):
        eval_run.main(eval_args(*argv, "--weights", "missing.pt", "--model", "small_cnn", "--eps", "0.1"))


def test_sanity_checks_flag_masking():
    plan = sanity.sanity_specs(0.1, in_chans=1, steps=20)
    good = {plan.base.label: 0.60, plan.more_steps.label: 0.59, plan.more_restarts.label: 0.595,
            plan.fgsm.label: 0.70, plan.black_box.label: 0.66, plan.big.label: 0.0}
    summary = {k: {"robust_acc": v} for k, v in good.items()}
    checks = sanity.run_checks(summary, plan, {"PGD-20": [(0.05, 0.7), (0.1, 0.6), (0.5, 0.0)]},
                               {plan.base.label: 0.60})
    assert all(c.status == "pass" for c in checks), checks
    masked = dict(good)
    masked.update({plan.fgsm.label: 0.9, plan.base.label: 0.2, plan.black_box.label: 0.1, plan.big.label: 0.4,
                   plan.more_steps.label: 0.3})
    summary = {k: {"robust_acc": v} for k, v in masked.items()}
    checks = sanity.run_checks(summary, plan, {"PGD-20": [(0.05, 0.1), (0.1, 0.2)]}, {plan.base.label: 0.2})
    warned = {c.check for c in checks if c.status == "warn"}
    assert {"PGD-20: falls with eps", "black box does not beat white box", "FGSM vs PGD",
            "more steps do not raise acc"} <= warned
    assert any(c.check.startswith("~0 at large eps") for c in checks if c.status == "warn")


def test_evaluate_shares_noise_across_specs(trained_demo_model):
    """Restarts in evaluate() start from plain PGD's noise, so they can only lower accuracy per example."""
    from dat_ds.core.config import DataConfig
    from dat_ds.data import build_dataset

    ds, _ = build_dataset(DataConfig(), "test")
    base, more = AttackSpec("pgd", eps=0.1, steps=3), AttackSpec("pgd", eps=0.1, steps=3, restarts=3)
    result = evaluate(trained_demo_model, ds, [base, more], batch_size=32, max_examples=96)
    r1, r3 = result.robust_correct[base.label], result.robust_correct[more.label]
    assert not (r3 & ~r1).any()
    assert result.count == 96 and result.clean_acc >= result.robust_acc(base.label) >= result.robust_acc(more.label)


def test_evaluate_shards_like_any_world_size(trained_demo_model, monkeypatch):
    """The per-rank DataLoader shards give each example the same batch and noise as one rank does:
    ranks 0 and 1 of a 2-rank world (run here one after the other) together equal the 1-rank result."""
    from dat_ds.core.config import DataConfig
    from dat_ds.data import build_dataset

    ds, _ = build_dataset(DataConfig(), "test")
    specs = [AttackSpec("pgd", eps=0.1, steps=2), AttackSpec("fgsm_rs", eps=0.1)]
    one = evaluate(trained_demo_model, ds, specs, batch_size=16, max_examples=72)  # 5 batches, the last one short
    payloads = []
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", lambda p: payloads.append(p) or [p])
    for rank in (0, 1):
        monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
        evaluate(trained_demo_model, ds, specs, batch_size=16, max_examples=72)
    idx = torch.cat([p[0] for p in payloads])
    assert sorted(idx.tolist()) == list(range(72)) and len(payloads[1][0]) == 32  # rank 1: batches 1, 3
    order = torch.argsort(idx)
    assert torch.equal(torch.cat([p[1] for p in payloads])[order], one.clean_correct)
    for s in specs:
        assert torch.equal(torch.cat([p[2][s.label] for p in payloads])[order], one.robust_correct[s.label])
    assert one.clean_acc > one.robust_acc(specs[0].label)


# Plumbing, not strength: 2 iterations, 5 Square queries. On ``weak_cnn`` APGD-CE breaks a third of the points.
TINY_AUTOATTACK = AttackSpec("autoattack", eps=0.05, extra={"aa_steps": 2, "n_queries": 5})


def assert_stages_consistent(stages: dict[str, float], clean_acc: float, robust_acc: float) -> None:
    """AutoAttack's accuracy after each stage: every stage reported, in order, never rising, below the clean
    accuracy after the first stage (it broke points), and ending at the attack's robust accuracy."""
    accs = list(stages.values())
    assert list(stages) == list(STANDARD_STAGES)
    assert clean_acc > accs[0] and all(a >= b for a, b in zip(accs, accs[1:])), (clean_acc, stages)
    assert accs[-1] == robust_acc


def test_autoattack_stages_gather_like_any_world_size(weak_cnn, monkeypatch):
    """AutoAttack's per-example outcome after each stage reaches ``EvalResult`` and is gathered like the other
    per-example tensors: the ranks of a 2-rank and of a 3-rank world (run one after the other; the last one
    gathers what all of them sent) give the 1-rank result. 2 batches: with 3 ranks, rank 2 has none."""
    from dat_ds.core.config import DataConfig
    from dat_ds.data import build_dataset

    ds, _ = build_dataset(DataConfig(), "test")
    specs = [AttackSpec("fgsm", eps=0.05), TINY_AUTOATTACK]
    one = evaluate(weak_cnn, ds, specs, batch_size=8, max_examples=16)
    aa = TINY_AUTOATTACK.label
    assert list(one.stage_correct) == [aa]  # FGSM is one attack: no stages
    assert one.stage_acc(specs[0].label) is None
    assert_stages_consistent(one.stage_acc(aa), one.clean_acc, one.robust_acc(aa))
    masks = list(one.stage_correct[aa].values())
    for earlier, later in zip(masks, masks[1:]):
        assert not (later & ~earlier).any()  # per example too: a broken point stays broken

    for world in (2, 3):
        payloads = []
        monkeypatch.setattr(dist, "world_size", lambda world=world: world)
        for rank in range(world):
            monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
            last = rank == world - 1
            monkeypatch.setattr(dist, "all_gather_object",
                                lambda p, last=last, payloads=payloads: payloads.append(p) or (payloads if last else [p]))
            merged = evaluate(weak_cnn, ds, specs, batch_size=8, max_examples=16)
        assert torch.equal(merged.indices, one.indices) and torch.equal(merged.robust_correct[aa], one.robust_correct[aa])
        assert merged.stage_correct.keys() == one.stage_correct.keys()
        for stage, correct in one.stage_correct[aa].items():
            assert torch.equal(merged.stage_correct[aa][stage], correct), (world, stage)
        assert merged.stage_acc(aa) == one.stage_acc(aa)


def test_eval_report_has_autoattack_stages(weak_cnn, monkeypatch):
    """eval.json's AutoAttack rows carry ``stages`` (robust accuracy after each one), other rows None, and the
    report prints them as the reference does: ``robust accuracy after APGD-CE: 54.69 % (35/64)``."""
    from dat_ds.core.config import DataConfig
    from dat_ds.data import build_dataset

    ds, _ = build_dataset(DataConfig(), "test")
    specs = [AttackSpec("pgd", eps=0.1, steps=2), TINY_AUTOATTACK]
    result = evaluate(weak_cnn, ds, specs, batch_size=8, max_examples=16)
    monkeypatch.setattr(eval_run, "provenance", lambda **kw: {})
    report = eval_run.build_report(result, specs, {}, eval_args(), None, 0.0)
    pgd_row, aa_row = report["results"]
    assert pgd_row["stages"] is None
    assert_stages_consistent(aa_row["stages"], report["clean_acc"], aa_row["robust_acc"])
    json.dumps(report)  # eval.json is written from it
    lines = eval_run.stage_lines(report)
    head = "AutoAttack-aa_steps2-n_queries5 at eps 0.05: "
    assert lines == [head + f"initial accuracy: {eval_run.percent(result.clean_acc, 16)}"] + [
        head + f"robust accuracy after {title}: {eval_run.percent(aa_row['stages'][stage], 16)}"
        for stage, title in STANDARD_STAGES.items()]
    assert "robust accuracy after APGD-CE: " in lines[1] and "/16)" in lines[1]


@pytest.fixture(scope="module")
def weights_file(trained_demo_model, tmp_path_factory) -> Path:
    """The trained demo model's backbone as a safetensors file, the way a timm user would hand it over."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "small_cnn.safetensors"
    save_file({k: v.contiguous() for k, v in trained_demo_model.backbone.state_dict().items()}, str(path))
    return path


@pytest.mark.dist
def test_two_ranks_equal_one_rank(cli, weights_file, tmp_path):
    """2-rank `dat-ds eval` gives per-example results identical to 1 rank (PGD, FGSM and APGD-CE)."""
    outs = {}
    for nproc in (1, 2):
        out = tmp_path / f"np{nproc}"
        cli("eval", "--weights", str(weights_file), "--model", "small_cnn", "--data", "fashion-mnist",
            *EVAL_FLAGS, "--nproc", str(nproc), "--out", str(out), check=True, timeout=600)
        outs[nproc] = json.loads((out / "eval.json").read_text())
        assert (out / "robust_acc_vs_eps.png").stat().st_size > 1000 and (out / "adv_examples.png").stat().st_size > 5000
    one, two = outs[1], outs[2]
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["count"] == two["count"] == 80
    assert one["clean_correct"] == two["clean_correct"]
    assert [r["label"] for r in one["results"]] == [r["label"] for r in two["results"]]
    for a, b in zip(one["results"], two["results"]):
        assert a["correct"] == b["correct"], a["label"]
        assert a["correct_sha256"] == b["correct_sha256"]
        assert a["robust_acc"] == b["robust_acc"] <= a["clean_acc"]
    assert one["per_class"] == two["per_class"]  # each class's clean and robust accuracy
    per_class = one["per_class"]
    assert sum(v["count"] for v in per_class.values()) == 80
    assert sum(v["count"] * v["clean_acc"] for v in per_class.values()) / 80 == pytest.approx(one["clean_acc"])
    for r in one["results"]:
        weighted = sum(v["count"] * v["robust_acc"][r["label"]] for v in per_class.values()) / 80
        assert weighted == pytest.approx(r["robust_acc"])


def test_eval_run_folder_end_to_end(cli, tmp_path):
    """Train 2 steps with `dat-ds train`, then `dat-ds eval --run` reads its DeepSpeed checkpoint, with --sanity."""
    train = cli("train", "--config", "recipes/demo.yaml", "--name", "tiny", "--output-dir", str(tmp_path), "--epochs",
                "1", "--set", "model.name=tiny_cnn", "--set", "train.max_steps_per_epoch=2", "--set",
                "eval.max_examples=16", "--set", "eval.steps=1", check=True, timeout=600)
    # Which input statistics the run normalises with, and where they came from: said once, by training and eval.
    said = "input normalisation (model.normalization=auto): mean ["
    assert (train.stdout + train.stderr).count(said) == 1
    run_dir = tmp_path / "tiny"
    proc = cli("eval", "--run", str(run_dir), "--attacks", "pgd,autoattack", "--eps", "0.05,0.1", "--steps", "2",
               "--aa-steps", "1", "--aa-queries", "5", "--square-queries", "5", "--max-examples", "32", "--sanity",
               "--per-class", check=True, timeout=600)
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["source"]["kind"] == "run" and report["source"]["tag"] == "epoch0001"
    labels = [r["label"] for r in report["results"]]
    # The sanity checks run at the first --eps (0.05), plus PGD at the large eps 0.5.
    assert {"PGD-2@0.05", "PGD-2@0.1", "PGD-10@0.05", "PGD-2x5@0.05", "FGSM@0.05", "Square-n_queries5@0.05",
            "PGD-2@0.5"} <= set(labels)
    checks = {c["check"]: c["status"] for c in report["sanity"]}
    assert "black box does not beat white box" in checks and "FGSM vs PGD" in checks
    assert "sanity" in proc.stdout + proc.stderr
    assert "input normalisation: mean [" in proc.stdout + proc.stderr and "(the data set's statistics)" in proc.stdout + proc.stderr
    assert "accuracy per class" in proc.stdout and "% (" in proc.stdout  # --per-class; accuracies with counts
    # AutoAttack's accuracy after each stage, in eval.json and printed as the reference prints it.
    aa_rows = [r for r in report["results"] if r["attack"] == "autoattack"]
    assert [r["eps"] for r in aa_rows] == [0.05, 0.1]
    for row in aa_rows:
        assert list(row["stages"]) == list(STANDARD_STAGES) and row["stages"]["square"] == row["robust_acc"]
        printed = f"at eps {row['eps']}: robust accuracy after APGD-CE: {eval_run.percent(row['stages']['apgd-ce'], 32)}"
        assert printed in proc.stdout + proc.stderr
    assert all(r["stages"] is None for r in report["results"] if r["attack"] != "autoattack")
    # The loaded weights are the trained ones: clean accuracy equals what the model gives in-process.
    from dat_ds.evaluation.loading import load_run

    loaded = load_run(run_dir)
    assert loaded.source["zero_stage"] == 0 and loaded.spec.num_classes == 10
    from dat_ds.data import build_dataset

    ds, _ = build_dataset(loaded.data_cfg, "test")
    x = torch.stack([ds[i][0] for i in range(32)])
    y = torch.tensor([int(ds[i][1]) for i in range(32)])
    with torch.no_grad():
        acc = float((loaded.model(x).argmax(1) == y).float().mean())
    assert acc == pytest.approx(report["clean_acc"])


def test_eval_cli_errors_are_one_line(cli, tmp_path):
    proc = cli("eval", "--run", str(tmp_path / "nope"))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]  # torch may print import warnings first
    assert last.startswith("error:") and "does not exist" in last


def test_accuracies_and_radii_read_as_papers_print_them():
    from dat_ds.evaluation.run import eps_text, percent

    assert percent(35 / 64, 64) == "54.69 % (35/64)" and percent(1.0, 200) == "100.00 % (200/200)"
    assert eps_text(8 / 255) == "8/255" and eps_text(0.1) == "0.1" and eps_text(0.0) == "0"


def test_one_eps_is_a_bar_per_attack(tmp_path, monkeypatch):
    """A single eps drew one dot per attack on a 0.096-0.104 axis; it is a bar chart now."""
    from dat_ds.evaluation import run

    drawn = {}
    monkeypatch.setattr(run, "save_bar_plot", lambda path, labels, values, **kw: drawn.update(labels=labels,
                                                                                               values=values, **kw))
    rows = [{"label": "PGD-20@0.03137", "eps": 8 / 255, "robust_acc": 0.5}, {"label": "AutoAttack@0.03137",
                                                                              "eps": 8 / 255, "robust_acc": 0.45}]
    run.plot_curves({"results": rows, "clean_acc": 0.8}, tmp_path / "p.png", "t")
    assert drawn["labels"] == ["PGD-20", "AutoAttack"] and drawn["values"] == [0.5, 0.45]
    assert drawn["hline"] == 0.8 and "8/255" in drawn["ylabel"]


def test_adversarial_examples_picture(tmp_path, embedded_test_tensors):
    from dat_ds.attacks import AttackSpec
    from dat_ds.evaluation.pictures import adversarial_grid
    from dat_ds.models import create_model

    x, y, spec = embedded_test_tensors
    model = create_model("tiny_cnn", spec)
    dataset = torch.utils.data.TensorDataset(x[:16], y[:16])
    adversarial_grid(model, dataset, AttackSpec("pgd", eps=0.1, steps=2), tmp_path / "adv.png", n=6,
                     classes=spec.classes)
    assert (tmp_path / "adv.png").stat().st_size > 5000
    assert model.training  # the attack ran in eval mode and gave the model back as it was
