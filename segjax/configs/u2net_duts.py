"""U2-Net on DUTS-TR (salient objects): 320x320, AdamW lr 1e-3 (wd 0 as in the reference's Adam), linear
warmup then cosine, BCE summed over the fused map and the 6 side outputs; evaluated by MAE and max F."""
from segjax.config import base_config


def get_config():
    c = base_config()
    c.name = "u2net_duts"
    c.task = "saliency"
    c.model = "u2net"
    c.num_classes = 1
    c.dataset = "duts"
    c.train_split = "train"
    c.eval_split = "test"
    c.base_size = 320
    c.crop_size = 320
    c.scale_range = (1.0, 1.0)
    c.optimizer = "adamw"
    c.learning_rate = 1e-3
    c.weight_decay = 0.0
    c.schedule = "cosine"
    c.loss = "u2net_bce"
    c.batch_size = 12
    c.num_epochs = 100
    c.best_metric = "max_f"
    c.lr_mult = {}
    return c
