"""The default recipe (`segjax train` with no arguments): a small UNet on the built-in synthetic data set.

Sized to finish in a few minutes on a 2-core CPU: 64x64 images, UNet with 16 base channels,
SGD with the seeds' momentum/decay and warmup + poly schedule at a higher learning rate.
"""
from segjax.config import base_config


def get_config():
    c = base_config()
    c.name = "synthetic_unet"
    c.model = "unet"
    c.model_kwargs.base_channels = 16
    c.model_kwargs.bilinear = True
    c.num_classes = 5
    c.dataset = "synthetic"
    c.base_size = 64
    c.crop_size = 64
    c.scale_range = (0.75, 1.25)
    c.batch_size = 16
    c.eval_batch_size = 32
    c.num_epochs = 20
    c.learning_rate = 0.1
    c.warmup_epochs = 1.0
    c.lr_mult = {}
    c.log_every_steps = 5
    c.eval_every_steps = 0
    c.keep_checkpoints = 1
    return c
