"""Confusion matrix vs sklearn, scores by hand, int64 totals past 2**31, saliency vs the eval tool's recipe."""

import jax
import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import f1_score, jaccard_score

from segjax import metrics
from segjax.errors import SegjaxError


def test_confusion_matrix_equals_sklearn_without_ignored_pixels():
    rng = np.random.default_rng(0)
    c = 5
    target = rng.integers(0, c, size=(3, 17, 19)).astype(np.uint8)
    target[rng.random(target.shape) < 0.15] = 255
    target[0, 0, :3] = 7  # out of range truth: not counted, like torchvision's reference
    pred = rng.integers(0, c, size=target.shape).astype(np.int32)
    cm = np.asarray(jax.jit(metrics.confusion_matrix, static_argnums=2)(pred, target, c))
    keep = target < c
    ref = sk_confusion_matrix(target[keep], pred[keep], labels=np.arange(c))
    np.testing.assert_array_equal(cm, ref)
    assert cm.sum() == keep.sum() and cm.dtype == np.int32


def test_scores_by_hand_with_an_absent_class():
    # rows = truth, cols = prediction; class 3 appears nowhere, class 2 is predicted but never true
    cm = np.array([[5, 1, 2, 0],
                   [0, 3, 1, 0],
                   [0, 0, 0, 0],
                   [0, 0, 0, 0]])
    s = metrics.scores(cm)
    assert s["global_acc"] == pytest.approx(8 / 12)
    np.testing.assert_allclose(s["class_acc"][:2], [5 / 8, 3 / 4])
    assert np.isnan(s["class_acc"][2]) and np.isnan(s["class_acc"][3])
    assert s["mean_acc"] == pytest.approx((5 / 8 + 3 / 4) / 2)
    np.testing.assert_allclose(s["iou"][:3], [5 / 8, 3 / 5, 0.0])  # 5/(8+5-5), 3/(4+4-3), 0/(0+3-0)
    assert np.isnan(s["iou"][3])
    assert s["miou"] == pytest.approx((5 / 8 + 3 / 5 + 0.0) / 3)
    assert s["fwiou"] == pytest.approx(8 / 12 * 5 / 8 + 4 / 12 * 3 / 5)
    np.testing.assert_allclose(s["dice"][:3], [10 / 13, 6 / 8, 0.0])
    assert np.isnan(s["dice"][3])
    table = metrics.format_table(s, ["bg", "cat", "dog", "cow"])
    assert "cat" in table and "60.00" in table and "mIoU 40.83" in table
    assert table.splitlines()[4].split()[1:] == ["-", "-", "-"]  # cow: absent everywhere


def test_scores_match_sklearn_on_random_predictions():
    rng = np.random.default_rng(1)
    c = 6
    target, pred = rng.integers(0, c, 5000), rng.integers(0, c, 5000)
    s = metrics.scores(sk_confusion_matrix(target, pred, labels=np.arange(c)))
    np.testing.assert_allclose(s["iou"], jaccard_score(target, pred, average=None), rtol=1e-12)
    np.testing.assert_allclose(s["dice"], f1_score(target, pred, average=None), rtol=1e-12)
    assert s["global_acc"] == pytest.approx(np.mean(target == pred), rel=1e-12)


def test_accumulate_in_int64_past_two_to_the_31():
    c = 3
    batch = np.full((c, c), 2**30, np.int32)  # a synthetic per-batch matrix from the device
    batch[0, 0] = 2**31 - 1
    total = None
    for _ in range(5):
        total = metrics.accumulate(total, batch)
    assert total.dtype == np.int64
    assert total[0, 0] == 5 * (2**31 - 1) and total[1, 2] == 5 * 2**30 and total.sum() > 2**34
    assert metrics.scores(total)["global_acc"] == pytest.approx((2**31 - 1 + 2 * 2**30) / (2**31 - 1 + 8 * 2**30))
    # a per-device stack from pmap is summed; a wrapped-around count is refused
    stacked = metrics.accumulate(total, np.stack([batch, batch]))
    assert stacked[1, 1] == 7 * 2**30
    with pytest.raises(SegjaxError, match="overflow"):
        metrics.accumulate(total, np.full((c, c), -5, np.int32))


def eval_tool_reference(probs, targets):
    """The U-2-Net route done by hand on each image's non-void pixels: normPRED, 8-bit map, then the
    evaluation tool's recipe (max-normalise to [0, 255], np.histogram over bins 0..255, flipped
    cumulative counts), curves averaged over images, F with beta^2 = 0.3."""
    beta = 0.3
    pre, rec, maes = [], [], []
    for p, t in zip(probs, targets):
        keep = t != 255
        p, t = p[keep], t[keep]
        p = (p - p.min()) / (p.max() - p.min())
        saved = np.floor(p * 255 + 0.5)
        gt = t / (t.max() + 1e-8) * 255.0
        rs = saved / (saved.max() + 1e-8) * 255.0
        pp, _ = np.histogram(rs[gt > 128], bins=np.arange(256))
        nn, _ = np.histogram(rs[gt <= 128], bins=np.arange(256))
        tp, fp = np.cumsum(pp[::-1]), np.cumsum(nn[::-1])
        pre.append(tp / (tp + fp + 1e-8))
        rec.append(tp / ((gt > 128).sum() + 1e-8))
        maes.append(np.abs(p - t).mean())
    pre, rec = np.mean(pre, 0), np.mean(rec, 0)
    return np.mean(maes), pre, rec, (1 + beta) * pre * rec / (beta * pre + rec + 1e-8)


def test_saliency_scores_follow_the_u2net_evaluation_tool():
    rng = np.random.default_rng(2)
    n, h, w = 6, 24, 20
    targets = np.zeros((n, h, w), np.int32)  # 0/1 masks as the data pipeline gives, 255 = padding
    for i in range(n):
        y, x = rng.integers(2, 12, 2)
        targets[i, y:y + 9, x:x + 7] = 1
    targets[1, :, 15:] = 255
    targets[4, 20:] = 255
    probs = np.clip(0.35 * targets + 0.65 * rng.random((n, h, w)), 0, 1).astype(np.float32)
    probs[targets == 255] = 0.99  # would change the normalisation and the counts if not ignored
    sums_fn = jax.jit(metrics.saliency_sums)
    total = None
    for lo in range(0, n, 4):  # the last batch padded with a repeated image (valid=0) and a void one
        p, t = probs[lo:lo + 4], targets[lo:lo + 4]
        valid = np.ones(4, np.float32)
        if len(p) < 4:
            valid[len(p)] = 0
            p = np.concatenate([p, p[:1], np.full_like(p[:1], 0.3)])
            t = np.concatenate([t, t[:1], np.full_like(t[:1], 255)])
        total = metrics.accumulate(total, sums_fn(p, t, valid))
    assert total["count"] == n
    got = metrics.saliency_scores(total)
    mae, pre, rec, f = eval_tool_reference(probs.astype(np.float64), targets.astype(np.float64))
    # tool index k counts levels in bins >= 254 - k: with the max-normalise that is level > 254 - k,
    # except k = 254 (all pixels); ours index s is level > s. Compare the 254 shared thresholds.
    np.testing.assert_allclose(np.asarray(total["precision"])[1:][::-1] / n, pre[:-1], atol=1e-6)
    np.testing.assert_allclose(np.asarray(total["recall"])[1:][::-1] / n, rec[:-1], atol=1e-6)
    print(f"saliency: max F {got['max_f']:.6f} vs tool {f.max():.6f}, MAE {got['mae']:.6f} vs {mae:.6f}")
    assert 0.5 < got["max_f"] < 0.98 and abs(got["max_f"] - f.max()) < 1e-6
    assert abs(got["mae"] - mae) < 1e-6
