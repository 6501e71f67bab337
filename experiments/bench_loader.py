"""Loader throughput: images/s of the 480x480 train transforms from JPEG, per CPU core.

    python experiments/bench_loader.py [--num-images 64] [--image-size 375 500] [--workers 0 2]

A VOC-sized synthetic set (JPEG, 500x375 by default) is prepared in a temporary dir, then:
  per_core: one thread runs read (JPEG + PNG decode from array_record) -> train transform, no
            prefetch threads, timed in CPU seconds (time.thread_time), so the figure is images per
            second per core even on a busy machine;
  loader:   the real `make_train_loader` with `worker_count` processes, wall-clock images / second.
Goal: >= 100 images/s per core.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np


def _prepare(data_dir: str, num_images: int, image_hw):
    """Synthetic JPEGs are square: make them max(H, W) on a side (decoding them is then a little
    dearer than decoding H x W, so the figure is conservative)."""
    from segjax import data

    data.prepare("synthetic", data_dir, image_size=max(image_hw), num_train=num_images, num_val=1, progress=False)
    return data.open_source("synthetic", "train", data_dir)


def loader_throughput(num_images: int = 64, image_size=(375, 500), crop_size: int = 480, base_size: int = 520,
                      workers=(0,), batches: int = 8, batch_size: int = 8, data_dir: str | None = None) -> dict:
    """{"per_core_images_per_s", "decode_ms", "transform_ms", "loader": {workers: images/s}, ...}."""
    from segjax import data
    from segjax.data import transforms

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = data_dir or tmp
        source = _prepare(data_dir, num_images, image_size)
        h, w = image_size
        crop = _CropSource(source, h, w)  # VOC-shaped (375x500) JPEG-decoded examples
        rng = np.random.default_rng(0)
        for i in range(min(4, len(crop))):  # warm-up
            ex = crop[i]
            transforms.train_transform(ex["image"], ex["segmentation_mask"], rng, crop_size=crop_size, base_size=base_size)
        t_read = t_tf = 0.0
        n = len(crop)
        for i in range(n):
            t0 = time.thread_time()
            ex = crop[i]
            t1 = time.thread_time()
            transforms.train_transform(ex["image"], ex["segmentation_mask"], rng, crop_size=crop_size, base_size=base_size)
            t2 = time.thread_time()
            t_read += t1 - t0
            t_tf += t2 - t1
        result = {"image_size": list(image_size), "crop_size": crop_size, "base_size": base_size, "images": n,
                  "decode_ms": 1e3 * t_read / n, "transform_ms": 1e3 * t_tf / n,
                  "per_core_images_per_s": n / (t_read + t_tf), "loader_images_per_s": {}}
        for wc in workers:
            loader = data.make_train_loader(crop, batch_size=batch_size, crop_size=crop_size, base_size=base_size,
                                            worker_count=wc, shard_index=0, shard_count=1)
            it = iter(loader)
            next(it)  # start-up (worker spawn) is not throughput
            t0 = time.perf_counter()
            for _ in range(batches):
                next(it)
            result["loader_images_per_s"][str(wc)] = batches * batch_size / (time.perf_counter() - t0)
            getattr(it, "close", lambda: None)()
        return result


class _CropSource:
    """Presents the square synthetic JPEGs as VOC-shaped (h, w) examples (decode cost of the full JPEG
    included; the crop is a view)."""

    def __init__(self, source, h, w):
        self.source, self.h, self.w = source, h, w

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        ex = self.source[i]
        return {"image": ex["image"][: self.h, : self.w], "segmentation_mask": ex["segmentation_mask"][: self.h, : self.w]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--image-size", type=int, nargs=2, default=(375, 500))
    p.add_argument("--workers", type=int, nargs="*", default=[0])
    args = p.parse_args()
    print(json.dumps(loader_throughput(args.num_images, tuple(args.image_size), workers=tuple(args.workers)), indent=1))


if __name__ == "__main__":
    main()
