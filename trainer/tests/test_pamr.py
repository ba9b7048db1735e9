from __future__ import annotations

import numpy as np
import pytest
import torch

from tclseg_trainer.pamr import PAMR

OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def slow_pamr(image: np.ndarray, masks: np.ndarray, num_iter: int, dilations) -> np.ndarray:
    """Direct per-pixel transcription of the PAMR formula (tcl.md 4.2), in float64.

    image [3, h, w], masks [N, h, w]. Replicate padding = clamping the neighbour coordinates.
    """
    C, h, w = image.shape

    def at(a, y, x):
        return a[..., min(max(y, 0), h - 1), min(max(x, 0), w - 1)]

    neighbours = [(d * dy, d * dx) for d in dilations for dy, dx in OFFSETS if (dy, dx) != (0, 0)]
    aff = np.zeros((len(neighbours), h, w))
    for y in range(h):
        for x in range(w):
            logits = np.zeros(len(neighbours))
            for c in range(C):
                # 9 samples (centre included) per dilation, pooled over all dilations: 54 values.
                samples = [at(image[c], y + d * dy, x + d * dx) for d in dilations for dy, dx in OFFSETS]
                std = np.std(samples, ddof=1)
                for k, (oy, ox) in enumerate(neighbours):
                    logits[k] += -abs(image[c, y, x] - at(image[c], y + oy, x + ox)) / (1e-8 + 0.1 * std)
            logits /= C
            e = np.exp(logits - logits.max())
            aff[:, y, x] = e / e.sum()
    m = masks.copy()
    for _ in range(num_iter):
        new = np.zeros_like(m)
        for y in range(h):
            for x in range(w):
                for k, (oy, ox) in enumerate(neighbours):
                    new[:, y, x] += aff[k, y, x] * at(m, y + oy, x + ox)
        m = new
    return m


@pytest.mark.parametrize("dilations,num_iter", [((1, 2, 4, 8, 12, 24), 10), ((1, 3), 2)])
def test_pamr_matches_direct_formula(dilations, num_iter):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 7, 9, generator=g)
    image[1, :, :3] = 0.5  # a flat region: std 0 there exercises the 1e-8 guard
    masks = torch.rand(2, 2, 7, 9, generator=g)
    got = PAMR(num_iter, dilations)(image, masks)
    assert got.shape == masks.shape
    for b in range(2):
        want = slow_pamr(image[b].double().numpy(), masks[b].double().numpy(), num_iter, dilations)
        np.testing.assert_allclose(got[b].numpy(), want, atol=1e-5, rtol=1e-4)


def test_pamr_defaults_and_properties():
    pamr = PAMR()
    assert pamr.num_iter == 10 and pamr.dilations == (1, 2, 4, 8, 12, 24)
    assert len(pamr.state_dict()) == 0  # constants only: nothing for a checkpoint
    g = torch.Generator().manual_seed(3)
    image = torch.randn(1, 3, 12, 10, generator=g)
    masks = torch.rand(1, 4, 12, 10, generator=g)
    out = pamr(image, masks)
    # A weighted average of neighbours: stays within the input range, constants stay constant.
    assert out.min() >= masks.min() - 1e-6 and out.max() <= masks.max() + 1e-6
    torch.testing.assert_close(pamr(image, torch.full_like(masks, 0.3)), torch.full_like(masks, 0.3))
    # Classes are independent: refining them together equals refining them one by one.
    one_by_one = torch.cat([pamr(image, masks[:, i : i + 1]) for i in range(4)], dim=1)
    torch.testing.assert_close(out, one_by_one, atol=1e-6, rtol=1e-5)
    assert (out - masks).abs().max() > 1e-3


def test_pamr_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pamr = PAMR(num_iter=3)
    image = torch.randn(1, 3, 16, 20)
    masks = torch.rand(1, 2, 16, 20)
    path = tmp_path / "pamr.onnx"
    torch.onnx.export(
        pamr,
        (image, masks),
        str(path),
        dynamo=False,
        opset_version=18,
        input_names=["image", "masks"],
        output_names=["refined"],
        dynamic_axes={"image": {0: "B"}, "masks": {0: "B", 1: "N"}},
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    masks5 = torch.rand(1, 5, 16, 20)  # a different class count than at export time
    (got,) = sess.run(None, {"image": image.numpy(), "masks": masks5.numpy()})
    np.testing.assert_allclose(got, pamr(image, masks5).numpy(), atol=1e-5, rtol=1e-4)
