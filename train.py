"""Train SimZSS: ``python train.py --config configs/demo.yaml [key.sub=value ...]`` (same as ``simzss train``).

Multi-GPU / multi-node: ``accelerate launch [--config_file ...] train.py --config ...`` (docs/multinode.md).
"""

import sys

from simzss.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
