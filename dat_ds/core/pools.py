"""The spelling of an unlabeled pool (``embedded:train[1000:]``, ``fashion-mnist-full:test[:500]`` or a
file), checked without loading anything, so ``dat-ds pseudo-label`` rejects a typo before the teacher loads."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ConfigError

POOL_SPEC = re.compile(r"^(?P<source>[\w-]+):(?P<split>train|test)\[(?P<lo>\d*):(?P<hi>\d*)\]$")
POOL_SOURCES = ("embedded", "fashion-mnist-full")


def check_pool_spec(spec: str) -> None:
    """A known ``source:split[lo:hi]`` or an existing file; one-line ``ConfigError`` otherwise."""
    m = POOL_SPEC.match(spec)
    if m:
        if m["source"] not in POOL_SOURCES:
            raise ConfigError(f"unknown pool source {m['source']!r} in {spec!r}; use embedded:, fashion-mnist-full: "
                              "or a .npz file")
        return
    if not Path(spec).is_file():
        raise ConfigError(f"pool {spec!r} is neither an existing file nor a spec like embedded:train[1000:]")
