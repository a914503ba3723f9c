"""Guards for files a user only meant to read: pickles run code when they are loaded.

``load_pickle`` refuses legacy pickle data files unless the user passed ``--trust-pickle``
(``data.trust_pickle``); even then it says so in the log. Torch files go through
``torch.load(weights_only=True)`` (see ``dat_ds.engine.checkpoint.verify_file``).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)


def load_pickle(path: str | Path, *, trust: bool, what: str = "data file", **kwargs: Any) -> Any:
    """Unpickle ``path`` only when the user trusts it; otherwise a one-line ConfigError (nothing is read)."""
    p = Path(path)
    if not trust:
        raise ConfigError(
            f"{what} {str(p)!r} is a pickle, which can run arbitrary code when loaded; convert it to npz/safetensors, "
            "or pass --trust-pickle (data.trust_pickle=true) if you trust its source"
        )
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} not found; check data.root")
    log.warning("loading pickle %s because data.trust_pickle is set", p)
    with open(p, "rb") as f:
        return pickle.load(f, **kwargs)
