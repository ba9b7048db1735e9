"""The parts of the official-heads comparison that run without the official code: the sliding windows, our side of
the protocol on a tiny CLIP, the framework shims, the comparison itself. The comparison against the official code
runs in scripts/test-heads-official."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tclseg_trainer.clip import CLIP
from tclseg_trainer.heads import dense_features
from tclseg_trainer.model import SIZES
from tclseg_trainer.tools import heads_parity


def test_windows_cover_the_image_with_whole_crops_inside_it():
    for h, w, crop, stride in [(300, 451, 224, 112), (336, 504, 224, 112), (300, 451, 448, 224), (224, 224, 224, 112)]:
        count = np.zeros((h, w), np.int64)
        boxes = heads_parity.windows(h, w, crop, stride)
        for y1, y2, x1, x2 in boxes:
            assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
            assert y2 - y1 == min(crop, h) and x2 - x1 == min(crop, w)
            count[y1:y2, x1:x2] += 1
        assert count.min() >= 1, (h, w, crop, stride)
    # 300 x 451 with 224 windows every 112: 2 rows x 4 columns, the last of each pushed back to the edge.
    boxes = heads_parity.windows(300, 451, 224, 112)
    assert len(boxes) == 8 and boxes[-1] == (76, 300, 227, 451)
    assert heads_parity.windows(224, 224, 224, 112) == [(0, 224, 0, 224)]


@pytest.fixture(scope="module")
def tiny_clip() -> CLIP:
    size = SIZES["tiny"]
    return CLIP(size.vision, size.text, seed=0).eval()


def _text(tiny_clip: CLIP, n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return F.normalize(torch.randn(n, tiny_clip.visual.proj.shape[1], generator=g), dim=-1)


def test_ours_on_one_window_is_the_head_upsampled_and_softmaxed(tiny_clip: CLIP):
    """An image smaller than the window is one window: the logits are the head's cosines, bilinearly stretched over
    the image (a side that is no multiple of 16 loses its remainder to the patch embedding, as the official
    NACLIP/SCLIP/PEARL code's does), and the probabilities their softmax at the method's scale."""
    text = _text(tiny_clip)
    pixels = torch.randn(1, 3, 70, 90, generator=torch.Generator().manual_seed(1))
    out = heads_parity.run_ours(tiny_clip, "naclip", pixels, text)
    with torch.no_grad():
        feats = dense_features(tiny_clip.visual, "naclip", pixels[:, :, :64, :80])
        want = F.interpolate(torch.einsum("behw,ne->bnhw", feats, text), size=(70, 90), mode="bilinear")[0]
    assert out["logits"].shape == (3, 70, 90)
    np.testing.assert_allclose(out["logits"], want.numpy(), atol=1e-6)
    probs = torch.from_numpy(out["logits"] * heads_parity.METHODS["naclip"]["kwargs"]["logit_scale"]).softmax(0)
    np.testing.assert_allclose(out["probs"], probs.numpy(), atol=1e-6)
    np.testing.assert_array_equal(out["labels"], out["probs"].argmax(0))


def test_ours_pads_clearclip_windows_to_whole_patches_and_cuts_back(tiny_clip: CLIP):
    text = _text(tiny_clip)
    pixels = torch.randn(1, 3, 70, 90, generator=torch.Generator().manual_seed(2))
    out = heads_parity.run_ours(tiny_clip, "clearclip", pixels, text)
    # 70 -> 80 (5 above, 5 below), 90 -> 96 (3 left, 3 right).
    with torch.no_grad():
        padded = F.pad(pixels, (3, 3, 5, 5))
        feats = dense_features(tiny_clip.visual, "clearclip", padded)
        logits = F.interpolate(torch.einsum("behw,ne->bnhw", feats, text), size=(80, 96), mode="bilinear")
    np.testing.assert_allclose(out["logits"], logits[0, :, 5:75, 3:93].numpy(), atol=1e-6)


def test_ours_averages_overlapping_windows(tiny_clip: CLIP):
    """Where two windows overlap, the logits are the mean of both windows' logits."""
    text = _text(tiny_clip)
    pixels = torch.randn(1, 3, 224, 336, generator=torch.Generator().manual_seed(4))
    out = heads_parity.run_ours(tiny_clip, "sclip", pixels, text)
    boxes = heads_parity.windows(224, 336, 224, 112)
    assert len(boxes) == 2
    with torch.no_grad():
        each = [
            F.interpolate(
                torch.einsum("behw,ne->bnhw", dense_features(tiny_clip.visual, "sclip", pixels[:, :, :, x1:x2]), text),
                size=(224, 224),
                mode="bilinear",
            )[0]
            for _, _, x1, x2 in boxes
        ]
    np.testing.assert_allclose(
        out["logits"][:, :, 112:224], ((each[0][:, :, 112:] + each[1][:, :, :112]) / 2), atol=1e-6
    )
    np.testing.assert_allclose(out["logits"][:, :, :112], each[0][:, :, :112], atol=1e-6)


@pytest.fixture
def restored_modules():
    """sys.modules as it was after the test: the shims leave no fake mmseg behind for other tests."""
    before = dict(sys.modules)
    yield
    for name in set(sys.modules) - set(before):
        del sys.modules[name]
    sys.modules.update(before)


def test_framework_shims_stand_in_for_mmseg_without_computing(restored_modules):
    heads_parity.install_framework_shims()
    from mmengine.structures import PixelData
    from mmseg.models.data_preprocessor import SegDataPreProcessor
    from mmseg.models.segmentors import BaseSegmentor
    from mmseg.registry import MODELS

    class Segmentor(BaseSegmentor):
        pass

    assert MODELS.register_module()(Segmentor) is Segmentor
    pre = SegDataPreProcessor(mean=[1.0], std=[2.0], rgb_to_bgr=True)
    seg = Segmentor(data_preprocessor=pre)
    assert isinstance(seg, torch.nn.Module) and seg.data_preprocessor.settings["std"] == [2.0]
    assert PixelData(data=torch.ones(2)).data.sum() == 2
    from BLIP.models.blip_retrieval import blip_retrieval

    with pytest.raises(RuntimeError, match="clip_type='BLIP'"):
        blip_retrieval(pretrained="x")


def test_compare_reports_the_largest_differences_and_label_agreement(tmp_path):
    ref = {
        "logits": np.zeros((2, 4, 5), np.float32),
        "probs": np.full((2, 4, 5), 0.5, np.float32),
        "labels": np.zeros((4, 5), np.int64),
    }
    for key, value in ref.items():
        np.save(tmp_path / f"img.{key}.npy", value)
    ours = {k: v.copy() for k, v in ref.items()}
    ours["logits"][1, 2, 3] = 3e-4
    ours["probs"][0, 0, 0] = 0.5 - 2e-5
    ours["labels"][0, :2] = 1
    row = heads_parity.compare(tmp_path, ours, "img")
    assert row["logits"] == pytest.approx(3e-4) and row["probs"] == pytest.approx(2e-5, rel=1e-3)
    assert row["labels_equal"] == pytest.approx(18 / 20) and row["classes"] == 1
    ours["labels"] = ours["labels"][:3]
    with pytest.raises(SystemExit, match="labels"):
        heads_parity.compare(tmp_path, ours, "img")
