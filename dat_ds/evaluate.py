"""``deepspeed --module dat_ds.evaluate --run runs/demo ...``: the evaluation rank entry (what ``dat-ds eval
--nproc N`` starts)."""

import sys

from .cli.ranks import eval_rank

if __name__ == "__main__":
    sys.exit(eval_rank())
