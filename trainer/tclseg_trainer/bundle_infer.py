"""Whole-image inference through a model bundle's ONNX graphs: the algorithm the Rust engine copies.

This mirrors `reference.segment` step by step, with numpy on the host and ONNX Runtime for the graphs:

 1. prepare:   keep-ratio resize (short side 448, long side at most 2048; sizes rounded half up) of the uint8
               image with OpenCV's uint8 bilinear arithmetic (whole grey levels, as the official pipeline's
               cv2.resize), then ImageNet normalization -> [3, h, w] (`reference.rescale` / `reference.normalize`).
 2. windows:   mmseg's slide_inference grid of 448x448 windows with stride 224, clamped to the image.
 3. per crop, in batches: image_trunk -> tcl_head -> mask_head (with the normalized text embeddings)
               -> optional pamr -> kp blend M = kp_w * kp_masks + (1 - kp_w) * M
               -> bilinear (half-pixel) up-sampling from the stride-4 mask to the crop size.
 4. optional background: a constant channel bg_thresh put in front of the N classes, per crop.
 5. average over the windows (sum / count), bilinear resize to the original size, argmax (first index wins).

Text: every query is put into each template, the prompts are tokenized with CLIP's BPE (the bundle's vocabulary)
and encoded by text_encoder; per query the *un-normalized* embeddings are averaged over the templates and the
mean is L2-normalized (x / max(|x|, 1e-6)).

The one known deviation from the reference: a window is smaller than the graphs' fixed 448x448 input only when
the resized image itself has a side under 448 (aspect ratio above 2048/448). The reference then pads the crop
to a multiple of 16; here the crop is padded to 448 with zeros (the mean colour after normalization), split
evenly between the two sides (the odd pixel right/bottom), and the result is cut back to the crop.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .bundle import Bundle, open_bundle

# The host steps that need no model: one definition.
from .reference import crop_boxes, normalize, rescale

NORMALIZE_EPS = 1e-6
TEXT_CHUNK = 1024


# ---------------------------------------------------------------------------------------------------------------
# Numeric building blocks (numpy, float32).


def linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output index: the two source indices and the weight of the second, for bilinear sampling
    with half-pixel centres (PyTorch align_corners=False, ONNX pytorch_half_pixel / half_pixel).

    All in float32 like PyTorch's CPU kernel: scale = in / out, src = scale * (dst + 0.5) - 0.5, clamped at 0;
    i0 = floor(src), i1 = min(i0 + 1, in - 1), weight of i1 = src - i0.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, frac


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of the last two axes of x (float32) to size=(h, w), half-pixel centres, no antialiasing.

    Separable: first along the rows (height), then along the columns (width).
    """
    out_h, out_w = int(size[0]), int(size[1])
    in_h, in_w = x.shape[-2:]
    x = np.asarray(x, dtype=np.float32)
    if (in_h, in_w) == (out_h, out_w):
        return x.copy()
    r0, r1, fy = linear_taps(in_h, out_h)
    fy = fy.reshape(-1, 1)
    rows = x[..., r0, :] * (np.float32(1.0) - fy) + x[..., r1, :] * fy
    c0, c1, fx = linear_taps(in_w, out_w)
    return rows[..., c0] * (np.float32(1.0) - fx) + rows[..., c1] * fx


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """x / max(|x|, 1e-6) along `axis` (torch.nn.functional.normalize with the official eps)."""
    norm = np.sqrt(np.sum(np.square(x, dtype=np.float32), axis=axis, keepdims=True, dtype=np.float32))
    return (x / np.maximum(norm, np.float32(NORMALIZE_EPS))).astype(np.float32)


def prepare(
    image_rgb_uint8: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    short_side: int = 448,
    long_side_max: int = 2048,
) -> np.ndarray:
    """HxWx3 uint8 RGB -> normalized float32 [3, h, w] at the evaluation scale.

    The resize is OpenCV's uint8 bilinear, bit for bit (`reference.resize_uint8_bilinear`); mean and std are on
    0..1 pixels and are scaled by 255 as the official configs hold them.
    """
    return normalize(rescale(image_rgb_uint8, short_side, long_side_max), mean, std)


def pad_to(crop: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Zero-pads [3, h, w] (h, w <= size) to [3, size, size], split evenly (the odd pixel right/bottom).

    Returns the padded crop and (top, left), where the original crop starts.
    """
    _, h, w = crop.shape
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((crop.shape[0], size, size), dtype=np.float32)
    out[:, top : top + h, left : left + w] = crop
    return out, (top, left)


# ---------------------------------------------------------------------------------------------------------------
# The bundle's graphs behind ONNX Runtime.


class BundleRunner:
    """Runs a bundle's graphs with ONNX Runtime (CPU by default) and the host steps around them."""

    def __init__(
        self,
        bundle: Bundle | str | Path,
        *,
        precision: str = "fp32",
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
        verify: bool = True,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle, verify=verify)
        if precision not in ("fp32", "fp16", "int8"):
            raise ValueError(f"precision must be fp32, fp16 or int8, not {precision!r}")
        for role in ("image_trunk", "tcl_head"):
            if precision not in self.bundle.precisions(role):
                raise ValueError(f"model bundle {self.bundle.dir}: no {precision} '{role}' graph")
        self.precision = precision
        self.providers = list(providers)
        self.threads = threads
        self._sessions: dict[str, object] = {}
        m = self.bundle.manifest
        self.crop_size = int(m["input"]["crop_size"])
        self.crop_stride = int(m["input"]["crop_stride"])
        self.short_side = int(m["input"]["short_side"])
        self.long_side_max = int(m["input"]["long_side_max"])
        self.mean = [float(v) for v in m["input"]["mean"]]
        self.std = [float(v) for v in m["input"]["std"]]
        self.kp_weight = float(m["mask"]["kp_weight"])
        self.query_thresholds = {str(k): float(v) for k, v in m["mask"].get("query_thresholds", {}).items()}
        self.templates = list(m["text"]["templates"])
        self.context_length = int(m["architecture"]["context_length"])

    def session(self, role: str):
        """The ONNX Runtime session of a graph role (created on first use)."""
        if role not in self._sessions:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3  # errors only: fp16 graphs on CPU warn about constant folding
            if self.threads:
                options.intra_op_num_threads = self.threads
            path = self.bundle.graph(role, self.precision)
            self._sessions[role] = ort.InferenceSession(str(path), options, providers=self.providers)
        return self._sessions[role]

    def run(self, role: str, **inputs: np.ndarray) -> list[np.ndarray]:
        return self.session(role).run(None, inputs)

    # --- text -----------------------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        from .tokenizer import tokenize

        tokens = tokenize(list(prompts), self.context_length, truncate=True, vocab_path=self.bundle.vocabulary)
        return tokens.numpy().astype(np.int64)

    def encode_text(self, tokens: np.ndarray) -> np.ndarray:
        """tokens int64 [T, 77] -> [T, E], not normalized; in chunks of 1024 prompts."""
        chunks = [
            self.run("text_encoder", tokens=np.ascontiguousarray(tokens[i : i + TEXT_CHUNK]))[0]
            for i in range(0, len(tokens), TEXT_CHUNK)
        ]
        return np.concatenate(chunks, axis=0).astype(np.float32)

    def text_embedding(self, queries: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """[N, E] L2-normalized: per query, the mean over templates of the un-normalized embeddings."""
        templates = self.templates if templates is None else list(templates)
        prompts = [t.format(q) for q in queries for t in templates]
        emb = self.encode_text(self.tokenize(prompts))
        emb = emb.reshape(len(queries), len(templates), -1).mean(axis=1, dtype=np.float32)
        return l2_normalize(emb, axis=-1)

    # --- image ----------------------------------------------------------------------------------------------

    def crop_masks(self, crops: np.ndarray, text: np.ndarray, *, pamr: bool, kp_w: float) -> np.ndarray:
        """crops [B, 3, S, S] normalized, text [N, E] normalized -> soft masks [B, N, S, S]."""
        (tokens,) = self.run("image_trunk", pixels=crops)
        dense, kp_feat = self.run("tcl_head", tokens=tokens)
        masks, kp_masks = self.run("mask_head", dense=dense, kp_feat=kp_feat, text=text)
        if pamr:
            (masks,) = self.run("pamr", pixels=crops, masks=masks)
        if kp_w:
            masks = np.float32(kp_w) * kp_masks + np.float32(1.0 - kp_w) * masks
        return resize_bilinear(masks, (crops.shape[-2], crops.shape[-1]))

    def calibrated_thresholds(self, queries: Sequence[str]) -> list[float | None]:
        """Per query, the bundle's calibrated threshold ([mask.query_thresholds]) for its name, if any."""
        return [self.query_thresholds.get(q.strip()) for q in queries]

    def segment(
        self,
        image_rgb_uint8: np.ndarray,
        text_emb: np.ndarray,
        *,
        pamr: bool = True,
        kp_w: float | None = None,
        bg_thresh: float | None = None,
        query_thresholds: Sequence[float | None] | None = None,
        batch_size: int = 2,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Segment one image. Returns scores [C, H, W] float32 and labels [H, W] int64 at the original size.

        With bg_thresh set, channel 0 is the constant background score and query n is label n + 1; then
        `query_thresholds` (one per query, e.g. `calibrated_thresholds`) make a pixel background where its winning
        query scores under that query's value, as the engine does. kp_w defaults to the bundle's kp_weight.
        """
        kp_w = self.kp_weight if kp_w is None else float(kp_w)
        text = np.ascontiguousarray(text_emb, dtype=np.float32)
        H, W = image_rgb_uint8.shape[:2]
        image = prepare(image_rgb_uint8, self.mean, self.std, self.short_side, self.long_side_max)
        scores = self.slide(image, text, pamr=pamr, kp_w=kp_w, bg_thresh=bg_thresh, batch_size=batch_size)
        scores = resize_bilinear(scores, (H, W))
        labels = scores.argmax(axis=0)
        if bg_thresh is not None and query_thresholds is not None:
            labels = apply_query_thresholds(scores, labels, query_thresholds)
        return scores, labels

    def slide(
        self,
        image: np.ndarray,
        text: np.ndarray,
        *,
        pamr: bool,
        kp_w: float,
        bg_thresh: float | None,
        batch_size: int = 2,
    ) -> np.ndarray:
        """Sliding-window scores [C, h, w] of a prepared image [3, h, w], averaged over the windows."""
        S = self.crop_size
        _, h, w = image.shape
        n = text.shape[0] + (bg_thresh is not None)
        total = np.zeros((n, h, w), dtype=np.float32)
        count = np.zeros((1, h, w), dtype=np.float32)
        boxes = crop_boxes(h, w, S, self.crop_stride)
        for start in range(0, len(boxes), max(1, batch_size)):
            batch = boxes[start : start + max(1, batch_size)]
            crops, offsets = [], []
            for y1, y2, x1, x2 in batch:
                crop, offset = pad_to(image[:, y1:y2, x1:x2], S)
                crops.append(crop)
                offsets.append(offset)
            masks = self.crop_masks(np.stack(crops), text, pamr=pamr, kp_w=kp_w)
            for (y1, y2, x1, x2), (top, left), m in zip(batch, offsets, masks, strict=True):
                m = m[:, top : top + (y2 - y1), left : left + (x2 - x1)]
                if bg_thresh is not None:
                    bg = np.full((1, *m.shape[1:]), bg_thresh, dtype=np.float32)
                    m = np.concatenate([bg, m], axis=0)
                total[:, y1:y2, x1:x2] += m
                count[:, y1:y2, x1:x2] += 1
        return total / count


def apply_query_thresholds(scores: np.ndarray, labels: np.ndarray, thresholds: Sequence[float | None]) -> np.ndarray:
    """Labels with the background class 0 in front: where query n (label n + 1) wins with a score under
    thresholds[n], the pixel becomes background."""
    limit = np.array([-np.inf] + [-np.inf if t is None else t for t in thresholds], dtype=np.float32)
    best = np.take_along_axis(scores, labels[None], axis=0)[0]
    return np.where(best < limit[labels], 0, labels)


def segment(
    bundle: Bundle | str | Path,
    image_rgb_uint8: np.ndarray,
    queries: Sequence[str],
    *,
    pamr: bool = True,
    kp_w: float | None = None,
    bg_thresh: float | None = None,
    precision: str = "fp32",
) -> tuple[np.ndarray, np.ndarray]:
    """One-shot convenience: text embeddings for `queries`, then BundleRunner.segment."""
    runner = BundleRunner(bundle, precision=precision)
    text = runner.text_embedding(queries)
    return runner.segment(image_rgb_uint8, text, pamr=pamr, kp_w=kp_w, bg_thresh=bg_thresh)
