"""Threat-model geometry, kept apart from the attack loops that use it (as in MadryLab robustness).

Each geometry knows how to start at a random point of the eps-ball, take an ascent step, and project
back onto the ball intersected with the image box [0, 1].
"""

from __future__ import annotations

import torch

from ..core.registry import Registry


class Geometry:
    name: str

    def __init__(self, eps: float):
        self.eps = float(eps)

    def random_start(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
        raise NotImplementedError

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


GEOMETRIES: Registry[type[Geometry]] = Registry("norm")


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


@GEOMETRIES.register("linf")
class LinfGeometry(Geometry):
    name = "linf"

    def random_start(self, x, generator):
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (x + (2 * noise - 1) * self.eps).clamp_(0, 1)

    def step(self, x_adv, grad, step_size):
        return x_adv + step_size * grad.sign()

    def project(self, x_adv, x):
        return torch.max(torch.min(x_adv, x + self.eps), x - self.eps).clamp_(0, 1)


@GEOMETRIES.register("l2")
class L2Geometry(Geometry):
    name = "l2"

    def random_start(self, x, generator):
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        direction = direction / _flat_norm(direction).clamp_min(1e-12)
        radius = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device, dtype=x.dtype)
        return self.project(x + direction * radius * self.eps, x)

    def step(self, x_adv, grad, step_size):
        return x_adv + step_size * grad / _flat_norm(grad).clamp_min(1e-12)

    def project(self, x_adv, x):
        delta = x_adv - x
        norm = _flat_norm(delta)
        delta = delta * torch.clamp(self.eps / norm.clamp_min(1e-12), max=1.0)
        # Clipping to the box only shrinks each coordinate of delta, so the L2 bound still holds.
        return (x + delta).clamp_(0, 1)
