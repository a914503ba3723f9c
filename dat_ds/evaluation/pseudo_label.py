"""Pseudo-labelling (RST, Carmon et al. 2019): a teacher trained on labeled data labels an unlabeled pool."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core import dist
from ..data.unlabeled import PseudoLabeled, load_pool, save_pseudo_labels

log = logging.getLogger(__name__)


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, *, batch_size: int = 512,
            device: torch.device | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Argmax labels and their softmax probabilities for uint8 NHWC ``images`` (model in eval mode).

    ``device``: default the accelerator's (``dist.device()``); the model is moved there.
    """
    device = dist.device() if device is None else torch.device(device)
    model = model.to(device).eval()
    labels, confidences = [], []
    for lo in range(0, len(images), batch_size):
        x = torch.from_numpy(images[lo:lo + batch_size])
        x = (x.pin_memory() if device.type != "cpu" else x).to(device, non_blocking=True)
        probs = torch.softmax(model(x.permute(0, 3, 1, 2).float().div_(255)).float(), dim=1)
        conf, pred = probs.max(dim=1)
        labels.append(pred)
        confidences.append(conf)
    if not labels:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    # One copy back at the end: the batches run back to back on the device.
    return (torch.cat(labels).cpu().numpy().astype(np.int64),
            torch.cat(confidences).cpu().numpy().astype(np.float32))


def pseudo_label(model: nn.Module, pool: str, out: str | Path, *, batch_size: int = 512, teacher: str = "",
                 trust_pickle: bool = False, device: torch.device | str | None = None) -> PseudoLabeled:
    """Label every image of ``pool`` with ``model`` and write the result to ``out`` (.npz, atomic)."""
    images, true_labels = load_pool(pool, trust_pickle=trust_pickle)
    labels, confidences = predict(model, images, batch_size=batch_size, device=device)
    meta = {"pool": pool, "teacher": teacher, "count": int(len(labels)),
            "mean_confidence": float(confidences.mean()),
            "class_counts": np.bincount(labels, minlength=int(labels.max()) + 1).tolist()}
    if true_labels is not None:  # the embedded pool has labels we pretend not to know: report the teacher's accuracy
        meta["pseudo_label_accuracy"] = float((labels == true_labels).mean())
    data = PseudoLabeled(images, labels, confidences, meta)
    save_pseudo_labels(out, data)
    log.info("pseudo-labelled %d images from %s -> %s (mean confidence %.3f%s)", len(labels), pool, out,
             meta["mean_confidence"],
             f", accuracy vs the withheld labels {meta['pseudo_label_accuracy']:.4f}" if true_labels is not None else "")
    return data
