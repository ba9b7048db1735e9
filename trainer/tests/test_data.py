"""Data sources (tar shards, folder, CSV, JSONL), bad samples skipped and counted, augmentation shapes."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tclseg_trainer.data import (
    AugmentConfig,
    DataError,
    ImageTextStream,
    collate,
    random_resized_crop,
    train_transform,
)

# 1 torch thread for these tests (cores are shared), restored afterwards: other modules assume 2.
pytestmark = pytest.mark.usefixtures("one_thread")


AUG = AugmentConfig(size=32)


def jpeg_bytes(color, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), color, dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_tar_shards_skip_and_count(tmp_path: Path):
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        add(tar, "000.jpg", jpeg_bytes(10))
        add(tar, "000.txt", b"a red square")
        add(tar, "001.jpg", b"not a jpeg at all")  # corrupt image
        add(tar, "001.txt", b"broken")
        add(tar, "002.jpg", jpeg_bytes(200))  # no caption
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        add(tar, "003.txt", b"caption without image")
        add(tar, "004.jpg", jpeg_bytes(90))
        add(tar, "004.txt", b"a blue circle")
    (tmp_path / "c.tar").write_bytes(b"\x00garbage" * 10)  # unreadable shard
    ds = ImageTextStream(str(tmp_path / "*.tar"), AUG, seed=0, shuffle_buffer=1, epochs=1)
    got = list(ds)
    assert sorted(c for _, c, _ in got) == ["a blue circle", "a red square"]
    assert all(x.shape == (3, 32, 32) for x, _, _ in got)
    assert ds.skips == {"bad image": 1, "missing caption": 1, "missing image": 1, "bad shard": 1}
    assert ds.skips.total == 4


def test_folder_csv_jsonl(tmp_path: Path):
    (tmp_path / "imgs").mkdir()
    for i, c in enumerate([30, 120, 220]):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpeg_bytes(c))
    (tmp_path / "imgs" / "0.txt").write_text("zero")
    (tmp_path / "imgs" / "1.txt").write_text("one")  # 2.jpg has no caption
    ds = ImageTextStream(str(tmp_path / "imgs"), AUG, epochs=1, shuffle_buffer=1)
    assert sorted(c for _, c, _ in ds) == ["one", "zero"]
    assert ds.skips == {"missing caption": 1}

    (tmp_path / "list.csv").write_text("image,caption\nimgs/0.jpg,zero\nimgs/missing.jpg,gone\nimgs/1.jpg,\n")
    ds = ImageTextStream(str(tmp_path / "list.csv"), AUG, epochs=1)
    assert [c for _, c, _ in ds] == ["zero"]
    assert ds.skips == {"missing image": 1, "missing caption": 1}

    lines = [json.dumps({"image": "imgs/2.jpg", "caption": "two"}), "{not json", json.dumps({"caption": "x"})]
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    ds = ImageTextStream(str(tmp_path / "list.jsonl"), AUG, epochs=1)
    assert [c for _, c, _ in ds] == ["two"]
    assert ds.skips.total == 2


def test_bad_sources_name_the_input(tmp_path: Path):
    with pytest.raises(DataError, match="no tar shards"):
        ImageTextStream(str(tmp_path / "*.tar"), AUG)
    (tmp_path / "l.csv").write_text("path,text\n")
    with pytest.raises(DataError, match="l.csv.*'image' and 'caption'"):
        ImageTextStream(str(tmp_path / "l.csv"), AUG)
    with pytest.raises(DataError, match="nope"):
        ImageTextStream(str(tmp_path / "nope"), AUG)


def test_ranks_split_the_samples(tmp_path: Path):
    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes(i * 40))
        (tmp_path / f"{i}.txt").write_text(f"c{i}")
    parts = [
        {c for _, c, _ in ImageTextStream(str(tmp_path), AUG, rank=r, world=2, epochs=1, shuffle_buffer=1)}
        for r in range(2)
    ]
    assert len(parts[0]) == 3 and len(parts[1]) == 3 and not parts[0] & parts[1]
    images, captions, skips = collate(take(ImageTextStream(str(tmp_path), AUG), 4))
    assert images.shape == (4, 3, 32, 32) and len(captions) == 4 and skips == {0: {}}


def test_augmentation_is_seeded_and_normalised():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    a = train_transform(img, AugmentConfig(size=48), random.Random(3))
    b = train_transform(img, AugmentConfig(size=48), random.Random(3))
    assert a.shape == (3, 48, 48) and torch.equal(a, b)
    assert random_resized_crop(img, 16, random.Random(0)).size == (16, 16)
    # without colour ops or erasing a full-image crop of a constant image normalises to ImageNet units
    flat = Image.new("RGB", (20, 20), (124, 116, 104))
    cfg = AugmentConfig(size=8, scale_min=1.0, color_jitter=0, rand_augment=False, erase_p=0)
    x = train_transform(flat, cfg, random.Random(0))
    assert x.abs().max().item() < 0.02
