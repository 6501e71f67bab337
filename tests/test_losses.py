"""Losses against torch (cross-entropy, BCE-with-logits) and explicit numpy Dice / soft IoU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segjax import losses
from segjax.errors import SegjaxError

N, H, W, C = 2, 5, 7, 4


def sample(seed=0, void_fraction=0.2, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.normal(size=(N, H, W, C))).astype(np.float32)
    labels = rng.integers(0, C, size=(N, H, W)).astype(np.uint8)
    labels[rng.random((N, H, W)) < void_fraction] = 255
    return logits, labels


def torch_ce(logits, labels, weight=None):
    logits, labels = np.array(logits), np.array(labels)  # writable copies for torch
    return F.cross_entropy(torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(labels).long(),
                           weight=None if weight is None else torch.tensor(weight), ignore_index=255).item()


@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_equals_torch_with_ignore_and_weights(weighted):
    logits, labels = sample()
    weight = np.array([0.3, 1.0, 2.5, 0.7], np.float32) if weighted else None
    ours = float(jax.jit(losses.cross_entropy)(logits, labels, 255, weight))
    ref = torch_ce(logits, labels, weight)
    print(f"CE weighted={weighted}: {ours:.6f} vs torch {ref:.6f}, abs err {abs(ours - ref):.2g}")
    assert abs(ours - ref) < 2e-6
    # void pixels really are ignored: changing their logits changes nothing
    noisy = np.where((labels == 255)[..., None], 100.0, logits).astype(np.float32)
    assert float(losses.cross_entropy(noisy, labels, 255, weight)) == pytest.approx(ours, abs=1e-6)


def test_cross_entropy_is_float32_from_bfloat16_logits_and_zero_when_all_void():
    logits, labels = sample()
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    got = losses.cross_entropy(bf16, labels)
    assert got.dtype == jnp.float32
    ref = torch_ce(np.asarray(bf16.astype(jnp.float32)), labels)
    assert abs(float(got) - ref) < 2e-6
    void = np.full_like(labels, 255)
    value, grad = jax.value_and_grad(losses.cross_entropy)(jnp.asarray(logits), void)
    assert float(value) == 0.0 and bool(jnp.all(grad == 0))


def test_cross_entropy_is_nan_for_a_label_out_of_range():
    logits, labels = sample()
    labels[0, 0, 0] = C  # neither a class nor void
    assert np.isnan(float(losses.cross_entropy(logits, labels)))


def test_segmentation_loss_is_out_plus_half_aux():
    logits, labels = sample(1)
    aux, _ = sample(2)
    ce, ce_dice = losses.make_loss("ce", logits.shape[-1]), losses.make_loss("ce+dice", logits.shape[-1])
    got = float(ce({"out": logits, "aux": aux}, labels))
    ref = torch_ce(logits, labels) + 0.5 * torch_ce(aux, labels)
    assert abs(got - ref) < 4e-6
    assert float(ce({"out": logits}, labels)) == pytest.approx(torch_ce(logits, labels), abs=2e-6)
    with_dice = float(ce_dice({"out": logits}, labels))
    assert with_dice == pytest.approx(torch_ce(logits, labels) + numpy_dice_loss(logits, labels), abs=4e-6)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_dice_loss(logits, labels, eps=1e-6):
    """Per-class loop as milesial/Pytorch-UNet's multiclass_dice_coeff(reduce_batch_first=True)."""
    probs, keep = softmax(logits.astype(np.float64)), labels != 255
    scores = []
    for c in range(logits.shape[-1]):
        p, y = probs[..., c][keep], (labels[keep] == c).astype(np.float64)
        inter, sets = (p * y).sum(), p.sum() + y.sum()
        sets = 2 * inter if sets == 0 else sets
        scores.append((2 * inter + eps) / (sets + eps))
    return 1 - np.mean(scores)


def test_dice_loss_equals_per_class_numpy_dice():
    logits, labels = sample(3)
    labels[labels == 2] = 0  # class 2 absent from the truth (still predicted)
    ours = float(jax.jit(losses.dice_loss, static_argnums=2)(logits, labels, C))
    ref = numpy_dice_loss(logits, labels)
    print(f"dice {ours:.6f} vs numpy {ref:.6f}, abs err {abs(ours - ref):.2g}")
    assert abs(ours - ref) < 1e-6
    # the milesial definition's edge: a class absent from truth and prediction scores 1
    certain = np.where(np.arange(C) == 1, 50.0, -50.0)[None, None, None].repeat(N, 0).repeat(H, 1).repeat(W, 2)
    ones = np.ones((N, H, W), np.uint8)
    assert float(losses.dice_loss(certain.astype(np.float32), ones, C)) == pytest.approx(0.0, abs=1e-6)


def test_soft_iou_loss_multiclass_and_binary():
    logits, labels = sample(4)
    probs, keep = softmax(logits.astype(np.float64)), (labels != 255)[..., None]
    onehot = (labels[..., None] == np.arange(C)) & keep
    x, y = probs * keep, onehot.astype(np.float64)
    ref = 1 - (x * y).sum() / (x + y - x * y).sum()
    ours = float(jax.jit(losses.soft_iou_loss)(logits, labels))
    assert abs(ours - ref) < 1e-6
    rng = np.random.default_rng(5)
    bin_logits = rng.normal(size=(N, H, W, 1)).astype(np.float32)
    target = (rng.random((N, H, W)) > 0.5).astype(np.float32)
    xb, yb = 1 / (1 + np.exp(-bin_logits[..., 0].astype(np.float64))), target
    ref_b = 1 - (xb * yb).sum() / (xb + yb - xb * yb).sum()
    assert abs(float(losses.soft_iou_loss(bin_logits, target)) - ref_b) < 1e-6


def test_u2net_bce_is_sum_of_seven_torch_bce_with_logits_means():
    rng = np.random.default_rng(6)
    maps = [(4 * rng.normal(size=(N, H, W, 1))).astype(np.float32) for _ in range(7)]
    target = rng.random((N, H, W)).astype(np.float32)  # soft targets are allowed
    target[0, :2] = 1.0
    ours = float(jax.jit(losses.u2net_bce)({"out": maps[0], "sides": maps[1:]}, target))
    t = torch.from_numpy(target)[:, None]
    bce = torch.nn.BCEWithLogitsLoss()
    ref = sum(bce(torch.from_numpy(m).permute(0, 3, 1, 2), t).item() for m in maps)
    # and U-2-Net's own form: BCELoss on sigmoid outputs
    ref_sigmoid = sum(F.binary_cross_entropy(torch.sigmoid(torch.from_numpy(m).permute(0, 3, 1, 2).double()),
                                             t.double()).item() for m in maps)
    print(f"u2net bce {ours:.6f} vs torch {ref:.6f}, abs err {abs(ours - ref):.2g}")
    assert abs(ours - ref) < 1e-5 and abs(ours - ref_sigmoid) < 1e-5


def test_binary_losses_leave_void_pixels_out():
    rng = np.random.default_rng(7)
    maps = [(4 * rng.normal(size=(N, H, W, 1))).astype(np.float32) for _ in range(3)]
    target = (rng.random((N, H, W)) > 0.5).astype(np.int32)
    target[:, :, -2:] = 255  # crop padding
    keep = torch.from_numpy(target != 255)
    t = torch.from_numpy(np.where(target == 255, 0, target).astype(np.float32))
    ref = sum(F.binary_cross_entropy_with_logits(torch.from_numpy(m)[..., 0][keep], t[keep]).item() for m in maps)
    ours = float(losses.u2net_bce({"out": maps[0], "sides": maps[1:]}, target))
    assert abs(ours - ref) < 1e-5
    x = 1 / (1 + np.exp(-maps[0][..., 0].astype(np.float64)))[target != 255]
    y = target[target != 255].astype(np.float64)
    ref_iou = 1 - (x * y).sum() / (x + y - x * y).sum()
    assert abs(float(losses.soft_iou_loss(maps[0], target)) - ref_iou) < 1e-6


def rahman_wang_soft_iou(logits, labels, void=255):
    """Rahman & Wang 2016 (Optimizing Intersection-over-Union in Deep Neural Networks) in numpy: L = 1 - I / U, I = sum X*Y, U = sum (X + Y - X*Y), void left out."""
    x = softmax(np.asarray(logits, np.float64))
    valid = labels != void
    y = np.eye(logits.shape[-1])[np.where(valid, labels, 0)]
    x, y = x[valid], y[valid]
    return 1 - (x * y).sum() / (x + y - x * y).sum()


def test_soft_iou_recipes_are_rahman_and_wangs_formula():
    logits, labels = sample(3)
    aux, _ = sample(4)
    labels[0, :2] = 255
    c = logits.shape[-1]
    soft = float(losses.make_loss("soft_iou", c)({"out": logits, "aux": aux}, labels))
    assert soft == pytest.approx(rahman_wang_soft_iou(logits, labels) + 0.5 * rahman_wang_soft_iou(aux, labels), abs=1e-5)
    mixed = float(losses.make_loss("ce+soft_iou", c)({"out": logits}, labels))
    assert mixed == pytest.approx(torch_ce(logits, labels) + rahman_wang_soft_iou(logits, labels), abs=1e-5)
    with pytest.raises(SegjaxError, match="config.loss='iou'"):
        losses.make_loss("iou", c)
