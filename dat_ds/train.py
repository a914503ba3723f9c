"""``deepspeed --module dat_ds.train ...``: the training rank entry under its documented name."""

import sys

from .launch.train import cli_entry

if __name__ == "__main__":
    sys.exit(cli_entry())
