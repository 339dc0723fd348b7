"""``simzss demo``: the whole pipeline on the built-in synthetic toy world, on a CPU, in minutes.

Each stage runs through the same command entry point a user would call (``simzss demo-data``,
``prepare``, ``tokenizer``, ``train``, ``plot``, ``export``, ``eval``, ``segment``), so the demo exercises what
the README documents. Stages whose outputs exist are reused; ``--overwrite`` starts over (``--fresh``, its former
spelling, still works for one release). The overlay shows the held-out image that the README describes: the first
one holding all of :data:`OVERLAY_CLASSES`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from simzss.cli import COMMANDS
from simzss.cli.options import (EXIT_FAILED, EXIT_USAGE, add_no_progress, add_overwrite, command_parser,
                                deprecated_alias, fail)

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
#: The classes of the held-out image the overlay shows (the README's picture: snow, a brick wall, a plank floor
#: and an apple).
OVERLAY_CLASSES: Tuple[str, ...] = ("snow", "wall", "floor", "apple")


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


def overlay_image(val_dir: Path, wanted: Sequence[str] = OVERLAY_CLASSES) -> Tuple[Path, List[str]]:
    """The first held-out image whose mask holds every class in ``wanted`` (the first image when none does), and
    the classes its mask holds."""
    import numpy as np
    from PIL import Image

    names = (val_dir / "classes.txt").read_text().split()
    images = sorted((val_dir / "images").iterdir())
    first: Optional[Tuple[Path, List[str]]] = None
    for image in images:
        ids = np.unique(np.asarray(Image.open(val_dir / "masks" / f"{image.stem}.png")))
        present = [names[i] for i in ids if i < len(names)]
        first = first or (image, present)
        if set(wanted) <= set(present):
            return image, present
    if first is None:
        raise FileNotFoundError(f"{val_dir / 'images'} holds no held-out image")
    return first


def run_demo(
    workdir: Path,
    *,
    num_train: int = 3000,
    num_val: int = 100,
    max_steps: Optional[int] = None,
    with_lit: bool = True,
    workers: int = 2,
    config_dir: Path = REPO_CONFIGS,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Run the toy-world pipeline under ``workdir``; return the mIoUs and output paths."""
    quiet = [] if progress else ["--no-progress"]
    if overwrite and workdir.exists():
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
        _run("tokenizer", ["--shards", str(data / "train"), "--out", str(tokenizer), "--vocab-size", "2048", *quiet])

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
        _run("train", ["--config", str(_config(config, config_dir)), f"run_name={run_name}", *common, *quiet])
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
    shown, shown_classes = overlay_image(data / "val")
    overlay = workdir / "overlay.png"
    _run("segment", [str(shown), "--model", str(export), "--labels", ",".join(classes),
                     "--out", str(overlay), "--out-mask", str(workdir / "overlay_mask.png"), *eval_size,
                     "--min-width", "448"])

    summary = {
        "miou_simzss": results["simzss"],
        "miou_lit": results.get("lit"),
        "export": str(export),
        "overlay": str(overlay),
        "overlay_image": str(shown),
        "overlay_classes": shown_classes,
        "eval_export": str(eval_json),
        "curves": str(curves),
    }
    (workdir / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``simzss demo``."""
    p = command_parser(
        "demo",
        "The whole pipeline on the built-in synthetic toy world, on a CPU, in minutes: demo data, concept "
        "annotation, tokenizer, SimZSS and LiT training, evaluation, export and an overlay picture.",
        ["simzss demo", "simzss demo --workdir /tmp/toy --no-lit --max-steps 20 --overwrite"],
    )
    p.add_argument("--workdir", default="demo", help="where data, runs, export and overlay go")
    p.add_argument("--num-train", type=int, default=3000, help="toy-world training pairs")
    p.add_argument("--num-val", type=int, default=100, help="held-out images with masks")
    p.add_argument("--max-steps", type=int, default=None, help="cap the training steps (default: configs/demo.yaml)")
    p.add_argument("--no-lit", action="store_true", help="skip the LiT baseline run")
    p.add_argument("--workers", type=int, default=2, help="data-loading workers")
    p.add_argument("--config-dir", default=str(REPO_CONFIGS), help="folder with demo.yaml and demo_lit.yaml")
    add_overwrite(p, "the whole workdir (it is deleted first)")
    deprecated_alias(p, "--fresh", "--overwrite", dest="overwrite", nargs=0, const=True)
    add_no_progress(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``simzss demo``: exit 0 when every stage ran, 1 when a stage failed, 2 for a usage error."""
    args = build_parser().parse_args(argv)
    from simzss.logs import setup_logging

    setup_logging(progress=not args.no_progress)
    config_dir = Path(args.config_dir)
    for name in ("demo.yaml", "demo_lit.yaml"):
        if not (config_dir / name).is_file():
            return fail("demo", f"{config_dir / name} not found: run the demo from a source checkout "
                        "(pip install -e .) or pass --config-dir", EXIT_USAGE)
    try:
        summary = run_demo(
            Path(args.workdir), num_train=args.num_train, num_val=args.num_val, max_steps=args.max_steps,
            with_lit=not args.no_lit, workers=args.workers, config_dir=config_dir, overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (StageFailed, FileNotFoundError) as e:
        return fail("demo", str(e), EXIT_FAILED)
    print("\n== toy world, held-out split: zero-shot segmentation ==")
    print(f"  SimZSS mIoU: {summary['miou_simzss']:.1f}")
    if summary["miou_lit"] is not None:
        print(f"  LiT mIoU: {summary['miou_lit']:.1f}   (same steps, concept loss off)")  # as the README quotes it
    print(f"  export: {summary['export']}\n  overlay: {summary['overlay']} (held-out image "
          f"{Path(summary['overlay_image']).name}: {', '.join(summary['overlay_classes'])})\n"
          f"  training curves: {summary['curves']}")
    return 0
