"""segjax.crf.dense_crf against pydensecrf2 (the maintained build of pydensecrf the DeepLab reproductions call):
label agreement and the largest probability difference, 21 classes, 10 iterations, with kazuto1011's and the
LargeFOV port's values, on realistic inputs (a smooth image of regions, soft noisy probabilities that follow
them) and on random ones (random colours, random probabilities).

pydensecrf2 builds from source with a C++ compiler, so it is not a test dependency; run this in an
environment that has it:
    python -m venv --system-site-packages /tmp/crfvenv && /tmp/crfvenv/bin/pip install pydensecrf2
    PYTHONPATH=$PWD /tmp/crfvenv/bin/python experiments/crf_vs_pydensecrf.py
"""
from __future__ import annotations

import argparse

import jax
import numpy as np

from segjax import crf

VALUES = {"kazuto1011 (v2)": crf.KAZUTO_VOC, "LargeFOV port (v1)": crf.LARGEFOV_PORT}


def pydensecrf(image, probs, iterations, pos_w, pos_xy_std, bi_w, bi_xy_std, bi_rgb_std):
    """What the reproductions' utils/crf.py does."""
    import pydensecrf.densecrf as dcrf
    import pydensecrf.utils as utils

    h, w, c = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(utils.unary_from_softmax(probs.transpose(2, 0, 1))))
    d.addPairwiseGaussian(sxy=pos_xy_std, compat=pos_w)
    d.addPairwiseBilateral(sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=np.ascontiguousarray(image), compat=bi_w)
    return np.array(d.inference(iterations)).reshape(c, h, w).transpose(1, 2, 0)


def realistic(h, w, c, seed):
    """Smooth colour regions (a few ellipses over a gradient), probabilities that favour each region's class
    with noise, blurred at the regions' borders as a network's are."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    labels = np.zeros((h, w), np.int64)
    colours = rng.integers(0, 256, (c, 3)).astype(np.float32)
    for k in range(1, 6):
        cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(h / 8, h / 3), rng.uniform(w / 8, w / 3)
        labels[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = rng.integers(1, c)
    image = colours[labels] * 0.8 + np.stack([xx / w, yy / h, (xx + yy) / (h + w)], -1) * 50
    image = np.clip(np.rint(image + rng.normal(0, 5, image.shape)), 0, 255).astype(np.uint8)
    logits = np.eye(c, dtype=np.float32)[labels] * 2.0 + rng.normal(0, 1.0, (h, w, c)).astype(np.float32)
    kernel = np.exp(-0.5 * (np.arange(-6, 7) / 3.0) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):  # a network's probabilities are smooth at region borders
        logits = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), axis, logits)
    return image, np.asarray(jax.nn.softmax(logits * 2.0, -1), np.float32)


def random_inputs(h, w, c, seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return image, np.asarray(jax.nn.softmax(rng.normal(size=(h, w, c)).astype(np.float32) * 2.0, -1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="64x64,289x321", help="HxW list (default: 64x64 and 289 rows x 321 columns)")
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--seeds", type=int, default=2, help="inputs per row")
    args = p.parse_args()
    print(f"{'size':>8}  {'inputs':<9}  {'values':<19}  {'label agreement':>15}  {'max |dQ|':>9}  {'pixels':>8}")
    for size in args.sizes.split(","):
        h, w = map(int, size.split("x"))
        for kind, make in (("realistic", realistic), ("random", random_inputs)):
            for name, values in VALUES.items():
                ours_fn = jax.jit(lambda i, q: crf.dense_crf(i, q, **values))
                agree, worst, total = 0, 0.0, 0
                for seed in range(args.seeds):
                    image, probs = make(h, w, args.classes, seed)
                    ref = pydensecrf(image, probs, **values)
                    ours = np.asarray(ours_fn(image, probs))
                    agree += int((ref.argmax(-1) == ours.argmax(-1)).sum())
                    worst = max(worst, float(np.abs(ref - ours).max()))
                    total += h * w
                print(f"{size:>8}  {kind:<9}  {name:<19}  {100 * agree / total:14.4f}%  {worst:9.2e}  {total:8d}",
                      flush=True)


if __name__ == "__main__":
    main()
