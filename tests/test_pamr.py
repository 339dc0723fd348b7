"""PAMR mask refinement: equals a per-pixel reference of the formula, snaps blurred masks to image edges, and is
an option of the segmentation evaluation recorded in its protocol."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from simzss.eval.segmentation import evaluate_segmentation
from simzss.models.pamr import PAMR_DILATIONS, PAMR_ITERATIONS, pamr, pamr_weights
from simzss.models.zeroshot import segment_image

torch.set_num_threads(1)


def reference_pamr(image: torch.Tensor, masks: torch.Tensor, iterations: int, dilations) -> torch.Tensor:
    """Pixel by pixel, in float64: neighbours at (dy*d, dx*d) with coordinates clamped to the image (= replicate
    padding); a_n = mean_k -|I_k(c) - I_k(n)| / (1e-8 + 0.1 std_k) with std_k over the centre (once per dilation)
    and the neighbours; w = softmax(a); m <- sum_n w_n m(n), ``iterations`` times."""
    img, m = image.double(), masks.double()
    b, k, h, w = img.shape
    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    weights = torch.zeros(b, len(offsets), h, w, dtype=torch.float64)
    for bi in range(b):
        for y in range(h):
            for x in range(w):
                nb = [(min(max(y + oy, 0), h - 1), min(max(x + ox, 0), w - 1)) for oy, ox in offsets]
                centre = img[bi, :, y, x]
                values = torch.stack([centre] * len(dilations) + [img[bi, :, ny, nx] for ny, nx in nb], dim=1)
                std = values.std(dim=1)  # unbiased, per channel
                aff = torch.stack([(-(centre - img[bi, :, ny, nx]).abs() / (1e-8 + 0.1 * std)).mean() for ny, nx in nb])
                weights[bi, :, y, x] = torch.softmax(aff, dim=0)
    for _ in range(iterations):
        new = torch.zeros_like(m)
        for bi in range(b):
            for y in range(h):
                for x in range(w):
                    for p, (oy, ox) in enumerate(offsets):
                        ny, nx = min(max(y + oy, 0), h - 1), min(max(x + ox, 0), w - 1)
                        new[bi, :, y, x] += weights[bi, p, y, x] * m[bi, :, ny, nx]
        m = new
    return m


def test_pamr_matches_reference_formula() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 7, 9, generator=g)
    masks = torch.softmax(torch.randn(2, 4, 7, 9, generator=g), dim=1)
    out = pamr(image, masks, iterations=3, dilations=(1, 2, 3))
    torch.testing.assert_close(out.double(), reference_pamr(image, masks, 3, (1, 2, 3)), rtol=1e-5, atol=1e-6)
    # weights are a distribution over the 8 x len(dilations) neighbours
    wts = pamr_weights(image, (1, 2, 3))
    assert wts.shape == (2, 24, 7, 9)
    torch.testing.assert_close(wts.sum(1), torch.ones(2, 7, 9))


def test_pamr_resizes_masks_like_tcl_and_keeps_probabilities() -> None:
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 12, 16, generator=g)
    small = torch.softmax(torch.randn(1, 3, 3, 4, generator=g), dim=1)
    out = pamr(image, small, iterations=2, dilations=(1, 2))
    up = F.interpolate(small, size=(12, 16), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out, pamr(image, up, iterations=2, dilations=(1, 2)))
    torch.testing.assert_close(out.sum(1), torch.ones(1, 12, 16))
    constant = torch.full((1, 1, 12, 16), 0.4)
    torch.testing.assert_close(pamr(image, constant), constant)  # a threshold channel stays a threshold
    assert PAMR_ITERATIONS == 10 and PAMR_DILATIONS == (1, 2, 4, 8, 12, 24)  # TCL's settings
    with pytest.raises(ValueError, match="dilations"):
        pamr(image, small, dilations=(0,))
    with pytest.raises(ValueError, match="masks"):
        pamr(image, small[0])


def test_pamr_snaps_a_blurred_mask_to_the_image_edge() -> None:
    """Dark left (cols < 20) / bright right with mild noise; class 1's probability is a smooth ramp centred at 16.5
    (3.5 columns too far left). PAMR averages within each side, so the argmax lands exactly on the edge."""
    g = torch.Generator().manual_seed(2)
    h, w, edge = 24, 40, 20
    image = torch.zeros(1, 3, h, w)
    image[..., edge:] = 1.0
    image += 0.02 * torch.randn(image.shape, generator=g)
    cols = torch.arange(w, dtype=torch.float32)
    p1 = torch.sigmoid((cols - 16.5) / 2.0).expand(h, w)
    masks = torch.stack([1 - p1, p1]).unsqueeze(0)
    truth = (cols >= edge).long().expand(h, w)
    before = masks.argmax(1)[0]
    assert (before != truth).sum() == 3 * h  # columns 17, 18 and 19 are wrong
    after = pamr(image, masks).argmax(1)[0]
    assert torch.equal(after, truth)


# ---------------------------------------------------------------------------- in the segmentation evaluation
class ColourPatches(torch.nn.Module):
    """Patch embedding = normalised mean colour of an 8x8 patch; "red" / "green" text embeddings = those colours."""

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(20.0)))
        self.vision = torch.nn.Module()
        self.vision.patch_size, self.vision.mean, self.vision.std = 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def encode_image(self, images):
        patches = F.normalize(F.avg_pool2d(images, 8).permute(0, 2, 3, 1) + 1e-6, dim=-1)
        return F.normalize(patches.mean((1, 2)), dim=-1), patches

    def encode_texts(self, texts):
        table = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0)}
        return torch.tensor([table[t] for t in texts])


def _red_green(edge: int = 19) -> np.ndarray:
    rgb = np.zeros((16, 40, 3), np.uint8)
    rgb[:, :edge, 0] = 255
    rgb[:, edge:, 1] = 255
    return rgb


def test_segment_image_with_pamr_follows_the_colour_edge() -> None:
    model = ColourPatches()
    img = torch.from_numpy(_red_green()).permute(2, 0, 1)[None].float() / 255
    cls = model.encode_texts(["red", "green"])
    truth = torch.zeros(16, 40, dtype=torch.long)
    truth[:, 19:] = 1
    plain = segment_image(model, img, cls, short_side=None, crop=40, stride=20)
    refined = segment_image(model, img, cls, short_side=None, crop=40, stride=20, pamr=True)
    assert (plain.argmax(0) != truth).any()  # the 8-px patch grid blurs the edge at column 19
    assert torch.equal(refined.argmax(0), truth)
    torch.testing.assert_close(refined.sum(0), torch.ones(16, 40))


def test_evaluate_segmentation_records_protocol_and_pamr(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("red\ngreen\n")
    mask = np.zeros((16, 40), np.uint8)
    mask[:, 19:] = 1
    Image.fromarray(_red_green()).save(root / "images" / "a.png")
    Image.fromarray(mask).save(root / "masks" / "a.png")
    kw = dict(short_side=None, crop=40, stride=20, templates=["{}"])
    plain = evaluate_segmentation(ColourPatches(), f"folder:{root}", **kw)
    refined = evaluate_segmentation(ColourPatches(), f"folder:{root}", pamr=True, **kw)
    assert plain["protocol"] == {"background": "none", "bg_threshold": None, "pamr": False, "templates": ["{}"],
                                 "short_side": None, "crop": 40, "stride": 20}
    assert refined["protocol"]["pamr"] is True
    assert plain["mIoU"] < 100.0 and refined["mIoU"] == pytest.approx(100.0)
