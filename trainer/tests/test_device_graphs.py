"""The device path's pre- and postprocessing graphs: committed bytes, op set, and numbers against bundle_infer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tclseg_trainer import device_graphs as dg
from tclseg_trainer.bundle_infer import pad_to, prepare, resize_bilinear
from tclseg_trainer.export import CUDA_SAFE_OPS, graph_op_types_of
from tclseg_trainer.reference import crop_boxes, pixel_statistics, rescale, rescale_size

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "src" / "model" / "graphs"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def session(data: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def spans(boxes, axis: int) -> list[tuple[int, int]]:
    """The distinct window spans along one axis (rows: axis 0, columns: axis 1), in order."""
    out: list[tuple[int, int]] = []
    for y1, y2, x1, x2 in boxes:
        span = (y1, y2) if axis == 0 else (x1, x2)
        if span not in out:
            out.append(span)
    return out


def test_committed_graphs_are_what_this_module_writes(tmp_path):
    for path in dg.write(tmp_path):
        committed = COMMITTED / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale: run `python -m tclseg_trainer.device_graphs --out src/model/graphs`"
        )


def test_graphs_use_only_cuda_safe_ops():
    import onnx

    for build in (dg.crops_graph, dg.labels_graph):
        ops = graph_op_types_of(onnx.load_from_string(build()))
        assert ops <= CUDA_SAFE_OPS, sorted(ops - CUDA_SAFE_OPS)


# Sizes: one window; a row of windows that overlap; a grid; a short window padded into the crop.
CASES = [((48, 48), 32, 16, 32), ((40, 90), 32, 16, 32), ((70, 50), 32, 16, 32), ((20, 300), 32, 16, 64)]


@pytest.mark.parametrize("size,crop,stride,short", CASES)
def test_crops_graph_cuts_the_reference_windows(size, crop, stride, short):
    """The frames arrive resized (OpenCV's arithmetic, on the host); the graph's windows equal bundle_infer's
    prepared crops bit for bit, padding included."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, *size, 3), dtype=np.uint8)
    h, w = rescale_size(*size, short, 4 * short)
    boxes = crop_boxes(h, w, crop, stride)
    mean, std = pixel_statistics(MEAN, STD)
    feeds = {
        "image": np.stack([rescale(img, short, 4 * short) for img in images]),
        "rows": dg.crop_matrices(h, spans(boxes, 0), crop),
        "cols": dg.crop_matrices(w, spans(boxes, 1), crop),
        "mean": mean,
        "std": std,
    }
    (pixels,) = session(dg.crops_graph()).run(["pixels"], feeds)
    assert pixels.shape == (2 * len(boxes), 3, crop, crop)
    for i, img in enumerate(images):
        prepared = prepare(img, MEAN, STD, short, 4 * short)
        for k, (y1, y2, x1, x2) in enumerate(boxes):
            expected, _ = pad_to(prepared[:, y1:y2, x1:x2], crop)
            np.testing.assert_array_equal(pixels[i * len(boxes) + k], expected)


@pytest.mark.parametrize("size,crop,stride,short", CASES)
@pytest.mark.parametrize("background", [None, 0.55])
def test_labels_graph_averages_and_resizes_like_bundle_infer(size, crop, stride, short, background):
    rng = np.random.default_rng(1)
    side, n, images, kp = crop // 4, 3, 2, np.float32(0.3)
    h, w = rescale_size(*size, short, 4 * short)
    boxes = crop_boxes(h, w, crop, stride)
    masks = rng.random((images * len(boxes), n, side, side), dtype=np.float32)
    kp_masks = rng.random(masks.shape, dtype=np.float32)
    feeds = {
        "masks": masks,
        "kp_masks": kp_masks,
        "kp_weight": np.array([kp], np.float32),
        "rows": dg.label_matrices(size[0], h, spans(boxes, 0), crop, side),
        "cols": dg.label_matrices(size[1], w, spans(boxes, 1), crop, side),
        "background": np.array([-np.inf if background is None else background], np.float32),
        "label_offset": np.array([0 if background is None else 1], np.int64),
    }
    labels, best, scores = session(dg.labels_graph()).run(["labels", "best", "scores"], feeds)
    assert labels.dtype == np.uint16 and labels.shape == (images, *size)
    for i in range(images):
        total = np.zeros((n, h, w), np.float32)
        count = np.zeros((h, w), np.float32)
        for k, (y1, y2, x1, x2) in enumerate(boxes):
            m = kp * kp_masks[i * len(boxes) + k] + (np.float32(1) - kp) * masks[i * len(boxes) + k]
            up = resize_bilinear(m, (crop, crop))
            top, left = (crop - (y2 - y1)) // 2, (crop - (x2 - x1)) // 2
            total[:, y1:y2, x1:x2] += up[:, top : top + y2 - y1, left : left + x2 - x1]
            count[y1:y2, x1:x2] += 1
        expected = resize_bilinear(total / count, size)
        np.testing.assert_allclose(scores[i], expected, atol=1e-5)
        if background is None:
            want = expected.argmax(0)
        else:
            want = np.where(expected.max(0) > background, expected.argmax(0) + 1, 0)
        # Labels agree wherever the top two scores are not within rounding of each other.
        ordered = np.sort(np.concatenate([expected, np.full((1, *size), background or -np.inf)]), axis=0)
        clear = ordered[-1] - ordered[-2] > 1e-5
        assert np.array_equal(labels[i][clear], want[clear])
        assert clear.mean() > 0.99
        np.testing.assert_allclose(best[i], np.maximum(expected.max(0), background or -np.inf), atol=1e-5)
