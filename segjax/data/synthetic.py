"""A procedurally generated, seeded segmentation data set written in VOC layout.

    <root>/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
                             SegmentationClass/<id>.png      (palette PNG, VOC palette)
                             ImageSets/Segmentation/{train,val,trainval}.txt

`voc2012_segmentation` then reads it exactly like real VOC. Each image shows a few shapes on a
textured background; the class follows from the shape (disc, square, triangle, ring) and never
from the colour, objects occlude one another, and a thin 255 (void) border runs along every object
outline as in VOC. Small enough to generate in seconds and train on a CPU.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

CLASS_NAMES = ("background", "disc", "square", "triangle", "ring")
DEFAULTS = dict(image_size=64, num_train=320, num_val=64, max_objects=3, seed=0)


def voc_palette() -> list[int]:
    """VOC's colour map: the bits of the class index spread over R, G, B, high bit first."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _shape_mask(kind: int, yy, xx, cy, cx, r, angle) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    # rotate into the shape's frame so squares and triangles come in any orientation
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    if kind == 1:  # disc
        return u * u + v * v <= r * r
    if kind == 2:  # square
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if kind == 3:  # equilateral triangle inscribed in radius r
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = 2 * np.pi * k / 3
            inside &= (u * np.cos(a) + v * np.sin(a)) <= r * 0.5
        return inside
    d2 = u * u + v * v  # ring
    return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)


def _background(rng: np.random.Generator, size: int, yy, xx) -> np.ndarray:
    base = rng.uniform(40, 215, size=3)
    freq, phase = rng.uniform(0.1, 0.5, size=2), rng.uniform(0, 2 * np.pi)
    stripes = np.sin(freq[0] * xx + freq[1] * yy + phase)[..., None] * rng.uniform(10, 40, size=3)
    noise = rng.normal(0, 12, size=(size, size, 3))
    return base + stripes + noise


def render(rng: np.random.Generator, size: int, max_objects: int) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 HxWx3, mask uint8 HxW) pair."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    image = _background(rng, size, yy, xx)
    label = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, max_objects + 1)):
        kind = int(rng.integers(1, len(CLASS_NAMES)))
        r = rng.uniform(0.13, 0.25) * size
        cy, cx = rng.uniform(r * 0.6, size - r * 0.6, size=2)
        region = _shape_mask(kind, yy, xx, cy, cx, r, rng.uniform(0, 2 * np.pi))
        colour = rng.uniform(0, 255, size=3)
        shade = 1.0 + 0.15 * np.sin(rng.uniform(0.2, 0.6) * (xx + yy))[..., None]
        image = np.where(region[..., None], colour * shade + rng.normal(0, 8, size=(size, size, 3)), image)
        label[region] = kind  # later objects occlude earlier ones
    # VOC-style void border, one pixel wide: pixels whose lower or right neighbour has another label.
    edge = np.zeros_like(label, dtype=bool)
    edge[:-1, :] |= label[1:, :] != label[:-1, :]
    edge[:, :-1] |= label[:, 1:] != label[:, :-1]
    mask = np.where(edge, 255, label).astype(np.uint8)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def write_voc(root: str, *, image_size: int = DEFAULTS["image_size"], num_train: int = DEFAULTS["num_train"],
              num_val: int = DEFAULTS["num_val"], max_objects: int = DEFAULTS["max_objects"],
              seed: int = DEFAULTS["seed"], progress: bool = False) -> dict[str, int]:
    """Writes the data set under `root` in VOC layout; returns the split sizes. Same seed, same files."""
    voc = os.path.join(root, "VOCdevkit", "VOC2012")
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(voc, d), exist_ok=True)
    palette = voc_palette()
    splits = {"train": [f"train_{i:05d}" for i in range(num_train)], "val": [f"val_{i:05d}" for i in range(num_val)]}
    names = splits["train"] + splits["val"]
    if progress:
        from tqdm import tqdm
        names = tqdm(names, desc="synthetic images", unit="img")
    # One child stream per image: any image can be regenerated alone, and the counts don't shift others.
    streams = {"train": np.random.SeedSequence([seed, 0]), "val": np.random.SeedSequence([seed, 1])}
    children = {s: streams[s].spawn(len(ids)) for s, ids in splits.items()}
    for name in names:
        split, index = name.split("_")
        image, mask = render(np.random.default_rng(children[split][int(index)]), image_size, max_objects)
        Image.fromarray(image, "RGB").save(os.path.join(voc, "JPEGImages", f"{name}.jpg"), quality=95)
        png = Image.fromarray(mask, "P")
        png.putpalette(palette)
        png.save(os.path.join(voc, "SegmentationClass", f"{name}.png"))
    lists = os.path.join(voc, "ImageSets", "Segmentation")
    for split, ids in {**splits, "trainval": splits["train"] + splits["val"]}.items():
        with open(os.path.join(lists, f"{split}.txt"), "w") as f:
            f.write("".join(f"{i}\n" for i in ids))
    return {s: len(ids) for s, ids in splits.items()}


def prepare(root: str, *, progress: bool, build, **opts) -> dict[str, int]:
    """Writes the files under `root/raw` (root: the registry's tfds root) and builds them with the VOC builder (`build`
    is segjax.data.prepare's); other parameters than last time start over rather than mix two sets."""
    import json
    import shutil

    from segjax.data import voc
    from segjax.errors import SegjaxError

    unknown = set(opts) - set(DEFAULTS)
    if unknown:
        raise SegjaxError(f"unknown synthetic options {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
    params = {**DEFAULTS, **opts}
    params_file = os.path.join(root, "params.json")
    builder = voc.Voc2012Segmentation(config="voc2012", data_dir=root)
    if os.path.isfile(params_file):
        with open(params_file) as f:
            if json.load(f) == params and builder.is_prepared():
                return build(builder, None, progress)
        shutil.rmtree(root)
        builder = voc.Voc2012Segmentation(config="voc2012", data_dir=root)
    raw = os.path.join(root, "raw")
    write_voc(raw, progress=progress, **params)
    sizes = build(builder, raw, progress)
    with open(params_file, "w") as f:
        json.dump(params, f)
    return sizes
