"""`voc2012_segmentation`: PASCAL VOC 2012 segmentation, plain (`voc2012`) or with SBD (`voc2012_aug`).

The manual dir holds either the extracted `VOCdevkit/VOC2012` (and `benchmark_RELEASE/dataset` for
voc2012_aug) or the untouched archives `VOCtrainval_11-May-2012.tar` (and `benchmark.tgz`), which are
read in place. Split sizes follow from the lists (real VOC: train 1,464, val 1,449, trainaug 10,582).

voc2012_aug train = (SBD train + SBD val + VOC train) - VOC val. Its masks come from SBD's
`cls/<id>.mat` (GTcls.Segmentation) wherever SBD annotates the image, and from VOC's
SegmentationClass for the VOC-train images SBD lacks; val is VOC val with VOC's masks.
"""
from __future__ import annotations

import inspect
import io

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from segjax.data import validate
from segjax.data.tree import open_tree
from segjax.errors import SegjaxError

VOC_DIR, VOC_TAR = "VOCdevkit/VOC2012", "VOCtrainval_11-May-2012.tar"
SBD_DIR, SBD_TGZ = "benchmark_RELEASE/dataset", "benchmark.tgz"

CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor")


def segmentation_features(in_channels: int = 3) -> tfds.features.FeaturesDict:
    # encoding_format=None: images are stored as given (original JPEG bytes, or lossless PNG for
    # anything that had to be converted to RGB); masks are single-channel 'L' PNGs. Other channel
    # counts (multi-band folder data sets) store the image as a zlib-compressed uint16 (H, W, C) tensor.
    if in_channels == 3:
        image = tfds.features.Image(shape=(None, None, 3), encoding_format=None)
    else:
        image = tfds.features.Tensor(shape=(None, None, in_channels), dtype=np.uint16, encoding="zlib")
    return tfds.features.FeaturesDict({
        "image": image,
        "segmentation_mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        "file_name": tfds.features.Text(),
    })


def read_list(tree, rel: str) -> list[str]:
    if not tree.exists(rel):
        raise SegjaxError(f"{tree.describe(rel)}: split list missing; the manual dir must hold the complete data set")
    ids = [line.split()[0] for line in tree.read(rel).decode().splitlines() if line.strip()]
    if not ids:
        raise SegjaxError(f"{tree.describe(rel)}: empty split; list one image id per line")
    return ids


def require(tree, rel: str, split_list: str) -> None:
    if not tree.exists(rel):
        raise SegjaxError(f"{tree.describe(rel)}: listed in {split_list} but missing; restore the file or "
                          "remove its id from the list")


def sbd_mask(data: bytes, where: str):
    import scipy.io

    try:
        mat = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True, struct_as_record=False)
        return mat["GTcls"].Segmentation.astype("uint8")
    except Exception as e:  # scipy raises several unrelated types for a bad .mat
        raise SegjaxError(f"{where}: not an SBD class mask (GTcls.Segmentation) ({type(e).__name__}: {e}); "
                          "re-extract benchmark.tgz") from None


def example(image_tree, image_rel, mask, mask_where, num_classes=len(CLASS_NAMES)):
    image, hw = validate.encode_image(image_tree.read(image_rel), image_tree.describe(image_rel))
    validate.check_mask(mask, image_hw=hw, num_classes=num_classes, where=mask_where,
                        image_where=image_tree.describe(image_rel))
    return {"image": image, "segmentation_mask": validate.encode_mask(mask),
            "file_name": image_rel.rsplit("/", 1)[-1]}


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder whose code lives in this installed package (no checksums, no downloads)."""

    # tfds' default looks the package up through importlib_resources, which isn't a dependency.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(inspect.getfile(cls))


class Voc2012Segmentation(LocalBuilder):
    """PASCAL VOC 2012 semantic segmentation (21 classes, 255 = void border)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="voc2012", description="VOC 2012 train / val from ImageSets/Segmentation"),
        tfds.core.BuilderConfig(name="voc2012_aug", description="SBD trainaug (SBD train+val + VOC train - VOC val) / VOC val"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put {VOC_TAR} (and {SBD_TGZ} for voc2012_aug) in the manual dir, or their extracted "
        f"{VOC_DIR} and {SBD_DIR} folders.")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__, features=segmentation_features(),
            homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
            metadata=tfds.core.MetadataDict(class_names=list(CLASS_NAMES)))

    def _split_generators(self, dl_manager):
        manual = str(dl_manager.manual_dir)
        voc = open_tree(manual, VOC_DIR, VOC_TAR)
        sbd = open_tree(manual, SBD_DIR, SBD_TGZ) if self.builder_config.name == "voc2012_aug" else True
        if voc is None or sbd is None:
            need = f"{VOC_DIR} + {SBD_DIR} (or {VOC_TAR} + {SBD_TGZ})" if self.builder_config.name == "voc2012_aug" \
                else f"{VOC_DIR} (or {VOC_TAR})"
            raise SegjaxError(f"{manual}: manual dir has neither the folders nor the archives; it needs {need}")
        lists = "ImageSets/Segmentation"
        voc_train, voc_val = read_list(voc, f"{lists}/train.txt"), read_list(voc, f"{lists}/val.txt")
        val = self._voc_examples(voc, voc_val, f"{lists}/val.txt")
        if self.builder_config.name == "voc2012":
            return {"train": self._voc_examples(voc, voc_train, f"{lists}/train.txt"), "val": val}
        return {"train": self._aug_examples(voc, sbd, voc_train, voc_val), "val": val}

    def _voc_examples(self, voc, ids, split_list):
        for i in ids:  # check the whole list before writing anything
            require(voc, f"JPEGImages/{i}.jpg", voc.describe(split_list))
            require(voc, f"SegmentationClass/{i}.png", voc.describe(split_list))
        return self._generate_examples(("voc", voc, i) for i in ids)

    def _aug_examples(self, voc, sbd, voc_train, voc_val):
        sbd_ids = read_list(sbd, "train.txt") + read_list(sbd, "val.txt")
        in_sbd, excluded = set(sbd_ids), set(voc_val)
        ids = sorted((set(sbd_ids) | set(voc_train)) - excluded)
        if not ids:
            raise SegjaxError(f"{sbd.describe('train.txt')}: empty trainaug split (every id is in VOC val)")
        jobs = []
        for i in ids:
            if i in in_sbd:
                require(sbd, f"cls/{i}.mat", sbd.describe("train.txt / val.txt"))
                jobs.append(("sbd", sbd, i))
            else:
                require(voc, f"SegmentationClass/{i}.png", voc.describe("ImageSets/Segmentation/train.txt"))
                jobs.append(("voc", voc, i))
            if not voc.exists(f"JPEGImages/{i}.jpg"):
                require(sbd, f"img/{i}.jpg", sbd.describe("train.txt / val.txt"))
        # Read SBD members in archive order: a .tgz then streams once instead of seeking back.
        jobs.sort(key=lambda j: (j[0] != "sbd", j[1].order_key(f"cls/{j[2]}.mat") if j[0] == "sbd" else 0))
        return self._generate_examples(iter(jobs), voc=voc, sbd=sbd)

    def _generate_examples(self, jobs, voc=None, sbd=None):
        for kind, tree, i in jobs:
            if kind == "voc":
                image_tree, image_rel = tree, f"JPEGImages/{i}.jpg"
                mask_rel = f"SegmentationClass/{i}.png"
                mask = validate.decode_mask(tree.read(mask_rel), tree.describe(mask_rel))
            else:
                mask_rel = f"cls/{i}.mat"
                mask = sbd_mask(tree.read(mask_rel), tree.describe(mask_rel))
                image_tree, image_rel = (voc, f"JPEGImages/{i}.jpg") if voc.exists(f"JPEGImages/{i}.jpg") else (sbd, f"img/{i}.jpg")
            yield i, example(image_tree, image_rel, mask, tree.describe(mask_rel))
