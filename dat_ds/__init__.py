"""dat-ds: distributed adversarial training on DeepSpeed."""

__version__ = "0.1.0"
