"""grain input pipelines over a random-access source (see `open_source`).

Train: a grain `MapDataset` (shuffle, reshuffled every epoch -> random_map -> batch -> this process's
slice of every global batch) turned into an `IterDataset`, with `mp_prefetch` worker processes when
asked. grain gives every record its own RNG derived from (seed, global position), and batches are
formed before the work is split, so the global batches are the same for any number of workers and
processes; the iterator's `get_state()` / `set_state()` resumes exactly where it was.

Eval (the choice, documented): every image keeps its own resolution (optionally after torchvision's
resize of the shorter side to `base_size`) and is padded at the bottom/right to one fixed `eval_size`
(by default the largest image of the split, rounded up to a multiple of `pad_multiple`, the model's
output stride). Padding is 0 in the image and 255 (void) in the mask, so metrics ignore it; the batch
also carries `valid_hw` to crop logits back to the image. The last batch is filled up with void
examples (`index` -1, `valid_hw` 0), so every process sees the same number of fixed-shape batches.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import signal

import grain
import numpy as np

from segjax.data import transforms
from segjax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from segjax.errors import SegjaxError


def _grain_flags_ready(worker_count: int) -> None:
    """grain's worker processes read absl flags; outside an absl app nobody parsed them, so take the
    defaults (what grain's own tests do) rather than fail."""
    if worker_count:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()


def _process_shard(shard_index, shard_count) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise SegjaxError(f"shard_index {shard_index} outside [0, {shard_count})")
    return int(shard_index), int(shard_count)


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
    crop_size: tuple[int, int]
    base_size: int
    scale_range: tuple[float, float]
    hflip: bool
    vflip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    uint8: bool = False

    def random_map(self, element, rng: np.random.Generator):
        image, mask = transforms.train_transform(
            element["image"], element["segmentation_mask"], rng, crop_size=self.crop_size,
            base_size=self.base_size, scale_range=self.scale_range, hflip=self.hflip, vflip=self.vflip,
            mean=self.mean, std=self.std, uint8=self.uint8)
        return {"image": image, "mask": mask}


def _iterable(ds: grain.MapDataset, worker_count: int, read_threads: int, buffer: int) -> grain.IterDataset:
    """Batches are formed before the worker split, so each worker produces whole batches and the
    stream is the same for any worker count (0 = in this process)."""
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=buffer))
    if worker_count:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count), worker_init_fn=_ignore_ctrl_c)
    return it


def _ignore_ctrl_c(worker_index: int, worker_count: int) -> None:
    """Ctrl-C reaches the whole process group: the trainer decides (finish the step, checkpoint), so
    workers must keep serving batches instead of dying with a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_train_loader(source, *, batch_size: int, crop_size, base_size: int, scale_range=(0.5, 2.0),
                      hflip: bool = True, vflip: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      seed: int = 0, worker_count: int = 0, shard_index: int | None = None,
                      shard_count: int | None = None, num_epochs: int | None = None,
                      read_threads: int = 8, uint8_images: bool = False) -> grain.IterDataset:
    """Shuffled, augmented, batched training data: {"image": float32 (B, H, W, C), "mask": int32 (B, H, W)}.

    C = len(mean) = len(std): 3 for RGB, the band count of a multi-band folder data set (uint16
    images, normalised as (x / 65535 - mean) / std; see segjax.data.transforms).

    `uint8_images=True` (opt-in) ships the images un-normalised as uint8 (uint16 for multi-band data),
    for `normalize_on_device`: a quarter of the host->device bytes and no normalisation on the host CPU.

    `batch_size` is per process. All processes walk one global stream (shuffled by `seed`,
    reshuffled every epoch, each record augmented by its global position); global batch t is
    `batch_size * shard_count` consecutive records and process p gets its rows
    [p * batch_size, (p + 1) * batch_size). So the global batches are the same for any number of
    processes. num_epochs=None repeats forever. `iter(loader)` has get_state() / set_state().
    """
    shard_index, shard_count = _process_shard(shard_index, shard_count)
    _grain_flags_ready(worker_count)
    if len(source) < batch_size * shard_count:
        raise SegjaxError(f"{source}: {len(source)} examples are fewer than the global batch, {batch_size} per "
                          f"process x {shard_count} processes; lower the batch size")
    transform = TrainTransform(transforms.pair(crop_size), int(base_size), tuple(scale_range), bool(hflip),
                               bool(vflip), tuple(mean), tuple(std), bool(uint8_images))
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)  # a new permutation every epoch
    ds = ds.random_map(transform, seed=seed).batch(batch_size, drop_remainder=True)
    # Lazy: a process only reads and augments the records of its own slices.
    ds = ds[: len(ds) // shard_count * shard_count][shard_index::shard_count]
    return _iterable(ds, worker_count, read_threads, max(2 * batch_size, 16))


class _PaddedShard:
    """This process's slice of `source`, stretched to `length` with void examples."""

    def __init__(self, source, indices: list[int], length: int, pad_hw, channels: int = 3):
        self.source, self.indices, self.length, self.pad_hw = source, indices, length, pad_hw
        self.channels = channels

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        i = int(i)
        if i < len(self.indices):
            return {**self.source[self.indices[i]], "index": self.indices[i]}
        return {"image": np.zeros((1, 1, self.channels), np.uint8), "segmentation_mask": np.full((1, 1), 255, np.uint8),
                "index": -1}


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
    pad_hw: tuple[int, int]
    base_size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def map(self, element):
        image, mask, hw = transforms.eval_transform(element["image"], element["segmentation_mask"],
                                                    pad_hw=self.pad_hw, base_size=self.base_size,
                                                    mean=self.mean, std=self.std)
        if element["index"] < 0:
            hw = (0, 0)
        return {"image": image, "mask": mask, "valid_hw": np.asarray(hw, np.int32),
                "index": np.int32(element["index"])}


def largest_size(source, base_size: int | None = None, multiple: int = 1) -> tuple[int, int]:
    """The largest (H, W) over `source` (after the eval resize), rounded up to `multiple`. Decodes
    every example once; pass eval_size to skip this."""
    h = w = 1
    for i in range(len(source)):
        mh, mw = source[i]["segmentation_mask"].shape
        if base_size is not None:
            mh, mw = transforms.resized_shape(mh, mw, base_size)
        h, w = max(h, mh), max(w, mw)
    return math.ceil(h / multiple) * multiple, math.ceil(w / multiple) * multiple


class EvalLoader:
    """Fixed-shape eval batches {"image", "mask", "valid_hw" (B, 2), "index" (B,)}; len() batches."""

    def __init__(self, source, *, batch_size, eval_size=None, base_size=None, pad_multiple=32,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, worker_count=0, shard_index=None, shard_count=None):
        shard_index, shard_count = _process_shard(shard_index, shard_count)
        _grain_flags_ready(worker_count)
        if len(source) == 0:
            raise SegjaxError(f"{source}: empty split; nothing to evaluate")
        self.eval_size = transforms.pair(eval_size) if eval_size is not None else \
            largest_size(source, base_size, pad_multiple)
        indices = list(range(shard_index, len(source), shard_count))
        per_process = math.ceil(len(source) / shard_count)
        self.num_batches = math.ceil(per_process / batch_size)
        padded = _PaddedShard(source, indices, self.num_batches * batch_size, self.eval_size, len(mean))
        ds = grain.MapDataset.source(padded).map(EvalTransform(self.eval_size, base_size, tuple(mean), tuple(std)))
        self._loader = _iterable(ds.batch(batch_size), worker_count, 8, max(2 * batch_size, 16))

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        return iter(self._loader)


def make_eval_loader(source, *, batch_size: int, eval_size=None, base_size: int | None = None,
                     pad_multiple: int = 32, mean=IMAGENET_MEAN, std=IMAGENET_STD, worker_count: int = 0,
                     shard_index: int | None = None, shard_count: int | None = None) -> EvalLoader:
    """Every example of `source` exactly once (this process's share), in order, in fixed-shape
    batches; see the module docstring for the padding policy."""
    return EvalLoader(source, batch_size=batch_size, eval_size=eval_size, base_size=base_size,
                      pad_multiple=pad_multiple, mean=mean, std=std, worker_count=worker_count,
                      shard_index=shard_index, shard_count=shard_count)


class DevicePrefetch:
    """Wraps a batch iterator so `depth` batches are already placed (`put`, e.g. onto the devices) ahead
    of the one being consumed: the host->device copy of the next batches is issued while the current step
    runs instead of just before the step that needs it. get_state()/set_state() are those of the first
    batch not yet consumed, so a checkpoint taken mid-stream resumes exactly (the look-ahead is re-read)."""

    def __init__(self, iterator, put, depth: int = 2):
        self.iterator, self.put, self.depth = iterator, put, int(depth)
        self._ahead = collections.deque()  # (iterator state before the batch, placed batch)

    def __iter__(self):
        return self

    def __next__(self):
        while len(self._ahead) <= self.depth:
            state = self.iterator.get_state()
            self._ahead.append((state, self.put(next(self.iterator))))
        return self._ahead.popleft()[1]

    def get_state(self):
        return self._ahead[0][0] if self._ahead else self.iterator.get_state()

    def set_state(self, state) -> None:
        self._ahead.clear()
        self.iterator.set_state(state)

    def __getattr__(self, name):  # e.g. grain's start_prefetch, used after a restore
        if name.startswith("_") or name in ("iterator", "put", "depth"):
            raise AttributeError(name)
        return getattr(self.iterator, name)


def normalize_on_device(batch: dict, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """The uint8 (or uint16) batch of `make_train_loader(uint8_images=True)` normalised where it lies (jit
    it: the result keeps the input's sharding); equal to the host path to float32 rounding."""
    import jax.numpy as jnp

    top = transforms.value_range(batch["image"].dtype)
    scale = (1.0 / (top * np.asarray(std, np.float32))).astype(np.float32)
    shift = (np.asarray(mean, np.float32) / np.asarray(std, np.float32)).astype(np.float32)
    return {**batch, "image": batch["image"].astype(jnp.float32) * scale - shift}
