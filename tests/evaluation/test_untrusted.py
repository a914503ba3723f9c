"""Untrusted files: nothing we load runs code, and exported weights load in plain timm and dat-ds."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dat_ds import cli
from dat_ds.core import dist
from dat_ds.core.errors import ConfigError
from tests.helpers import tiny_args, write_ds

dist.setup_logging()


class RunsCode:
    """Unpickling this creates ``marker``: proof that a loader executed code from the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(tmp: Path, marker: Path, victim: str = "mp_rank_00_model_states.pt") -> Path:
    tag = tmp / "runs" / "run" / "checkpoint" / "step000000004"
    tag.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}}, tag / "mp_rank_00_model_states.pt")
    torch.save({"torch": torch.get_rng_state()}, tag / "rank_state_0.pt")
    torch.save({"payload": RunsCode(marker)}, tag / victim)
    (tag / "complete.json").write_text(json.dumps({
        "tag": tag.name, "global_step": 4, "epoch": 0, "world_size": 1,
        "fits": {"model.name": "tiny_cnn", "data.name": "fashion-mnist", "optimizer": "AdamW", "zero_stage": 0},
        "files": {p.name: p.stat().st_size for p in tag.iterdir()}}))
    return tag


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "rank_state_0.pt"])
def test_checkpoint_that_runs_code_is_refused(tmp_path, capsys, victim):
    marker = tmp_path / "pwned"
    crafted_checkpoint(tmp_path, marker, victim)
    ds = write_ds(tmp_path)
    rc = cli.main(["train", *tiny_args(tmp_path / "runs", "run", ds), "--resume", "auto"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"error: refusing to load '{tmp_path}/runs/run/checkpoint/step000000004/{victim}': "
                             "it references posix.system, which could run code when unpickled")
    assert not marker.exists()
    # the same file, unpickled the way DeepSpeed does it (weights_only=False), would have run the code
    torch.load(tmp_path / "runs/run/checkpoint/step000000004" / victim, weights_only=False)
    assert marker.exists()


def test_export_refuses_crafted_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    tag = crafted_checkpoint(tmp_path, marker)
    with pytest.raises(ConfigError, match="refusing to load"):
        from dat_ds.evaluation.export import export

        export(tag.parent.parent, tmp_path / "model.safetensors")
    assert not marker.exists() and not (tmp_path / "model.safetensors").exists()


def cifar_folder(tmp: Path, marker: Path) -> Path:
    folder = tmp / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    good = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(good, protocol=2))
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": RunsCode(marker), b"labels": [0]}))
    return folder


def test_pickle_data_that_runs_code_is_refused_without_trust_pickle(tmp_path, capsys):
    from dat_ds.data import DATASETS

    if "cifar10" not in DATASETS:
        pytest.skip("the CIFAR loader is not registered")
    marker = tmp_path / "pwned"
    folder = cifar_folder(tmp_path, marker)
    ds = write_ds(tmp_path)
    args = tiny_args(tmp_path / "runs", "cifar", ds, "--set", "data.name=cifar10", "--set", f"data.root={folder.parent}")
    rc = cli.main(["train", *args])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"error: '{folder}/data_batch_1' references posix.system")
    assert "data.trust_pickle=true" in err[0]
    assert not marker.exists() and not (tmp_path / "runs").exists()
    # --trust-pickle really is what stands between the user and the payload
    from dat_ds.data.cifar import load_pickle

    load_pickle(folder / "data_batch_1", trust=True)
    assert marker.exists()


def test_trust_pickle_flag_sets_the_config():
    from dat_ds.cli.args import train_args_parser, train_request
    from dat_ds.launch.validate import config_from_request

    request = train_request(train_args_parser().parse_args(["--trust-pickle"]))
    assert config_from_request(request).data.trust_pickle is True
    assert config_from_request(train_request(train_args_parser().parse_args([]))).data.trust_pickle is False


def test_export_loads_in_timm_and_dat_ds(tmp_path, capsys):
    import timm
    from safetensors.torch import load_file

    from dat_ds.core.config import DataConfig
    from dat_ds.data import build_dataset
    from dat_ds.models import create_model

    ds = write_ds(tmp_path)
    args = tiny_args(tmp_path / "runs", "timm", ds, "--set", "model.name=test_resnet", "--set", "attack.name=fgsm",
                     "--set", "train.max_steps_per_epoch=2", epochs=1, save_every=0)
    assert cli.main(["train", *args]) == 0
    out = tmp_path / "export" / "model.safetensors"
    assert cli.main(["export", "--run", str(tmp_path / "runs" / "timm"), "--out", str(out)]) == 0
    meta = json.loads((out.parent / "model.json").read_text())
    assert {k: meta[k] for k in ("model", "dataset", "num_classes", "in_chans", "img_size")} == {
        "model": "test_resnet", "dataset": "fashion-mnist", "num_classes": 10, "in_chans": 1, "img_size": 28}
    weights = load_file(str(out))
    assert not any(k.startswith(("backbone.", "module.")) for k in weights)

    trained = torch.load(tmp_path / "runs/timm/checkpoint/epoch0001/mp_rank_00_model_states.pt",
                         weights_only=True)["module"]
    test_set, spec = build_dataset(DataConfig(), "test")
    x = torch.stack([test_set[i][0] for i in range(4)])
    plain = timm.create_model(meta["model"], pretrained=False, num_classes=meta["num_classes"], in_chans=meta["in_chans"])
    plain.load_state_dict(weights)  # strict: every key fits
    plain.eval()
    ours = create_model("test_resnet", spec)
    ours.load_state_dict(trained)
    ours.eval()
    mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(plain((x - mean) / std), ours(x))
        # what `dat-ds eval --weights FILE --model NAME` does: model.weights through create_model
        loaded = create_model(meta["model"], spec, weights=str(out)).eval()
        torch.testing.assert_close(loaded(x), ours(x))
        try:
            from dat_ds.evaluation.loading import load_weights
        except ImportError:
            return
        torch.testing.assert_close(load_weights(out, meta["model"], meta["dataset"]).model(x), ours(x))
