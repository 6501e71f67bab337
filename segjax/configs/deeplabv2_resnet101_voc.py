"""DeepLab v2 ResNet-101 (ASPP-L) on VOC 2012 (+SBD in the paper): SGD lr 2.5e-4 (x10 on the ASPP classifier),
momentum 0.9, wd 5e-4, poly 0.9, batch 10, 321x321 crops, 20k iterations."""
from segjax.config import base_config


def get_config():
    c = base_config()
    c.name = "deeplabv2_resnet101_voc"
    c.model = "deeplabv2_resnet101"
    c.num_classes = 21
    c.dataset = "voc2012"
    c.learning_rate = 2.5e-4
    c.weight_decay = 5e-4
    c.batch_size = 10
    c.num_steps = 20000
    c.base_size = 321
    c.crop_size = 321
    c.lr_mult = {"classifier": 10.0}
    return c
