"""Thin entry point: ``python eval.py MODEL --task ... --datasets ...`` == ``simzss eval ...``."""

import sys

from simzss.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
