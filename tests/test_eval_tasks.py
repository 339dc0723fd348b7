"""Classification top-k, retrieval R@k (several captions per image), `simzss eval`, and two-process runs."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

from simzss.eval.classification import evaluate_classification
from simzss.eval.metrics import retrieval_recall, topk_correct
from simzss.eval.retrieval import evaluate_retrieval
from simzss.eval.segmentation import evaluate_segmentation

torch.set_num_threads(1)

E = torch.eye(8)


def unit(*pairs) -> List[float]:
    """Normalised sum of (weight, axis) pairs in R^8."""
    v = sum(w * E[i] for w, i in pairs)
    return F.normalize(v, dim=0).tolist()


class LookupModel(torch.nn.Module):
    """Known embeddings: an image's id is its red value / 10 (solid-colour images), texts are looked up by string.

    The vision side normalises with mean 0 / std 1, so pixel values reach the model as value / 255.
    """

    def __init__(self, image_emb: Dict[int, List[float]], text_emb: Dict[str, List[float]], patch_size: int = 4):
        super().__init__()
        self.image_emb, self.text_emb = image_emb, text_emb
        self.vision = torch.nn.Module()
        self.vision.patch_size, self.vision.mean, self.vision.std = patch_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        self.logit_scale = torch.nn.Parameter(torch.tensor(np.log(10.0), dtype=torch.float32))

    def encode_image(self, images: torch.Tensor):
        ids = (images[:, 0].mean((1, 2)) * 255 / 10).round().long().tolist()
        cls = torch.tensor([self.image_emb[i] for i in ids])
        h, w = images.shape[-2] // self.vision.patch_size, images.shape[-1] // self.vision.patch_size
        return cls, cls.view(len(ids), 1, 1, -1).expand(-1, h, w, -1)

    def encode_texts(self, texts):
        return torch.tensor([self.text_emb[t] for t in texts])


def solid(path: Path, image_id: int, size=(20, 28)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((*size, 3), np.uint8)
    arr[..., 0] = image_id * 10
    Image.fromarray(arr).save(path)


# ------------------------------------------------------------------------------------ classification


CLASSES = [f"c{i}" for i in range(8)]


def classification_model() -> LookupModel:
    """8 classes c0..c7 (one-hot text embeddings); images 1, 2, 3 whose true class ranks 1st, 3rd and 8th."""
    images = {
        1: unit((1.0, 0), (0.5, 1)),  # class c0: rank 1
        2: unit((1.0, 2), (0.9, 3), (0.8, 1), (0.1, 0)),  # class c1: rank 3 -> top-5 only
        3: unit((1.0, 0), (0.9, 1), (0.8, 2), (0.7, 3), (0.6, 5), (0.5, 6), (0.4, 7), (0.0, 4)),  # class c4: miss
    }
    texts = {f"a photo of a {n}.": E[i].tolist() for i, n in enumerate(CLASSES)}
    return LookupModel(images, texts)


def write_classification(root: Path) -> None:
    for n in CLASSES:
        (root / n).mkdir(parents=True)
    solid(root / "c0" / "a.png", 1)
    solid(root / "c1" / "b.png", 2)
    solid(root / "c4" / "c.png", 3)


def test_topk_correct_by_hand() -> None:
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.3, 0.2, 0.1]])
    assert topk_correct(logits, torch.tensor([0, 0, 2]), (1, 2, 5)) == {1: 1, 2: 1, 5: 3}


def test_classification_top1_top5(tmp_path: Path) -> None:
    write_classification(tmp_path / "if")
    res = evaluate_classification(classification_model(), f"imagefolder:{tmp_path / 'if'}", templates="single",
                                  image_size=16, batch_size=2)
    assert res["num_images"] == 3 and res["skipped"] == 0 and res["num_classes"] == 8
    assert res["top1"] == pytest.approx(100 / 3)
    assert res["top5"] == pytest.approx(200 / 3)


def test_classification_skips_unreadable_image(tmp_path: Path) -> None:
    write_classification(tmp_path / "if")
    (tmp_path / "if" / "c4" / "c.png").write_bytes(b"broken")
    model = classification_model()
    res = evaluate_classification(model, f"imagefolder:{tmp_path / 'if'}", templates="single", image_size=16)
    assert res["num_images"] == 2 and res["skipped"] == 1
    assert res["top1"] == pytest.approx(50.0) and res["top5"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        evaluate_classification(model, f"imagefolder:{tmp_path / 'if'}", image_size=18)


# ----------------------------------------------------------------------------------------- retrieval


RET_IMAGES = {1: unit((1, 0)), 2: unit((1, 1)), 3: unit((1, 2))}
RET_TEXTS = {
    "c0": unit((1, 0)),  # image 1, nearest image 1
    "c1": unit((1, 1), (0.1, 0)),  # image 1, nearest image 2 (then 1)
    "c2": unit((1, 2), (0.5, 1)),  # image 2, nearest image 3 (then 2)
    "c3": unit((1, 2), (0.2, 0)),  # image 3, nearest image 3
    "a photo": unit((1, 7)),
}
# i2t: image 1 -> c0 (own) hit@1; image 2 -> c1 (image 1's) then c2 (own): hit@2; image 3 -> c3 (own) hit@1.
EXPECTED_RETRIEVAL = {"i2t_R@1": 200 / 3, "i2t_R@5": 100.0, "i2t_R@10": 100.0,
                      "t2i_R@1": 50.0, "t2i_R@5": 100.0, "t2i_R@10": 100.0}


def write_karpathy(root: Path) -> Path:
    for i in (1, 2, 3):
        solid(root / "val2014" / f"im{i}.jpg", i)
    caps = {1: ["c0", "c1"], 2: ["c2"], 3: ["c3"]}
    data = {"images": [{"filepath": "val2014", "filename": f"im{i}.jpg", "split": "test",
                        "sentences": [{"raw": c} for c in caps[i]]} for i in (1, 2, 3)]}
    (root / "dataset_coco.json").write_text(json.dumps(data))
    return root / "dataset_coco.json"


def test_retrieval_recall_by_hand() -> None:
    imgs = torch.tensor([RET_IMAGES[i] for i in (1, 2, 3)])
    txts = torch.tensor([RET_TEXTS[c] for c in ("c0", "c1", "c2", "c3")])
    out = retrieval_recall(imgs, txts, torch.tensor([0, 0, 1, 2]), chunk=2)
    assert out == pytest.approx(EXPECTED_RETRIEVAL)


def test_retrieval_recall_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    n_img, per = 40, 5
    imgs = F.normalize(torch.randn(n_img, 6, generator=g), dim=-1)
    owner = torch.arange(n_img).repeat_interleave(per)
    txts = F.normalize(imgs[owner] + 0.8 * torch.randn(n_img * per, 6, generator=g), dim=-1)
    out = retrieval_recall(imgs, txts, owner, chunk=7)
    sim = (imgs @ txts.T).numpy()
    o = owner.numpy()
    for k in (1, 5, 10):
        i2t = np.mean([np.isin(np.argsort(-sim[i])[:k], np.where(o == i)[0]).any() for i in range(n_img)])
        t2i = np.mean([o[t] in np.argsort(-sim[:, t])[:k] for t in range(len(o))])
        assert out[f"i2t_R@{k}"] == pytest.approx(100 * i2t)
        assert out[f"t2i_R@{k}"] == pytest.approx(100 * t2i)


def test_evaluate_retrieval_karpathy(tmp_path: Path) -> None:
    js = write_karpathy(tmp_path)
    res = evaluate_retrieval(LookupModel(RET_IMAGES, RET_TEXTS), f"karpathy:{js}", image_size=16, batch_size=2)
    assert res["num_images"] == 3 and res["num_texts"] == 4 and res["skipped"] == {}
    assert {k: res[k] for k in EXPECTED_RETRIEVAL} == pytest.approx(EXPECTED_RETRIEVAL)


def test_evaluate_retrieval_wds_repeated_keys_and_bad_image(tmp_path: Path) -> None:
    from test_eval_datasets import write_tar  # the tar writer of the dataset tests

    def png(i: int) -> bytes:
        solid(tmp_path / "tmp.png", i)
        return (tmp_path / "tmp.png").read_bytes()

    write_tar(tmp_path / "s0.tar", {"k1.png": png(1), "k1.txt": b"c0", "k2.png": png(2), "k2.txt": b"c2",
                                    "bad.jpg": b"not an image", "bad.txt": b"c3"})
    write_tar(tmp_path / "s1.tar", {"k3.png": png(3), "k3.txt": b"c3", "k1.png": png(1), "k1.txt": b"c1",
                                    "lonely.png": png(3)})
    res = evaluate_retrieval(LookupModel(RET_IMAGES, RET_TEXTS), f"wds:{tmp_path}/s{{0..1}}.tar", image_size=16,
                             batch_size=2, workers=2)
    # k1 gets c0 and c1 (repeated key); the undecodable image and the caption-less one are dropped.
    assert res["num_images"] == 3 and res["num_texts"] == 4
    assert res["skipped"] == {"undecodable_image": 1, "no_caption": 1, "captions_of_dropped_images": 1}
    assert {k: res[k] for k in EXPECTED_RETRIEVAL} == pytest.approx(EXPECTED_RETRIEVAL)


# ------------------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    root = Path(data)
    results = {
        "cls": evaluate_classification(classification_model(), f"imagefolder:{root / 'cls'}", templates="single", image_size=16,
                                       batch_size=1, accelerator=acc),
        "ret": evaluate_retrieval(LookupModel(RET_IMAGES, RET_TEXTS), f"karpathy:{root / 'ret' / 'dataset_coco.json'}",
                                  image_size=16, batch_size=1, accelerator=acc),
        "seg": evaluate_segmentation(_seg_model(), f"folder:{root / 'seg'}", templates=["{}"], short_side=None,
                                     crop=16, stride=8, accelerator=acc),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def _seg_model() -> LookupModel:
    # image id 1 -> class "a", id 2 -> class "b"
    return LookupModel({1: unit((1, 0)), 2: unit((1, 1))}, {"a": unit((1, 0)), "b": unit((1, 1))})


def _write_seg(root: Path) -> None:
    (root / "masks").mkdir(parents=True)
    (root / "classes.txt").write_text("a\nb\n")
    for name, i, label in (("x", 1, 0), ("y", 2, 1), ("z", 2, 0)):  # z is predicted b but labelled a
        solid(root / "images" / f"{name}.png", i, size=(12, 20))
        Image.fromarray(np.full((12, 20), label, np.uint8)).save(root / "masks" / f"{name}.png")


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_classification(data / "cls")
    write_karpathy(data / "ret")
    _write_seg(data / "seg")
    mp.spawn(_worker, args=(2, _free_port(), str(data), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == r1  # every rank returns the reduced result
    single_cls = evaluate_classification(classification_model(), f"imagefolder:{data / 'cls'}",
                                         templates="single", image_size=16)
    assert r0["cls"] == single_cls and r0["cls"]["num_images"] == 3
    assert {k: r0["ret"][k] for k in EXPECTED_RETRIEVAL} == pytest.approx(EXPECTED_RETRIEVAL)
    seg = evaluate_segmentation(_seg_model(), f"folder:{data / 'seg'}", templates=["{}"], short_side=None, crop=16, stride=8)
    assert r0["seg"] == json.loads(json.dumps(seg))
    assert seg["num_images"] == 3 and seg["per_class"] == {"a": 50.0, "b": 50.0}


# ------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def exported_tiny(tmp_path_factory) -> Path:
    """A random-init tiny SimZSS saved with simzss.io.save_pretrained."""
    from simzss.config import ModelConfig, TextConfig, VisionConfig
    from simzss.data.tokenize import train_bpe_tokenizer
    from simzss.io import save_pretrained
    from simzss.models.simzss import SimZSS

    torch.manual_seed(0)
    work = tmp_path_factory.mktemp("tiny")
    caps = ["a photo of a red square", "a blue circle on grass", "the sky above a road", "a tree"] * 8
    tok = train_bpe_tokenizer(caps, work / "tok", vocab_size=300, min_frequency=1)
    cfg = ModelConfig(
        vision=VisionConfig(name="vit_small_patch14_reg4_dinov2", pretrained=False, model_kwargs={"img_size": 56, "depth": 1}),
        text=TextConfig(layers=1, width=32, heads=2, context_length=16),
        tokenizer=str(work / "tok"),
    )
    return Path(save_pretrained(SimZSS.from_config(cfg, tok).eval(), work / "export"))


def test_cli_segmentation_json_and_run_report(exported_tiny: Path, tmp_path: Path, capsys) -> None:
    from simzss.cli import main
    from simzss.config import TrainConfig, to_yaml
    from simzss.data.synthetic import generate_toy_world

    info = generate_toy_world(tmp_path / "toy", num_train=0, num_val=2, image_size=64)
    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig(report_to="tensorboard", run_name="run")
    (run / "config.yaml").write_text(to_yaml(cfg))
    out = tmp_path / "res.json"
    argv = ["eval", str(exported_tiny), "--task", "segmentation", "--datasets", f"folder:{info['val_dir']}",
            f"voc:{tmp_path / 'missing'}", "--short-side", "56", "--crop", "56", "--stride", "28",
            "--workers", "0", "--cpu", "--no-progress", "--out", str(out), "--report-to-run", str(run), "--step", "7"]
    assert main(argv) == 2 and not out.exists()  # a path that does not exist: refused before anything runs
    capsys.readouterr()
    (tmp_path / "missing").mkdir()  # now it exists but is no VOC layout: reported, the folder dataset still evaluated
    rc = main(argv)
    assert rc == 1
    table = capsys.readouterr().out
    assert "mIoU" in table and f"folder:{info['val_dir']}" in table
    payload = json.loads(out.read_text())
    res = payload["results"][f"folder:{info['val_dir']}"]
    assert res["num_images"] == 2 and 0 <= res["mIoU"] <= 100
    assert payload["settings"]["crop"] == 56 and payload["task"] == "segmentation"
    assert json.loads((run / "eval" / "segmentation-step-7.json").read_text())["results"] == payload["results"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 7 and row[f"eval/folder:{info['val_dir']}/mIoU"] == pytest.approx(res["mIoU"])


def test_cli_retrieval_and_errors(exported_tiny: Path, tmp_path: Path, capsys) -> None:
    from simzss.cli.eval import checkpoint_step, main

    js = write_karpathy(tmp_path / "ret")
    assert main([str(exported_tiny), "--task", "retrieval", "--datasets", f"karpathy:{js}", "--image-size", "28",
                 "--workers", "0", "--cpu", "--no-progress"]) == 0
    assert "I→T R@1" in capsys.readouterr().out
    assert main([str(tmp_path / "no-model"), "--datasets", "folder:x", "--cpu"]) == 2
    with pytest.raises(SystemExit):
        main([str(exported_tiny), "--task", "detection", "--datasets", "folder:x"])
    assert checkpoint_step("runs/x/checkpoints/step-1200") == 1200 and checkpoint_step("exports/m") is None


def test_cli_failed_datasets_are_one_line_errors_and_exit_1(exported_tiny: Path, tmp_path: Path, capsys,
                                                            caplog) -> None:
    from test_eval_datasets import write_tar  # the tar writer of the dataset tests

    from simzss.cli.eval import main

    js = write_karpathy(tmp_path / "ret")
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 200)  # every shard unreadable -> DatasetError
    good, junk = f"karpathy:{js}", f"wds:{tmp_path}/junk.tar"
    # A wds shard cut in its only sample: nothing complete before the damage.
    write_tar(tmp_path / "cut.tar", {"k1.png": (tmp_path / "ret" / "val2014" / "im1.jpg").read_bytes(), "k1.txt": b"c0"})
    (tmp_path / "cut.tar").write_bytes((tmp_path / "cut.tar").read_bytes()[:530])
    cut = f"wds:{tmp_path}/cut.tar"
    out = tmp_path / "res.json"
    rc = main([str(exported_tiny), "--task", "retrieval", "--datasets", junk, good, cut, "--image-size", "28",
               "--workers", "0", "--cpu", "--no-progress", "--out", str(out)])
    assert rc == 1
    payload = json.loads(out.read_text())
    assert list(payload["results"]) == [good] and set(payload["failed"]) == {junk, cut}
    assert "could be read" in payload["failed"][junk] and "Traceback" not in caplog.text
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert any(junk in r.getMessage() and r.exc_info is None for r in errors)

    # Every image unreadable: num_images == 0 is a failure, not a result; the good dataset still runs.
    caplog.clear()
    write_classification(tmp_path / "ok")
    bad = tmp_path / "bad"
    write_classification(bad)
    for p in bad.rglob("*.png"):
        p.write_bytes(b"broken")
    rc = main([str(exported_tiny), "--task", "classification", "--datasets", f"imagefolder:{bad}",
               f"imagefolder:{tmp_path / 'ok'}", "--image-size", "28", "--templates", "single", "--workers", "0",
               "--cpu", "--no-progress", "--out", str(out)])
    assert rc == 1
    payload = json.loads(out.read_text())
    assert list(payload["results"]) == [f"imagefolder:{tmp_path / 'ok'}"]
    assert "no images evaluated" in payload["failed"][f"imagefolder:{bad}"]
    assert f"imagefolder:{bad}" not in capsys.readouterr().out  # not in the table


def test_cli_oserror_from_one_dataset_does_not_stop_the_others(monkeypatch, tmp_path: Path, caplog) -> None:
    from simzss.data.shards import ShardReadError
    from simzss.cli import eval as runner

    def fake_run_task(model, task, spec, args, accelerator):
        if spec.startswith("bad"):
            raise ShardReadError(tmp_path / "x.tar", "truncated archive", 3)
        if spec.startswith("io"):
            raise PermissionError(13, "Permission denied", str(tmp_path / "locked"))
        return {"dataset": spec, "mIoU": 50.0, "pixel_acc": 90.0, "num_images": 2, "skipped": {}}

    monkeypatch.setattr(runner, "load_model", lambda path, device: torch.nn.Identity())
    monkeypatch.setattr(runner, "run_task", fake_run_task)
    monkeypatch.setattr(runner, "_dataset_problem", lambda task, specs: None)  # stand-in specs, never opened
    out = tmp_path / "r.json"
    rc = runner.main(["m", "--datasets", "bad:x", "io:y", "folder:z", "--cpu", "--out", str(out)])
    assert rc == 1
    payload = json.loads(out.read_text())
    assert list(payload["results"]) == ["folder:z"]
    assert payload["failed"]["bad:x"].startswith("ShardReadError: cannot read shard")
    assert "Permission denied" in payload["failed"]["io:y"] and "Traceback" not in caplog.text


def test_cli_image_batch_gives_the_same_results(exported_tiny: Path, tmp_path: Path, capsys) -> None:
    """``--image-batch`` only changes how many images share the forward passes, never the results; 0 is a usage
    error named by its option."""
    from simzss.cli import main
    from simzss.data.synthetic import generate_toy_world

    info = generate_toy_world(tmp_path / "toy", num_train=0, num_val=5, image_size=64)
    results = []
    for n in ("1", "3"):
        out = tmp_path / f"res{n}.json"
        assert main(["eval", str(exported_tiny), "--datasets", f"folder:{info['val_dir']}", "--short-side", "56",
                     "--crop", "56", "--stride", "28", "--workers", "0", "--device", "cpu", "--no-progress",
                     "--image-batch", n, "--out", str(out)]) == 0
        results.append(json.loads(out.read_text())["results"][f"folder:{info['val_dir']}"])
    assert results[0]["num_images"] == 5 and results[0]["per_class"] == results[1]["per_class"]
    assert results[0]["mIoU"] == results[1]["mIoU"]
    capsys.readouterr()
    assert main(["eval", str(exported_tiny), "--datasets", f"folder:{info['val_dir']}", "--image-batch", "0"]) == 2
    assert "--image-batch must be at least 1" in capsys.readouterr().err
