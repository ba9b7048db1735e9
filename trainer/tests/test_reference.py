from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tclseg_trainer.model import MEAN, STD
from tclseg_trainer.reference import crop_boxes, prepare, rescale_size, segment, segment_crops


def test_rescale_size_follows_mmcv():
    assert rescale_size(300, 500) == (448, 747)  # short side to 448, 746.67 rounds half up
    assert rescale_size(500, 375) == (597, 448)
    assert rescale_size(100, 1000) == (205, 2048)  # long side capped at 2048
    assert rescale_size(448, 600) == (448, 600)
    assert rescale_size(1000, 1000) == (448, 448)


def test_prepare_resizes_and_normalises():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    x = prepare(img, short_side=60)
    assert x.shape == (1, 3, 60, 100) and x.dtype == torch.float32
    raw = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    want = F.interpolate(raw, size=(60, 100), mode="bilinear", align_corners=False)
    want = (want - torch.tensor(MEAN).view(1, 3, 1, 1) * 255) / (torch.tensor(STD).view(1, 3, 1, 1) * 255)
    torch.testing.assert_close(x, want)
    flat = prepare(np.full((8, 8, 3), 128, np.uint8), short_side=8)
    expected = (128 / 255 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(flat[0, :, 0, 0].numpy(), expected, rtol=1e-5)
    with pytest.raises(ValueError):
        prepare(np.zeros((8, 8), np.uint8))


@pytest.mark.parametrize(
    "h,w,n_rows,n_cols",
    [
        (448, 448, 1, 1),
        (300, 200, 1, 1),
        (448, 672, 1, 2),
        (448, 673, 1, 3),
        (800, 448, 3, 1),
        (1000, 1500, 4, 6),
    ],
)
def test_crop_grid(h, w, n_rows, n_cols):
    boxes = crop_boxes(h, w, 448, 224)
    assert len(boxes) == n_rows * n_cols
    cover = np.zeros((h, w), int)
    for y1, y2, x1, x2 in boxes:
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        assert y2 - y1 == min(448, h) and x2 - x1 == min(448, w)
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1
    assert boxes[-1][1] == h and boxes[-1][3] == w  # the last window is pushed back inside the image


def test_crop_grid_exact_positions():
    assert crop_boxes(448, 673) == [(0, 448, 0, 448), (0, 448, 224, 672), (0, 448, 225, 673)]
    assert crop_boxes(100, 60, 64, 32) == [(0, 64, 0, 60), (32, 96, 0, 60), (36, 100, 0, 60)]


# Small crops keep the tiny model fast; the crop logic does not depend on the size.
SMALL = dict(crop=64, stride=32, short_side=64, long_side_max=512)


@pytest.mark.parametrize("hw", [(40, 40), (90, 60), (50, 120), (64, 64), (150, 200)])
def test_segment_shapes(tiny_model, tiny_text, hw):
    img = np.random.default_rng(1).integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    scores, labels = segment(tiny_model, img, tiny_text, pamr=False, **SMALL)
    assert scores.shape == (3, *hw) and scores.dtype == torch.float32
    assert labels.shape == hw and labels.dtype == torch.int64
    assert torch.equal(labels, scores.argmax(0))
    scores_bg, labels_bg = segment(tiny_model, img, tiny_text, pamr=False, bg_thresh=0.4, **SMALL)
    assert scores_bg.shape == (4, *hw)
    torch.testing.assert_close(scores_bg[1:], scores)
    torch.testing.assert_close(scores_bg[0], torch.full(hw, 0.4))


def test_background_threshold_decides(tiny_model, tiny_text):
    img = np.random.default_rng(2).integers(0, 256, size=(48, 80, 3), dtype=np.uint8)
    _, all_bg = segment(tiny_model, img, tiny_text, pamr=False, bg_thresh=1.0, **SMALL)
    assert (all_bg == 0).all()
    _, no_bg = segment(tiny_model, img, tiny_text, pamr=False, bg_thresh=0.0, **SMALL)
    assert (no_bg > 0).all()


def test_segment_crops_averages_overlaps(tiny_model, tiny_text):
    x = torch.randn(1, 3, 64, 112)
    got = segment_crops(tiny_model, x, tiny_text, pamr=False, kp_w=0.3, crop=64, stride=32)
    boxes = crop_boxes(64, 112, 64, 32)
    assert len(boxes) == 3
    total = torch.zeros(1, 3, 64, 112)
    count = torch.zeros(1, 1, 64, 112)
    for y1, y2, x1, x2 in boxes:
        masks, _ = tiny_model.generate_masks(x[:, :, y1:y2, x1:x2], tiny_text, kp_w=0.3)
        total[:, :, y1:y2, x1:x2] += masks
        count[:, :, y1:y2, x1:x2] += 1
    torch.testing.assert_close(got, total / count)
    assert count.max() == 3  # x: [0, 64), [32, 96), [48, 112)


def test_segment_with_pamr_resizes_back(tiny_model, tiny_text):
    img = np.random.default_rng(3).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    scores, labels = segment(tiny_model, img, tiny_text, pamr=True, **SMALL)
    assert scores.shape == (3, 37, 53) and labels.shape == (37, 53)
    x = prepare(img, 64, 512)
    inner = segment_crops(tiny_model, x, tiny_text, pamr=True, crop=64, stride=32)
    want = F.interpolate(inner, size=(37, 53), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(scores, want)
