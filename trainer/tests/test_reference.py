from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tclseg_trainer.model import MEAN, STD
from tclseg_trainer.reference import (
    crop_boxes,
    normalize,
    pixel_statistics,
    prepare,
    rescale_size,
    resize_uint8_bilinear,
    segment,
    segment_crops,
)


def test_rescale_size_follows_mmcv():
    assert rescale_size(300, 500) == (448, 747)  # short side to 448, 746.67 rounds half up
    assert rescale_size(500, 375) == (597, 448)
    assert rescale_size(100, 1000) == (205, 2048)  # long side capped at 2048
    assert rescale_size(448, 600) == (448, 600)
    assert rescale_size(1000, 1000) == (448, 448)


# The official pipeline's image steps, against OpenCV itself (opencv-python-headless, pinned in requirements.txt).

# (in_h, in_w, out_h, out_w): non-integer up/down scales, exact integer factors (OpenCV hands an exact 2x
# reduction to its area filter), odd sizes, one-pixel rows and columns, extreme aspect ratios, the pipeline's sizes.
RESIZE_CASES = [
    (13, 17, 29, 31),
    (61, 47, 23, 19),
    (64, 48, 32, 24),
    (63, 48, 21, 16),
    (64, 60, 16, 15),
    (16, 21, 32, 42),
    (11, 9, 33, 27),
    (40, 30, 20, 29),
    (7, 5, 11, 13),
    (20, 1, 37, 3),
    (1, 20, 3, 37),
    (9, 7, 1, 1),
    (1, 1, 5, 6),
    (3, 150, 9, 448),
    (150, 3, 448, 9),
    (53, 37, 642, 448),
    (480, 640, 448, 597),
    (896, 1194, 448, 597),
    (100, 1000, 205, 2048),
]


@pytest.mark.parametrize("in_h,in_w,out_h,out_w", RESIZE_CASES)
def test_resize_equals_opencv_inter_linear(in_h, in_w, out_h, out_w):
    rng = np.random.default_rng(in_h * 1000 + in_w)
    for img in (
        rng.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8),
        rng.choice(np.array([0, 255], np.uint8), (in_h, in_w, 3)),  # saturation at both ends
    ):
        want = cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(resize_uint8_bilinear(img, (out_h, out_w)), want)


def test_resize_equals_opencv_on_random_sizes():
    rng = np.random.default_rng(7)
    for _ in range(300):
        in_h, in_w = (int(v) for v in rng.integers(1, 80, 2))
        out_h, out_w = (int(v) for v in rng.integers(1, 160, 2))
        img = rng.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
        want = cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
        got = resize_uint8_bilinear(img, (out_h, out_w))
        assert np.array_equal(got, want), f"{in_w}x{in_h} -> {out_w}x{out_h}"


def mmseg_pipeline(img_rgb: np.ndarray) -> np.ndarray:
    """What mmseg 0.27's test pipeline gives the model, with the calls it makes (cv2 image in BGR order):
    mmcv.imrescale(img, (2048, 448)) -> cv2.resize INTER_LINEAR; Normalize(to_rgb=True) -> mmcv.imnormalize with
    float32 mean/std: float32 image, BGR->RGB, cv2.subtract(mean in float64), cv2.multiply(1 / std in float64)."""
    bgr = np.ascontiguousarray(img_rgb[..., ::-1])
    h, w = bgr.shape[:2]
    nh, nw = rescale_size(h, w)
    resized = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_LINEAR)
    mean = np.array([123.675, 116.28, 103.53], np.float32)
    std = np.array([58.395, 57.12, 57.375], np.float32)
    x = resized.astype(np.float32)
    cv2.cvtColor(x, cv2.COLOR_BGR2RGB, x)
    cv2.subtract(x, np.float64(mean.reshape(1, -1)), x)
    cv2.multiply(x, 1 / np.float64(std.reshape(1, -1)), x)
    return x.transpose(2, 0, 1)


@pytest.mark.parametrize("h,w", [(53, 37), (75, 100), (130, 90), (60, 150), (896, 1194)])
def test_prepare_is_the_official_pipeline_bit_for_bit(h, w):
    rng = np.random.default_rng(h + w)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    x = prepare(img)
    assert x.dtype == torch.float32 and x.shape == (1, 3, *rescale_size(h, w))
    np.testing.assert_array_equal(x[0].numpy(), mmseg_pipeline(img))


def test_normalize_equals_mmcv_for_every_grey_level():
    grey = np.tile(np.arange(256, dtype=np.uint8)[:, None, None], (1, 1, 3))
    mean, std = pixel_statistics(MEAN, STD)
    np.testing.assert_array_equal(mean, np.float32([123.675, 116.28, 103.53]))
    np.testing.assert_array_equal(std, np.float32([58.395, 57.12, 57.375]))
    np.testing.assert_array_equal(normalize(grey), mmseg_pipeline_normalize_only(grey))


def mmseg_pipeline_normalize_only(img_rgb: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(img_rgb).astype(np.float32)
    cv2.subtract(x, np.float64(np.float32([123.675, 116.28, 103.53]).reshape(1, -1)), x)
    cv2.multiply(x, 1 / np.float64(np.float32([58.395, 57.12, 57.375]).reshape(1, -1)), x)
    return x.transpose(2, 0, 1)


def test_prepare_rejects_a_grey_image():
    with pytest.raises(ValueError):
        prepare(np.zeros((8, 8), np.uint8))


def test_committed_opencv_fixtures_are_opencvs_output(tmp_path):
    """tests/fixtures/opencv (what the Rust tests compare with) is what this OpenCV makes now."""
    from pathlib import Path

    from PIL import Image

    from tclseg_trainer.tools.fixtures import write_opencv_cases

    committed = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "opencv"
    (tmp_path / "images").symlink_to(committed.parent / "images")
    write_opencv_cases(tmp_path / "opencv")
    fresh = json.loads((tmp_path / "opencv" / "opencv.json").read_text())
    stored = json.loads((committed / "opencv.json").read_text())
    assert fresh["cases"] == stored["cases"] and fresh["normalized"] == stored["normalized"]
    for case in stored["cases"]:
        for key in ("input", "output"):
            a = np.asarray(Image.open(committed / case[key]))
            b = np.asarray(Image.open(tmp_path / "opencv" / case[key]))
            assert np.array_equal(a, b), f"{case[key]} is stale: run python -m tclseg_trainer.tools.fixtures"


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
