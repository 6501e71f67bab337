"""DeepLab v1 LargeFOV (VGG-16, dilation 12 fc6) on VOC 2012: SGD lr 1e-3 (x10 on the classifier), momentum 0.9,
wd 5e-4, batch 20, 321x321 crops, poly 0.9 (the v2 paper's schedule for v1-LargeFOV), 6k iterations x ~2 at batch 10."""
from segjax.config import base_config


def get_config():
    c = base_config()
    c.name = "deeplabv1_largefov_voc"
    c.model = "deeplabv1_largefov_vgg16"
    c.num_classes = 21
    c.dataset = "voc2012"
    c.learning_rate = 1e-3
    c.weight_decay = 5e-4
    c.batch_size = 20
    c.num_steps = 6000
    c.base_size = 321
    c.crop_size = 321
    c.lr_mult = {"fc8": 10.0}  # the classifier layer, 10x as in DeepLab
    return c
