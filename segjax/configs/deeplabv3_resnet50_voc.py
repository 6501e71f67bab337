"""DeepLab v3 ResNet-50 on VOC 2012 (torchvision reference: --model deeplabv3_resnet50 --aux-loss --lr 0.02, 30 epochs)."""
from segjax.config import base_config


def get_config():
    c = base_config()
    c.name = "deeplabv3_resnet50_voc"
    c.model = "deeplabv3_resnet50"
    c.model_kwargs.aux = True
    c.num_classes = 21
    c.dataset = "voc2012"
    c.learning_rate = 0.02
    c.num_epochs = 30
    c.batch_size = 32
    c.eval_scales = (1.0,)  # DeepLab v3's multi-scale test: (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) + eval_flip
    return c
