"""Zero-shot segmentation: slide windows, overlap averaging, background threshold, metrics, end to end."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from simzss.eval.metrics import confusion_matrix, segmentation_scores
from simzss.eval.segmentation import evaluate_segmentation
from simzss.models.zeroshot import (
    get_mean_std, normalize_image, resized_shape, segment_image, slide_cosine, slide_windows,
    text_classifier,
)

torch.set_num_threads(1)


class ColourModel(torch.nn.Module):
    """Patch embedding = L2-normalised mean colour of the patch; text embedding = a fixed vector per word.

    Its vision side normalises with mean 0 / std 1, so an RGB pixel (r, g, b) / 255 is the embedding direction.
    """

    TEXT = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "background": (1.0, 1.0, 1.0)}

    def __init__(self, patch_size: int = 4, logit_scale: float = 10.0):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(logit_scale)))
        self.vision = torch.nn.Module()
        self.vision.patch_size, self.vision.mean, self.vision.std = patch_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        self.window_sizes: List[tuple] = []

    def encode_image(self, images: torch.Tensor):
        p = self.vision.patch_size
        assert images.shape[-2] % p == 0 and images.shape[-1] % p == 0, "windows must be patch-aligned"
        self.window_sizes.append(tuple(images.shape[-2:]))
        patches = F.avg_pool2d(images, p).permute(0, 2, 3, 1)
        patches = F.normalize(patches + 1e-6, dim=-1)
        return F.normalize(patches.mean((1, 2)), dim=-1), patches

    def encode_texts(self, texts):
        out = []
        for t in texts:
            word = next(w for w in self.TEXT if w in t)
            out.append(self.TEXT[word])
        return F.normalize(torch.tensor(out), dim=-1)


class SequenceModel(torch.nn.Module):
    """The k-th window it sees (over all calls) gets the constant embedding (v_k, sqrt(1 - v_k^2))."""

    def __init__(self, values: List[float], patch_size: int = 2):
        super().__init__()
        self.values, self.k, self.patch_size = values, 0, patch_size

    def encode_image(self, images: torch.Tensor):
        b, _, h, w = images.shape
        v = torch.tensor(self.values[self.k : self.k + b])
        self.k += b
        emb = torch.stack([v, (1 - v**2).sqrt()], dim=-1)  # [b, 2], unit norm
        patches = emb.view(b, 1, 1, 2).expand(b, h // self.patch_size, w // self.patch_size, 2)
        return emb, patches

    def encode_texts(self, texts):
        return torch.tensor([[1.0, 0.0]] * len(texts))


# ----------------------------------------------------------------------------------------- windows


@pytest.mark.parametrize(
    "h,w,crop,stride",
    [(449, 1001, 448, 224), (448, 448, 448, 224), (673, 897, 448, 224), (100, 37, 448, 224), (31, 50, 16, 7), (17, 9, 8, 3)],
)
def test_slide_windows_follow_the_formula_and_cover_every_pixel(h, w, crop, stride) -> None:
    wins = slide_windows(h, w, crop, stride)
    n_h = max(h - crop + stride - 1, 0) // stride + 1
    n_w = max(w - crop + stride - 1, 0) // stride + 1
    assert len(wins) == n_h * n_w
    cover = np.zeros((h, w), np.int32)
    for k, (y1, y2, x1, x2) in enumerate(wins):
        i, j = divmod(k, n_w)
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        assert (y2 - y1, x2 - x1) == (min(crop, h), min(crop, w))  # every window has the same size
        if i < n_h - 1:
            assert y1 == i * stride
        if j < n_w - 1:
            assert x1 == j * stride
        cover[y1:y2, x1:x2] += 1
    assert max(w[1] for w in wins) == h and max(w[3] for w in wins) == w  # last windows snap to the border
    assert cover.min() >= 1


def test_slide_windows_known_case() -> None:
    # 449 rows: n = (449 - 448 + 223) // 224 + 1 = 2; second window snaps to [1, 449).
    assert slide_windows(449, 448) == [(0, 448, 0, 448), (1, 449, 0, 448)]
    assert slide_windows(300, 200) == [(0, 300, 0, 200)]
    with pytest.raises(ValueError):
        slide_windows(0, 10)


def test_resized_shape_short_side_and_long_cap() -> None:
    assert resized_shape(375, 500, 448) == (448, 597)
    assert resized_shape(500, 375, 448) == (597, 448)
    assert resized_shape(100, 4000, 448) == (51, 2048)  # long side capped: short side ends below 448
    assert resized_shape(10, 20, None) == (10, 20)


# ---------------------------------------------------------------------------------------- averaging


def test_overlap_averaging_matches_hand_computation() -> None:
    # 10 x 14 image, crop 8, stride 4 -> rows: n = (10-8+3)//4+1 = 2 windows [0,8) [2,10);
    # cols: n = (14-8+3)//4+1 = 3 windows [0,8) [4,12) [6,14). Window k = row-major index.
    values = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    model = SequenceModel(values)
    image = torch.zeros(1, 3, 10, 14)
    cos = slide_cosine(model, image, torch.tensor([[1.0, 0.0]]), crop=8, stride=4, window_batch=4)
    assert cos.shape == (1, 10, 14)
    assert model.k == 6  # 6 windows in two batched calls
    # Hand-computed: (0,0) only window 0; (0,5) windows 0 and 1; (5,7) all six; (9,13) only window 5.
    assert cos[0, 0, 0].item() == pytest.approx(0.1)
    assert cos[0, 0, 5].item() == pytest.approx((0.1 + 0.2) / 2)
    assert cos[0, 5, 7].item() == pytest.approx(sum(values) / 6)
    assert cos[0, 9, 13].item() == pytest.approx(0.6)
    # Everywhere: mean of the values of the windows covering the pixel (brute force).
    expected = np.zeros((10, 14))
    count = np.zeros((10, 14))
    for v, (y1, y2, x1, x2) in zip(values, slide_windows(10, 14, 8, 4)):
        expected[y1:y2, x1:x2] += v
        count[y1:y2, x1:x2] += 1
    np.testing.assert_allclose(cos[0].numpy(), expected / count, atol=1e-6)


def test_small_image_is_one_padded_window_and_output_has_original_size() -> None:
    model = ColourModel(patch_size=4)
    img = torch.zeros(1, 3, 10, 7)
    img[:, 0] = 1.0  # all red
    probs = segment_image(model, img, model.encode_texts(["red", "green"]), short_side=None, crop=16, stride=8)
    assert model.window_sizes == [(12, 8)]  # one window, padded to the patch multiple
    assert probs.shape == (2, 10, 7)
    assert torch.allclose(probs.sum(0), torch.ones(10, 7), atol=1e-5)
    assert (probs.argmax(0) == 0).all()


def test_resize_then_back_to_original_size() -> None:
    model = ColourModel(patch_size=4)
    img = torch.zeros(1, 3, 30, 45)
    img[:, 1] = 1.0  # green
    probs = segment_image(model, img, model.encode_texts(["red", "green", "blue"]), short_side=16, crop=16, stride=8)
    assert probs.shape == (3, 30, 45)
    assert set(model.window_sizes) == {(16, 16)}  # resized to 16 x 24 -> two 16-px windows
    assert (probs.argmax(0) == 1).all()


# --------------------------------------------------------------------------------------- background


def _two_region_image() -> torch.Tensor:
    """Left half red (confident 'red'), right half yellow (red and green tie at p = 0.5)."""
    img = torch.zeros(1, 3, 16, 32)
    img[:, 0] = 1.0
    img[:, 1, :, 16:] = 1.0
    return img


def test_background_threshold() -> None:
    model = ColourModel(patch_size=4, logit_scale=10.0)
    cls = model.encode_texts(["red", "green"])
    img = _two_region_image()
    probs = segment_image(model, img, cls, short_side=None, crop=32, stride=16, background="threshold", bg_threshold=0.6)
    assert probs.shape == (3, 16, 32)  # background channel + 2 classes
    assert torch.all(probs[0] == 0.6)
    pred = probs.argmax(0)
    p_red = 1 / (1 + math.exp(-10.0))  # red vs green cosines 1 and 0
    assert probs[1, 4, 4].item() == pytest.approx(p_red, abs=1e-4)
    assert (pred[:, :12] == 1).all()  # red, away from the bilinear seam
    assert (pred[:, 20:] == 0).all()  # 0.5 < 0.6 -> background
    # A threshold below 0.5 keeps the yellow half as a foreground class.
    low = segment_image(model, img, cls, short_side=None, crop=32, stride=16, background="threshold", bg_threshold=0.4)
    assert (low.argmax(0)[:, 20:] != 0).all()
    # "class" / "none": no extra channel.
    assert segment_image(model, img, cls, short_side=None, crop=32, stride=16, background="class").shape == (2, 16, 32)
    with pytest.raises(ValueError, match="background"):
        segment_image(model, img, cls, background="bogus")


def test_text_classifier_averages_normalised_prompts() -> None:
    class TwoPrompt(torch.nn.Module):
        def encode_texts(self, texts):
            # "a {}" -> e0 * 3 (unnormalised on purpose), "the {}" -> e1
            return torch.tensor([[3.0, 0.0] if t.startswith("a ") else [0.0, 1.0] for t in texts])

    emb = text_classifier(TwoPrompt(), ["cat", "dog"], ["a {}", "the {}"])
    assert emb.shape == (2, 2)
    np.testing.assert_allclose(emb.numpy(), [[2**-0.5, 2**-0.5]] * 2, atol=1e-6)
    with pytest.raises(ValueError, match="placeholder"):
        text_classifier(TwoPrompt(), ["cat"], ["no placeholder"])


# ------------------------------------------------------------------------------------------ metrics


def _np_confusion(pred: np.ndarray, gt: np.ndarray, n: int) -> np.ndarray:
    conf = np.zeros((n, n), np.int64)
    for g, p in zip(gt.ravel(), pred.ravel()):
        if g != 255:
            conf[g, p] += 1
    return conf


def test_miou_matches_independent_numpy_computation() -> None:
    rng = np.random.default_rng(0)
    n = 6
    conf = torch.zeros(n, n, dtype=torch.long)
    np_conf = np.zeros((n, n), np.int64)
    for _ in range(3):  # dataset-level accumulation over several "images"
        gt = rng.integers(0, n, size=(17, 23)).astype(np.uint8)
        gt[rng.random(gt.shape) < 0.2] = 255
        gt[gt == 5] = 255  # class 5 never in the ground truth ...
        pred = rng.integers(0, n - 1, size=gt.shape)  # ... nor predicted -> NaN, left out of the mean
        c = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), n)
        assert c.shape == (n + 1, n) and c[n].sum() == 0  # no out-of-range labels here
        conf += c[:n]
        np_conf += _np_confusion(pred, gt, n)
    np.testing.assert_array_equal(conf.numpy(), np_conf)
    scores = segmentation_scores(conf, [f"c{i}" for i in range(n)])
    tp = np.diag(np_conf)
    with np.errstate(invalid="ignore"):
        iou = tp / (np_conf.sum(0) + np_conf.sum(1) - tp)
    assert scores["per_class"]["c5"] is None
    assert scores["mIoU"] == pytest.approx(np.nanmean(iou[:5]) * 100)
    assert scores["pixel_acc"] == pytest.approx(tp.sum() / np_conf.sum() * 100)
    for i in range(5):
        assert scores["per_class"][f"c{i}"] == pytest.approx(iou[i] * 100)


def test_confusion_matrix_excludes_ignore_and_keeps_invalid_labels_in_a_last_row() -> None:
    gt = torch.tensor([[0, 1, 255, 7]])
    pred = torch.tensor([[0, 0, 1, 1]])
    conf = confusion_matrix(pred, gt, 2)
    assert conf.tolist() == [[1, 0], [1, 0], [0, 1]]  # 255 dropped; the out-of-range 7 predicted as 1: last row
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(pred, gt[:, :2], 2)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([[0, 2]]), torch.tensor([[0, 1]]), 2)


def mmseg_iou_metric(preds, labels, num_classes: int, ignore_index: int = 255):
    """Reference written from mmsegmentation's ``IoUMetric`` (mmseg/evaluation/metrics/iou_metric.py,
    ``intersect_and_union`` + ``total_area_to_metrics``): per image, drop ``ignore_index`` pixels, histogram
    (``torch.histc`` over [0, C-1]) the intersection, the predictions and the labels; sum over images;
    IoU = intersect / union, aAcc = intersect / label area, mIoU = nanmean."""
    inter, area_p, area_l = (torch.zeros(num_classes, dtype=torch.float64) for _ in range(3))
    for pred, label in zip(preds, labels):
        keep = label != ignore_index
        p, lab = pred[keep].double(), label[keep].double()
        inter += torch.histc(p[p == lab], bins=num_classes, min=0, max=num_classes - 1).double()
        area_p += torch.histc(p, bins=num_classes, min=0, max=num_classes - 1).double()
        area_l += torch.histc(lab, bins=num_classes, min=0, max=num_classes - 1).double()
    iou = (inter / (area_p + area_l - inter)).numpy()
    return {"mIoU": float(np.nanmean(iou)) * 100, "aAcc": float(inter.sum() / area_l.sum()) * 100, "IoU": iou * 100}


def test_out_of_range_labels_count_as_false_positives_like_mmseg() -> None:
    """A label map with values that are neither a class id nor 255 (e.g. a mask from another label space): mmseg
    keeps those pixels, so their predictions are false positives; dropping them (the old rule) gives another mIoU."""
    rng = np.random.default_rng(3)
    n = 4
    preds, labels = [], []
    for _ in range(3):
        gt = rng.integers(0, n, size=(20, 30)).astype(np.uint8)
        pred = gt.copy()
        flip = rng.random(gt.shape) < 0.25
        pred[flip] = rng.integers(0, n, size=int(flip.sum()))
        gt[rng.random(gt.shape) < 0.1] = 255
        gt[:6, :10] = 9  # out of range: 9 is no class id of a 4-class dataset
        preds.append(torch.from_numpy(pred.astype(np.int64)))
        labels.append(torch.from_numpy(gt))
    conf = sum(confusion_matrix(p, g, n) for p, g in zip(preds, labels))
    ours = segmentation_scores(conf, [f"c{i}" for i in range(n)])
    ref = mmseg_iou_metric(preds, [g.long() for g in labels], n)
    assert int(conf[n].sum()) == 3 * 60
    assert ours["mIoU"] == pytest.approx(ref["mIoU"], abs=1e-9)
    assert ours["pixel_acc"] == pytest.approx(ref["aAcc"], abs=1e-9)
    np.testing.assert_allclose([ours["per_class"][f"c{i}"] for i in range(n)], ref["IoU"], atol=1e-9)
    dropped = segmentation_scores(conf[:n], [f"c{i}" for i in range(n)])  # the old rule: such pixels dropped
    assert dropped["mIoU"] - ours["mIoU"] > 1.0  # the two conventions differ on this map


# -------------------------------------------------------------------------------------- end to end


def _write_folder(root: Path, classes: List[str], samples) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for name, rgb, mask in samples:
        Image.fromarray(rgb).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")


def test_evaluate_segmentation_folder_with_background_threshold(tmp_path: Path) -> None:
    # Left: red (class 1), right: yellow (ambiguous -> background 0); a 255 column in the middle.
    rgb = np.zeros((16, 32, 3), np.uint8)
    rgb[..., 0] = 255
    rgb[:, 16:, 1] = 255
    mask = np.zeros((16, 32), np.uint8)
    mask[:, :16] = 1
    mask[:, 14:18] = 255  # the seam is ignored
    green = np.zeros((16, 32, 3), np.uint8)
    green[..., 1] = 255
    _write_folder(tmp_path / "ds", ["background", "red", "green"],
                  [("a", rgb, mask), ("b", green, np.full((16, 32), 2, np.uint8))])
    model = ColourModel(patch_size=4)
    res = evaluate_segmentation(model, f"folder:{tmp_path / 'ds'}", short_side=None, crop=16, stride=8,
                                bg_threshold=0.6, templates=["{}"])
    assert res["background"] == "threshold" and res["bg_threshold"] == 0.6
    assert res["num_images"] == 2 and res["skipped"] == 0
    assert res["mIoU"] == pytest.approx(100.0)
    assert res["per_class"] == {"background": 100.0, "red": 100.0, "green": 100.0}
    # "class" mode embeds "background" (white) as a class: cos(yellow, white) = 0.816 > cos(yellow, red) = 0.707,
    # so the yellow half is background here too.
    res2 = evaluate_segmentation(model, f"folder:{tmp_path / 'ds'}", short_side=None, crop=16, stride=8,
                                 background="class", templates=["{}"])
    assert res2["background"] == "class" and res2["mIoU"] == pytest.approx(100.0)


def test_evaluate_segmentation_counts_out_of_range_mask_values_like_mmseg(tmp_path: Path, caplog) -> None:
    """A folder mask holding 7 in a 3-class dataset: the loader passes it through, the evaluation counts it and
    scores it as mmseg's IoUMetric does (the red predictions there are false positives of red)."""
    rgb = np.zeros((16, 32, 3), np.uint8)
    rgb[..., 0] = 255
    rgb[:, 16:, 0] = 0
    rgb[:, 16:, 2] = 255  # left red, right blue
    mask = np.zeros((16, 32), np.uint8)
    mask[:, 16:] = 2
    mask[:4, :8] = 7  # no class id: predicted red there
    _write_folder(tmp_path / "ds", ["red", "green", "blue"], [("a", rgb, mask)])
    res = evaluate_segmentation(ColourModel(), f"folder:{tmp_path / 'ds'}", short_side=None, crop=16, stride=8,
                                templates=["{}"], return_confusion=True)
    assert res["invalid_pixels"] == 32 and "counted as false positives" in caplog.text
    assert res["confusion_invalid"] == [32, 0, 0]  # the JSON alone reproduces the mIoU
    from_json = segmentation_scores(torch.tensor(res["confusion"] + [res["confusion_invalid"]]), ["red", "green", "blue"])
    assert from_json["mIoU"] == res["mIoU"]
    pred = np.zeros((16, 32), np.int64)
    pred[:, 16:] = 2
    ref = mmseg_iou_metric([torch.from_numpy(pred)], [torch.from_numpy(mask).long()], 3)
    assert res["mIoU"] == pytest.approx(ref["mIoU"]) and res["per_class"]["red"] == pytest.approx(ref["IoU"][0])
    assert res["per_class"]["red"] == pytest.approx(100 * 224 / 256)  # 224 red pixels right, 32 false positives


def test_evaluate_segmentation_skips_a_corrupt_image(tmp_path: Path, caplog) -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 2] = 255
    _write_folder(tmp_path / "ds", ["red", "blue"], [("a", rgb, np.ones((8, 8), np.uint8)), ("b", rgb, np.ones((8, 8), np.uint8))])
    (tmp_path / "ds" / "images" / "b.png").write_bytes(b"not a png")
    res = evaluate_segmentation(ColourModel(), f"folder:{tmp_path / 'ds'}", short_side=None, crop=8, stride=4, templates=["{}"])
    assert res["num_images"] == 1 and res["skipped"] == 1
    assert res["background"] == "none"
    assert res["per_class"] == {"red": None, "blue": 100.0}
    assert "skipped b" in caplog.text


@pytest.fixture(scope="module")
def tiny_simzss(tmp_path_factory):
    """A random-init SimZSS (tiny DINOv2-register ViT, 2-layer text tower) with an in-test BPE tokenizer."""
    from simzss.config import ModelConfig, TextConfig, VisionConfig
    from simzss.data.tokenize import train_bpe_tokenizer
    from simzss.models.simzss import SimZSS

    torch.manual_seed(0)
    work = tmp_path_factory.mktemp("tiny")
    caps = ["a photo of a red square", "a blue circle on grass", "the sky above a road", "a tree"] * 8
    tok = train_bpe_tokenizer(caps, work / "tok", vocab_size=300, min_frequency=1)
    cfg = ModelConfig(
        vision=VisionConfig(name="vit_small_patch14_reg4_dinov2", pretrained=False,
                            model_kwargs={"img_size": 56, "depth": 1}),
        text=TextConfig(layers=1, width=32, heads=2, context_length=16),
        tokenizer=str(work / "tok"),
    )
    return SimZSS.from_config(cfg, tok).eval()


def test_evaluate_segmentation_real_tiny_simzss(tiny_simzss, tmp_path: Path) -> None:
    from simzss.data.synthetic import generate_toy_world

    info = generate_toy_world(tmp_path / "toy", num_train=0, num_val=3, image_size=64)
    res = evaluate_segmentation(tiny_simzss, f"folder:{info['val_dir']}", templates="tcl9", short_side=84, crop=56,
                                stride=28, window_batch=4)
    assert res["num_images"] == 3 and res["skipped"] == 0 and res["background"] == "none"
    assert 0.0 <= res["mIoU"] <= 100.0 and 0.0 <= res["pixel_acc"] <= 100.0
    assert set(res["per_class"]) == set((Path(info["val_dir"]) / "classes.txt").read_text().split("\n")) - {""}
    # SimZSS.segment delegates to the same code path.
    img = torch.randn(1, 3, 50, 61)
    pred, scores = tiny_simzss.segment(img, ["sky", "tree"], short_side=56, crop=56, stride=28)
    assert pred.shape == (50, 61) and scores.shape == (2, 50, 61)


# ------------------------------------------------------------- the fast path gives the direct path's outputs


def _direct_labels(model, image, classifier, *, short_side, crop, stride, background, bg_threshold) -> torch.Tensor:
    """The label map of the pre-speed-up sliding-window path, written out here step by step from the protocol
    (mmseg 0.x ``slide_inference``), independently of :mod:`simzss.models.zeroshot`: keep-ratio resize, one
    window at a time (padded bottom/right to the patch multiple), cosine to the classes, bilinear upsampling to
    the padded window, crop, sum into a canvas, divide by the per-pixel window count, resize back, softmax of
    logit_scale x cosine, optional background channel, argmax."""
    h, w = image.shape[-2:]
    scale = min(short_side / min(h, w), 2048 / max(h, w)) if short_side else 1.0
    nh, nw = (max(int(h * scale + 0.5), 1), max(int(w * scale + 0.5), 1)) if short_side else (h, w)
    x = image if (nh, nw) == (h, w) else F.interpolate(image, size=(nh, nw), mode="bilinear", align_corners=False)
    p = model.vision.patch_size
    cls = classifier.float()
    canvas = torch.zeros(cls.shape[0], nh, nw)
    count = torch.zeros(nh, nw)
    for i in range(max(nh - crop + stride - 1, 0) // stride + 1):
        for j in range(max(nw - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(i * stride + crop, nh), min(j * stride + crop, nw)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            win = x[:, :, y1:y2, x1:x2]
            wh, ww = y2 - y1, x2 - x1
            ph, pw = -(-wh // p) * p, -(-ww // p) * p
            win = F.pad(win, (0, pw - ww, 0, ph - wh))
            _, patches = model.encode_image(win)
            cos = (patches[0].float() @ cls.T).permute(2, 0, 1)  # [C, gh, gw]
            up = F.interpolate(cos[None], size=(ph, pw), mode="bilinear", align_corners=False)[0, :, :wh, :ww]
            canvas[:, y1:y2, x1:x2] += up
            count[y1:y2, x1:x2] += 1
    cos = canvas / count
    if (nh, nw) != (h, w):
        cos = F.interpolate(cos[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    probs = torch.softmax(cos * model.logit_scale.detach().float().clamp(max=model.logit_scale_max).exp(), dim=0)
    if background == "threshold":
        probs = torch.cat([torch.full((1, h, w), bg_threshold), probs])
    return probs.argmax(0)


@pytest.mark.parametrize("shape,short_side,crop,stride", [
    ((50, 61), 56, 28, 14),   # resized, overlapping windows on both axes
    ((40, 23), None, 28, 14),  # one axis shorter than the crop: a padded window
    ((64, 64), 84, 42, 20),   # crop not a multiple of the patch size: padded windows
])
def test_separable_form_equals_the_canvas_form(tiny_simzss, shape, short_side, crop, stride) -> None:
    from simzss.models.zeroshot import assemble_windows, plan_windows, window_crops, window_logits

    torch.manual_seed(1)
    image = torch.randn(1, 3, *shape)
    cls = F.normalize(torch.randn(5, tiny_simzss.embed_dim), dim=-1)
    h, w = resized_shape(*shape, short_side)
    x = image if (h, w) == shape else F.interpolate(image, size=(h, w), mode="bilinear", align_corners=False)
    plan = plan_windows(h, w, crop, stride, 14)
    assert plan.windows == slide_windows(h, w, crop, stride)
    (logits,) = window_logits(tiny_simzss, [window_crops(x, plan)], cls, window_batch=3)
    direct = slide_cosine(tiny_simzss, x, cls, crop=crop, stride=stride)
    torch.testing.assert_close(assemble_windows(logits, plan, (h, w)), direct, rtol=1e-5, atol=1e-5)
    back = F.interpolate(direct[None], size=shape, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(assemble_windows(logits, plan, shape, 3.0), 3.0 * back, rtol=1e-5, atol=3e-5)


def test_batched_evaluation_keeps_the_direct_paths_labels_and_miou(tiny_simzss, tmp_path: Path) -> None:
    """Images of several sizes segmented together (windows of different images in one forward, overlapping
    windows, resize both ways) give the same label maps as the direct path, and evaluate_segmentation the mIoU
    computed from those maps."""
    from simzss.data.synthetic import generate_toy_world
    from simzss.eval.datasets import build_segmentation_dataset
    from simzss.models.zeroshot import segment_images

    info = generate_toy_world(tmp_path / "toy", num_train=0, num_val=4, image_size=64)
    ds = build_segmentation_dataset(f"folder:{info['val_dir']}")
    mean, std = get_mean_std(tiny_simzss)
    images = []
    for i in range(len(ds)):
        img, _ = ds[i]
        arr = torch.from_numpy(np.asarray(img.resize((64 + 9 * i, 60 - 5 * i)), dtype=np.uint8).copy())
        images.append(normalize_image(arr.permute(2, 0, 1), mean, std))
    cls = text_classifier(tiny_simzss, ds.classnames[1:], "single")
    kw = dict(short_side=70, crop=56, stride=28)
    for background, thr in (("none", None), ("threshold", 0.08)):
        want = [_direct_labels(tiny_simzss, im, cls, background=background, bg_threshold=thr, **kw) for im in images]
        got = segment_images(tiny_simzss, images, cls, window_batch=3, background=background, bg_threshold=thr, **kw)
        for g, wnt in zip(got, want):
            assert torch.equal(g, wnt)
        if background == "threshold":  # both branches of the threshold rule are exercised
            assert 0 < sum(int((wnt == 0).sum()) for wnt in want) < sum(wnt.numel() for wnt in want)
    # whole-dataset evaluation: the mIoU of the direct path's maps, whatever the image batch
    full = text_classifier(tiny_simzss, ds.classnames, "single")
    conf = torch.zeros(len(ds.classnames), len(ds.classnames), dtype=torch.long)
    for i in range(len(ds)):
        img, mask = ds[i]
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        pred = _direct_labels(tiny_simzss, normalize_image(arr, mean, std), full, background="none",
                              bg_threshold=None, **kw)
        conf += torch.from_numpy(_np_confusion(pred.numpy(), mask, len(ds.classnames)))
    want = segmentation_scores(conf, ds.classnames)
    for image_batch in (1, 3):
        res = evaluate_segmentation(tiny_simzss, ds, templates="single", window_batch=2, image_batch=image_batch, **kw)
        assert res["mIoU"] == want["mIoU"] and res["per_class"] == want["per_class"]
        assert res["model_variant"] == "SimZSS"
