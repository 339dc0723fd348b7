"""``simzss demo``: the whole pipeline on the built-in synthetic toy world, on a CPU, in minutes.

Each stage runs through the same command entry point a user would call (``simzss demo-data``,
``prepare``, ``tokenizer``, ``train``, ``plot``, ``export``, ``eval``, ``segment``), so the demo exercises what
the README documents. Stages whose outputs exist are reused; ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from simzss.cli import COMMANDS
from simzss.helpformat import HelpFormatter
from simzss.logs import setup_logging

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class StageFailed(RuntimeError):
    """A pipeline stage exited non-zero."""


def _run(command: str, argv: List[str]) -> None:
    """Run ``simzss COMMAND ARGV`` in-process; raise StageFailed on a non-zero exit."""
    import importlib

    module, func, _ = COMMANDS[command]
    entry: Callable[[List[str]], Optional[int]] = getattr(importlib.import_module(module), func)
    print(f"\n$ simzss {command} {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    code = int(entry(argv) or 0)
    if code != 0:
        raise StageFailed(f"`simzss {command}` exited with {code}")
    print(f"[demo] {command} done in {time.perf_counter() - t0:.1f}s", flush=True)


def _config(name: str, config_dir: Path) -> Path:
    path = config_dir / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run the demo from a source checkout (pip install -e .) or pass --config-dir"
        )
    return path


def _read_miou(run_dir: Path) -> float:
    """The mIoU of the trainer's final evaluation (RUN/eval.json: {"step", "results": {spec: {...}}})."""
    results = json.loads((run_dir / "eval.json").read_text()).get("results", {})
    if len(results) != 1:
        raise KeyError(f"expected one evaluation dataset in {run_dir / 'eval.json'}, found {list(results)}")
    return float(next(iter(results.values()))["mIoU"])


def run_demo(
    workdir: Path,
    *,
    num_train: int = 3000,
    num_val: int = 100,
    max_steps: Optional[int] = None,
    with_lit: bool = True,
    workers: int = 2,
    config_dir: Path = REPO_CONFIGS,
    fresh: bool = False,
) -> dict:
    """Run the toy-world pipeline under ``workdir``; return the mIoUs and output paths."""
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    data, prepared, tokenizer = workdir / "data", workdir / "prepared", workdir / "tokenizer"
    runs, export = workdir / "runs", workdir / "export"

    if not (data / "val" / "classes.txt").is_file():
        _run("demo-data", [str(data), "--num-train", str(num_train), "--num-val", str(num_val), "--overwrite"])
    train_shards = sorted(str(p) for p in (data / "train").glob("*.tar"))
    # prepare skips shards that are already done, so re-running it is cheap.
    _run("prepare", [*train_shards, "--out", str(prepared), "--processes", "2",
                     "--concept-bank", str(data / "val" / "classes.txt"), "--no-progress"])
    if not (tokenizer / "tokenizer.json").is_file():
        _run("tokenizer", ["--shards", str(data / "train"), "--out", str(tokenizer), "--vocab-size", "2048"])

    prepared_shards = sorted(str(p) for p in prepared.glob("*.tar"))
    common = [
        f"output_dir={runs}",
        f"data.shards=[{','.join(prepared_shards)}]",
        f"data.concept_bank={data / 'val' / 'classes.txt'}",
        f"data.workers={workers}",
        f"model.tokenizer={tokenizer}",
        f"eval.datasets=[folder:{data / 'val'}]",
    ]
    if max_steps is not None:
        common.append(f"max_steps={max_steps}")

    results = {}
    variants = [("simzss", "demo.yaml")] + ([("lit", "demo_lit.yaml")] if with_lit else [])
    for variant, config in variants:
        run_name = f"demo_{variant}"
        run_dir = runs / run_name
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a demo run is cheap; never resume a stale one silently
        _run("train", ["--config", str(_config(config, config_dir)), f"run_name={run_name}", *common])
        results[variant] = _read_miou(run_dir)
    curves = workdir / "training_curves.png"
    _run("plot", [*(str(runs / f"demo_{v}") for v, _ in variants), "--out", str(curves), "--title", "toy world",
                  "--labels", *({"simzss": "SimZSS", "lit": "LiT"}[v] for v, _ in variants)])

    simzss_run = runs / "demo_simzss"
    _run("export", [str(simzss_run / "checkpoints"), str(export), "--overwrite"])
    eval_json = workdir / "eval_export.json"
    eval_size = ["--short-side", "112", "--crop", "112", "--stride", "56"]
    _run("eval", [str(export), "--task", "segmentation", "--datasets", f"folder:{data / 'val'}",
                  *eval_size, "--out", str(eval_json), "--workers", "0", "--no-progress"])
    classes = (data / "val" / "classes.txt").read_text().split()
    first_image = sorted((data / "val" / "images").iterdir())[0]
    overlay = workdir / "overlay.png"
    _run("segment", [str(first_image), "--model", str(export), "--labels", ",".join(classes),
                     "--out", str(overlay), "--out-mask", str(workdir / "overlay_mask.png"), *eval_size,
                     "--min-width", "448"])

    summary = {
        "miou_simzss": results["simzss"],
        "miou_lit": results.get("lit"),
        "export": str(export),
        "overlay": str(overlay),
        "eval_export": str(eval_json),
        "curves": str(curves),
    }
    (workdir / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="simzss demo", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="demo", help="where data, runs, export and overlay go")
    p.add_argument("--num-train", type=int, default=3000, help="toy-world training pairs")
    p.add_argument("--num-val", type=int, default=100, help="held-out images with masks")
    p.add_argument("--max-steps", type=int, default=None, help="cap the training steps (default: configs/demo.yaml)")
    p.add_argument("--no-lit", action="store_true", help="skip the LiT baseline run")
    p.add_argument("--workers", type=int, default=2, help="data-loading workers")
    p.add_argument("--config-dir", default=str(REPO_CONFIGS), help="folder with demo.yaml and demo_lit.yaml")
    p.add_argument("--fresh", action="store_true", help="delete the workdir first")
    args = p.parse_args(argv)
    setup_logging()
    try:
        summary = run_demo(
            Path(args.workdir), num_train=args.num_train, num_val=args.num_val, max_steps=args.max_steps,
            with_lit=not args.no_lit, workers=args.workers, config_dir=Path(args.config_dir), fresh=args.fresh,
        )
    except (StageFailed, FileNotFoundError) as e:
        print(f"simzss demo: {e}", file=sys.stderr)
        return 1
    print("\n== toy world, held-out split: zero-shot segmentation ==")
    print(f"  SimZSS mIoU: {summary['miou_simzss']:.1f}")
    if summary["miou_lit"] is not None:
        print(f"  LiT    mIoU: {summary['miou_lit']:.1f}   (same steps, concept loss off)")
    print(f"  export: {summary['export']}\n  overlay: {summary['overlay']}\n  training curves: {summary['curves']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
