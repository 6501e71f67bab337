"""LR-ASPP MobileNetV3-Large on VOC 2012 (torchvision reference: --model lraspp_mobilenet_v3_large --wd 0.000001, lr 0.01, 30 epochs; no aux head)."""
from segjax.config import base_config


def get_config():
    c = base_config()
    c.name = "lraspp_mobilenetv3_voc"
    c.model = "lraspp_mobilenet_v3_large"
    c.num_classes = 21
    c.dataset = "voc2012"
    c.learning_rate = 0.01
    c.weight_decay = 1e-6
    c.num_epochs = 30
    c.batch_size = 32
    return c
