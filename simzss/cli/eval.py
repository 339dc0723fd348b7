"""``simzss eval``: zero-shot segmentation / classification / retrieval of a model on several datasets.

The examples are in :data:`EXAMPLES` (shown by ``simzss eval --help``).

Several models are evaluated in turn with the same settings; ``--out`` then holds ``{"task", "runs": [...]}`` (one
payload per model) and ``--report DIR`` writes pictures and a ``report.md`` comparing them
(:mod:`simzss.reports.segmentation_report`).

Under ``accelerate launch`` the images of each dataset are split across processes and the counts reduced; a plain
``simzss eval`` is one process (GPU if present, else CPU). Results are printed as a table and, with ``--out``,
written as JSON (atomically). ``--report-to-run RUN_DIR`` also writes them to ``RUN_DIR/eval/`` and logs
``eval/<spec>/<metric>`` scalars at the checkpoint's step to the run's ``metrics.jsonl`` and its tracker
(TensorBoard folder or wandb run, as configured in ``RUN_DIR/config.yaml``).

A dataset spec that names no dataset of the task, or whose path does not exist, is refused before any model is
loaded (one line, exit status 2). A dataset that cannot be read (malformed folder, unreadable shards, IO error) or
that ends with no evaluated image (all skipped) is reported in one error line and listed under ``"failed"`` in the
JSON; the other datasets still run, and the exit status is then 1 (2 when the model cannot be loaded). The output paths
(``--out``, ``--report``) are checked for writing before anything is computed; a write that fails at the end (a
full disk) is one error line and exit status 1.

Only light modules are imported at the top (``simzss eval --help`` answers at once); the evaluation stack (torch,
accelerate, the model loaders) is imported when it runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from simzss.cli.options import (EXIT_FAILED, EXIT_USAGE, add_device, add_no_progress, command_parser,
                                deprecated_alias, fail, os_error_line, select_cuda_device, unwritable)

log = logging.getLogger("simzss.eval")

TASKS = ("segmentation", "classification", "retrieval")
DEFAULT_TEMPLATES = {"segmentation": "single", "classification": "imagenet80", "retrieval": None}
EXAMPLES = [
    "simzss eval exports/simzss-b14 --task segmentation --datasets voc20:/data/VOCdevkit context59:/data/VOCdevkit",
    "accelerate launch -m simzss.cli eval runs/x/checkpoints/step-5000 --task segmentation "
    "--datasets folder:demo/data/val --out results.json --report-to-run runs/x",
    "simzss eval exports/simzss-b14 --task classification --datasets imagenet:/data/imagenet/val --device cpu",
    "simzss eval exports/simzss-b14 --task retrieval --datasets karpathy:/data/coco/dataset_coco.json",
    "simzss eval exports/simzss-b14 gem:ViT-B-16/openai maskclip:ViT-B-16/openai --datasets voc20:/data/VOCdevkit "
    "--out compare.json --report reports/voc20",
]


# --------------------------------------------------------------------------------------------- model


def load_model(path: str, device: Any = "cpu") -> Any:
    """Load a SimZSS model from an export folder or a trainer checkpoint (step folder, checkpoints folder or run
    folder: the newest complete checkpoint) via :func:`simzss.io.load.load_model`."""
    from simzss.baselines import is_baseline_spec
    from simzss.io.checkpoint import LATEST
    from simzss.io.load import load_model as _load

    if is_baseline_spec(path):  # gem:..., maskclip:... (simzss.baselines)
        return _load(path, device)
    p = Path(path).expanduser()
    if not p.exists() and not (p.name == LATEST and p.parent.is_dir()):  # RUN/checkpoints/latest: an alias
        raise FileNotFoundError(f"model not found: {p}")
    return _load(p, device)


def checkpoint_step(path: str) -> Optional[int]:
    """Training step encoded in a checkpoint path (``.../step-5000``), if any."""
    m = re.search(r"step-(\d+)", Path(path).name) or re.search(r"step-(\d+)", str(path))
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------- outputs


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temp file in the same folder + ``os.replace`` (never a half-written file); the file gets
    the mode the user's umask gives a new file (mkstemp alone would leave 0600)."""
    from simzss.data.shards import current_umask

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_json_safe(data), f, indent=2, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_COLUMNS = {
    "segmentation": [("mIoU", "mIoU"), ("pixel_acc", "pixAcc"), ("num_images", "images"), ("skipped", "skipped")],
    "classification": [("top1", "top1"), ("top5", "top5"), ("num_images", "images"), ("skipped", "skipped")],
    "retrieval": [
        ("i2t_R@1", "I→T R@1"), ("i2t_R@5", "R@5"), ("i2t_R@10", "R@10"),
        ("t2i_R@1", "T→I R@1"), ("t2i_R@5", "R@5"), ("t2i_R@10", "R@10"),
        ("num_images", "images"), ("num_texts", "texts"),
    ],
}


def format_table(task: str, results: Dict[str, Dict[str, Any]]) -> str:
    """Plain-text table: one row per dataset spec, the task's headline metrics as columns."""
    cols = _COLUMNS[task]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.2f}"
        if isinstance(v, dict):
            return str(sum(v.values()))
        return str(v)

    rows = [["dataset"] + [h for _, h in cols]]
    rows += [[spec] + [cell(r.get(k, "")) for k, _ in cols] for spec, r in results.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _scalars(task: str, spec: str, r: Dict[str, Any]) -> Dict[str, float]:
    """``eval/<spec>/<metric>`` scalars (the trainer's eval-hook naming)."""
    keys = [k for k, _ in _COLUMNS[task] if not k.startswith(("num_", "skipped"))]
    return {f"eval/{spec}/{k}": float(r[k]) for k in keys if isinstance(r.get(k), (int, float))}


def _run_tracking(run_dir: Path) -> Tuple[str, Optional[str], str]:
    """(report_to, run_id, run_name) of a training run, from ``RUN/config.yaml`` and its newest checkpoint."""
    from simzss.config import TrainConfig, load_config
    from simzss.engine.checkpoint import latest_checkpoint

    report_to, run_name, run_id = "none", run_dir.name, None
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        cfg = load_config(TrainConfig, cfg_path)
        report_to, run_name = cfg.report_to, cfg.run_name
    ckpt = latest_checkpoint(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
    if ckpt is not None and (ckpt / "trainer_state.json").is_file():
        run_id = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8")).get("run_id")
    return report_to, run_id, run_name


def report_to_run(run_dir: Path, task: str, payload: Dict[str, Any], step: Optional[int]) -> Path:
    """Save results as ``RUN_DIR/eval/<task>-step-N.json`` and log ``eval/<spec>/<metric>`` scalars at ``step``
    through the run's own tracker (:class:`simzss.engine.tracking.MetricLogger`: ``metrics.jsonl`` plus the
    run's wandb run (same id) or TensorBoard folder). Returns the JSON path."""
    from simzss.engine.tracking import MetricLogger, new_run_id

    if not run_dir.is_dir():
        raise FileNotFoundError(f"--report-to-run: run folder not found: {run_dir}")
    stamp = f"step-{step}" if step is not None else _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = run_dir / "eval" / f"{task}-{stamp}.json"
    write_json_atomic(out, payload)
    report_to, run_id, run_name = _run_tracking(run_dir)
    if report_to == "wandb" and run_id is None:
        log.warning("%s: no run id found in its checkpoints; eval scalars go to metrics.jsonl only", run_dir)
        report_to = "none"
    scalars: Dict[str, float] = {}
    for spec, r in payload["results"].items():
        scalars.update(_scalars(task, spec, r))
    logger = MetricLogger(run_dir, report_to, run_id=run_id or new_run_id(), run_name=run_name)
    try:
        logger.log(scalars, step if step is not None else 0)
    finally:
        logger.close()
    log.info("logged %d eval scalars to %s (%s)", len(scalars), run_dir, report_to)
    return out


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``simzss eval``."""
    p = command_parser(
        "eval", "Zero-shot segmentation / classification / retrieval of one or more models on several datasets; "
        "prints a table and writes JSON (--out) and a comparison report (--report).", EXAMPLES,
    )
    p.add_argument("model", nargs="+",
                   help="one or more models, evaluated in turn: export folder (simzss export), training checkpoint "
                        "folder (RUN/checkpoints/step-N), or a training-free baseline spec such as gem:ViT-B-16/openai, "
                        "maskclip:ViT-B-16/openai, gem:ViT-B-16@/path/weights.bin (docs/baselines_and_reports.md)")
    p.add_argument("--task", choices=TASKS, default="segmentation", help="what to evaluate")
    p.add_argument("--datasets", nargs="+", required=True, metavar="NAME:PATH",
                   help="segmentation: voc, voc20, context60, context59, coco_object, coco_stuff, cityscapes, ade20k, "
                        "folder; classification: imagenet, imagefolder; retrieval: wds, karpathy")
    p.add_argument("--templates", default=None, help="imagenet80 | tcl9 | single (default: single for segmentation, "
                   "imagenet80 for classification)")
    g = p.add_argument_group("segmentation")
    g.add_argument("--short-side", type=int, default=448, help="resize the short side to this (0 = keep size)")
    g.add_argument("--max-long", type=int, default=2048, help="cap on the long side after resizing")
    g.add_argument("--crop", type=int, default=448, help="sliding window size")
    g.add_argument("--stride", type=int, default=224, help="sliding window stride")
    g.add_argument("--window-batch", type=int, default=16, help="windows per forward pass")
    g.add_argument("--image-batch", type=int, default=8,
                   help="images segmented together (their windows share the forward passes; same results for any "
                        "value, more memory for larger ones)")
    g.add_argument("--background", choices=("threshold", "class"), default=None,
                   help="background handling for datasets with a background class (default: threshold)")
    g.add_argument("--bg-threshold", type=float, default=None,
                   help="threshold mode: default 0.95 voc/coco_object, 0.35 context60, 0.5 folder")
    g.add_argument("--pamr", action="store_true",
                   help="refine each image's probabilities with PAMR (TCL: 10 iterations, dilations 1-24); "
                        "recorded in the results' protocol")
    g = p.add_argument_group("classification / retrieval")
    g.add_argument("--image-size", type=int, default=224, help="input size (resize short side, center crop)")
    g.add_argument("--batch-size", type=int, default=64, help="images per batch")
    g.add_argument("--split", default="test", help="Karpathy json split")
    g.add_argument("--image-root", default=None, help="Karpathy images root (default: the json's folder)")
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=int, default=4, help="data-loading workers (threads for retrieval)")
    g.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images of each dataset")
    g.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no", help="autocast dtype")
    add_device(g)
    deprecated_alias(p, "--cpu", "--device cpu", dest="device", nargs=0, const="cpu")
    g.add_argument("--out", default=None, help="write results JSON here")
    g.add_argument("--report-to-run", default=None, metavar="RUN_DIR", help="also log results to this training run")
    g.add_argument("--report", default=None, metavar="DIR",
                   help="segmentation: write pictures (per-class IoU, most confused pairs, sample grids) and a "
                        "report.md comparing the models into DIR")
    g.add_argument("--report-samples", type=int, default=6, help="images per dataset in the report's sample grid")
    g.add_argument("--step", type=int, default=None, help="step to log at (default: from a step-N checkpoint name)")
    add_no_progress(g)
    return p


def run_task(model: Any, task: str, spec: str, args: argparse.Namespace, accelerator: Any) -> Dict[str, Any]:
    """Evaluate one dataset spec (translates CLI options into library arguments)."""
    from simzss.eval.classification import evaluate_classification
    from simzss.eval.retrieval import evaluate_retrieval
    from simzss.eval.segmentation import evaluate_segmentation

    common = dict(accelerator=accelerator, max_images=args.max_images, workers=args.workers,
                  progress=not args.no_progress)
    templates = args.templates or DEFAULT_TEMPLATES[task]
    if task == "segmentation":
        return evaluate_segmentation(
            model, spec, templates=templates, short_side=args.short_side or None, crop=args.crop,
            stride=args.stride, window_batch=args.window_batch, image_batch=args.image_batch,
            background=args.background,
            bg_threshold=args.bg_threshold, max_long=args.max_long, return_confusion=bool(args.report),
            num_samples=args.report_samples if args.report else 0, pamr=args.pamr, **common,
        )
    if task == "classification":
        return evaluate_classification(model, spec, templates=templates, image_size=args.image_size,
                                       batch_size=args.batch_size, **common)
    return evaluate_retrieval(model, spec, image_size=args.image_size, batch_size=args.batch_size,
                              image_root=args.image_root, split=args.split, **common)


def _usage_problem(args: argparse.Namespace) -> Optional[str]:
    """The first usage problem of the options, found before anything is loaded or computed, or None."""
    for flag in ("window_batch", "image_batch", "batch_size"):
        if getattr(args, flag) < 1:
            return f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}"
    if args.report_to_run and len(args.model) > 1:
        return f"--report-to-run takes one model, got {len(args.model)}"
    if args.report and args.task != "segmentation":
        return f"--report draws segmentation results; drop it for --task {args.task}"
    if args.report_to_run and not Path(args.report_to_run).is_dir():
        return f"--report-to-run: run folder not found: {args.report_to_run}"
    return select_cuda_device(args.device)


def _dataset_problem(task: str, specs: List[str]) -> Optional[str]:
    """The first ``--datasets`` spec that cannot be right, checked before any model is loaded: not ``NAME:PATH``,
    a name the task does not know, or a local path that does not exist (a usage error, exit 2, as a missing input
    is in every command). A dataset that exists but cannot be read still fails alone, later (exit 1)."""
    from simzss.eval.datasets import SEGMENTATION_DATASETS, parse_spec

    known = {"segmentation": sorted(SEGMENTATION_DATASETS), "classification": ["imagefolder", "imagenet"],
             "retrieval": ["karpathy", "wds"]}[task]
    for spec in specs:
        try:
            name, path = parse_spec(spec)
        except ValueError as e:
            return f"--datasets: {e}"
        if name not in known:
            return f"--datasets {spec}: no {task} dataset is called {name!r}; known: {', '.join(known)}"
        if name == "wds" and (any(c in path for c in "{*?[") or "::" in path or "://" in path or path.startswith("pipe:")):
            continue  # a shard pattern or URL: read (and reported) when the dataset runs
        root = Path(path).expanduser()
        if not root.exists():
            return f"--datasets {spec}: {root} does not exist"
        if name == "karpathy" and not root.is_file():
            return f"--datasets {spec}: {root} is a folder; karpathy takes the dataset's json file"
        if name not in ("karpathy", "wds") and not root.is_dir():
            return f"--datasets {spec}: {root} is a file; {name} takes the dataset's folder"
    return None


def _output_problem(args: argparse.Namespace) -> Optional[str]:
    """Why an output (``--out``, ``--report``, ``--report-to-run``) cannot be written, checked before computing."""
    checks = [(args.out, False), (args.report, True),
              (str(Path(args.report_to_run) / "eval") if args.report_to_run else None, True)]
    for path, folder in checks:
        problem = unwritable(path, folder=folder) if path else None
        if problem:
            return problem
    return None


def main(argv: Optional[List[str]] = None) -> int:
    """``simzss eval``: exit 0 when every model and dataset was evaluated; 2 for a usage error (a bad option, a
    dataset spec with an unknown name or a missing path, a model that cannot be loaded); 1 for a failed run (a
    dataset failed to read, an output could not be written)."""
    args = build_parser().parse_args(argv)
    problem = _usage_problem(args) or _dataset_problem(args.task, args.datasets)
    if problem:
        return fail("eval", problem, EXIT_USAGE)
    problem = _output_problem(args)
    if problem:
        return fail("eval", problem, EXIT_FAILED)

    import torch
    from accelerate import Accelerator

    from simzss.logs import setup_logging

    setup_logging(progress=not args.no_progress)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return fail("eval", f"--device {args.device}: CUDA is not available on this machine; use --device cpu",
                    EXIT_USAGE)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    payloads: List[Dict[str, Any]] = []
    not_loaded: List[str] = []
    any_failed = False
    for model_spec in args.model:
        try:
            model = load_model(model_spec, accelerator.device)
        except (FileNotFoundError, ValueError, RuntimeError) as e:  # ExportError is a RuntimeError
            fail("eval", str(e), EXIT_USAGE)  # one line; the other models still run
            not_loaded.append(model_spec)
            continue
        model.eval()
        results: Dict[str, Dict[str, Any]] = {}
        failed: Dict[str, str] = {}
        for spec in args.datasets:
            try:
                res = run_task(model, args.task, spec, args, accelerator)
            except (OSError, ValueError) as e:  # DatasetError, ShardReadError, IO: one line, go on with the others
                failed[spec] = f"{type(e).__name__}: {e}"
                log.error("%s: %s", spec, failed[spec])
                continue
            if not res.get("num_images"):  # everything skipped: no number to report
                failed[spec] = f"no images evaluated (skipped: {res.get('skipped')})"
                log.error("%s: %s", spec, failed[spec])
                continue
            results[spec] = res
        del model
        any_failed = any_failed or bool(failed)
        if failed:
            log.error("%s: %d of %d datasets failed: %s", model_spec, len(failed), len(args.datasets), ", ".join(failed))
        if results:
            payloads.append({
                "model": str(model_spec),
                "task": args.task,
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "num_processes": accelerator.num_processes,
                "settings": {k: v for k, v in vars(args).items() if k not in ("model", "task", "datasets", "out")},
                "results": results,
                "failed": failed,
            })
    write_failed = False
    if accelerator.is_main_process and payloads:
        for payload in payloads:
            print((f"\n{payload['model']}\n" if len(args.model) > 1 else "") + format_table(args.task, payload["results"]))
        try:
            _write_outputs(args, payloads)
        except OSError as e:  # a full or read-only disk at the end: one line, the table above still stands
            fail("eval", f"cannot write the results: {os_error_line(e)}", EXIT_FAILED)
            write_failed = True
    accelerator.wait_for_everyone()
    return EXIT_USAGE if not_loaded else (EXIT_FAILED if any_failed or write_failed else 0)


def _write_outputs(args: argparse.Namespace, payloads: List[Dict[str, Any]]) -> None:
    """The report (--report), the results JSON (--out) and the run's eval log (--report-to-run)."""
    if args.report:
        from simzss.reports.segmentation_report import ModelRun, write_report

        runs = [ModelRun(p["model"], p["results"], failed=p["failed"]) for p in payloads]
        log.info("report written to %s", write_report(args.report, runs))
    for payload in payloads:  # sample pictures are for the report only, never JSON
        for res in payload["results"].values():
            res.pop("samples", None)
    if args.out:
        write_json_atomic(Path(args.out), payloads[0] if len(args.model) == 1 else {"task": args.task, "runs": payloads})
        log.info("results written to %s", args.out)
    if args.report_to_run:
        report_to_run(Path(args.report_to_run), args.task, payloads[0],
                      args.step if args.step is not None else checkpoint_step(args.model[0]))


__all__ = ["TASKS", "EXAMPLES", "load_model", "checkpoint_step", "write_json_atomic", "format_table", "report_to_run",
           "build_parser", "run_task", "main"]
