"""The model zoo: `create(name, num_classes, **kw)` and `names()` (contract).

Every model is a flax.linen Module called as `model.apply(variables, x, train=False)` on float32
NHWC ImageNet-normalised images of any size; it returns a dict with "out" logits at the input's
H, W, plus "aux" (auxiliary head) or "sides" (U2-Net) where the model has them.
"""
from segjax.models.registry import create, names, register  # noqa: F401

# Importing a family registers its models.
from segjax.models import vgg, resnet, mobilenetv3  # noqa: E402,F401  backbones
from segjax.models import fcn, fcn_vgg, deeplab, deeplab_largefov, lraspp, unet, u2net, segnet  # noqa: E402,F401
