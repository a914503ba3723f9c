"""``deepspeed --module dat_ds.train ...``: the training rank entry under its documented name."""

import sys

from .cli.ranks import train_rank

if __name__ == "__main__":
    sys.exit(train_rank())
