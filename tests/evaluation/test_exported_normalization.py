"""``dat-ds eval --weights FILE`` normalises inputs with the mean/std ``dat-ds export`` recorded in the model.json
next to FILE: a run trained with ``model.normalization=model`` (the timm model's statistics, not the data set's)
evaluates the same through its exported weights as through its run folder."""

from __future__ import annotations

import json
import random

import pytest
import torch

from dat_ds import cli
from dat_ds.data.cifar import CIFAR10_STATS
from tests.helpers import tiny_args, write_ds

MODEL = "test_resnet"  # timm's; its pretrained_cfg declares mean/std for 3 channels (0.5 each), not CIFAR's


def _cifar10_binary(root, train_per_file: int = 8, test: int = 16):
    """A CIFAR-10 binary release of random images: 3 channels, which model.normalization=model needs."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for name, n in [*((f"data_batch_{i}.bin", train_per_file) for i in range(1, 6)), ("test_batch.bin", test)]:
        (folder / name).write_bytes(b"".join(bytes([i % 10]) + rng.randbytes(3072) for i in range(n)))
    return root


@pytest.fixture
def exported(tmp_path):
    """What ``dat-ds export`` writes for a run trained with model.normalization=model (model.json's mean/std are
    the timm model's), without the training: a model's weights, and the data to evaluate them on."""
    from safetensors.torch import save_file

    from dat_ds.core.config import DataConfig
    from dat_ds.data import build_dataset
    from dat_ds.models import create_model

    data = _cifar10_binary(tmp_path / "data")
    _, spec = build_dataset(DataConfig(name="cifar10", root=str(data)), "test")
    torch.manual_seed(0)
    model = create_model(MODEL, spec, normalization="model")
    out = tmp_path / "export" / "model.safetensors"
    out.parent.mkdir()
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, str(out))
    out.with_suffix(".json").write_text(json.dumps({
        "model": MODEL, "act": "relu", "dataset": "cifar10", "num_classes": 10, "in_chans": 3, "img_size": 32,
        "mean": [0.5] * 3, "std": [0.5] * 3}))
    return model.eval(), out, data


def test_exported_weights_are_normalised_with_the_recorded_mean_and_std(exported):
    from dat_ds.evaluation.loading import load_weights

    trained, out, data = exported
    loaded = load_weights(out, MODEL, "cifar10", str(data))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # before: normalised with CIFAR-10's statistics, another function
        torch.testing.assert_close(loaded.model(x), trained(x))
    assert loaded.source["mean"] == [0.5] * 3 and loaded.source["std"] == [0.5] * 3  # eval.json says which
    out.with_suffix(".json").unlink()  # a plain checkpoint: the data set's statistics, as before
    assert load_weights(out, MODEL, "cifar10", str(data)).source["mean"] == pytest.approx(list(CIFAR10_STATS[0]))


def test_a_model_json_without_mean_or_std_is_one_line(exported, tmp_path, capsys):
    _, out, data = exported
    meta = json.loads(out.with_suffix(".json").read_text())
    copy = tmp_path / "model.safetensors"
    copy.write_bytes(out.read_bytes())
    (tmp_path / "model.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "std"}))
    capsys.readouterr()
    assert cli.main(["eval", "--weights", str(copy), "--model", MODEL, "--data", "cifar10", "--data-root", str(data),
                     "--attacks", "fgsm", "--eps", "0.1", "--max-examples", "4", "--out", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {str(tmp_path / 'model.json')!r} records no input mean/std lists for {MODEL!r}, which the weights "
        f"need; export the run again (dat-ds export --run RUN --out {copy} --force), or add its \"mean\"/\"std\" "
        "lists (move the file away to normalise with the data set's statistics)"]
    assert not (tmp_path / "e").exists()
    (tmp_path / "model.json").write_text(json.dumps({**meta, "mean": [0.5], "std": [0.5]}))
    from dat_ds.core.errors import ConfigError
    from dat_ds.evaluation.loading import load_weights

    with pytest.raises(ConfigError, match=r"has mean/std for 1/1 channel\(s\), the data 3; evaluate on the data"):
        load_weights(copy, MODEL, "cifar10", str(data))


@pytest.mark.slow
def test_eval_of_exported_weights_equals_eval_of_the_run(tmp_path):
    """Train with model.normalization=model, export, evaluate both ways: the same numbers (before: the exported
    model was normalised with the data set's statistics)."""
    from dat_ds.evaluation.loading import load_run, load_weights

    tmp = tmp_path
    data = _cifar10_binary(tmp / "data")
    args = tiny_args(tmp / "runs", "m", write_ds(tmp), "--set", f"model.name={MODEL}", "--set", "model.normalization=model",
                     "--set", "data.name=cifar10", "--set", f"data.root={data}", "--set", "attack.name=fgsm",
                     "--set", "train.max_steps_per_epoch=2", subset=32, epochs=1, save_every=0)
    assert cli.main(["train", *args]) == 0
    out = tmp / "export" / "model.safetensors"
    assert cli.main(["export", "--run", str(tmp / "runs" / "m"), "--out", str(out)]) == 0
    run = tmp / "runs" / "m"
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["mean"] == [0.5] * 3 and meta["mean"] != list(CIFAR10_STATS[0])  # not the data set's
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loaded = load_weights(out, MODEL, "cifar10", str(data))
    with torch.no_grad():  # before: the data set's statistics, another function than the run's
        torch.testing.assert_close(loaded.model(x), load_run(run).model(x))
    assert loaded.source["mean"] == [0.5] * 3 and loaded.source["std"] == [0.5] * 3
    common = ["--attacks", "fgsm", "--max-examples", "16", "--batch-size", "16", "--eps", "0.1"]
    assert cli.main(["eval", "--run", str(run), *common, "--out", str(tmp_path / "run")]) == 0
    assert cli.main(["eval", "--weights", str(out), "--model", MODEL, "--data", "cifar10", "--data-root", str(data),
                     *common, "--out", str(tmp_path / "weights")]) == 0
    by_run, by_weights = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("run", "weights"))
    assert by_weights["clean_acc"] == by_run["clean_acc"]
    assert [r["robust_acc"] for r in by_weights["results"]] == [r["robust_acc"] for r in by_run["results"]]
