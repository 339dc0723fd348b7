"""Concurrent writers of one sizes.json lose nothing; train names the shards that lack sizes."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from fault_helpers import tiny_overrides, write_uneven_shards
from simzss.data import shards as shards_mod
from simzss.data.stream import count_samples


def _hammer(folder: str, writer: int, n: int) -> None:
    for i in range(n):
        shards_mod.update_sizes(folder, {f"w{writer}-{i:03d}.tar": i})


def test_concurrent_sizes_updates_keep_every_entry(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    sizes = shards_mod.read_sizes(tmp_path, missing_ok=False)
    assert len(sizes) == 160 and sizes["w3-039.tar"] == 39
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sizes.json"]  # no lock or temp files left


def _prepare(inputs: list, out: str) -> None:
    from simzss.concepts import ConceptBank
    from simzss.data.prepare import prepare_shards

    prepare_shards(inputs, out, progress=False, bank=ConceptBank.from_names(["cat"]))


def test_two_prepare_runs_into_one_folder(tmp_path: Path) -> None:
    shards = write_uneven_shards(tmp_path / "in", [2] * 8, concepts=False)
    out = tmp_path / "out"
    out.mkdir()
    ctx = multiprocessing.get_context("fork")
    runs = [ctx.Process(target=_prepare, args=(shards[i::2], str(out))) for i in range(2)]
    for p in runs:
        p.start()
    for p in runs:
        p.join(120)
        assert p.exitcode == 0
    assert json.loads((out / "sizes.json").read_text()) == {f"shard-{i}.tar": 2 for i in range(8)}


def test_train_names_shards_without_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import tiny_tokenizer
    from simzss.cli import train as train_cli

    shards = write_uneven_shards(tmp_path / "data", [3, 4, 5])
    shards_mod.write_sizes(tmp_path / "data", {"shard-0.tar": 3})
    with pytest.raises(ValueError) as info:
        count_samples(shards)
    msg = str(info.value)
    assert "shard-1.tar" in msg and "shard-2.tar" in msg and "simzss prepare" in msg and "data.num_samples" in msg
    tiny_tokenizer(tmp_path / "tok")
    rc = train_cli.main(tiny_overrides(tmp_path, f"data.shards=[{tmp_path / 'data'}]", f"model.tokenizer={tmp_path / 'tok'}",
                                         "data.workers=0"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "shard-1.tar" in err and "Traceback" not in err
