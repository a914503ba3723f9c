"""`dat-ds eval --protocol robustbench`: standard AutoAttack, determinism check, RobustBench model_info fields."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from dat_ds.core.errors import ConfigError
from dat_ds.evaluation import run as eval_run
from dat_ds.launch.validate import check_eval_request
from tests.helpers import eval_args

# robustbench.utils.ModelInfo's fields: an entry must carry every one of them.
MODEL_INFO_FIELDS = {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                     "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote"}


@pytest.mark.parametrize("argv, message", [
    (["--attacks", "pgd,square"], "runs standard AutoAttack only; drop --attacks pgd,square"),
    (["--aa-steps", "10"], "standard AutoAttack (100 for --aa-steps); drop --aa-steps 10"),
    (["--aa-queries", "100"], "(5000 for --aa-queries); drop --aa-queries 100"),
    (["--eps", "0.1,0.2"], "scores one eps"),
    (["--subset-file", "missing.txt"], "--subset-file 'missing.txt' not found"),
])
def test_protocol_arguments_are_checked_in_one_line(tmp_path, argv, message):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    with pytest.raises(ConfigError) as e:
        check_eval_request(eval_args("--weights", str(weights), "--model", "small_cnn", "--protocol", "robustbench",
                                          *argv))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_protocol_selects_standard_autoattack_and_subset_needs_the_protocol(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    args = eval_args("--weights", str(weights), "--model", "small_cnn", "--protocol", "robustbench", "--eps", "8/255")
    args = check_eval_request(args)
    assert args.attacks == "autoattack"
    with pytest.raises(ConfigError, match="belongs to --protocol robustbench"):
        check_eval_request(eval_args("--weights", str(weights), "--model", "small_cnn", "--subset-file", "x"))


def test_subset_file_is_read_and_checked(tmp_path):
    f = tmp_path / "idx.txt"
    f.write_text("5 3,\n9\n0")
    assert eval_run.read_subset(str(f), 10) == [5, 3, 9, 0]
    for text, match in (("1 10", "index 10 outside"), ("1 1", "twice"), ("a", "integer"), ("", "empty")):
        f.write_text(text)
        with pytest.raises(ConfigError, match=match):
            eval_run.read_subset(str(f), 10)


class _Randomised(nn.Module):
    """A randomised defence: noise on the input at test time."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.flatten(1) + 0.01 * torch.randn_like(x.flatten(1)))


def test_randomised_models_are_refused_deterministic_ones_pass():
    data = [(torch.rand(1, 2, 2), 0) for _ in range(8)]
    with pytest.raises(ConfigError) as e:
        eval_run.check_deterministic(_Randomised(), data)
    assert "not deterministic" in str(e.value) and "randomised defences are out of scope" in str(e.value)
    det = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Dropout(0.5))  # dropout is off in eval mode
    eval_run.check_deterministic(det, data)


def test_robustbench_entry_on_a_trained_model(trained_demo_model, tmp_path, dat_ds_log):
    """Standard AutoAttack on a fixed subset, shortened by --max-examples: model_info fields, and the warning."""
    from safetensors.torch import save_file

    from dat_ds.core.config import DataConfig
    from dat_ds.data import build_dataset

    weights = tmp_path / "demo.safetensors"
    save_file({k: v.contiguous() for k, v in trained_demo_model.backbone.state_dict().items()}, str(weights))
    subset = [int(i) for i in torch.randperm(500, generator=torch.Generator().manual_seed(0))[:40]]
    (tmp_path / "subset.txt").write_text("\n".join(map(str, subset)))
    out = tmp_path / "out"
    args = eval_args("--weights", str(weights), "--model", "small_cnn_avgpool", "--data", "fashion-mnist", "--eps", "0.1",
                 "--protocol", "robustbench", "--subset-file", str(tmp_path / "subset.txt"), "--max-examples", "12",
                 "--batch-size", "12", "--threads", "2", "--out", str(out), "--entry-name", "Demo2026Tiny")
    args = check_eval_request(args)
    # Standard AutoAttack takes minutes even on 12 images on two CPU cores (FAB-T); the command line refuses
    # these settings (test above), so only this in-process test shortens it. The label says so.
    args = replace(args, aa_steps=2, aa_queries=20)
    report = eval_run.main(args)
    entry = json.loads((out / eval_run.ROBUSTBENCH_JSON).read_text())
    assert MODEL_INFO_FIELDS <= entry.keys() and entry == report["robustbench"]
    assert entry["name"] == "Demo2026Tiny" and entry["architecture"] == "small_cnn_avgpool"
    assert entry["dataset"] == "fashion-mnist" and entry["threat_model"] == "Linf" and entry["eps"] == 0.1
    assert entry["number_forward_passes"] == 1 and entry["deterministic"] is True
    assert entry["attack"] == "AutoAttack-aa_steps2-n_queries20@0.1" and entry["n_examples"] == 12
    assert entry["subset"] == 12 and entry["test_set_size"] == 2000
    assert entry["clean_acc"] == f"{100 * report['clean_acc']:.2f}"
    assert entry["autoattack_acc"] == f"{100 * report['results'][0]['robust_acc']:.2f}"
    assert float(entry["autoattack_acc"]) <= float(entry["clean_acc"])
    assert [r["attack"] for r in report["results"]] == ["autoattack"]
    # The first 12 indices of the subset file were scored, in its order.
    test_set, _ = build_dataset(DataConfig(), "test")
    x = torch.stack([test_set[i][0] for i in subset[:12]])
    y = torch.tensor([int(test_set[i][1]) for i in subset[:12]])
    with torch.no_grad():
        correct = (trained_demo_model(x).argmax(1) == y).tolist()
    assert report["clean_correct"] == "".join("1" if c else "0" for c in correct)
    warnings = [r.getMessage() for r in dat_ds_log.records if r.levelname == "WARNING" and r.name == "dat_ds.evaluation.run"]
    assert any(m.startswith("NOT A ROBUSTBENCH SCORE: --max-examples 12 scored only the first 12 of 40") for m in warnings), \
        warnings


def test_entry_of_a_run_with_generated_data_names_its_extra_data_and_architecture():
    """A run's config fills additional_data / architecture; a full score has no subset and CIFAR's eps reads k/255."""
    from dat_ds.core.config import build_config
    from dat_ds.evaluation.loading import LoadedModel

    cfg = build_config(overrides=["data.name=cifar10", "data.unlabeled=gen/", "model.name=wideresnet28_10",
                                  "model.act=silu", "attack.eps=8/255", "objective.name=trades"])
    loaded = LoadedModel(model=nn.Identity(), data_cfg=cfg.data, cfg=cfg,
                         source={"kind": "run", "run_dir": "runs/wrn_dm", "model": "wideresnet28_10",
                                 "which_weights": "ema"})
    report = {"count": 10000, "clean_acc": 0.92444, "results": [
        {"eps": 8 / 255, "norm": "linf", "label": "AutoAttack@0.03137", "robust_acc": 0.6731}]}
    args = eval_args("--run", "runs/wrn_dm", "--protocol", "robustbench")
    entry = eval_run.robustbench_entry(report, loaded, args, n_test=10000, subset=None)
    assert MODEL_INFO_FIELDS <= entry.keys()
    assert (entry["name"], entry["dataset"], entry["eps"], entry["threat_model"]) == ("wrn_dm", "cifar10", "8/255", "Linf")
    assert entry["additional_data"] is True and entry["architecture"] == "wideresnet28_10 (silu)"
    assert (entry["clean_acc"], entry["autoattack_acc"]) == ("92.44", "67.31")  # percent, two decimals
    assert entry["subset"] is None and entry["which_weights"] == "ema"
