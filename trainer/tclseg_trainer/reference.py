"""Whole-image reference inference: the unified evaluation protocol of TCL, made exact.

    prepare:  keep-ratio resize so the short side is 448 (long side capped at 2048) with OpenCV's uint8 bilinear
              arithmetic, bit for bit, then ImageNet normalisation: the official test pipeline
              (segmentation/configs/_base_/datasets/*.py: mmseg Resize(keep_ratio=True) -> mmcv.imrescale ->
              cv2.resize INTER_LINEAR; Normalize -> mmcv.imnormalize);
    segment:  448x448 sliding window with stride 224 (mmseg `slide_inference`), `generate_masks` per crop,
              optional constant background channel, average over crops, bilinear resize to the original size,
              argmax.

This is THE numerical reference that the Rust runtime must match.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .model import MEAN, STD, TCL


def rescale_size(h: int, w: int, short_side: int = 448, long_side_max: int = 2048) -> tuple[int, int]:
    """mmcv keep-ratio rescale: the largest scale that fits both limits; sizes rounded half up.

    mmcv 1.6.2 mmcv/image/geometric.py: rescale_size (l. 218-244) and _scale_size (l. 34).
    """
    scale = min(long_side_max / max(h, w), short_side / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _fixed_taps(size_in: int, size_out: int, clamp_weights: bool) -> tuple[np.ndarray, ...]:
    """One axis of OpenCV's uint8 INTER_LINEAR resize: source indices (clamped) and 11-bit integer weights.

    OpenCV's arithmetic step by step: scale = 1 / (out / in) in float64; the source position
    (dst + 0.5) * scale - 0.5 is rounded to float32 before floor; the fraction is taken in float32; each weight is
    round-half-even(w * 2048) of the float32 weight. The horizontal pass moves taps outside the image onto the
    edge pixel with weights (1, 0) (`clamp_weights`); the vertical pass keeps the weights and clamps only the rows.
    """
    scale = 1.0 / (np.float64(size_out) / np.float64(size_in))
    pos = ((np.arange(size_out, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    idx = np.floor(pos).astype(np.int64)
    frac = (pos - idx.astype(np.float32)).astype(np.float32)
    if clamp_weights:
        outside = (idx < 0) | (idx >= size_in - 1)
        frac[outside] = 0
        idx = np.clip(idx, 0, size_in - 1)
    w_lo = np.rint((np.float32(1) - frac) * np.float32(2048)).astype(np.int64)
    w_hi = np.rint(frac * np.float32(2048)).astype(np.int64)
    return np.clip(idx, 0, size_in - 1), np.clip(idx + 1, 0, size_in - 1), w_lo, w_hi


def resize_uint8_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR) for an HxWxC uint8 image, bit for bit, in numpy.

    Horizontal pass: sum of pixel * weight in integers (exact). Vertical pass: OpenCV's SIMD kernel, which its
    uint8 path uses for every column: each row sum >> 4, times the 16-bit weight keeping the high half (>> 16),
    the two products added, then (v + 2) >> 2, saturated to 0..255. That differs from one rounding of sum / 2**22.
    Exact 2x reductions (OpenCV's area filter) come out the same through this formula. Checked against
    opencv-python-headless (trainer/tests/test_reference.py).
    """
    h, w = int(size[0]), int(size[1])
    in_h, in_w = image.shape[:2]
    if (in_h, in_w) == (h, w):
        return image.copy()
    src = image.astype(np.int64).reshape(in_h, in_w, -1)
    x0, x1, a0, a1 = _fixed_taps(in_w, w, clamp_weights=True)
    rows = src[:, x0, :] * a0[None, :, None] + src[:, x1, :] * a1[None, :, None]  # [in_h, w, C]
    y0, y1, b0, b1 = _fixed_taps(in_h, h, clamp_weights=False)
    top = ((rows[y0] >> 4) * b0[:, None, None]) >> 16
    bottom = ((rows[y1] >> 4) * b1[:, None, None]) >> 16
    out = np.clip((top + bottom + 2) >> 2, 0, 255).astype(np.uint8)
    return out.reshape((h, w, *image.shape[2:]))


def pixel_statistics(mean=MEAN, std=STD) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std in 0..255 units as float32, as the official configs hold them (mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375], l. 12 of each): 255 * the decimal value in float64, rounded once."""
    return (
        (np.asarray(mean, np.float64) * 255.0).astype(np.float32),
        (np.asarray(std, np.float64) * 255.0).astype(np.float32),
    )


def rescale(image_rgb_uint8: np.ndarray, short_side: int = 448, long_side_max: int = 2048) -> np.ndarray:
    """The image at the evaluation scale, still HxWx3 uint8 (mmcv.imrescale with the cv2 backend)."""
    if image_rgb_uint8.ndim != 3 or image_rgb_uint8.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {image_rgb_uint8.shape}")
    h, w = image_rgb_uint8.shape[:2]
    return resize_uint8_bilinear(np.asarray(image_rgb_uint8, np.uint8), rescale_size(h, w, short_side, long_side_max))


def normalize(image_uint8: np.ndarray, mean=MEAN, std=STD) -> np.ndarray:
    """HxWx3 uint8 -> float32 [3, h, w], (x - mean) / std in float32 on 0..255 values.

    This equals mmcv.imnormalize (cv2.subtract, then cv2.multiply by 1 / std in float64) for every grey level of
    the ImageNet statistics (checked in trainer/tests/test_reference.py).
    """
    m, s = pixel_statistics(mean, std)
    x = np.ascontiguousarray(image_uint8.transpose(2, 0, 1)).astype(np.float32)
    return ((x - m.reshape(3, 1, 1)) / s.reshape(3, 1, 1)).astype(np.float32)


def prepare(image_rgb_uint8: np.ndarray, short_side: int = 448, long_side_max: int = 2048) -> torch.Tensor:
    """HWC uint8 RGB -> normalised float32 [1, 3, h, w] at the evaluation scale.

    The official pipeline, exactly: OpenCV's uint8 bilinear resize (whole grey levels; per channel, so mmcv's BGR
    order makes no difference), then mmcv's normalisation. The Rust runtime reproduces it bit for bit.
    """
    return torch.from_numpy(normalize(rescale(image_rgb_uint8, short_side, long_side_max)))[None]


def crop_boxes(h: int, w: int, crop: int = 448, stride: int = 224) -> list[tuple[int, int, int, int]]:
    """The (y1, y2, x1, x2) windows of mmseg's slide_inference, row by row.

    A window is clamped to the image, shifted back inside when it overhangs, and is smaller than `crop` only
    where the image itself is.
    """
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2 = min(r * stride + crop, h)
            x2 = min(c * stride + crop, w)
            y1 = max(y2 - crop, 0)
            x1 = max(x2 - crop, 0)
            boxes.append((y1, y2, x1, x2))
    return boxes


@torch.no_grad()
def segment_crops(
    model: TCL,
    image: torch.Tensor,
    text_emb: torch.Tensor,
    *,
    pamr: bool = True,
    kp_w: float = 0.3,
    bg_thresh: float | None = None,
    crop: int = 448,
    stride: int = 224,
) -> torch.Tensor:
    """Slide over a prepared image [1, 3, h, w]; crop-averaged scores [1, C, h, w] (C = N, +1 with bg)."""
    _, _, h, w = image.shape
    n = text_emb.shape[0] + (bg_thresh is not None)
    total = torch.zeros(1, n, h, w, device=image.device)
    count = torch.zeros(1, 1, h, w, device=image.device)
    for y1, y2, x1, x2 in crop_boxes(h, w, crop, stride):
        masks, _ = model.generate_masks(image[:, :, y1:y2, x1:x2], text_emb, apply_pamr=pamr, kp_w=kp_w)
        if bg_thresh is not None:
            bg = torch.full_like(masks[:, :1], float(bg_thresh))
            masks = torch.cat([bg, masks], dim=1)
        total[:, :, y1:y2, x1:x2] += masks.float()
        count[:, :, y1:y2, x1:x2] += 1
    return total / count


@torch.no_grad()
def segment(
    model: TCL,
    image_rgb_uint8: np.ndarray,
    text_emb: torch.Tensor,
    *,
    pamr: bool = True,
    kp_w: float = 0.3,
    bg_thresh: float | None = None,
    crop: int = 448,
    stride: int = 224,
    short_side: int = 448,
    long_side_max: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment one image. Returns scores [C, H, W] float32 and labels [H, W] int64 at the original size.

    With `bg_thresh` set, channel 0 is a constant background score and class n of `text_emb` is label n+1.
    mmseg applies a softmax before the argmax; it cannot change the argmax, so it is left out (the first
    index wins ties, as torch.argmax does).
    """
    H, W = image_rgb_uint8.shape[:2]
    x = prepare(image_rgb_uint8, short_side, long_side_max).to(next(model.parameters()).device)
    scores = segment_crops(model, x, text_emb, pamr=pamr, kp_w=kp_w, bg_thresh=bg_thresh, crop=crop, stride=stride)
    scores = F.interpolate(scores, size=(H, W), mode="bilinear", align_corners=False)[0].float().cpu()
    return scores, scores.argmax(dim=0)
