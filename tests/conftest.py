"""Shared fixtures: the CLI in a subprocess, the embedded test data, small models (trained or not), a batch.

Plain helper functions are in ``tests/helpers.py``."""

from __future__ import annotations

import logging
import os

import pytest

from tests.helpers import run_cli


@pytest.fixture
def cli():
    return run_cli


class DatDsLog:
    """What the ``dat_ds`` logger said during one test: ``text``, ``records``, ``clear()``, ``set_level()``.

    Its own handler on the ``dat_ds`` logger, rather than ``caplog``'s: in a full run of the suite ``caplog`` came
    back empty for records the ``dat_ds`` logger had printed to stderr, depending on which tests ran before."""

    def __init__(self, caplog):
        from _pytest.logging import LogCaptureHandler

        self._caplog = caplog
        self.handler = LogCaptureHandler()
        self.handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    @property
    def text(self) -> str:
        return self.handler.stream.getvalue()

    @property
    def records(self) -> list[logging.LogRecord]:
        return self.handler.records

    def clear(self) -> None:
        self.handler.clear()

    def set_level(self, level: int, logger: str = "dat_ds") -> None:
        self._caplog.set_level(level, logger=logger)  # the logger's level; caplog restores it after the test


@pytest.fixture
def dat_ds_log(caplog):
    logger = logging.getLogger("dat_ds")
    log = DatDsLog(caplog)
    logger.addHandler(log.handler)
    yield log
    logger.removeHandler(log.handler)


@pytest.fixture(scope="session")
def embedded_test_tensors():
    """The first 512 embedded test images and labels as tensors."""
    import torch

    from dat_ds.core.config import DataConfig
    from dat_ds.data import build_dataset

    ds, spec = build_dataset(DataConfig(), "test")
    xs, ys = zip(*(ds[i] for i in range(512)))
    return torch.stack(xs), torch.tensor(ys), spec


@pytest.fixture(scope="module")
def batch(request, embedded_test_tensors):
    """The first embedded test images and labels: one batch for unit tests of attacks and objectives. Its size is
    the test module's ``BATCH_SIZE`` (32 where it sets none)."""
    n = getattr(request.module, "BATCH_SIZE", 32)
    x, y, _ = embedded_test_tensors
    return x[:n], y[:n]


@pytest.fixture(scope="module")
def cnn(embedded_test_tensors):
    """An untrained ``tiny_cnn`` (seed 0) for the embedded data, in eval mode: every forward of the same input
    gives the same logits. One per test module (a test may leave gradients on it)."""
    import torch

    from dat_ds.models import create_model

    _, _, spec = embedded_test_tensors
    torch.manual_seed(0)
    return create_model("tiny_cnn", spec).eval()


@pytest.fixture(scope="session")
def weak_cnn(embedded_test_tensors):
    """``tiny_cnn`` trained 60 steps of plain cross-entropy on 1,024 embedded training images (~2 s), in eval mode:
    about 75 % clean accuracy, and no robustness, so every attack has points to break. For tests of evaluation
    plumbing that need broken points but not a strong model (``trained_demo_model`` takes minutes on two cores)."""
    import torch
    import torch.nn.functional as F

    from dat_ds.core.config import DataConfig
    from dat_ds.data import build_dataset
    from dat_ds.models import create_model

    train, spec = build_dataset(DataConfig(), "train")
    xs, ys = zip(*(train[i] for i in range(1024)))
    x, y = torch.stack(xs), torch.tensor(ys)
    torch.manual_seed(0)
    model = create_model("tiny_cnn", spec)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(60):
        i = torch.arange(step * 64, step * 64 + 64) % len(x)
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def trained_demo_model(embedded_test_tensors):
    """The demo's model (small_cnn_avgpool) adversarially trained (PGD-3, eps=0.1) for two epochs on the embedded
    data, in eval mode.

    Plain torch loop, one process: about 20-40 s on two cores; shared by every test that needs a robust model.
    """
    import torch
    import torch.nn.functional as F

    from dat_ds.attacks import pgd
    from dat_ds.core.config import DataConfig
    from dat_ds.data import build_dataset
    from dat_ds.models import create_model

    torch.manual_seed(0)
    train, spec = build_dataset(DataConfig(), "train")
    model = create_model("small_cnn_avgpool", spec)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        for x, y in loader:
            x_adv = pgd(model, x, y, eps=0.1, steps=3, generator=g)
            model.train()
            loss = F.cross_entropy(model(x_adv), y) + 0.5 * F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return model


@pytest.fixture(scope="session", autouse=True)
def _no_network_namespace_left_behind():
    """No ``datds-*`` network namespace or link that this session (or a process it started) made outlives
    it: the two-node test and ``bench network`` create them (``benchmarks.netns``)."""
    yield
    from benchmarks import netns  # torch-free

    netns.remove_leftovers(also_owner=os.getpid())


@pytest.fixture
def cpu_runs_fp16(monkeypatch):
    """DeepSpeed's fp16 engine on CPU tensors: the CPU accelerator is told that it supports fp16 (GPUs do)."""
    import torch
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu" and not acc.is_fp16_supported():
        monkeypatch.setattr(type(acc), "is_fp16_supported", lambda self: True)
        monkeypatch.setattr(type(acc), "supported_dtypes",
                            lambda self: [torch.float32, torch.bfloat16, torch.float16])
    return acc
