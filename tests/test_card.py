"""ModelCard (what a trained model is) and Task (segmentation vs saliency): one reader of every meta
format, fallbacks for old checkpoints, the round trip, and the task rules the rest of segjax calls."""
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import config as config_lib, metrics, tasks
from segjax.card import ModelCard
from segjax.errors import SegjaxError


def test_a_card_survives_its_meta_round_trip():
    card = ModelCard(model="unet", num_classes=3, model_kwargs={"base_channels": 8, "bilinear": True},
                     task=tasks.SEGMENTATION, class_names=("bg", "a", "b"), dataset="synthetic", in_channels=4,
                     mean=(0.5,) * 4, std=(0.25,) * 4, output_stride=(16, 8), crf={"iterations": 5},
                     extra={"layout": "milesial/Pytorch-UNet", "config": {"seed": 3}})
    meta = card.to_meta()
    assert meta["model_kwargs"] == {"num_classes": 3, "base_channels": 8, "bilinear": True}
    assert meta["layout"] == "milesial/Pytorch-UNet" and meta["task"] == "segmentation"
    assert ModelCard.from_meta(meta) == card


def test_meta_written_before_task_normalisation_and_bands_reads_with_the_old_rules():
    old = {"model": "u2netp", "model_kwargs": {"num_classes": 1}, "dataset": "duts"}
    card = ModelCard.from_meta(old)
    assert card.task is tasks.SALIENCY and card.num_classes == 1 and card.model_kwargs == {}
    assert card.mean == (0.485, 0.456, 0.406) and card.std == (0.229, 0.224, 0.225) and card.in_channels == 3
    assert card.class_names == ("salient",) and card.palette is None
    seg = ModelCard.from_meta({"model": "fcn_resnet50", "num_classes": 3, "dataset": "no_such_data"})
    assert seg.task is tasks.SEGMENTATION and seg.class_names == ("0", "1", "2")
    assert seg.palette[:2] == [[0, 0, 0], [128, 0, 0]]  # VOC's


@pytest.mark.parametrize("meta, match", [({"num_classes": 3}, "does not name its model"),
                                         ({"model": "unet"}, "number of classes"),
                                         ({"model": "unet", "num_classes": 2, "task": "depth"}, "task 'depth'")])
def test_a_meta_that_describes_no_model_is_a_one_line_error(meta, match):
    with pytest.raises(SegjaxError, match=match) as e:
        ModelCard.from_meta(meta, "ckpt/")
    assert "\n" not in str(e.value)


def test_the_card_of_a_recipe_builds_its_model_and_normalises_like_training():
    config = config_lib.load_config("synthetic_unet")
    card = ModelCard.from_config(config, [f"c{i}" for i in range(config.num_classes)])
    assert card.model == config.model and card.extra["config"]["model"] == config.model
    assert type(card.build()).__name__.lower() == "unet"
    image = np.full((2, 3, 3), 255, np.uint8)
    np.testing.assert_allclose(card.normalise(image)[0, 0], (1 - np.asarray(config.mean)) / np.asarray(config.std),
                               rtol=1e-6)


def test_tasks_activate_label_and_score_their_own_way():
    logits = jnp.asarray([[[[2.0, 0.0, -1.0]], [[-3.0, 1.0, 0.5]]]])  # (1, 2, 1, 3)
    seg = tasks.SEGMENTATION
    probs = seg.activate(logits)
    np.testing.assert_allclose(probs.sum(-1), 1, rtol=1e-6)
    assert seg.labels(probs).tolist() == [[[0], [1]]]
    mask = jnp.asarray([[[0], [2]]])
    cm = seg.eval_sums(probs, mask, 3)["confusion"]
    assert int(cm[0, 0]) == 1 and int(cm[2, 1]) == 1 and int(cm.sum()) == 2
    sal = tasks.SALIENCY
    p = sal.activate(jnp.asarray([[[[3.0]], [[-3.0]]]]))
    assert sal.labels(p).tolist() == [[[1], [0]]]
    # U-2-Net's evaluation min-max normalises each map first: (1, 0) against an all-background mask.
    sums = sal.eval_sums(p, jnp.asarray([[[0], [0]]]), 1)
    assert sal.scores(metrics.accumulate(None, sums))["mae"] == pytest.approx(0.5, rel=1e-5)
    assert tasks.for_model("u2net") is sal and tasks.for_model("unet") is seg and tasks.get("saliency") is sal
