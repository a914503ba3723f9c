"""``data.on_corrupt``: what an image that does not decode does, met while training (ImageFolder, HF data).

- ``abort`` (default): ``CorruptImageError`` naming the file: a ``ConfigError``, so one ``error:`` line and
  exit code 2. Raised in a DataLoader worker, it comes back to the main process as a new exception of the
  same type built from a message holding the whole worker traceback; the constructor finds its own line
  in there again, so the user still sees one line.
- ``skip``: the example is replaced by the next one (in index order) that decodes, so batches keep their
  size and every rank its step count; each replacement is counted in a shared-memory table that the
  DataLoader workers write too, and the trainer logs the epoch's count once, with a few of the files.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch

from ..core.errors import ConfigError

POLICIES = ("abort", "skip")
# What PIL (and datasets' Image feature, through PIL) raise for a file that is not a whole image: a
# truncated or unidentified file (OSError), a broken PNG/JPEG header (SyntaxError), bad sizes (ValueError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError)


class CorruptImageError(ConfigError):
    """An image of the data set does not decode (``data.on_corrupt=abort``)."""

    def __init__(self, message: str):
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:  # re-raised from a DataLoader worker
            message = message.rsplit(marker, 1)[1].strip().splitlines()[0]
        super().__init__(message)


class CorruptImages:
    """The corrupt-image bookkeeping of one data set (its ``corrupt`` attribute)."""

    def __init__(self, size: int, policy: str, describe: Callable[[int], str]):
        if policy not in POLICIES:
            raise ConfigError(f"data.on_corrupt={policy!r}; allowed: {', '.join(POLICIES)}")
        self.policy, self.describe = policy, describe
        self.hits = torch.zeros(size, dtype=torch.int32).share_memory_()  # replacements per example; workers write
        self._reported = 0

    def load(self, i: int, read: Callable[[int], Any]) -> Any:
        """``read(i)``; for a corrupt image: raise (abort) or ``read`` the next example that decodes (skip)."""
        n = len(self.hits)
        for k in range(n):
            j = (i + k) % n
            try:
                return read(j)
            except ConfigError:
                raise
            except DECODE_ERRORS as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                if self.policy == "abort":
                    raise CorruptImageError(
                        f"corrupt image {self.describe(j)} ({type(e).__name__}: {first}); replace or remove it, "
                        "or set data.on_corrupt=skip to train without such files") from None
                self.hits[j] += 1  # one index per step and rank: no two workers write the same slot at once
        raise CorruptImageError(f"no image of the data set decodes (e.g. {self.describe(i)}); check data.root")

    def epoch_report(self, examples: int = 3) -> tuple[int, list[str]]:
        """(replacements since the last call, up to ``examples`` of the files): the trainer calls it per epoch."""
        total = int(self.hits.sum())
        new, self._reported = total - self._reported, total
        where = self.hits.nonzero().flatten()[:examples].tolist() if new else []
        return new, [self.describe(j) for j in where]


@runtime_checkable
class HasCorruptImages(Protocol):
    corrupt: CorruptImages


def corrupt_images(dataset) -> CorruptImages | None:
    """The bookkeeping of a data set that reads image files (ImageFolder, HF), else None."""
    return dataset.corrupt if isinstance(dataset, HasCorruptImages) else None
