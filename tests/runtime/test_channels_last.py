"""``model.channels_last``: NHWC weights only where DeepSpeed's engine keeps the module's own parameters."""

from __future__ import annotations

import pytest
import torch


def _settings(zero: int, precision: str):
    from dat_ds.runtime.ds_config import EngineSettings

    return EngineSettings(ds_config={}, optimizer={"type": "AdamW"}, micro_batch=4, grad_accum=1, global_batch=8,
                          zero_stage=zero, precision=precision, has_scheduler=False, compresses=False,
                          gradient_compression=None)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2))


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_zero0_weights_go_nhwc_in_place_and_the_optimizer_still_moves_them(precision):
    from dat_ds.runtime.build import weights_channels_last

    net = _net()
    net(torch.rand(1, 3, 6, 6))  # materialise the lazy layer
    conv = net[0].weight
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = conv.detach().clone()
    assert weights_channels_last(net, _settings(0, precision))
    assert net[0].weight is conv, "the optimizer's parameter object must stay the module's"
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    net(torch.rand(4, 3, 6, 6)).sum().backward()
    opt.step()
    assert not torch.equal(net[0].weight.detach(), before)  # the step reached the module's weights


@pytest.mark.parametrize("zero,precision", [(1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16")])
def test_flat_buffer_engines_keep_nchw_weights(zero, precision, dat_ds_log):
    import logging

    from dat_ds.runtime.build import weights_channels_last

    dat_ds_log.set_level(logging.INFO, logger="dat_ds")
    net = _net()
    assert not weights_channels_last(net, _settings(zero, precision))
    assert net[0].weight.is_contiguous()
    assert "inputs in NHWC; the weights stay NCHW" in dat_ds_log.text


# Two ranks with model.channels_last=true through the DeepSpeed launcher (it used to fail at start-up):
# tests/e2e/test_train_end_to_end.py::test_two_ranks_through_the_deepspeed_launcher.
