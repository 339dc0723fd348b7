"""PAMR, pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as TCL and Talk2DINO use it at test time.

Each pixel's class scores are replaced, ``iterations`` times, by an average of its neighbours' scores weighted by
how alike their colours are in the guide image. Neighbours: the 8 pixels at distance ``d`` (rows, columns and
diagonals) for every dilation ``d``, borders replicated. Weights, per pixel, over all P = 8 x len(dilations)
neighbours n:

    a_n = mean over image channels k of  -|I_k(centre) - I_k(n)| / (1e-8 + 0.1 * std_k)
    w = softmax_n(a)

where ``std_k`` is the (unbiased) standard deviation of channel k over the centre and its neighbours, the centre
counted once per dilation (9 x len(dilations) values). Because the weights sum to 1, probabilities stay
probabilities and a constant channel (a background threshold) stays constant. Defaults are TCL's: 10 iterations,
dilations (1, 2, 4, 8, 12, 24).
"""

from __future__ import annotations

from typing import Iterator, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

PAMR_ITERATIONS = 10
PAMR_DILATIONS: Tuple[int, ...] = (1, 2, 4, 8, 12, 24)
_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]

__all__ = ["PAMR_ITERATIONS", "PAMR_DILATIONS", "pamr", "pamr_weights"]


def _shifted(x: Tensor, dilations: Sequence[int]) -> Iterator[Tensor]:
    """The 8 neighbours of every pixel at each dilation (replicate padding), each ``x``'s shape, in a fixed order."""
    h, w = x.shape[-2:]
    for d in dilations:
        padded = F.pad(x, (d, d, d, d), mode="replicate")
        for dy, dx in _OFFSETS:
            yield padded[..., d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w]


def pamr_weights(image: Tensor, dilations: Sequence[int] = PAMR_DILATIONS) -> Tensor:
    """Neighbour weights ``[B, P, H, W]`` (softmax over the P neighbours) of a guide image ``[B, K, H, W]``."""
    if image.dim() != 4:
        raise ValueError(f"PAMR guide image must be [B, K, H, W], got {tuple(image.shape)}")
    if not dilations or any(int(d) < 1 for d in dilations):
        raise ValueError(f"PAMR dilations must be positive integers, got {list(dilations)}")
    image = image.float()
    neighbours = torch.stack(list(_shifted(image, dilations)), dim=2)  # [B, K, P, H, W]
    # spread of each channel over the centre (once per dilation) and its neighbours
    n_dil = len(dilations)
    window = torch.cat([image.unsqueeze(2).expand(-1, -1, n_dil, -1, -1), neighbours], dim=2)
    std = window.std(dim=2, keepdim=True)
    affinity = -(image.unsqueeze(2) - neighbours).abs() / (1e-8 + 0.1 * std)
    return torch.softmax(affinity.mean(dim=1), dim=1)


@torch.no_grad()
def pamr(
    image: Tensor,
    masks: Tensor,
    *,
    iterations: int = PAMR_ITERATIONS,
    dilations: Sequence[int] = PAMR_DILATIONS,
) -> Tensor:
    """Refine class scores ``masks`` ``[B, C, h, w]`` (e.g. probabilities) with the guide ``image`` ``[B, K, H, W]``.

    ``masks`` are first resized bilinearly (``align_corners=True``, as TCL does) to the image's size; returns
    ``[B, C, H, W]`` in fp32. Memory is O(C x H x W + P x H x W): neighbours are visited one at a time.
    """
    if masks.dim() != 4 or masks.shape[0] != image.shape[0]:
        raise ValueError(f"PAMR masks must be [B, C, h, w] with the image's batch size, got {tuple(masks.shape)}")
    if iterations < 0:
        raise ValueError(f"PAMR iterations must be >= 0, got {iterations}")
    weights = pamr_weights(image, dilations)  # [B, P, H, W]
    out = masks.float()
    if out.shape[-2:] != image.shape[-2:]:
        out = F.interpolate(out, size=image.shape[-2:], mode="bilinear", align_corners=True)
    for _ in range(iterations):
        acc = torch.zeros_like(out)
        for p, neighbour in enumerate(_shifted(out, dilations)):
            acc.addcmul_(neighbour, weights[:, p : p + 1])
        out = acc
    return out
