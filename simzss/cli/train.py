"""``simzss train`` / ``python train.py``: parse a config and overrides, then run the trainer."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence

from simzss.config import ConfigError, TrainConfig, load_config, to_yaml
from simzss.engine.trainer import NonFiniteLossError, first_line, train, validate_config
from simzss.helpformat import HelpFormatter
from simzss.logs import setup_logging


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        prog="simzss train",
        description="Train SimZSS (or LiT with model.concept_weight=0). Works as a plain process or under "
        "`accelerate launch` (multi-GPU / multi-node).",
        epilog="example: simzss train --config configs/demo.yaml max_steps=50 optim.lr=1e-3",
    )
    p.add_argument("--config", help="YAML file in the TrainConfig schema (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. batch_size=256 model.text.layers=6")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", metavar="latest|PATH",
                   help="continue from the newest checkpoint of this run (latest) or from a checkpoint / run folder; "
                   "same as the override resume=..., and takes precedence over it")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``simzss train`` / ``python train.py``; exit 0 (done or preempted), 1 (non-finite stop), 2 (bad config)."""
    args = _parser().parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        if args.resume is not None:
            if not args.resume.strip():
                raise ConfigError("--resume needs 'latest' or a checkpoint path")
            # Set on the dataclass, not as a dotlist override: a path is taken verbatim (no YAML parsing).
            cfg = dataclasses.replace(cfg, resume=args.resume)
        validate_config(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"simzss train: config error: {first_line(e)}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    try:
        result = train(cfg)
    except ConfigError as e:
        print(f"simzss train: config error: {first_line(e)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"simzss train: stopped: {e}", file=sys.stderr)
        return 1
    if result["stopped"]:
        print(f"simzss train: stopped by {result['stopped']} at step {result['step']}, checkpoint "
              f"{result['checkpoint']}; resume with --resume latest", file=sys.stderr)
    return 0
