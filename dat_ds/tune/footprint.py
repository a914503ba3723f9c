"""A model's memory facts for ``plan.py``, without a GPU and without allocating the model.

The model is built on the ``meta`` device (no weights are allocated: ViT-L costs nothing), then moved to fake
CPU tensors (``FakeTensorMode``: shapes, dtypes and storages without memory) so that CPU autocast applies
as it does in training. One forward at micro-batch 1 and one at 2, under ``saved_tensors_hooks``, count the
bytes autograd saves for backward (each storage once, the weights' own excluded: they are model states); the
difference is the per-sample cost, the rest the fixed part (autocast's 16-bit weight copies). The training
forward runs in train mode; the attack's in eval mode with only the input requiring a gradient, as
``attacks.core`` runs it. The bytes are what the pass holds on any device: the same kernels save the same
tensors on a GPU, whose convolution/attention kernels may use extra workspace that the plan's allowance covers.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from .plan import Footprint


def _saved_bytes(model: torch.nn.Module, x: torch.Tensor, *, autocast: torch.dtype | None) -> tuple[int, int]:
    """(all saved bytes, the largest saved activation: a storage that grows with the batch) of one forward of
    ``model`` on ``x``."""
    own = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}
    largest = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        storage = t.untyped_storage()
        if storage._cdata not in own:
            seen[storage._cdata] = storage.nbytes()
            if t.dim() and t.shape[0] == x.shape[0]:  # per-example, not a weight's 16-bit copy
                largest = max(largest, storage.nbytes())
        return t

    cast = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
        model(x)
    return sum(seen.values()), largest


def _largest_layer(model: torch.nn.Module) -> int:
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def measure(model: torch.nn.Module, *, in_chans: int, img_size: int, precision: str,
            persistence_threshold: int = 100_000) -> Footprint:
    """The facts of ``model`` (built on the meta device) for a DeepSpeed ``precision`` (fp32 | bf16 | fp16 |
    bf16-autocast)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    persistent = sum(p.numel() for p in params if p.numel() < persistence_threshold)
    largest = _largest_layer(model)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    autocast = torch.bfloat16 if precision == "bf16-autocast" else None
    # a copy (the caller's meta model stays as it was), in the engine's dtype while on the meta device: fake
    # tensors cannot be converted in place
    model = copy.deepcopy(model).to(weight_dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = model.to_empty(device="cpu")

        def passes(batch: int) -> tuple[int, int, int]:
            x = torch.empty(batch, in_chans, img_size, img_size, dtype=weight_dtype)
            fake.train()
            train, largest_saved = _saved_bytes(fake, x, autocast=autocast)
            fake.eval()
            attack, _ = _saved_bytes(fake, x.requires_grad_(True), autocast=autocast)
            return train, attack, largest_saved

        train1, attack1, _ = passes(1)
        train2, attack2, largest2 = passes(2)
    train_per, attack_per = max(0, train2 - train1), max(0, attack2 - attack1)
    return Footprint(params=n_params, buffer_bytes=buffer_bytes, largest_layer=largest, persistent_params=persistent,
                     weight_bytes=torch.empty((), dtype=weight_dtype).element_size(),
                     train_per_sample=train_per, train_fixed=max(0, train1 - train_per),
                     attack_per_sample=attack_per, attack_fixed=max(0, attack1 - attack_per),
                     largest_saved_per_sample=largest2 // 2, input_per_sample=in_chans * img_size * img_size * 4)


def meta_model(cfg, spec) -> torch.nn.Module:
    """The run config's model (normalisation wrapper included) on the meta device: shapes only."""
    from ..models import create_model

    with torch.device("meta"):
        return create_model(cfg.model.name, spec, None, act=cfg.model.act, strict_head=cfg.model.strict_head,
                            normalization=cfg.model.normalization, pretrained=cfg.model.weights is not None,
                            grad_checkpointing=cfg.model.grad_checkpointing)
