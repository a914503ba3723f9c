"""Robust evaluation: ``dat-ds eval`` (distributed, exact across ranks), gradient-masking checks, and the
catastrophic-overfitting monitor used during training. Attacks themselves live in ``dat_ds.attacks``."""

from .sanity import Check, run_checks, sanity_specs

__all__ = ["Check", "run_checks", "sanity_specs"]
