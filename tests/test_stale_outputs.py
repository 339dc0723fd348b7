"""Issue 19 item 1: `prepare`, `shards` and `tokenizer` never reuse an output made from different input, and the
training data refuses a folder whose sizes.json no longer describes its shards."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from simzss.cli import main as simzss
from simzss.data.sampling import count_samples
from simzss.data.shards import (
    StaleSizesError, iter_samples, read_fingerprints, read_sizes, write_shard, write_sizes,
)
from simzss.data.tokenize import TRAINING_SOURCE_FILE, load_tokenizer

SMALL = ["--num-val", "0", "--image-size", "48"]


def _captions(folder: Path) -> list[str]:
    return [s["txt"].decode() for p in sorted(folder.glob("*.tar")) for s in iter_samples(p)]


def test_readme_block_after_the_demo_redoes_prepare_and_train_refuses_a_stale_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The newcomer's scenario: demo-data -> prepare -> demo-data --overwrite with other samples -> prepare must
    redo (not "already done"); leftovers of the old, bigger input are refused, then removed by --overwrite."""
    data, prepared = tmp_path / "data", tmp_path / "prepared"
    assert simzss(["demo-data", str(data), "--num-train", "12", "--shard-size", "4", *SMALL]) == 0
    capsys.readouterr()
    assert simzss(["prepare", str(data / "train"), "--out", str(prepared), "--no-progress"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["shards_done"] == 3 and first["total_samples"] == 12

    # same input again: kept
    assert simzss(["prepare", str(data / "train"), "--out", str(prepared), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["shards_skipped"] == 3

    # other samples in the same shard names (another seed, fewer shards)
    assert simzss(["demo-data", str(data), "--num-train", "8", "--shard-size", "4", "--seed", "7", "--overwrite",
                   *SMALL]) == 0
    capsys.readouterr()
    assert simzss(["prepare", str(data / "train"), "--out", str(prepared), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shard-000002.tar" in err and "--overwrite" in err  # the old third shard
    assert simzss(["prepare", str(data / "train"), "--out", str(prepared), "--no-progress", "--overwrite"]) == 0
    redone = json.loads(capsys.readouterr().out)
    assert redone["shards_done"] == 2 and redone["shards_skipped"] == 0 and redone["stale_shards_removed"] == 1
    assert redone["total_samples"] == 8 and read_sizes(prepared) == {"shard-000000.tar": 4, "shard-000001.tar": 4}
    assert _captions(prepared) == _captions(data / "train")  # the new samples, not the old ones

    # input rewritten with the same shard count: redone without being asked
    assert simzss(["demo-data", str(data), "--num-train", "8", "--shard-size", "4", "--seed", "8", "--overwrite",
                   *SMALL]) == 0
    capsys.readouterr()
    assert simzss(["prepare", str(data / "train"), "--out", str(prepared), "--no-progress"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["shards_done"] == 2 and again["shards_redone"] == 2 and again["shards_skipped"] == 0
    assert _captions(prepared) == _captions(data / "train")

    # train side: a prepared shard replaced behind sizes.json's back is refused, naming the folder and the fix
    urls = sorted(str(p) for p in prepared.glob("*.tar"))
    assert count_samples(urls) == 8
    write_shard(prepared / "shard-000001.tar", [{"__key__": f"n{i}", "jpg": b"x", "txt": "a dog"} for i in range(3)])
    with pytest.raises(StaleSizesError) as caught:
        count_samples(urls)
    message = str(caught.value)
    assert str(prepared) in message and "simzss prepare" in message and "--overwrite" in message
    assert "shard-000001.tar" in message and "\n" not in message


def test_a_copied_folder_with_new_mtimes_is_accepted_when_the_counts_hold(tmp_path: Path) -> None:
    """`cp -r` (no -p) changes every mtime: same size and same sample count is not stale."""
    folder = tmp_path / "a"
    folder.mkdir()
    for n in range(2):
        write_shard(folder / f"s{n}.tar", [{"__key__": f"k{i}", "txt": "a cat", "jpg": b"j"} for i in range(n + 2)])
    write_sizes(folder, {"s0.tar": 2, "s1.tar": 3})
    assert set(read_fingerprints(folder)) == {"s0.tar", "s1.tar"}
    copy = tmp_path / "b"
    shutil.copytree(folder, copy, copy_function=shutil.copyfile)  # contents only: fresh mtimes
    os.utime(copy / "s0.tar", ns=(1, 1))
    assert read_sizes(copy) == {"s0.tar": 2, "s1.tar": 3}
    # same size, different count: the tar was padded to the same length but holds other samples
    write_shard(copy / "s1.tar", [{"__key__": f"x{i}", "txt": "a cat", "jpg": b"j"} for i in range(2)])
    if (copy / "s1.tar").stat().st_size == (folder / "s1.tar").stat().st_size:
        with pytest.raises(StaleSizesError, match="2 samples now"):
            read_sizes(copy)
    else:
        with pytest.raises(StaleSizesError, match="bytes"):
            read_sizes(copy)
    assert read_sizes(copy, verify=False) == {"s0.tar": 2, "s1.tar": 3}  # writers that rebuild do not check


def _tok_shard(path: Path, captions: list[str]) -> None:
    write_shard(path, [{"__key__": f"k{i:04d}", "txt": c, "jpg": b"j"} for i, c in enumerate(captions)])


def test_tokenizer_is_reused_only_for_the_same_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    words = ["dog", "cat", "boat", "tree", "house", "car", "apple", "ball"]
    captions = [f"a {a} next to a {b} and a {c}" for a in words for b in words for c in words[:3]]
    shard, out = tmp_path / "s.tar", tmp_path / "tok"
    _tok_shard(shard, captions)
    argv = ["tokenizer", "--shards", str(shard), "--out", str(out), "--vocab-size", "300"]
    assert simzss(argv) == 0
    source = json.loads((out / TRAINING_SOURCE_FILE).read_text())
    assert source["shards"][0]["path"] == str(shard.resolve()) and source["settings"]["vocab_size"] == 300
    stamp = (out / "tokenizer.json").stat().st_mtime_ns
    assert simzss(argv) == 0  # same shards, same settings: up to date, not retrained
    assert (out / "tokenizer.json").stat().st_mtime_ns == stamp
    capsys.readouterr()

    _tok_shard(shard, [c.upper() + " today" for c in captions])  # other captions under the same name
    assert simzss(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other shards or settings" in err and "--overwrite" in err
    assert simzss([*argv[:-1], "310"]) == 2  # other settings: also refused
    capsys.readouterr()
    assert simzss([*argv, "--overwrite"]) == 0
    assert json.loads((out / TRAINING_SOURCE_FILE).read_text())["shards"][0]["size"] == shard.stat().st_size
    assert 259 <= len(load_tokenizer(out)) <= 300


def _table(root: Path, colours: list[tuple[int, int, int]], size: tuple[int, int] = (64, 48)) -> Path:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = ["filepath\ttitle"]
    for i, colour in enumerate(colours):
        Image.new("RGB", size, colour).save(images / f"{i}.jpg", quality=90)
        rows.append(f"images/{i}.jpg\ta photo number {i}")
    table = root / "pairs.tsv"
    table.write_text("\n".join(rows) + "\n")
    return table


def test_shards_rewrites_a_shard_whose_image_or_caption_changed(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    table = _table(tmp_path, [(200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 90)])
    out = tmp_path / "shards"
    argv = ["shards", "table", str(table), "--out", str(out), "--samples-per-shard", "2", "--no-progress"]
    assert simzss(argv) == 0
    assert json.loads(capsys.readouterr().out)["shards_written"] == 2
    assert simzss(argv) == 0
    assert json.loads(capsys.readouterr().out)["shards_skipped"] == 2

    Image.new("RGB", (64, 48), (255, 255, 0)).save(tmp_path / "images" / "3.jpg", quality=70)  # in shard 00001
    assert simzss(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards_written"] == 1 and summary["shards_skipped"] == 1 and summary["shards_rewritten_changed"] == 1
    assert summary["records"] == 4 and summary["samples"] == 4  # the table's rows, not the fingerprint records
    (last,) = [s for s in iter_samples(out / "00001.tar") if s["__key__"].endswith("3")] or [None]
    stored = Image.open(io.BytesIO(last["jpg"])).convert("RGB").getpixel((10, 10))
    assert stored[0] > 200 and stored[1] > 200 and stored[2] < 60  # the new yellow image

    table.write_text(table.read_text().replace("a photo number 0", "a new caption"))
    assert simzss(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards_written"] == 1 and summary["shards_skipped"] == 1
    assert [s["txt"] for s in iter_samples(out / "00000.tar")][0] == b"a new caption"

    # resizing changes every shard: refused without --overwrite (one line), done with it
    assert simzss([*argv, "--resize-short", "24"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert simzss([*argv, "--resize-short", "24", "--overwrite"]) == 0
    capsys.readouterr()
    for s in (s for p in sorted(out.glob("*.tar")) for s in iter_samples(p)):
        assert Image.open(io.BytesIO(s["jpg"])).size == (32, 24)


def test_prepare_redoes_outputs_it_cannot_vouch_for(tmp_path: Path) -> None:
    """An output without a record (older version, copied in by hand), edited after it was written, or made with
    other settings is redone; an unchanged one is kept."""
    from simzss.concepts import ConceptBank
    from simzss.data.prepare import prepare_shards

    src = tmp_path / "in" / "s.tar"
    src.parent.mkdir()
    write_shard(src, [{"__key__": f"k{i}", "jpg": b"\xff\xd8", "txt": "a dog on the grass"} for i in range(3)])
    out, bank = tmp_path / "out", ConceptBank.from_names(["dog"])

    def run(**kwargs) -> dict:  # noqa: ANN003
        return prepare_shards(str(src), out, progress=False, bank=bank, **kwargs)

    assert run()["shards_done"] == 1
    assert run()["shards_skipped"] == 1
    (out / "fingerprints.json").unlink()
    assert run()["shards_redone"] == 1
    write_shard(out / "s.tar", [{"__key__": "other", "jpg": b"\xff\xd8", "txt": "a cat"}])
    assert run()["shards_redone"] == 1 and [s["__key__"] for s in iter_samples(out / "s.tar")] == ["k0", "k1", "k2"]
    assert run(lowercase=True)["shards_redone"] == 1
    assert run(lowercase=True)["shards_skipped"] == 1


def test_shard_keys_from_headers_agree_with_iter_samples(tmp_path: Path) -> None:
    """The header-only key list that the staleness check counts with groups samples exactly as the reader does."""
    import tarfile

    from simzss.data.shards import shard_keys

    path = tmp_path / "s.tar"
    members = [("a.jpg", b"1"), ("a.txt", b"x"), ("b.txt", b"y"), ("b.txt", b"z"),  # a repeated ext: new sample
               ("c.pkl", b"never"), ("noext", b"?"), ("a.txt", b"again"), ("d/e.jpg", b"2")]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert shard_keys(path) == [s["__key__"] for s in iter_samples(path)] == ["a", "b", "b", "a", "d/e"]
