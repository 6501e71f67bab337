"""Helpers shared by the PyTorch parity tests."""
import numpy as np


def rel_l2(ours, ref) -> float:
    """Relative L2 error ||ours - ref|| / ||ref||, in float64."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def random_state_dict(table: dict, seed: int = 0, gain: float = 1.0, gain_key: str | None = None
                      ) -> dict[str, np.ndarray]:
    """Random values with a reference checkpoint's key names and shapes; BN statistics away from the defaults.

    BN weights whose key contains `gain_key` are scaled by `gain` (see the U2-Net test for why).
    """
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in table.items():
        leaf = key.rsplit(".", 1)[1]
        if leaf == "num_batches_tracked":
            sd[key] = np.zeros(shape, np.int64)
        elif leaf == "running_var" or (leaf == "weight" and len(shape) == 1):
            scale = gain if gain_key is not None and gain_key in key else 1.0
            sd[key] = (scale * rng.uniform(0.5, 1.5, shape)).astype(np.float32)
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            sd[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        else:  # biases, running means
            sd[key] = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    return sd


def randomise_batch_norm(module) -> None:
    """Every BatchNorm2d of a PyTorch module gets gains, biases and running statistics away from their
    defaults (as a trained network has), so a conversion that drops or swaps one of them shows."""
    import torch

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)


def eval_and_train_forward(model):
    """jit (variables, x) -> (eval logits, train-mode logits, updated batch_stats) of a segjax model."""
    import jax

    @jax.jit
    def forward(variables, x):
        evaluated = model.apply(variables, x, train=False)["out"]
        trained, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return evaluated, trained["out"], updates["batch_stats"]
    return forward


# wkentaro/pytorch-fcn's mean (torchfcn.datasets.VOC.mean_bgr), written out here rather than read from segjax
FCN_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)


def caffe_input(image_rgb255: np.ndarray, mean_bgr):
    """What the caffe-era references feed their nets: BGR, 0-255, minus the mean, NCHW float32 torch tensor."""
    import torch

    x = image_rgb255[..., ::-1].astype(np.float64) - np.asarray(mean_bgr)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None], np.float32))


def our_input(image_rgb255: np.ndarray, meta: dict) -> np.ndarray:
    """The same image as segjax's converted model takes it: normalised with the card's mean and std, NHWC."""
    return ((image_rgb255 / 255.0 - np.asarray(meta["mean"])) / np.asarray(meta["std"]))[None].astype(np.float32)
