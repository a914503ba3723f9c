"""Models: the CIFAR-stem nets registered with timm (and their SiLU variants), timm names through our factory, local
weights."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from dat_ds.core import names
from dat_ds.core.config import build_config
from dat_ds.core.errors import ConfigError
from dat_ds.data import DataSpec
from dat_ds.models import MODELS, create_model
from dat_ds.models.cifar import CIFAR_MODELS

CIFAR_SPEC = DataSpec(in_chans=3, num_classes=10, img_size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))
# The two timm names of the acceptance list: a ResNet and a ViT at CIFAR resolution (img_size=32 from the data set).
TIMM_NAMES = ("resnet18", "vit_tiny_patch16_224")


@pytest.mark.parametrize("name", CIFAR_MODELS + TIMM_NAMES)
def test_forward_backward_on_cifar_input(name):
    torch.manual_seed(0)
    model = create_model(name, CIFAR_SPEC)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    y = torch.tensor([3, 7])
    logits = model(x)
    assert logits.shape == (2, 10)
    torch.nn.functional.cross_entropy(logits, y).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # attacks need the input gradient
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ("preactresnet18", "wideresnet16_4"))  # the WRN-28/34-10 code paths are the same
def test_cifar_models_are_timm_models(name):
    import timm

    assert timm.is_model(name) and name in MODELS
    model = timm.create_model(name, num_classes=100, in_chans=1)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 100)
    assert model.num_classes == 100 and model.get_classifier().out_features == 100
    model.reset_classifier(5)
    assert model(torch.rand(1, 1, 32, 32)).shape == (1, 5)
    assert model.forward_head(model.forward_features(torch.rand(1, 1, 32, 32)), pre_logits=True).shape == (1, model.num_features)
    with pytest.raises(ConfigError, match="no pretrained weights"):
        timm.create_model(name, pretrained=True)


def test_parameter_counts_match_the_literature():
    # PreActResNet-18 11.2M and WRN-34-10 46.2M parameters are the sizes the AT papers report.
    counts = {n: sum(p.numel() for p in create_model(n, CIFAR_SPEC).parameters()) / 1e6
              for n in ("preactresnet18", "wideresnet28_10", "wideresnet34_10")}
    assert counts["preactresnet18"] == pytest.approx(11.17, abs=0.01)
    assert counts["wideresnet28_10"] == pytest.approx(36.48, abs=0.01)
    assert counts["wideresnet34_10"] == pytest.approx(46.16, abs=0.01)


def test_names_do_not_shadow_timm_builtins():
    # No timm model module defines an entrypoint of the same name: registering ours overwrote nothing.
    import timm.models._registry as registry

    timm_modules = [m for name, m in sys.modules.items() if name.startswith("timm.models.") and m is not None]
    for name in CIFAR_MODELS:
        assert registry._model_entrypoints[name].__module__ == "dat_ds.models.cifar"
        assert not [m.__name__ for m in timm_modules if callable(getattr(m, name, None))], name


def test_model_takes_channels_and_classes_from_the_data_set():
    gray = DataSpec(in_chans=1, num_classes=100, img_size=32, mean=(0.5,), std=(0.5,))
    for name in ("wideresnet16_4", "resnet18"):
        model = create_model(name, gray)
        assert model(torch.rand(2, 1, 32, 32)).shape == (2, 100)


def test_local_weights_round_trip(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = create_model("wideresnet16_4", CIFAR_SPEC).eval()
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.manual_seed(1)
    loaded = create_model("wideresnet16_4", CIFAR_SPEC, weights=str(tmp_path / "w.safetensors")).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    with pytest.raises(ConfigError, match="do not fit"):
        create_model("preactresnet18", CIFAR_SPEC, weights=str(tmp_path / "w.safetensors"))


def test_avgpool_small_cnn_is_small_cnn_with_average_pooling():
    """Same parameters and state-dict keys as small_cnn; the pooled features are window means, not maxima."""
    from dat_ds.models.small import SmallCNN

    spec = DataSpec(in_chans=1, num_classes=10, img_size=28, mean=(0.5,), std=(0.5,))
    torch.manual_seed(0)
    avg = create_model("small_cnn_avgpool", spec).eval()
    torch.manual_seed(0)
    mx = create_model("small_cnn", spec).eval()
    assert avg.state_dict().keys() == mx.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(avg.state_dict().values(), mx.state_dict().values()))
    x = torch.rand(3, 1, 28, 28)
    first = avg.backbone.features[:2](x)
    pooled = avg.backbone.features[2](first)
    assert torch.allclose(pooled, first.unfold(2, 2, 2).unfold(3, 2, 2).mean((-1, -2)))
    assert not torch.allclose(avg(x), mx(x))
    with pytest.raises(ValueError, match="pool='min'"):
        SmallCNN(pool="min")


# ----------------------------------------------------------------------------- SiLU variants (model.act)


def _counts(model) -> tuple[int, int]:
    mods = list(model.modules())
    return sum(isinstance(m, torch.nn.SiLU) for m in mods), sum(isinstance(m, torch.nn.ReLU) for m in mods)


def _functional_relu_forward(backbone, x):
    """The forward as it was written before model.act: F.relu everywhere, through the same modules."""
    out = backbone.conv1(x)
    for block in backbone.layers:
        pre = F.relu(block.bn1(out))
        shortcut = block.shortcut(pre) if block.shortcut is not None else out
        out = block.conv2(F.relu(block.bn2(block.conv1(pre)))) + shortcut
    return backbone.forward_head(F.relu(backbone.bn(out)))


@pytest.mark.parametrize("name", ["preactresnet18", "wideresnet16_4"])
def test_silu_variant_has_silu_only_and_relu_default_is_unchanged(name):
    torch.manual_seed(0)
    relu = create_model(name, CIFAR_SPEC).eval()
    torch.manual_seed(0)
    silu = create_model(name, CIFAR_SPEC, act="silu").eval()
    assert _counts(silu.backbone)[0] > 0 and _counts(silu.backbone)[1] == 0
    assert _counts(relu.backbone)[0] == 0 and _counts(relu.backbone)[1] > 0
    n_params = sum(p.numel() for p in relu.parameters())
    assert n_params == sum(p.numel() for p in silu.parameters())
    assert n_params == {"preactresnet18": 11_172_170, "wideresnet16_4": 2_748_890}[name]
    # Same seed, same tensors: the activation is the only difference (a checkpoint loads into either).
    assert all(torch.equal(a, b) for a, b in zip(relu.state_dict().values(), silu.state_dict().values()))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_relu, out_silu = relu(x), silu(x)
        assert out_silu.shape == (2, 10)
        assert torch.equal(out_relu, _functional_relu_forward(relu.backbone, (x - relu.mean) / relu.std))
        assert not torch.allclose(out_relu, out_silu)


def test_model_act_is_validated_and_reaches_the_run_loader():
    from dat_ds.evaluation.loading import trained_model

    assert names.ACT_MODELS == CIFAR_MODELS
    with pytest.raises(ConfigError, match="model.act=silu applies to the models"):
        build_config(None, ["model.act=silu"])  # small_cnn has its own activation
    with pytest.raises(ConfigError, match="allowed: relu, silu"):
        build_config(None, ["model.name=preactresnet18", "model.act=gelu"])
    with pytest.raises(ConfigError, match="applies to the models"):
        create_model("small_cnn", CIFAR_SPEC, act="silu")
    cfg = build_config(None, ["model.name=wideresnet16_4", "model.act=silu"])
    silu, relu = _counts(trained_model(cfg, CIFAR_SPEC))
    assert silu > 0 and relu == 0  # `dat-ds eval` of a SiLU run evaluates a SiLU model


# timm's ``test_resnet`` (0.4M parameters, random weights: nothing is downloaded) declares mean = std = 0.5 in its
# pretrained_cfg; CIFAR_SPEC's statistics differ, so each test below tells which ones the model took.
TIMM_WITH_STATS = "test_resnet"


def _stats(model) -> tuple[list[float], list[float]]:
    from dat_ds.models import normalization_of

    norm = normalization_of(model)
    return [round(v, 4) for v in norm.mean.flatten().tolist()], [round(v, 4) for v in norm.std.flatten().tolist()]


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """A local weights file for the timm model, as a user would give it in model.weights."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in create_model(TIMM_WITH_STATS, CIFAR_SPEC).backbone.state_dict().items()},
              str(path))
    return str(path)


def test_model_normalization_picks_the_timm_pretrained_cfg_statistics(timm_weights):
    """``model.normalization``: "model" takes the pretrained_cfg's mean/std, "data" the data set's, "auto" the
    model's only when the run starts from weights; a model that declares none (or for other channels) is refused
    with "model" and falls back to the data's with "auto"."""
    model_stats, data_stats = ([0.5] * 3, [0.5] * 3), (list(CIFAR_SPEC.mean), list(CIFAR_SPEC.std))
    assert create_model(TIMM_WITH_STATS, CIFAR_SPEC).backbone.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert _stats(create_model(TIMM_WITH_STATS, CIFAR_SPEC, normalization="model")) == model_stats
    assert _stats(create_model(TIMM_WITH_STATS, CIFAR_SPEC, normalization="data")) == data_stats
    assert _stats(create_model(TIMM_WITH_STATS, CIFAR_SPEC, timm_weights, normalization="auto")) == model_stats
    assert _stats(create_model(TIMM_WITH_STATS, CIFAR_SPEC, timm_weights, normalization="data")) == data_stats
    assert _stats(create_model(TIMM_WITH_STATS, CIFAR_SPEC, normalization="auto")) == data_stats  # random start
    assert "pretrained_cfg" in create_model(TIMM_WITH_STATS, CIFAR_SPEC, normalization="model").describe()
    gray = DataSpec(in_chans=1, num_classes=10, img_size=32, mean=(0.3,), std=(0.35,))
    with pytest.raises(ConfigError, match="has mean/std for 3 channels, the data 1; use model.normalization=data"):
        create_model(TIMM_WITH_STATS, gray, normalization="model")
    assert _stats(create_model(TIMM_WITH_STATS, gray, normalization="auto", pretrained=True)) == ([0.3], [0.35])
    with pytest.raises(ConfigError, match="'preactresnet18' declares no mean/std"):
        create_model("preactresnet18", CIFAR_SPEC, normalization="model")
    # Ours declare none: refused by the config itself, before anything is built (no torch needed).
    with pytest.raises(ConfigError, match="model.normalization=model: model 'small_cnn' declares no input mean/std"):
        build_config(None, ["model.normalization=model"])
    with pytest.raises(ConfigError, match="allowed: auto, data, model"):
        build_config(None, ["model.normalization=imagenet"])


def test_the_run_loader_normalises_as_training_did(timm_weights, tmp_path):
    """Training builds with ``model.weights`` (``runtime.build.make_model``); the run loader rebuilds without them
    (the checkpoint has the weights) and must take the same statistics, for "auto" too; a config saved before
    ``model.normalization`` existed loads with the data set's statistics, as it trained."""
    import yaml

    from dat_ds.evaluation.loading import _run_config, trained_model
    from dat_ds.runtime.build import make_model

    for setting, expected in (("auto", [0.5] * 3), ("model", [0.5] * 3), ("data", list(CIFAR_SPEC.mean))):
        cfg = build_config(None, [f"model.name={TIMM_WITH_STATS}", f"model.weights={timm_weights}",
                                  f"model.normalization={setting}"])
        assert _stats(make_model(cfg, CIFAR_SPEC, cfg.model.weights))[0] == expected, setting
        assert _stats(make_model(cfg, CIFAR_SPEC, None))[0] == expected, setting  # ZeRO-3's evaluation copy
        assert _stats(trained_model(cfg, CIFAR_SPEC))[0] == expected, setting
    cfg = build_config(None, [f"model.name={TIMM_WITH_STATS}", f"model.weights={timm_weights}"])
    saved = cfg.to_dict()
    assert saved["model"]["normalization"] == "auto"
    del saved["model"]["normalization"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    old = _run_config(tmp_path, {})
    assert old.model.normalization == "data" and _stats(trained_model(old, CIFAR_SPEC))[0] == list(CIFAR_SPEC.mean)
