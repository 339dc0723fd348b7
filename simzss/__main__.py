"""``python -m simzss COMMAND ...``: the same as the ``simzss`` console script."""

import sys

from simzss.cli import main

sys.exit(main())
