"""`segmentation_folder`: any image / mask folder pair, described by a small manifest.

    {"name": "mydata",                       # the tfds config name
     "class_names": ["background", "vessel"],
     "value_map": {"255": 1},                # optional: raw mask value -> class (binary 0/255 masks)
     "threshold": null,                      # optional: instead, mask >= threshold -> 1, else 0
     "splits": {"train": {"images": "training/images/*_training.tif",      # one '*' = the id
                          "masks":  "training/1st_manual/{id}_manual1.gif",
                          "roi":    "training/mask/{id}_training_mask.gif"}}}  # optional; outside -> 255

Paths are relative to the manual dir; `masks` and `roi` may use `{stem}` (the id without its file
extension) instead of `{id}`. Presets: DRIVE (retinal vessels) and DUTS (saliency).

Without a manifest, a manual dir in the common layout needs none (`resolve_manifest`):

    DIR/{train,val,test}/images/<stem>.<any image extension>
    DIR/{train,val,test}/masks/<stem>.png           class indices, 255 = void
    DIR/classes.txt                                 optional: one class name per line

Its name is the folder's name and, without classes.txt, its classes are 0..the largest label found.
A `DIR/manifest.json` takes precedence over the layout, and a manifest passed in over both.

Multi-band images: `"in_channels": N` in the manifest, or the data option `in_channels=N`
(`prepare("folder", ..., in_channels=N)`, `--config.data_options='{"in_channels": N}'`), with N != 3,
reads every image as it is (TIFF through tifffile: 8 or 16-bit, any band count; see
`validate.decode_bands`) and stores it as a uint16 (H, W, N) tensor, 8-bit data scaled by 257; the
pipeline then normalises by (x / 65535 - mean) / std with N means and stds. An image with another
band count is an error naming the file. Without it (or N == 3) images are converted to 8-bit RGB as
always. See docs/in_channels.md.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from segjax.data import validate
from segjax.data.voc import LocalBuilder, segmentation_features
from segjax.errors import SegjaxError

DRIVE = {
    "name": "drive", "class_names": ["background", "vessel"], "value_map": {"255": 1},
    "splits": {
        "train": {"images": "training/images/*_training.tif", "masks": "training/1st_manual/{id}_manual1.gif",
                  "roi": "training/mask/{id}_training_mask.gif"},
        "test": {"images": "test/images/*_test.tif", "masks": "test/1st_manual/{id}_manual1.gif",
                 "roi": "test/mask/{id}_test_mask.gif"},
    },
}
DUTS = {
    "name": "duts", "class_names": ["background", "salient"], "threshold": 128,  # masks are anti-aliased
    "splits": {
        "train": {"images": "DUTS-TR/DUTS-TR-Image/*.jpg", "masks": "DUTS-TR/DUTS-TR-Mask/{id}.png"},
        "test": {"images": "DUTS-TE/DUTS-TE-Image/*.jpg", "masks": "DUTS-TE/DUTS-TE-Mask/{id}.png"},
    },
}
PRESETS = {"drive": DRIVE, "duts": DUTS}
MANIFEST_FILE = "manifest.json"        # a manifest inside the manual dir
LAYOUT_SPLITS = ("train", "val", "test")
CLASSES_FILE = "classes.txt"


def load_manifest(manifest) -> dict:
    """A manifest dict, or the path of a JSON file holding one; checked for the required keys."""
    where = "manifest"
    if isinstance(manifest, (str, os.PathLike)):
        where = os.fspath(manifest)
        try:
            with open(manifest) as f:
                manifest = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SegjaxError(f"{where}: cannot read the manifest ({e}); give a JSON file as in segjax.data.folder") from None
    for key in ("name", "class_names", "splits"):
        if key not in manifest:
            raise SegjaxError(f"{where}: manifest lacks '{key}'; see the example in segjax/data/folder.py")
    channels = manifest.get("in_channels", 3)
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise SegjaxError(f"{where}: in_channels={channels!r}; give the number of image bands, an integer >= 1")
    for split, spec in manifest["splits"].items():
        masks = spec.get("masks", "")
        if spec.get("images", "").count("*") != 1 or ("{id}" not in masks and "{stem}" not in masks):
            raise SegjaxError(f"{where}: split '{split}' needs 'images' with exactly one '*' and 'masks' with '{{id}}'")
    return manifest


def layout_splits(root: str) -> dict | None:
    """The manifest `splits` of a manual dir in the common layout (see the module docstring), or None."""
    splits = {split: {"images": f"{split}/images/*", "masks": f"{split}/masks/{{stem}}.png"}
              for split in LAYOUT_SPLITS if os.path.isdir(os.path.join(root, split, "images"))}
    return splits or None


def config_name(text: str) -> str:
    """A tfds config name made of `text` (a folder's name): lowercase letters, digits and '_'."""
    name = re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")
    return name or "folder"


def _layout_class_names(root: str, splits: dict, infer: bool = True) -> list[str] | None:
    path = os.path.join(root, CLASSES_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) < 2:
            raise SegjaxError(f"{path}: lists {len(names)} class(es); list one class name per line, at least two")
        return names
    if not infer:
        return None
    largest = 1  # at least two classes: background and one more
    for split, spec in splits.items():
        for _, _, mask_path, _ in match_pairs(root, spec, split):
            values = np.unique(validate.decode_mask(read(mask_path), mask_path))
            values = values[values != validate.VOID]
            largest = max(largest, int(values.max()) if len(values) else 0)
    return layout_class_names(largest + 1)


def layout_class_names(num_classes: int) -> list[str]:
    """The class names of a layout without classes.txt."""
    return [f"class_{k}" for k in range(num_classes)]


def resolve_manifest(manual_dir: str, manifest=None, name: str | None = None, infer_classes: bool = True) -> dict:
    """The manifest of a folder data set: `manifest` (dict or JSON path) when given, else
    `manual_dir/manifest.json`, else the common layout; `name` (of `folder:<name>`) must match a
    manifest's name and names a layout. A layout without classes.txt gets its classes from the masks,
    or `class_names` None when not `infer_classes`."""
    explicit = os.path.join(manual_dir, MANIFEST_FILE)
    if manifest is not None or os.path.isfile(explicit):
        manifest = load_manifest(explicit if manifest is None else manifest)
        if name is not None and manifest["name"] != name:
            raise SegjaxError(f"manifest names data set '{manifest['name']}', not '{name}'; use folder:{manifest['name']} "
                              "or rename it in the manifest")
        return manifest
    splits = layout_splits(manual_dir)
    if splits is None:
        raise SegjaxError(f"{manual_dir}: 'folder' needs a manifest (--manifest FILE.json, or {MANIFEST_FILE} in the "
                          "folder) or the layout {train,val}/images/* with {train,val}/masks/<stem>.png; "
                          "see segjax/data/folder.py")
    return {"name": name or config_name(os.path.basename(os.path.abspath(manual_dir))),
            "class_names": _layout_class_names(manual_dir, splits, infer_classes), "splits": splits}


class EmptySplit(SegjaxError):
    """A split with no image: its folder is missing or matches no file."""


def match_pairs(root: str, spec: dict, split: str, missing=None) -> list[tuple[str, str, str, str | None]]:
    """[(id, image path, mask path, roi path or None)] for one split, sorted by id.

    An image without its mask or ROI raises; with `missing` (a callable taking the one-line message)
    it is reported there and left out instead. An empty split always raises."""
    def lacking(message):
        if missing is None:
            raise SegjaxError(message)
        missing(message)
    pattern = spec["images"]
    image_dir, image_glob = os.path.split(pattern)
    full_dir = os.path.join(root, image_dir)
    if not os.path.isdir(full_dir):
        raise EmptySplit(f"{full_dir}: image folder of split '{split}' not found; check the manual dir and the manifest")
    head, tail = image_glob.split("*")
    id_of = re.compile(re.escape(head) + "(.+)" + re.escape(tail) + "$")
    pairs = []
    for name in sorted(os.listdir(full_dir)):
        if not fnmatch.fnmatchcase(name, image_glob):
            continue
        i = id_of.match(name).group(1)
        ids = {"id": i, "stem": os.path.splitext(i)[0]}
        mask = os.path.join(root, spec["masks"].format(**ids))
        if not os.path.isfile(mask):
            lacking(f"{mask}: mask for image {os.path.join(full_dir, name)} is missing; add it or remove the image")
            continue
        roi = os.path.join(root, spec["roi"].format(**ids)) if spec.get("roi") else None
        if roi and not os.path.isfile(roi):
            lacking(f"{roi}: ROI mask for image {os.path.join(full_dir, name)} is missing; add it or drop 'roi'")
            continue
        pairs.append((i, os.path.join(full_dir, name), mask, roi))
    if not pairs:
        raise EmptySplit(f"{os.path.join(full_dir, image_glob)}: empty split '{split}' (no image matches); "
                          "fix the 'images' pattern")
    return pairs


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def in_channels(manifest) -> int:
    """The manifest's image band count (3, RGB, unless it says otherwise)."""
    return int(manifest.get("in_channels", 3))


def with_channels(manifest: dict, channels: int | None) -> dict:
    """`manifest` with the data option in_channels applied (3 leaves an RGB manifest as it is, so its
    builder config is the same as without the option); a manifest that says otherwise is an error."""
    if channels is None:
        return manifest
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise SegjaxError(f"in_channels={channels!r}: give the number of image bands, an integer >= 1")
    if "in_channels" in manifest and manifest["in_channels"] != channels:
        raise SegjaxError(f"manifest '{manifest['name']}' says in_channels={manifest['in_channels']} but "
                          f"in_channels={channels} was asked; make them agree")
    return manifest if channels == 3 else {**manifest, "in_channels": channels}


def load_pair(pair, manifest, encode: bool = True) -> tuple[bytes | np.ndarray | None, tuple[int, int], np.ndarray]:
    """(image to store: bytes, or a uint16 (H, W, C) array for a multi-band manifest, or None when not
    `encode`; (height, width); class-index mask after the manifest's value map / threshold and ROI).
    Unchecked against the classes: see `check_pair`."""
    image_path = pair[1]
    if not encode:
        return None, image_hw(image_path, manifest), load_mask(pair, manifest)
    channels = in_channels(manifest)
    if channels != 3:
        bands = validate.decode_bands(read(image_path), image_path, channels)
        return bands, bands.shape[:2], load_mask(pair, manifest)
    image, hw = validate.encode_image(read(image_path), image_path)
    return image, hw, load_mask(pair, manifest)


def image_hw(image_path: str, manifest) -> tuple[int, int]:
    """(height, width) of an image, read as `load_pair` reads it for this manifest (its band count checked)."""
    channels = in_channels(manifest)
    if channels != 3:
        return validate.decode_bands(read(image_path), image_path, channels).shape[:2]
    return validate.image_size(read(image_path), image_path)


def load_mask(pair, manifest) -> np.ndarray:
    """The class-index mask of a pair, after the manifest's value map / threshold and ROI."""
    _, _, mask_path, roi_path = pair
    mask = validate.remap(validate.decode_mask(read(mask_path), mask_path), manifest.get("value_map"),
                          manifest.get("threshold"))
    if roi_path:
        mask = validate.apply_roi(mask, validate.decode_mask(read(roi_path), roi_path), roi_path)
    return mask


def check_pair(pair, manifest, hw, mask, num_classes: int | None = None) -> None:
    """Raises validate.InvalidData when training must not read this pair as it is."""
    remapped = bool(manifest.get("value_map")) or manifest.get("threshold") is not None
    validate.check_mask(mask, image_hw=hw, num_classes=num_classes or len(manifest["class_names"]), where=pair[2],
                        image_where=pair[1], remapped=remapped)


def folder_example(pair, manifest) -> dict:
    image, hw, mask = load_pair(pair, manifest)
    check_pair(pair, manifest, hw, mask)
    return {"image": image, "segmentation_mask": validate.encode_mask(mask),
            "file_name": os.path.basename(pair[1])}


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
    manifest: dict = dataclasses.field(default_factory=dict)


def folder_config(manifest) -> FolderConfig:
    manifest = load_manifest(manifest)  # a dict passes through (checked again)
    return FolderConfig(name=manifest["name"], description=f"segmentation folder '{manifest['name']}'", manifest=manifest)


class SegmentationFolder(LocalBuilder):
    """Image / mask folders described by a manifest (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [folder_config(DRIVE), folder_config(DUTS)]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the extracted image and mask folders in the manual dir, as the manifest names them."

    def _info(self) -> tfds.core.DatasetInfo:
        manifest = self.builder_config.manifest
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__, features=segmentation_features(in_channels(manifest)),
            metadata=tfds.core.MetadataDict(class_names=list(manifest["class_names"]), manifest=manifest,
                                            in_channels=in_channels(manifest)))

    def _split_generators(self, dl_manager):
        root, manifest = str(dl_manager.manual_dir), self.builder_config.manifest
        pairs = {split: match_pairs(root, spec, split) for split, spec in manifest["splits"].items()}
        return {split: self._generate_examples(p, manifest) for split, p in pairs.items()}

    def _generate_examples(self, pairs, manifest):
        for pair in pairs:
            yield pair[0], folder_example(pair, manifest)

