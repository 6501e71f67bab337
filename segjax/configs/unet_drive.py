"""UNet (base 32) on DRIVE retinal vessels: CE + Dice, 200 epochs, 480 crops, vertical and horizontal flips,
the data set's mean/std; pixels outside the field-of-view mask are 255 and ignored by the loss."""
from segjax.config import base_config


def get_config():
    c = base_config()
    c.name = "unet_drive"
    c.model = "unet"
    c.model_kwargs.base_channels = 32
    c.model_kwargs.bilinear = True
    c.num_classes = 2
    c.dataset = "drive"
    c.train_split = "train"
    c.eval_split = "test"
    c.base_size = 565
    c.crop_size = 480
    c.scale_range = (0.5, 1.2)
    c.hflip = True
    c.vflip = True
    c.mean = (0.709, 0.381, 0.224)   # DRIVE training images, RGB / 255
    c.std = (0.127, 0.079, 0.043)
    c.loss = "ce+dice"
    c.dice_weight = 1.0
    c.learning_rate = 0.01
    c.batch_size = 4
    c.num_epochs = 200
    c.eval_every_steps = 0
    c.lr_mult = {}
    c.eval_batch_size = 1
    return c
