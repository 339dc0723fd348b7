"""Throughput of ``simzss prepare`` (captions/s) by process count, on toy-world shards; prints JSON.

    python benchmarks/bench_prepare.py [--captions 4000] [--processes 1,2] [--shard-size 250] [--spacy numpy-blas,blis]

``captions_per_s`` is end to end (worker start and spaCy loading included); ``captions_per_s_per_process``
counts only the time workers spend on shards (read, spaCy, write) and ``captions_per_cpu_s`` the CPU
time of that work, which stays meaningful on a machine shared with other jobs. ``--spacy`` runs spaCy's matrix
products through numpy's BLAS (``prepare``'s default) and/or spaCy's bundled BLIS, for a before/after comparison
under the same load; the pipeline itself is spaCy's as shipped in both. Every process gets one BLAS thread (set here before numpy is imported,
unless the variables are set already), so the per-process figures are per core. The toy-world generation
rate (``simzss demo-data``) is reported as well, since the benchmark writes its input with it.
"""

from __future__ import annotations

import os

# Before anything imports numpy: one BLAS thread per process (prepare's worker processes get the same).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

from simzss.concepts import ConceptBank
from simzss.data.prepare import prepare_shards
from simzss.data.synthetic import generate_toy_world

SPACY_MODES = {"numpy-blas": True, "blis": False}  # where spaCy's matrix products run (same pipeline)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captions", type=int, default=4000, help="toy-world samples to prepare")
    ap.add_argument("--processes", default="1,2", help="comma-separated process counts")
    ap.add_argument("--spacy", default="numpy-blas",
                    help="comma-separated matrix-product backends to run: numpy-blas (prepare's default), blis")
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--image-size", type=int, default=128, help="toy-world image size (only affects generation)")
    ap.add_argument("--spacy-model", default="en_core_web_sm")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workdir", help="keep data here instead of a temporary folder")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    counts = [int(p) for p in args.processes.split(",")]
    modes = [m.strip() for m in args.spacy.split(",")]
    if unknown := [m for m in modes if m not in SPACY_MODES]:
        ap.error(f"--spacy: unknown pipeline(s) {unknown}; choose from {sorted(SPACY_MODES)}")

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        t0, c0 = time.perf_counter(), time.process_time()
        world = generate_toy_world(root / "toy", num_train=args.captions, num_val=0, image_size=args.image_size,
                                   shard_size=args.shard_size)
        gen_seconds, gen_cpu = time.perf_counter() - t0, time.process_time() - c0
        inputs = [str(root / "toy" / "train" / name) for name in world["shards"]]
        bank = ConceptBank.default()
        results = []
        for mode in modes:
            for p in counts:
                s = prepare_shards(inputs, root / f"out-{mode}-{p}", processes=p, spacy_model=args.spacy_model,
                                   batch_size=args.batch_size, bank=bank, progress=False,
                                   fast_spacy=SPACY_MODES[mode])
                assert s["shards_failed"] == 0 and s["captions"] == args.captions, s
                results.append({"spacy": mode, **{k: s[k] for k in (
                    "processes", "captions_per_s", "captions_per_s_per_process", "captions_per_cpu_s", "seconds",
                    "concepts_per_caption", "in_bank_share")}})

    base = results[0]["captions_per_s"]
    report = {
        "benchmark": "prepare",
        "command": "python benchmarks/bench_prepare.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1m": round(os.getloadavg()[0], 2),
                    "blas_threads_per_process": os.environ.get("OPENBLAS_NUM_THREADS")},
        "date": time.strftime("%Y-%m-%d"),
        "captions": args.captions,
        "shards": len(inputs),
        "spacy_model": args.spacy_model,
        "toy_world": {"samples": args.captions, "image_size": args.image_size, "seconds": round(gen_seconds, 2),
                      "samples_per_s": round(args.captions / gen_seconds, 1),
                      "samples_per_cpu_s": round(args.captions / gen_cpu, 1)},
        "results": results,
        "speedup_vs_first": [round(r["captions_per_s"] / base, 2) for r in results],
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
