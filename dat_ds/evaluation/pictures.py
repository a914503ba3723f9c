"""``adv_examples.png``: what the attack does to the first test images -- clean images with their true and
predicted classes, the adversarial images with their predictions, and the perturbation magnified to the full
range (mid-grey is no change)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..attacks import AttackSpec, eval_mode
from ..core.io import save_figure
from .evaluate import batch_generator

ADV_EXAMPLES = "adv_examples.png"


def first_examples(dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


def _image(t: torch.Tensor):
    t = t.detach().float().cpu().clamp(0, 1)
    return t[0].numpy() if t.shape[0] == 1 else t.permute(1, 2, 0).numpy()


def adversarial_grid(model: nn.Module, dataset, spec: AttackSpec, path: str | Path, *, n: int = 8, seed: int = 0,
                     classes: tuple[str, ...] = ()) -> None:
    """Attack the first ``n`` images of ``dataset`` with ``spec`` (model in eval mode) and draw the three rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = next(model.parameters()).device
    x, y = first_examples(dataset, n)
    x, y = x.to(device), y.to(device)
    with eval_mode(model):
        x_adv = spec.run(model, x, y, batch_generator(seed, 0, device))
        with torch.no_grad():
            clean_pred, adv_pred = model(x).argmax(1), model(x_adv).argmax(1)
    delta = (x_adv - x).float()
    scale = delta.abs().amax().clamp_min(1e-12)
    name = (lambda c: classes[c] if c < len(classes) else str(c))  # noqa: E731
    fig, axes = plt.subplots(3, len(y), figsize=(1.5 * len(y), 5.0), squeeze=False)
    for i in range(len(y)):
        rows = [(x[i], f"{name(int(y[i]))}\n-> {name(int(clean_pred[i]))}"),
                (x_adv[i], f"-> {name(int(adv_pred[i]))}"), (delta[i] / (2 * scale) + 0.5, "")]
        for r, (img, text) in enumerate(rows):
            ax = axes[r][i]
            ax.imshow(_image(img), cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(text, fontsize=7, color="black" if r == 0 or adv_pred[i] == y[i] else "red")
    for r, label in enumerate(("clean\ntrue -> pred", "adversarial", f"perturbation\n(x{0.5 / float(scale):.3g})")):
        axes[r][0].set_ylabel(label, fontsize=7)
    fig.suptitle(f"{spec.label}: first {len(y)} test images", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
