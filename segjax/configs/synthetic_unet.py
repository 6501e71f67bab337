"""The default recipe (`segjax train` with no arguments): a small UNet on the built-in synthetic data set.

Sized to reach mIoU >= 0.8 in well under 10 minutes on a busy 2-core CPU: 32x32 images (2,000 for
training), UNet with 16 base channels, AdamW with torchvision's reference-recipe 1e-3 linear warmup then poly 0.9.
(From scratch and on this budget, SGD with momentum 0.9 stalled on predicting background; AdamW didn't.)
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
    c.data_options.image_size = 32
    c.data_options.num_train = 2000
    c.data_options.num_val = 100
    c.base_size = 32
    c.crop_size = 32
    c.scale_range = (0.9, 1.1)
    c.batch_size = 32
    c.eval_batch_size = 50
    c.num_steps = 1800
    c.optimizer = "adamw"
    c.learning_rate = 0.01
    c.weight_decay = 1e-4
    c.warmup_epochs = 0.5
    c.lr_mult = {}
    c.log_every_steps = 50
    c.eval_every_steps = 600
    c.keep_checkpoints = 1
    return c
