"""FCN-8s VGG-16 on VOC 2012 (Long et al.: SGD momentum 0.99 at a fixed lr 1e-10 on unnormalised sums in caffe;
here the per-pixel-mean loss with torchvision's reference-recipe SGD momentum 0.9, wd 5e-4, poly lr 1e-3, batch 20 crops of 480)."""
from segjax.config import base_config


def get_config():
    c = base_config()
    c.name = "fcn8s_vgg16_voc"
    c.model = "fcn8s_vgg16"
    c.num_classes = 21
    c.dataset = "voc2012"
    c.learning_rate = 1e-3
    c.weight_decay = 5e-4
    c.num_epochs = 50
    c.batch_size = 20
    c.lr_mult = {}
    return c
