"""The synthetic toy world: built-in image-caption shards and a labelled held-out split.

Every image is a stuff background (1-3 bands with wavy borders: sky, grass, water, ...) with 1-3
things drawn on it (apple, ball, boat, car, ...). Each class has its own texture and a small palette;
several classes share colours (sky / water / car are blue, grass / tree / apple green, ...), and
colours, texture scale, phase and angle are jittered per image, so colour alone does not identify
a class while texture plus colour does. Captions are varied English naming most visible classes.

Output (``simzss demo-data OUT``)::

    OUT/train/shard-000000.tar ...   img2dataset-style webdataset shards: KEY.jpg, KEY.txt, KEY.json
    OUT/train/sizes.json             samples per shard
    OUT/val/images/ID.jpg            held-out images
    OUT/val/masks/ID.png             uint8 class index per pixel, 255 = ignore (thin borders of things)
    OUT/val/classes.txt              one class name per line (no background class: every pixel is named)
    OUT/toy_world.json               generation parameters and class lists

Generation is deterministic: every sample draws from its own generator seeded by (seed, split,
index), and all files are written with fixed metadata, so the same arguments give identical bytes.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from simzss.data.shard_index import index_new_shard
from simzss.data.shards import atomic_write_bytes, write_shard, write_sizes


RGB = tuple[int, int, int]


@dataclass(frozen=True)
class ToyClass:
    """One toy-world class: how it looks and how captions talk about it."""

    name: str
    plural: str
    kind: str  # "stuff" | "thing"
    texture: str
    palette: tuple[tuple[RGB, str], ...]  # (base colour, colour word); one is drawn per image/instance
    adjectives: tuple[str, ...] = ()
    mass: bool = False  # mass noun ("grass", "sand"): no "a", rarely a count


STUFF: tuple[ToyClass, ...] = (
    ToyClass("sky", "skies", "stuff", "clouds", (((110, 160, 230), "blue"), ((150, 175, 205), "pale")), ("clear", "bright", "cloudy", "open")),
    ToyClass("grass", "grass", "stuff", "blades", (((70, 150, 55), "green"), ((120, 160, 60), "green")), ("fresh", "tall", "short", "lush"), mass=True),
    ToyClass("sand", "sand", "stuff", "grain", (((215, 190, 130), "golden"), ((200, 170, 120), "pale")), ("warm", "dry", "soft", "fine"), mass=True),
    ToyClass("water", "water", "stuff", "waves", (((40, 95, 175), "blue"), ((40, 120, 125), "green")), ("calm", "deep", "rippling", "dark"), mass=True),
    ToyClass("snow", "snow", "stuff", "drifts", (((238, 240, 246), "white"), ((215, 222, 235), "white")), ("fresh", "deep", "soft", "cold"), mass=True),
    ToyClass("road", "roads", "stuff", "lanes", (((95, 95, 100), "grey"), ((70, 70, 75), "dark")), ("empty", "wide", "quiet", "long")),
    ToyClass("wall", "walls", "stuff", "bricks", (((185, 95, 70), "red"), ((200, 195, 180), "white")), ("old", "tall", "plain", "long")),
    ToyClass("floor", "floors", "stuff", "planks", (((150, 105, 60), "brown"), ((185, 150, 105), "wooden")), ("wooden", "polished", "clean", "old")),
)
THINGS: tuple[ToyClass, ...] = (
    ToyClass("apple", "apples", "thing", "speckles", (((200, 30, 35), "red"), ((120, 185, 45), "green")), ("small", "shiny", "fresh", "ripe")),
    ToyClass("ball", "balls", "thing", "stripes", (((240, 140, 30), "orange"), ((225, 215, 40), "yellow")), ("big", "small", "striped", "round")),
    ToyClass("bird", "birds", "thing", "chevrons", (((225, 200, 35), "yellow"), ((45, 80, 200), "blue")), ("small", "little", "lone", "tiny")),
    ToyClass("boat", "boats", "thing", "hull", (((235, 235, 230), "white"), ((195, 50, 45), "red")), ("small", "little", "old", "wooden")),
    ToyClass("car", "cars", "thing", "checker", (((40, 80, 200), "blue"), ((200, 30, 40), "red"), ((230, 200, 30), "yellow")), ("small", "shiny", "old", "new")),
    ToyClass("dog", "dogs", "thing", "fur", (((145, 95, 50), "brown"), ((40, 38, 36), "black")), ("small", "big", "happy", "fluffy")),
    ToyClass("house", "houses", "thing", "windows", (((220, 200, 160), "beige"), ((185, 75, 60), "red")), ("small", "old", "little", "big")),
    ToyClass("tree", "trees", "thing", "leaves", (((40, 115, 50), "green"), ((95, 140, 40), "green")), ("tall", "big", "leafy", "lone")),
)
CLASSES: tuple[ToyClass, ...] = STUFF + THINGS
#: Class names in class-index order (the ``val/classes.txt`` order).
TOY_CLASSES: list[str] = [c.name for c in CLASSES]
TOY_STUFF: list[str] = [c.name for c in STUFF]
TOY_THINGS: list[str] = [c.name for c in THINGS]
IGNORE_INDEX = 255
_IS_THING = np.array([c.kind == "thing" for c in CLASSES] + [False] * (256 - len(CLASSES)))

# ----------------------------------------------------------------------------------------------
# textures: f(rng, yy, xx, size) -> float32 field in [0, 1] (0 = base colour, 1 = accent colour)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Bilinearly interpolated value noise with feature size ``cell`` pixels, in [0, 1]."""
    gh, gw = int(h / cell) + 2, int(w / cell) + 2
    g = rng.random((gh, gw), dtype=np.float32)
    ys, xs = np.arange(h, dtype=np.float32) / cell, np.arange(w, dtype=np.float32) / cell
    y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = g[y0][:, x0] * (1 - fx) + g[y0][:, x0 + 1] * fx
    bot = g[y0 + 1][:, x0] * (1 - fx) + g[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bot * fy


def _rotated(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, max_deg: float) -> tuple[np.ndarray, np.ndarray]:
    a = np.deg2rad(rng.uniform(-max_deg, max_deg))
    return yy * np.cos(a) + xx * np.sin(a), xx * np.cos(a) - yy * np.sin(a)


def _tex_clouds(rng, yy, xx, s):
    n = _smooth_noise(rng, *yy.shape, cell=s * rng.uniform(0.15, 0.3))
    return np.clip(0.25 * yy / s + 1.8 * np.maximum(n - 0.55, 0), 0, 1)


def _tex_blades(rng, yy, xx, s):
    p = rng.uniform(2.5, 3.5)
    return ((xx / p + 0.25 * np.sin(yy / rng.uniform(4, 7)) + rng.random()) % 1.0 < 0.4).astype(np.float32)


def _tex_grain(rng, yy, xx, s):
    return (rng.random(yy.shape, dtype=np.float32) > 0.72) * 0.8 + 0.2 * _smooth_noise(rng, *yy.shape, cell=8)


def _tex_waves(rng, yy, xx, s):
    p, q = rng.uniform(5, 7), rng.uniform(20, 34)
    return 0.5 + 0.5 * np.sin(2 * np.pi * (yy / p + 0.35 * np.sin(2 * np.pi * xx / q + rng.uniform(0, 6.3))) + rng.uniform(0, 6.3))


def _tex_drifts(rng, yy, xx, s):
    return 0.6 * _smooth_noise(rng, *yy.shape, cell=s * 0.12) + 0.4 * (rng.random(yy.shape, dtype=np.float32) > 0.97)


def _tex_lanes(rng, yy, xx, s):
    p, q = rng.uniform(14, 20), rng.uniform(12, 18)
    lines = (np.abs(yy % p - p / 2) < 0.9) & ((xx + rng.uniform(0, q)) % q < q * 0.55)
    return np.maximum(lines.astype(np.float32), 0.25 * (rng.random(yy.shape, dtype=np.float32) > 0.8))


def _tex_bricks(rng, yy, xx, s):
    h = rng.uniform(6, 8)
    w = 2.2 * h
    row = np.floor(yy / h)
    shifted = xx + (row % 2) * w / 2 + rng.uniform(0, w)
    return ((yy % h < 1.3) | (shifted % w < 1.3)).astype(np.float32)


def _tex_planks(rng, yy, xx, s):
    h = rng.uniform(8, 11)
    row = np.floor(yy / h).astype(np.int64)
    tone = rng.random(int(row.max()) + 2, dtype=np.float32)[row] * 0.45
    return np.maximum(tone, (yy % h < 1.0).astype(np.float32))


def _tex_speckles(rng, yy, xx, s):
    return 0.9 * (rng.random(yy.shape, dtype=np.float32) > 0.93)


def _tex_stripes(rng, yy, xx, s):
    u, _ = _rotated(rng, yy, xx, 35)
    return ((u / rng.uniform(7, 10) + rng.random()) % 1.0 < 0.5).astype(np.float32)


def _tex_chevrons(rng, yy, xx, s):
    p = rng.uniform(4, 6)
    return (((np.abs(xx % (2 * p) - p) + yy) / p + rng.random()) % 1.0 < 0.45).astype(np.float32)


def _tex_hull(rng, yy, xx, s):
    p = rng.uniform(4.5, 6.5)
    return ((yy / p + rng.random()) % 1.0 < 0.3).astype(np.float32)


def _tex_checker(rng, yy, xx, s):
    u, v = _rotated(rng, yy, xx, 10)
    p = rng.uniform(4, 5.5)
    return ((np.floor(u / p) + np.floor(v / p)) % 2).astype(np.float32)


def _tex_fur(rng, yy, xx, s):
    u, _ = _rotated(rng, yy, xx, 15)
    streak = 0.5 + 0.5 * np.sin(2 * np.pi * (u + xx) / rng.uniform(3, 4) + 2.5 * _smooth_noise(rng, *yy.shape, cell=6))
    return 0.8 * streak


def _tex_windows(rng, yy, xx, s):
    p = rng.uniform(7, 9)
    return (((xx + rng.uniform(0, p)) % p < p * 0.45) & ((yy + rng.uniform(0, p)) % p < p * 0.45)).astype(np.float32)


def _tex_leaves(rng, yy, xx, s):
    p = rng.uniform(5, 7)
    row = np.floor(yy / p)
    dx = (xx + (row % 2) * p / 2) % p - p / 2
    dy = yy % p - p / 2
    return (dx * dx + dy * dy < (0.32 * p) ** 2).astype(np.float32)


TEXTURES: dict[str, Callable[..., np.ndarray]] = {
    "clouds": _tex_clouds, "blades": _tex_blades, "grain": _tex_grain, "waves": _tex_waves,
    "drifts": _tex_drifts, "lanes": _tex_lanes, "bricks": _tex_bricks, "planks": _tex_planks,
    "speckles": _tex_speckles, "stripes": _tex_stripes, "chevrons": _tex_chevrons, "hull": _tex_hull,
    "checker": _tex_checker, "fur": _tex_fur, "windows": _tex_windows, "leaves": _tex_leaves,
}
# accent colour of each texture, relative to the base colour: (mix towards, amount)
_ACCENT: dict[str, tuple[RGB, float]] = {
    "clouds": ((245, 246, 250), 0.9), "blades": ((20, 60, 15), 0.45), "grain": ((120, 95, 55), 0.4),
    "waves": ((190, 215, 235), 0.35), "drifts": ((150, 165, 190), 0.45), "lanes": ((240, 235, 220), 0.9),
    "bricks": ((225, 220, 210), 0.75), "planks": ((60, 35, 15), 0.6), "speckles": ((255, 240, 200), 0.6),
    "stripes": ((250, 250, 250), 0.85), "chevrons": ((30, 30, 30), 0.55), "hull": ((30, 40, 70), 0.6),
    "checker": ((15, 15, 25), 0.45), "fur": ((235, 215, 180), 0.5), "windows": ((60, 90, 130), 0.8),
    "leaves": ((170, 220, 90), 0.5),
}

# ----------------------------------------------------------------------------------------------
# scene layout


@dataclass
class Scene:
    """One generated image: pixels, class map and what captions may say about it."""

    image: np.ndarray  # [S,S,3] uint8
    labels: np.ndarray  # [S,S] uint8 class index (no ignore)
    stuff: list[int]  # class ids of the background bands, top to bottom
    instances: list[tuple[int, int, float]]  # (class id, palette index, visible area fraction)


def _paint(rng: np.random.Generator, cls: ToyClass, palette_idx: int, yy: np.ndarray, xx: np.ndarray, s: int) -> np.ndarray:
    """Texture the whole canvas with ``cls``'s look (colour and texture jittered); [S,S,3] float32."""
    base = (np.asarray(cls.palette[palette_idx][0]) * rng.uniform(0.85, 1.12) + rng.normal(0, 10, 3)).astype(np.float32)
    target, amount = _ACCENT[cls.texture]
    accent = (base + (np.asarray(target) - base) * amount * rng.uniform(0.8, 1.2)).astype(np.float32)
    t = TEXTURES[cls.texture](rng, yy, xx, s)[..., None]
    return base + (accent - base) * t


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _rect(yy, xx, y0, y1, x0, x1):
    return (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)


def _convex(yy, xx, pts: Sequence[tuple[float, float]]):
    """Inside test for a convex polygon given as (y, x) vertices in order (either orientation)."""
    inside_pos = np.ones(yy.shape, bool)
    inside_neg = np.ones(yy.shape, bool)
    for (y0, x0), (y1, x1) in zip(pts, list(pts[1:]) + [pts[0]]):
        cross = (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)
        inside_pos &= cross >= 0
        inside_neg &= cross <= 0
    return inside_pos | inside_neg


def _thing_mask(name: str, rng: np.random.Generator, yy, xx, cy: float, cx: float, r: float) -> np.ndarray:
    """A simple silhouette for a thing centred at (cy, cx) with radius about ``r``."""
    flip = rng.choice([-1.0, 1.0])
    if name in ("apple", "ball"):
        squash = rng.uniform(0.9, 1.1) if name == "apple" else 1.0
        m = _ellipse(yy, xx, cy, cx, r * squash, r)
        if name == "apple":  # stalk
            m |= _rect(yy, xx, cy - 1.35 * r, cy - 0.8 * r, cx - 0.08 * r - 0.5, cx + 0.08 * r + 0.5)
        return m
    if name == "bird":
        m = _ellipse(yy, xx, cy, cx, 0.5 * r, r)
        m |= _ellipse(yy, xx, cy - 0.45 * r, cx + flip * 0.85 * r, 0.35 * r, 0.35 * r)
        m |= _convex(yy, xx, [(cy, cx - flip * 0.7 * r), (cy - 0.5 * r, cx - flip * 1.5 * r), (cy + 0.35 * r, cx - flip * 1.4 * r)])
        return m
    if name == "boat":
        hull = _convex(yy, xx, [(cy, cx - 1.2 * r), (cy, cx + 1.2 * r), (cy + 0.5 * r, cx + 0.8 * r), (cy + 0.5 * r, cx - 0.8 * r)])
        sail = _convex(yy, xx, [(cy - 0.05 * r, cx - 0.1 * r), (cy - 1.3 * r, cx - 0.1 * r), (cy - 0.05 * r, cx + flip * 0.9 * r)])
        return hull | sail
    if name == "car":
        body = _rect(yy, xx, cy - 0.3 * r, cy + 0.35 * r, cx - 1.3 * r, cx + 1.3 * r)
        cabin = _convex(yy, xx, [(cy - 0.3 * r, cx - 0.8 * r), (cy - 0.85 * r, cx - 0.45 * r), (cy - 0.85 * r, cx + 0.45 * r), (cy - 0.3 * r, cx + 0.8 * r)])
        wheels = _ellipse(yy, xx, cy + 0.4 * r, cx - 0.75 * r, 0.3 * r, 0.3 * r) | _ellipse(yy, xx, cy + 0.4 * r, cx + 0.75 * r, 0.3 * r, 0.3 * r)
        return body | cabin | wheels
    if name == "dog":
        m = _ellipse(yy, xx, cy, cx, 0.45 * r, 0.9 * r)
        m |= _ellipse(yy, xx, cy - 0.45 * r, cx + flip * 0.9 * r, 0.35 * r, 0.38 * r)
        for lx in (-0.6, 0.5):
            m |= _rect(yy, xx, cy + 0.2 * r, cy + 0.85 * r, cx + lx * r, cx + (lx + 0.18) * r + 1)
        return m
    if name == "house":
        body = _rect(yy, xx, cy - 0.4 * r, cy + 0.8 * r, cx - 0.9 * r, cx + 0.9 * r)
        roof = _convex(yy, xx, [(cy - 0.4 * r, cx - 1.1 * r), (cy - 1.2 * r, cx), (cy - 0.4 * r, cx + 1.1 * r)])
        return body | roof
    if name == "tree":
        crown = _ellipse(yy, xx, cy - 0.35 * r, cx, 0.8 * r, 0.7 * r)
        trunk = _rect(yy, xx, cy + 0.3 * r, cy + 1.2 * r, cx - 0.14 * r - 0.5, cx + 0.14 * r + 0.5)
        return crown | trunk
    raise KeyError(name)


def make_scene(rng: np.random.Generator, size: int) -> Scene:
    """Draw one random scene of ``size`` x ``size`` pixels."""
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    img = np.zeros((s, s, 3), np.float32)
    labels = np.zeros((s, s), np.uint8)

    # background: 1-3 stuff bands, top to bottom, with wavy borders; sky, when drawn, is on top
    n_bands = int(rng.choice([1, 2, 3], p=[0.2, 0.5, 0.3]))
    stuff = [int(i) for i in rng.choice(len(STUFF), size=n_bands, replace=False)]
    stuff.sort(key=lambda i: STUFF[i].name != "sky")
    cuts = np.sort(rng.uniform(0.25, 0.8, n_bands - 1)) * s
    band = np.zeros((s, s), np.int64)
    x = xx[0]
    for c in cuts:
        wave = rng.uniform(1, 0.07 * s) * np.sin(2 * np.pi * x / rng.uniform(0.4, 1.5) / s + rng.uniform(0, 6.3))
        wave += rng.uniform(0, 0.03 * s) * np.sin(2 * np.pi * x * rng.uniform(5, 9) / s + rng.uniform(0, 6.3))
        band += yy >= c + wave[None, :]
    for k, ci in enumerate(stuff):
        m = band == k
        if m.any():
            np.copyto(img, _paint(rng, STUFF[ci], int(rng.integers(len(STUFF[ci].palette))), yy, xx, s), where=m[..., None])
            labels[m] = ci

    # things: 1-3 objects; a repeat of the previous class makes plurals ("two boats")
    n_obj = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    drawn: list[tuple[int, int, np.ndarray]] = []
    for j in range(n_obj):
        if j and rng.random() < 0.3:
            ti, pal = drawn[-1][0], drawn[-1][1]
        else:
            ti = int(rng.integers(len(THINGS)))
            pal = int(rng.integers(len(THINGS[ti].palette)))
        r = rng.uniform(0.09, 0.2) * s
        cy, cx = rng.uniform(0.25, 0.8) * s, rng.uniform(0.15, 0.85) * s
        m = _thing_mask(THINGS[ti].name, rng, yy, xx, cy, cx, r)
        cid = len(STUFF) + ti
        np.copyto(img, _paint(rng, THINGS[ti], pal, yy, xx, s), where=m[..., None])
        labels[m] = cid
        for _, _, prev in drawn:
            prev &= ~m  # occluded parts are no longer visible
        drawn.append((ti, pal, m))

    img += 4.0 * rng.standard_normal((s, s, 1), dtype=np.float32)
    image = np.clip(img, 0, 255).astype(np.uint8)
    instances = [(len(STUFF) + ti, pal, float(m.mean())) for ti, pal, m in drawn]
    return Scene(image=image, labels=labels, stuff=stuff, instances=instances)  # stuff ids = STUFF indices


def ignore_borders(labels: np.ndarray) -> np.ndarray:
    """Evaluation mask: ``labels`` with the 1-pixel rim on both sides of every thing border set to 255."""
    thing = _IS_THING[labels]
    border = np.zeros(labels.shape, bool)
    v = (labels[1:] != labels[:-1]) & (thing[1:] | thing[:-1])
    h = (labels[:, 1:] != labels[:, :-1]) & (thing[:, 1:] | thing[:, :-1])
    border[1:] |= v
    border[:-1] |= v
    border[:, 1:] |= h
    border[:, :-1] |= h
    out = labels.copy()
    out[border] = IGNORE_INDEX
    return out


# ----------------------------------------------------------------------------------------------
# captions

_NUMBERS = {2: ("two", "a couple of", "a pair of", "some"), 3: ("three", "a few", "several", "some")}
_VERBS = {
    "apple": ("lying", "resting", "sitting"), "ball": ("lying", "rolling", "resting"),
    "bird": ("perched", "standing", "sitting"), "boat": ("floating", "sailing", "resting"),
    "car": ("parked", "driving", "standing"), "dog": ("sitting", "standing", "running", "playing"),
    "house": ("standing", "built"), "tree": ("growing", "standing"),
}
_PLACES = {  # phrases locating things relative to a stuff class; {np} = noun phrase for it
    "sky": ("under {np}", "beneath {np}", "against {np}"),
    "grass": ("on {np}", "in {np}"),
    "sand": ("on {np}",),
    "water": ("on {np}", "by {np}", "near {np}"),
    "snow": ("in {np}", "on {np}"),
    "road": ("on {np}", "by {np}", "next to {np}"),
    "wall": ("in front of {np}", "next to {np}", "by {np}"),
    "floor": ("on {np}",),
}
_STUFF_STATES = {
    "sky": ("is clear", "looks bright", "is blue", "stretches above"), "grass": ("is green", "looks fresh", "is short"),
    "sand": ("is warm", "looks dry", "is golden"), "water": ("is calm", "looks deep", "ripples"),
    "snow": ("is fresh", "looks deep", "is white"), "road": ("is empty", "looks wet", "is quiet"),
    "wall": ("is old", "looks plain", "is tall"), "floor": ("is wooden", "looks clean", "is polished"),
}
_RELATIONS = ("next to", "near", "beside", "close to", "not far from", "in front of", "behind")
_EXTRAS = ("on a summer day", "in the afternoon", "on a sunny morning", "in this toy world scene",
           "in a cartoon style", "on a quiet day", "in the evening light")


def _pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _article(word: str, definite: bool) -> str:
    if definite:
        return "the"
    return "an" if word[0] in "aeiou" else "a"


def _thing_np(rng: np.random.Generator, cls: ToyClass, count: int, colours: set[str], definite: bool = False) -> str:
    """Noun phrase for ``count`` visible instances of a thing: "a red apple", "two small boats"."""
    adj = ""
    if rng.random() < 0.65:
        options = [*cls.adjectives] + ([next(iter(colours))] * 3 if len(colours) == 1 else [])
        adj = _pick(rng, options)
    if count == 1:
        words = f"{adj} {cls.name}".strip()
        return f"{_article(words, definite)} {words}"
    det = "the two" if definite and count == 2 else _pick(rng, _NUMBERS[min(count, 3)])
    return f"{det} {adj} {cls.plural}".replace("  ", " ")


def _stuff_np(rng: np.random.Generator, cls: ToyClass, colour: str) -> str:
    """Noun phrase for a stuff class: "the grass", "a clear sky", "deep snow"."""
    adj = _pick(rng, [*cls.adjectives, colour]) if rng.random() < 0.5 else ""
    words = f"{adj} {cls.name}".strip()
    if cls.mass:
        return words if adj and rng.random() < 0.4 else f"the {words}"
    return f"{_article(words, rng.random() < 0.6 or not adj)} {words}"


def make_caption(rng: np.random.Generator, scene: Scene, min_area: float = 0.004) -> tuple[str, list[str]]:
    """Varied English caption naming most visible classes; returns (caption, class names mentioned)."""
    counts: dict[int, int] = {}
    colours: dict[int, set[str]] = {}
    for cid, pal, area in scene.instances:
        if area >= min_area:
            counts[cid] = counts.get(cid, 0) + 1
            colours.setdefault(cid, set()).add(CLASSES[cid].palette[pal][1])
    areas = np.bincount(scene.labels.ravel(), minlength=len(CLASSES)) / scene.labels.size
    stuff = [c for c in dict.fromkeys(scene.stuff) if areas[c] >= 0.03]
    if not counts and not stuff:  # only slivers visible: name the largest class
        top = int(np.argmax(areas))
        if CLASSES[top].kind == "stuff":
            stuff = [top]
        else:
            counts[top] = 1
            colours[top] = {CLASSES[top].palette[next(p for c, p, _ in scene.instances if c == top)][1]}
    things = list(counts)
    # mention most, not all: each class is dropped with a small probability, keeping at least one
    things = [t for t in things if rng.random() > 0.08] or things[:1]
    stuff = [c for c in stuff if rng.random() > 0.12] or (stuff[:1] if not things else [])
    order = rng.permutation(len(things))
    things = [things[i] for i in order]
    stuff = [stuff[i] for i in rng.permutation(len(stuff))]

    nps = [_thing_np(rng, CLASSES[t], counts[t], colours[t]) for t in things]
    stuff_colour = {c: _pick(rng, [w for _, w in CLASSES[c].palette]) for c in stuff}
    places = [_pick(rng, _PLACES[CLASSES[c].name]).format(np=_stuff_np(rng, CLASSES[c], stuff_colour[c])) for c in stuff]

    if nps:
        if len(nps) == 1:
            subject = nps[0]
        elif len(nps) == 2 and rng.random() < 0.6:
            subject = f"{nps[0]} {_pick(rng, _RELATIONS)} {nps[1]}"
        else:
            subject = ", ".join(nps[:-1]) + " and " + nps[-1]
        plural = len(nps) > 1 or counts[things[0]] > 1
        if len(nps) == 1 and places and rng.random() < 0.5:
            subject += " " + _pick(rng, _VERBS[CLASSES[things[0]].name])
        main = f"{subject} {places[0]}" if places else subject
        rest = places[1:]
        style = rng.random()
        if style < 0.25:
            main = f"{_pick(rng, ('a photo of', 'a picture of', 'an image of', 'a drawing of', 'a view of'))} {main}"
        elif style < 0.4:
            main = f"there {'are' if plural else 'is'} {main}"
        elif style < 0.5:
            main = f"{_pick(rng, ('this image shows', 'here we see', 'you can see', 'the scene shows'))} {main}"
        for c, p in zip(stuff[1:], rest):
            kind = rng.random()
            if kind < 0.35:
                main += f" {p}"
            elif kind < 0.6:
                main += f", with {_stuff_np(rng, CLASSES[c], stuff_colour[c])} in the background"
            elif kind < 0.8:
                main += f", and the {CLASSES[c].name} {_pick(rng, _STUFF_STATES[CLASSES[c].name])}"
            else:
                main += f". The {CLASSES[c].name} {_pick(rng, _STUFF_STATES[CLASSES[c].name])}"
    else:
        first = _stuff_np(rng, CLASSES[stuff[0]], stuff_colour[stuff[0]])
        main = f"{_pick(rng, ('a view of', 'a picture of', 'a landscape with', 'nothing but'))} {first}"
        for c, p in zip(stuff[1:], places[1:]):
            main += f" {p}" if rng.random() < 0.5 else f" and {_stuff_np(rng, CLASSES[c], stuff_colour[c])}"
    if rng.random() < 0.2:
        main += f" {_pick(rng, _EXTRAS)}"
    caption = ". ".join(part[:1].upper() + part[1:] if rng.random() < 0.7 else part for part in main.split(". "))
    if rng.random() < 0.6:
        caption += "."
    mentioned = [CLASSES[c].name for c in things + stuff]
    return caption, mentioned


# ----------------------------------------------------------------------------------------------
# writing

_SPLITS = {"train": 0, "val": 1}


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLITS[split], index])


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _train_samples(seed: int, start: int, stop: int, size: int, class_counts: np.ndarray) -> Iterator[dict[str, Any]]:
    for i in range(start, stop):
        rng = _rng(seed, "train", i)
        scene = make_scene(rng, size)
        caption, mentioned = make_caption(rng, scene)
        present = np.flatnonzero(np.bincount(scene.labels.ravel(), minlength=len(CLASSES)))
        class_counts[present] += 1
        key = f"{i:09d}"
        meta = {
            "key": key,
            "caption": caption,
            "status": "success",
            "width": size,
            "height": size,
            "classes": [TOY_CLASSES[c] for c in present],
            "class_ids": [int(c) for c in present],
            "mentioned": mentioned,
            "instances": [{"class": TOY_CLASSES[c], "area": round(a, 5)} for c, _, a in scene.instances],
        }
        yield {"__key__": key, "jpg": _jpeg(scene.image), "txt": caption, "json": meta}


def _prepare_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def generate_toy_world(
    out_dir: str | Path,
    num_train: int = 2000,
    num_val: int = 100,
    image_size: int = 128,
    shard_size: int = 500,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the toy world (train shards + labelled val split) under ``out_dir``; return a summary.

    Same arguments -> byte-identical files (except ``train/fingerprints.json`` and the shard indexes ``*.tar.idx``,
    which record the shards' mtimes).
    ``out_dir/train`` and ``out_dir/val`` must be absent or empty unless ``overwrite`` (then they are replaced).
    """
    if num_train < 0 or num_val < 0:
        raise ValueError("num_train and num_val must be >= 0")
    if not 32 <= image_size <= 2048:
        raise ValueError(f"image_size must be in [32, 2048], got {image_size}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    train_dir, val_dir = out / "train", out / "val"
    _prepare_dir(train_dir, overwrite)
    _prepare_dir(val_dir, overwrite)

    class_counts = np.zeros(len(CLASSES), np.int64)
    sizes: dict[str, int] = {}
    for shard, start in enumerate(range(0, num_train, shard_size)):
        name = f"shard-{shard:06d}.tar"
        stop = min(start + shard_size, num_train)
        sizes[name] = write_shard(train_dir / name, _train_samples(seed, start, stop, image_size, class_counts))
        index_new_shard(train_dir / name)
    write_sizes(train_dir, sizes)

    (val_dir / "images").mkdir()
    (val_dir / "masks").mkdir()
    for i in range(num_val):
        scene = make_scene(_rng(seed, "val", i), image_size)
        atomic_write_bytes(val_dir / "images" / f"{i:06d}.jpg", _jpeg(scene.image))
        atomic_write_bytes(val_dir / "masks" / f"{i:06d}.png", _png(ignore_borders(scene.labels)))
    atomic_write_bytes(val_dir / "classes.txt", ("\n".join(TOY_CLASSES) + "\n").encode())

    params = {"version": 1, "seed": seed, "num_train": num_train, "num_val": num_val, "image_size": image_size,
              "shard_size": shard_size, "classes": TOY_CLASSES, "stuff": TOY_STUFF, "things": TOY_THINGS}
    atomic_write_bytes(out / "toy_world.json", (json.dumps(params, indent=1) + "\n").encode())
    seconds = time.perf_counter() - t0
    return {
        **params,
        "out_dir": str(out),
        "train_dir": str(train_dir),
        "val_dir": str(val_dir),
        "shards": sorted(sizes),
        "class_image_counts": {n: int(c) for n, c in zip(TOY_CLASSES, class_counts)},
        "seconds": round(seconds, 3),
        "samples_per_s": round((num_train + num_val) / max(seconds, 1e-9), 1),
    }


__all__ = ["TOY_CLASSES", "TOY_STUFF", "TOY_THINGS", "IGNORE_INDEX", "Scene", "ToyClass", "generate_toy_world",
           "ignore_borders", "make_caption", "make_scene"]
