"""FCN ResNet-50 on VOC 2012 (torchvision reference: --model fcn_resnet50 --aux-loss --lr 0.02, 30 epochs, 4 images/GPU x 8)."""
from segjax.config import base_config


def get_config():
    c = base_config()
    c.name = "fcn_resnet50_voc"
    c.model = "fcn_resnet50"
    c.model_kwargs.aux = True
    c.num_classes = 21
    c.dataset = "voc2012"
    c.learning_rate = 0.02
    c.num_epochs = 30
    c.batch_size = 32
    c.backbone_weights = ""  # e.g. resnet50-0676ba61.pth (torchvision ImageNet) for backbone-only init
    return c
