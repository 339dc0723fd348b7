"""``benchmarks/gpu_session.sh``, the one prepared run for a lent GPU, works end to end: its CPU dry run (tiny models,
the same benchmarks and options) writes one parseable JSON per benchmark, so a session that is lent a GPU does not
spend its 15 device minutes on a broken script. The spaCy-free annotation it falls back on there is checked against
``simzss prepare``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ("e2e", "e2e_variants", "train_step", "train_step_cached", "cache", "eval")


def test_cpu_dry_run_writes_every_result(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "SMALL": "1", "OUT": str(out), "PYTHON": sys.executable, "SHARDS": str(tmp_path / "shards")}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    log = (out / "session.log").read_text() if (out / "session.log").exists() else ""
    assert proc.returncode == 0, proc.stderr + log[-3000:]
    for name in BENCHES:
        assert f"{name}: rc=0" in proc.stdout, log[-3000:]
        result = json.loads((out / f"{name}.json").read_text())
        assert result and isinstance(result, dict)
    assert json.loads((out / "profile.json").read_text())
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back
    variants = json.loads((out / "e2e_variants.json").read_text())
    assert [run["variant"] for run in variants["runs"]] == ["resized", "pil"]
    assert (tmp_path / "shards" / "photo_shards.json").is_file()  # made once, for both e2e benchmarks


def test_only_reruns_the_named_benchmarks(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "SMALL": "1", "OUT": str(out), "PYTHON": sys.executable, "ONLY": "eval",
           "SHARDS": str(tmp_path / "shards")}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [line for line in proc.stdout.splitlines() if line.startswith("eval: rc=0")]
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "session.log"]


def test_toy_annotation_without_spacy_matches_prepare_on_the_bank(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_cache
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from simzss.concepts import ConceptBank
    from simzss.data.prepare import prepare_shards
    from simzss.data.shards import iter_samples
    from simzss.data.synthetic import TOY_CLASSES, generate_toy_world

    toy = generate_toy_world(tmp_path / "toy", num_train=100, num_val=1, image_size=32, shard_size=50)
    shards = [str(Path(toy["train_dir"]) / n) for n in toy["shards"]]
    bench_cache.annotate_toy(shards, tmp_path / "plain")
    prepare_shards(shards, tmp_path / "spacy", progress=False,
                   bank=ConceptBank.from_file(Path(toy["val_dir"]) / "classes.txt"))
    same = total = 0
    for shard in sorted((tmp_path / "plain").glob("*.tar")):
        ours = {s["__key__"]: json.loads(s["concepts.json"])["concepts"] for s in iter_samples(shard)}
        theirs = {s["__key__"]: json.loads(s["concepts.json"])["concepts"] for s in iter_samples(tmp_path / "spacy" / shard.name)}
        assert ours.keys() == theirs.keys()
        for key, concepts in ours.items():
            a = sorted((c["concept"], tuple(c["spans"][0])) for c in concepts)
            b = sorted((c["concept"], tuple(c["spans"][0])) for c in theirs[key] if c["concept"] in TOY_CLASSES)
            assert set(b) <= set(a), key  # every bank concept spaCy finds is found, at the same characters
            same += a == b
            total += 1
    assert total == 100 and same >= 90
