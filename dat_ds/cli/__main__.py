"""``python -m dat_ds.cli``: the same as the ``dat-ds`` command."""

import sys

from . import main

sys.exit(main())
