"""``python -m dat_ds.cli.tune_rank --exchange DIR ...``: a measuring rank of ``dat-ds tune`` (started by
``cli.tune.start_ranks`` through the one launcher)."""

import sys

from .ranks import tune_rank

if __name__ == "__main__":
    sys.exit(tune_rank())
