"""Shared building blocks, written once, with PyTorch's numerics.

Conventions every model in `segjax.models` follows:
- NHWC tensors, `train: bool` passed explicitly, `dtype` = compute dtype, `param_dtype` = storage.
- A network's builder binds the dtypes, the BatchNorm axis name and constants once
  (`dtype_partials`) and hands the resulting conv / norm / conv-BN ModuleDefs down as fields.
- Padding is explicit and symmetric, as in PyTorch (Flax's "SAME" is asymmetric at stride 2).
- Submodules are named after the PyTorch reference's module path ("conv1", "layer1", "0", ...),
  so `segjax.convert` maps a state_dict onto our variables with one generic rule.

One module per subject: `convolution` (conv, transposed conv and their lowerings), `norm`
(BatchNorm), `blocks` (ConvBN and the per-network ModuleDefs), `resizing` (`F.interpolate`),
`pooling` (max / adaptive pools, max unpooling); `core` holds what they share.
"""
from segjax.nn.blocks import ConvBN, Layers, dtype_partials
from segjax.nn.convolution import (CONV_METHODS, TAPS_MIN_CHANNELS2, Conv, ConvTranspose, bilinear_kernel_init,
                                   bilinear_upsample_kernel, check_conv_method, conv, conv2d, conv_lowering, conv_plan,
                                   default_conv_lowering,
                                   conv_transpose, conv_transpose_output_size)
from segjax.nn.core import Array, Dtype, ModuleDef, is_symbolic, kaiming_normal_fan_out, pair
from segjax.nn.norm import BatchNorm, batch_norm_train
from segjax.nn.pooling import (PoolIndices, adaptive_avg_pool2d, bed_of_nails, max_pool2d, max_unpool2d,
                               nearest_upsample, pool_output_size, unpool_output_size)
from segjax.nn.resizing import resize
