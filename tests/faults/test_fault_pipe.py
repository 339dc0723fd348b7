"""``pipe:`` shard URLs: accepted from configs and the command line (trusted), refused inside shard list files
(e.g. a ``shards.txt`` shipped in a downloaded dataset folder) unless explicitly allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from fault_helpers import tiny_overrides, write_uneven_shards
from simzss.data.shards import expand_shards


def test_pipe_in_config_passes_but_not_from_list_files(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    command = f"pipe:touch {marker}; cat shard.tar"
    assert expand_shards([command]) == [command]  # typed by the user: trusted

    dataset = tmp_path / "downloaded"
    shards = write_uneven_shards(dataset, [2, 2])
    (dataset / "shards.txt").write_text(f"# shard list\nshard-0.tar\n{command}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"shards\.txt.*pipe:.*allow_pipe_in_shard_lists"):
        expand_shards([str(dataset)])
    with pytest.raises(ValueError, match="refusing the pipe: entry"):
        expand_shards([str(dataset / "shards.txt")])
    assert expand_shards([str(dataset)], allow_pipe_in_lists=True) == [shards[0], command]
    assert not marker.exists()  # nothing ran

    (dataset / "shards.txt").write_text("shard-{0..1}.tar\n", encoding="utf-8")  # relative to the list's folder
    assert expand_shards([str(dataset)]) == shards


def test_train_refuses_pipe_in_dataset_list_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import tiny_tokenizer
    from simzss.cli import train as train_cli

    dataset = tmp_path / "downloaded"
    write_uneven_shards(dataset, [8])
    (dataset / "shards.txt").write_text(f"pipe:touch {tmp_path / 'pwned'}; cat shard-0.tar\n", encoding="utf-8")
    tiny_tokenizer(tmp_path / "tok")
    rc = train_cli.main(tiny_overrides(tmp_path, f"data.shards=[{dataset}]", f"model.tokenizer={tmp_path / 'tok'}",
                                         "data.workers=0", "data.num_samples=8"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "shards.txt" in err and "pipe:" in err, err
    assert not (tmp_path / "pwned").exists()
