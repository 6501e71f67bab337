"""DeepLab v3+ ResNet-101 on VOC 2012 + SBD (trainaug, 10,582 images); output stride 16, poly lr 0.01 (VainF's DeepLabV3Plus-Pytorch: 30k iterations at batch 16, crop 513)."""
from segjax.config import base_config


def get_config():
    c = base_config()
    c.name = "deeplabv3plus_resnet101_voc_aug"
    c.model = "deeplabv3plus_resnet101"
    c.num_classes = 21
    c.dataset = "voc2012_aug"
    c.learning_rate = 0.01
    c.batch_size = 16
    c.num_steps = 30000
    c.base_size = 513
    c.crop_size = 513
    c.eval_scales = (1.0,)
    return c
