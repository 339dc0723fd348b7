"""``simzss train`` / ``python train.py``: parse a config and overrides, then run the trainer.

The module imports only light modules at the top so that ``simzss train --help`` answers at once; the trainer
(torch, accelerate, timm) is imported inside :func:`main` after the arguments are parsed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional, Sequence

from simzss.cli.options import (add_device, add_no_progress, command_parser, fail, os_error_line,
                                select_cuda_device, unwritable, usage_error)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``simzss train``."""
    p = command_parser(
        "train",
        "Train SimZSS (or LiT with model.concept_weight=0) from a YAML config plus key.sub=value overrides. Works "
        "as a plain process or under `accelerate launch` (multi-GPU / multi-node).",
        ["simzss train --config configs/demo.yaml max_steps=50 optim.lr=1e-3",
         "simzss train --config configs/demo.yaml --resume latest max_steps=62",
         "simzss train --config configs/demo.yaml --device cpu --print-config"],
    )
    p.add_argument("--config", help="YAML file in the TrainConfig schema (configs/*.yaml)")
    p.add_argument("overrides", nargs="*",
                   help="key.sub=value overrides, before or after the options, e.g. batch_size=256 model.text.layers=6")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", metavar="latest|PATH",
                   help="continue from the newest checkpoint of this run (latest) or from a checkpoint / run folder; "
                   "same as the override resume=..., and takes precedence over it")
    add_device(p)
    add_no_progress(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``simzss train``; exit 0 (done or preempted), 1 (a failed run: non-finite stop, unwritable or full disk),
    2 (a usage or config error)."""
    # intermixed: overrides may come after options too (`--resume latest max_steps=62`)
    args = build_parser().parse_intermixed_args(argv)
    problem = select_cuda_device(args.device)
    if problem:
        return usage_error("train", problem)

    if args.config is not None and not os.path.isfile(args.config):
        return usage_error("train", f"--config {args.config}: no such file (the configs are in configs/*.yaml)")

    from safetensors import SafetensorError

    from simzss.config import ConfigError, TrainConfig, load_config, to_yaml
    from simzss.data.stream import TrainingDataError
    from simzss.engine.startup_checks import validate_config
    from simzss.engine.trainer import NonFiniteLossError, first_line, train
    from simzss.logs import setup_logging

    setup_logging(progress=not args.no_progress)
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        if args.resume is not None:
            if not args.resume.strip():
                raise ConfigError("--resume needs 'latest' or a checkpoint path")
            # Set on the dataclass, not as a dotlist override: a path is taken verbatim (no YAML parsing).
            cfg = dataclasses.replace(cfg, resume=args.resume)
        if args.device == "cpu":
            cfg = dataclasses.replace(cfg, cpu=True)
        elif args.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
            cfg = dataclasses.replace(cfg, cpu=False)
        validate_config(cfg)
    except (ConfigError, FileNotFoundError) as e:
        return usage_error("train", f"config error: {first_line(e)}")
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    problem = unwritable(os.path.join(cfg.output_dir, cfg.run_name), folder=True)
    if problem:
        return fail("train", f"output_dir: {problem}")
    try:
        result = train(cfg)
    except ConfigError as e:
        return usage_error("train", f"config error: {first_line(e)}")
    except NonFiniteLossError as e:
        return fail("train", f"stopped: {e}")
    except TrainingDataError as e:  # shards that yield nothing, every sample skipped: one line, not a traceback
        return fail("train", f"training data: {e}")
    except OSError as e:  # a read-only or full disk mid-run
        return fail("train", f"run failed: {os_error_line(e)}")
    except SafetensorError as e:  # safetensors' writer reports a full disk with its own exception
        return fail("train", f"run failed writing a checkpoint: {first_line(e)} (free some space or write elsewhere)")
    if result["stopped"]:
        print(f"simzss train: stopped by {result['stopped']} at step {result['step']}, checkpoint "
              f"{result['checkpoint']}; resume with --resume latest", file=sys.stderr)
    return 0


__all__ = ["build_parser", "main"]
