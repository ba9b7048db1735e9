"""Whole-image reference inference: the unified evaluation protocol of TCL, made exact.

    prepare:  keep-ratio resize so the short side is 448 (long side capped at 2048), ImageNet normalisation;
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
    """mmcv keep-ratio rescale: the largest scale that fits both limits; sizes rounded half up."""
    scale = min(long_side_max / max(h, w), short_side / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def prepare(image_rgb_uint8: np.ndarray, short_side: int = 448, long_side_max: int = 2048) -> torch.Tensor:
    """HWC uint8 RGB -> normalised float32 [1, 3, h, w] at the evaluation scale.

    mmseg resizes with cv2 (bilinear) on uint8 pixels, which rounds to uint8 and uses cv2's own fixed-point
    bilinear. We deliberately fix something simpler and portable as the reference instead: float32 pixels in
    0..255, torch bilinear with align_corners=False and no antialiasing. The Rust runtime reproduces this
    exactly; against mmseg it differs by rounding only.
    """
    if image_rgb_uint8.ndim != 3 or image_rgb_uint8.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {image_rgb_uint8.shape}")
    h, w = image_rgb_uint8.shape[:2]
    x = torch.from_numpy(np.array(image_rgb_uint8, dtype=np.uint8)).permute(2, 0, 1)[None].float()
    nh, nw = rescale_size(h, w, short_side, long_side_max)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=False)
    mean = torch.tensor(MEAN).reshape(1, 3, 1, 1) * 255.0
    std = torch.tensor(STD).reshape(1, 3, 1, 1) * 255.0
    return (x - mean) / std


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
