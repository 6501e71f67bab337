"""`segmentation_folder`: any image / mask folder pair, described by a small manifest.

    {"name": "mydata",                       # the tfds config name
     "class_names": ["background", "vessel"],
     "value_map": {"255": 1},                # optional: raw mask value -> class (binary 0/255 masks)
     "threshold": null,                      # optional: instead, mask >= threshold -> 1, else 0
     "splits": {"train": {"images": "training/images/*_training.tif",      # one '*' = the id
                          "masks":  "training/1st_manual/{id}_manual1.gif",
                          "roi":    "training/mask/{id}_training_mask.gif"}}}  # optional; outside -> 255

Paths are relative to the manual dir. Presets: DRIVE (retinal vessels) and DUTS (saliency).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re

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
    for split, spec in manifest["splits"].items():
        if spec.get("images", "").count("*") != 1 or "{id}" not in spec.get("masks", ""):
            raise SegjaxError(f"{where}: split '{split}' needs 'images' with exactly one '*' and 'masks' with '{{id}}'")
    return manifest


def match_pairs(root: str, spec: dict, split: str) -> list[tuple[str, str, str, str | None]]:
    """[(id, image path, mask path, roi path or None)] for one split, sorted by id."""
    pattern = spec["images"]
    image_dir, image_glob = os.path.split(pattern)
    full_dir = os.path.join(root, image_dir)
    if not os.path.isdir(full_dir):
        raise SegjaxError(f"{full_dir}: image folder of split '{split}' not found; check the manual dir and the manifest")
    head, tail = image_glob.split("*")
    id_of = re.compile(re.escape(head) + "(.+)" + re.escape(tail) + "$")
    pairs = []
    for name in sorted(os.listdir(full_dir)):
        if not fnmatch.fnmatchcase(name, image_glob):
            continue
        i = id_of.match(name).group(1)
        mask = os.path.join(root, spec["masks"].format(id=i))
        if not os.path.isfile(mask):
            raise SegjaxError(f"{mask}: mask for image {os.path.join(full_dir, name)} is missing; add it or "
                              "remove the image")
        roi = os.path.join(root, spec["roi"].format(id=i)) if spec.get("roi") else None
        if roi and not os.path.isfile(roi):
            raise SegjaxError(f"{roi}: ROI mask for image {os.path.join(full_dir, name)} is missing; add it or drop 'roi'")
        pairs.append((i, os.path.join(full_dir, name), mask, roi))
    if not pairs:
        raise SegjaxError(f"{os.path.join(full_dir, image_glob)}: empty split '{split}' (no image matches); "
                          "fix the 'images' pattern")
    return pairs


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def folder_example(pair, manifest) -> dict:
    _, image_path, mask_path, roi_path = pair
    image, hw = validate.encode_image(read(image_path), image_path)
    value_map, threshold = manifest.get("value_map"), manifest.get("threshold")
    mask = validate.remap(validate.decode_mask(read(mask_path), mask_path), value_map, threshold)
    if roi_path:
        mask = validate.apply_roi(mask, validate.decode_mask(read(roi_path), roi_path), roi_path)
    validate.check_mask(mask, image_hw=hw, num_classes=len(manifest["class_names"]), where=mask_path,
                        image_where=image_path, remapped=bool(value_map) or threshold is not None)
    return {"image": image, "segmentation_mask": validate.encode_mask(mask),
            "file_name": os.path.basename(image_path)}


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
    manifest: dict = dataclasses.field(default_factory=dict)


def folder_config(manifest) -> FolderConfig:
    manifest = load_manifest(manifest)
    return FolderConfig(name=manifest["name"], description=f"segmentation folder '{manifest['name']}'", manifest=manifest)


class SegmentationFolder(LocalBuilder):
    """Image / mask folders described by a manifest (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [folder_config(DRIVE), folder_config(DUTS)]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the extracted image and mask folders in the manual dir, as the manifest names them."

    def _info(self) -> tfds.core.DatasetInfo:
        manifest = self.builder_config.manifest
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__, features=segmentation_features(),
            metadata=tfds.core.MetadataDict(class_names=list(manifest["class_names"]), manifest=manifest))

    def _split_generators(self, dl_manager):
        root, manifest = str(dl_manager.manual_dir), self.builder_config.manifest
        pairs = {split: match_pairs(root, spec, split) for split, spec in manifest["splits"].items()}
        return {split: self._generate_examples(p, manifest) for split, p in pairs.items()}

    def _generate_examples(self, pairs, manifest):
        for pair in pairs:
            yield pair[0], folder_example(pair, manifest)

