"""The sample picture written at each evaluation: enlarged tiles at their places, titles, per-row scores,
a legend of the colours shown, and a small lossless PNG."""
import numpy as np
import pytest
from PIL import Image

from segjax import samples
from segjax.data.synthetic import CLASS_NAMES, render

SIZE, FACTOR = 32, 6  # 32 px tiles are enlarged 6x to reach samples.MIN_TILE (192)
CELL = SIZE * FACTOR


def _batch(rows=4, seed=0):
    rng = np.random.default_rng(seed)
    images, masks = zip(*(render(rng, SIZE, 3) for _ in range(rows)))
    images, masks = np.stack(images).astype(np.float32), np.stack(masks)
    return images, masks, _probs(masks, rng)


def _probs(masks, rng=None):
    """Scores that predict the truth (background on void pixels), with a little noise."""
    rng = rng or np.random.default_rng(1)
    num_classes = len(CLASS_NAMES)
    labels = np.where(masks == 255, 0, masks)
    return np.eye(num_classes, dtype=np.float32)[labels] + rng.uniform(0, 0.1, labels.shape + (num_classes,))


def _ink(region) -> int:
    """Dark text pixels in a region of the white background."""
    return int((region.max(-1) < 100).sum())


def _blocks(tile):
    return np.repeat(np.repeat(tile, FACTOR, 0), FACTOR, 1)


def test_tiles_are_enlarged_in_place_and_cropped_to_their_image():
    images, masks, probs = _batch()
    probs[1, :, :, 2] += 5  # row 1 predicts class 2 everywhere
    valid = np.array([[SIZE, SIZE]] * 4 + [[0, 0]])  # a filler example of a padded batch is left out
    picture = samples.grid(np.concatenate([images, images[:1]]), np.concatenate([masks, masks[:1]]),
                           np.concatenate([probs, probs[:1]]), valid_hw=valid, step=7, class_names=CLASS_NAMES)
    assert picture.dtype == np.uint8 and picture.shape[1] == 2 * samples.PAD + 3 * (CELL + samples.GAP) + samples.SCORE_W
    legend_top = samples.PAD + samples.TITLE_H + 4 * (CELL + samples.GAP)
    assert legend_top + samples.LINE <= picture.shape[0] < legend_top + 3 * samples.LINE
    palette = samples._palette()
    for row in range(4):
        expected = [images[row].astype(np.uint8), palette[masks[row]], palette[probs[row].argmax(-1)]]
        for column, want in enumerate(expected):
            x, y = samples.cell_origin(row, column, CELL, CELL)
            np.testing.assert_array_equal(picture[y:y + CELL, x:x + CELL], _blocks(want), err_msg=f"{row}, {column}")
    x, y = samples.cell_origin(1, 2, CELL, CELL)
    assert (picture[y:y + CELL, x:x + CELL] == palette[2]).all()


def test_columns_are_titled_and_each_row_scored_beside_it():
    images, masks, probs = _batch()
    picture = samples.grid(images, masks, probs, step=1800)
    title = picture[samples.PAD + samples.LINE:samples.PAD + samples.TITLE_H]
    for column in range(3):
        x, _ = samples.cell_origin(0, column, CELL, CELL)
        assert _ink(title[:, x:x + CELL]) > 20, column  # "image", "truth", "prediction"
    score_x = samples.PAD + 3 * (CELL + samples.GAP)
    assert _ink(title[:, score_x:]) > 10  # the score's name
    for row in range(4):
        _, y = samples.cell_origin(row, 0, CELL, CELL)
        assert _ink(picture[y:y + CELL, score_x:]) > 20, row
    other = samples.grid(images, masks, probs, step=2)
    heading = samples.PAD + samples.LINE
    assert _ink(picture[:heading]) > 30 and not np.array_equal(picture[:heading], other[:heading])
    np.testing.assert_array_equal(picture[heading:], other[heading:])  # only the step differs


def test_the_legend_shows_the_colours_in_the_picture_and_no_others():
    images, masks, _ = _batch()
    masks = np.where(masks == 3, 1, masks)  # no triangles
    probs = _probs(masks)
    shown = set(np.unique(masks).tolist())
    assert 255 in shown and len(shown) < len(CLASS_NAMES) + 1
    picture = samples.grid(images, masks, probs, class_names=CLASS_NAMES)
    legend = picture[samples.PAD + samples.TITLE_H + 4 * (CELL + samples.GAP) - samples.GAP:]
    palette = samples._palette()
    for c in range(len(CLASS_NAMES)):
        swatch = int((legend == palette[c]).all(-1).sum())
        if c in shown:
            assert swatch >= (samples.SWATCH - 2) ** 2, c
        else:
            assert swatch == 0, c
    assert _ink(legend) > 100  # the names


@pytest.mark.parametrize("task", ["segmentation", "saliency"])
def test_row_scores(task):
    mask = np.zeros((4, 4), np.uint8)
    mask[:, 2:] = 1
    mask[0, 0] = 255  # void: not counted
    probs = np.zeros((4, 4, 2), np.float32)
    if task == "segmentation":
        probs[..., 0] = 1  # everything class 0: IoU 7/15 for class 0, 0 for class 1
        assert samples.row_score(mask, probs, task) == pytest.approx((7 / 15 + 0) / 2)
        probs[:, 2:, 1] = 2
        assert samples.row_score(mask, probs, task) == 1.0
    else:
        probs = np.full((4, 4, 1), 0.25, np.float32)
        assert samples.row_score(mask, probs, task) == pytest.approx((7 * 0.25 + 8 * 0.75) / 15)


def test_saliency_rows_show_grey_maps_and_their_mae():
    images, masks, _ = _batch(rows=2)
    masks = np.where(masks == 255, 255, masks > 0).astype(np.uint8)
    probs = np.linspace(0, 1, SIZE * SIZE, dtype=np.float32).reshape(1, SIZE, SIZE, 1).repeat(2, 0)
    picture = samples.grid(images, masks, probs, "saliency", step=3)
    x, y = samples.cell_origin(0, 2, CELL, CELL)
    np.testing.assert_array_equal(picture[y:y + CELL, x:x + CELL, 0], _blocks(np.rint(probs[0, ..., 0] * 255)))
    x, y = samples.cell_origin(1, 1, CELL, CELL)
    assert set(np.unique(picture[y:y + CELL, x:x + CELL]).tolist()) <= {0, 128, 255}
    legend = picture[samples.PAD + samples.TITLE_H + 2 * (CELL + samples.GAP):]
    assert _ink(legend) > 100


def test_saved_png_is_lossless_and_small(tmp_path):
    images, masks, probs = _batch()
    picture = samples.grid(images, masks, probs, step=5, class_names=CLASS_NAMES)
    path = samples.save(str(tmp_path), 5, picture)
    assert path == str(tmp_path / "samples" / "step_5.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), picture)
    assert (tmp_path / "samples" / "step_5.png").stat().st_size < 100_000  # RGB: 4 x 192 x 576 x 3 = 1.3 MB raw
    labels = np.where(masks == 255, 0, masks)
    few = samples.grid(images * 0 + 128, masks, np.eye(len(CLASS_NAMES), dtype=np.float32)[labels], step=5)
    path = samples.save(str(tmp_path), 6, few)
    with Image.open(path) as saved:
        assert saved.mode == "P"  # at most 256 colours: a palette picture
        np.testing.assert_array_equal(np.asarray(saved.convert("RGB")), few)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_5.png", "step_6.png"]  # no .tmp
