"""Image-caption data for training: webdataset tar shards, a folder, or a CSV/JSONL list; TCL's augmentations.

Sources (`open_source`):
- **tar shards** (`*.tar`, glob patterns allowed): webdataset layout, members grouped by key (the name up to the
  first dot): `<key>.jpg|jpeg|png|webp` + `<key>.txt`. Read with the standard `tarfile` module.
- **folder**: every image with a sidecar caption `<stem>.txt` next to it.
- **CSV** (`.csv`, header with `image` and `caption` columns) or **JSONL** (`.jsonl`, `{"image": ..., "caption":
  ...}` per line); relative image paths are relative to the list file.

A bad sample (unreadable or missing image, missing or empty caption, unreadable shard) is skipped and counted in
`SkipCounter` under a reason, never fatal. Samples are split across processes and loader workers round-robin.

Augmentation (tcl.md §3, timm's `create_transform(224, is_training=True)` rebuilt on PIL since timm and
torchvision are not dependencies): RandomResizedCrop scale (0.08, 1) ratio (3/4, 4/3) bilinear; horizontal flip
0.5; ColorJitter 0.4 (brightness, contrast, saturation); RandAugment with 2 ops at magnitude 9 (std 0.5, the
"increasing" op set); RandomErasing p 0.25, one box, per-pixel normal noise; ImageNet normalisation.

Labelled sets for evaluation (`load_eval_set`, `miou`): classes.txt (background first), images/, labels/.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import random
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from .model import MEAN, STD

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


class DataError(RuntimeError):
    """A data source that cannot be used at all (missing path, no samples, bad list header)."""


class SkipCounter(Counter):
    """Skipped samples by reason ("bad image", "missing caption", ...)."""

    @property
    def total(self) -> int:  # type: ignore[override]
        return sum(self.values())


# ---------------------------------------------------------------------------------------------------------
# Raw samples: (name, image bytes or path, caption)


@dataclass
class RawSample:
    name: str
    image: bytes | Path | None
    caption: str | None


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def iter_tar(path: Path, skips: SkipCounter) -> Iterator[RawSample]:
    """Samples of one webdataset shard; a truncated or unreadable shard ends with a counted skip."""
    try:
        with tarfile.open(path, "r|*") as tar:
            key, image, caption = None, None, None
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                k, _, ext = base.partition(".")
                k = os.path.join(os.path.dirname(member.name), k)
                if k != key:
                    if key is not None:
                        yield RawSample(f"{path.name}:{key}", image, caption)
                    key, image, caption = k, None, None
                data = tar.extractfile(member).read()
                if _is_image(base):
                    image = data
                elif ext.lower() == "txt":
                    caption = data.decode("utf-8", errors="replace")
            if key is not None:
                yield RawSample(f"{path.name}:{key}", image, caption)
    except (tarfile.TarError, OSError, EOFError):
        skips["bad shard"] += 1


def list_folder(root: Path) -> list[RawSample]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and _is_image(p.name):
            cap = p.with_suffix(".txt")
            out.append(RawSample(str(p), p, cap.read_text(encoding="utf-8") if cap.is_file() else None))
    return out


def list_table(path: Path) -> list[RawSample]:
    rows: list[dict] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
                raise DataError(f"{path}: the CSV header must name the columns 'image' and 'caption'")
            rows = list(reader)
    else:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        rows.append({"image": None, "caption": None, "_line": i})
    out = []
    for i, r in enumerate(rows):
        img = r.get("image") if isinstance(r, dict) else None
        p = (path.parent / img) if img else None
        out.append(RawSample(f"{path.name}:{i}", p, r.get("caption") if isinstance(r, dict) else None))
    return out


def open_source(spec: str) -> tuple[str, list]:
    """("tar", [shard paths]) or ("list", [RawSample]) for a path, a glob, or comma-separated globs."""
    parts = [s.strip() for s in spec.split(",") if s.strip()]
    if not parts:
        raise DataError("empty data source")
    if all(p.endswith(".tar") for p in parts):
        shards = sorted({Path(s) for p in parts for s in glob.glob(p)})
        if not shards:
            raise DataError(f"{spec}: no tar shards match")
        return "tar", shards
    if len(parts) != 1:
        raise DataError(f"{spec}: several sources must all be .tar shard patterns")
    p = Path(parts[0])
    if p.is_dir():
        samples = list_folder(p)
    elif p.is_file() and p.suffix.lower() in (".csv", ".jsonl"):
        samples = list_table(p)
    else:
        raise DataError(f"{p}: not a folder, a .csv/.jsonl list or .tar shards")
    if not samples:
        raise DataError(f"{p}: no samples found")
    return "list", samples


# ---------------------------------------------------------------------------------------------------------
# Augmentation


def random_resized_crop(img: Image.Image, size: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    W, H = img.size
    area = W * H
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= W and 0 < h <= H:
            x, y = rng.randint(0, W - w), rng.randint(0, H - h)
            return img.resize((size, size), Image.BILINEAR, box=(x, y, x + w, y + h))
    # fallback: central crop at the clamped ratio
    in_ratio = W / H
    if in_ratio < ratio[0]:
        w, h = W, int(round(W / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = H, int(round(H * ratio[1]))
    else:
        w, h = W, H
    x, y = (W - w) // 2, (H - h) // 2
    return img.resize((size, size), Image.BILINEAR, box=(x, y, x + w, y + h))


def color_jitter(img: Image.Image, rng: random.Random, strength: float = 0.4) -> Image.Image:
    ops = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    rng.shuffle(ops)
    for op in ops:
        img = op(img).enhance(rng.uniform(max(0.0, 1 - strength), 1 + strength))
    return img


def _rand_augment_op(img: Image.Image, name: str, m: float, rng: random.Random) -> Image.Image:
    """One RandAugment op at magnitude m in [0, 10] ("increasing": larger m is always stronger)."""
    f = m / 10.0
    sign = 1 if rng.random() < 0.5 else -1
    fill = (124, 116, 104)
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(sign * 30 * f, resample=Image.BILINEAR, fillcolor=fill)
    if name == "PosterizeIncreasing":
        return ImageOps.posterize(img, max(1, 8 - int(4 * f)))
    if name == "SolarizeIncreasing":
        return ImageOps.solarize(img, 256 - int(256 * f))
    if name == "SolarizeAdd":
        arr = np.asarray(img).astype(np.int16) + int(110 * f)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        enh = {
            "ColorIncreasing": ImageEnhance.Color,
            "ContrastIncreasing": ImageEnhance.Contrast,
            "BrightnessIncreasing": ImageEnhance.Brightness,
            "SharpnessIncreasing": ImageEnhance.Sharpness,
        }[name]
        return enh(img).enhance(max(0.1, 1.0 + sign * 0.9 * f))
    if name in ("ShearX", "ShearY"):
        s = sign * 0.3 * f
        data = (1, s, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, s, 1, 0)
        return img.transform(img.size, Image.AFFINE, data, resample=Image.BILINEAR, fillcolor=fill)
    if name in ("TranslateXRel", "TranslateYRel"):
        t = sign * 0.45 * f
        dx, dy = (t * img.size[0], 0) if name == "TranslateXRel" else (0, t * img.size[1])
        return img.transform(img.size, Image.AFFINE, (1, 0, dx, 0, 1, dy), resample=Image.BILINEAR, fillcolor=fill)
    raise ValueError(f"unknown RandAugment op {name}")


RAND_AUGMENT_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


def rand_augment(img: Image.Image, rng: random.Random, n: int = 2, m: float = 9.0, mstd: float = 0.5) -> Image.Image:
    for name in rng.choices(RAND_AUGMENT_OPS, k=n):
        if rng.random() < 0.5:  # timm applies each chosen op with probability 0.5
            mag = min(10.0, max(0.0, rng.gauss(m, mstd)))
            img = _rand_augment_op(img, name, mag, rng)
    return img


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (arr - mean) / std


def random_erasing(x: torch.Tensor, rng: random.Random, p: float = 0.25, scale=(0.02, 1 / 3), ratio=(0.3, 3.3)):
    """timm RandomErasing, mode 'pixel', count 1: one box of per-pixel normal noise (in normalised units)."""
    if rng.random() >= p:
        return x
    _, H, W = x.shape
    for _ in range(10):
        area = H * W * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if h < H and w < W:
            y, x0 = rng.randint(0, H - h), rng.randint(0, W - w)
            gen = torch.Generator().manual_seed(rng.getrandbits(32))
            x = x.clone()
            x[:, y : y + h, x0 : x0 + w] = torch.randn(3, h, w, generator=gen)
            return x
    return x


@dataclass
class AugmentConfig:
    size: int = 224
    scale_min: float = 0.08
    hflip: float = 0.5
    color_jitter: float = 0.4
    rand_augment: bool = True
    erase_p: float = 0.25


def train_transform(img: Image.Image, cfg: AugmentConfig, rng: random.Random) -> torch.Tensor:
    img = random_resized_crop(img.convert("RGB"), cfg.size, rng, scale=(cfg.scale_min, 1.0))
    if rng.random() < cfg.hflip:
        img = ImageOps.mirror(img)
    if cfg.color_jitter > 0:
        img = color_jitter(img, rng, cfg.color_jitter)
    if cfg.rand_augment:
        img = rand_augment(img, rng)
    x = to_normalized_tensor(img)
    return random_erasing(x, rng, cfg.erase_p) if cfg.erase_p > 0 else x


# ---------------------------------------------------------------------------------------------------------
# The dataset


def decode(sample: RawSample, skips: SkipCounter) -> tuple[Image.Image, str] | None:
    """(RGB image, caption) or None after counting why the sample is unusable."""
    if sample.caption is None or not sample.caption.strip():
        skips["missing caption"] += 1
        return None
    if sample.image is None:
        skips["missing image"] += 1
        return None
    try:
        src = io.BytesIO(sample.image) if isinstance(sample.image, bytes) else sample.image
        with Image.open(src) as im:
            im.load()
            img = im.convert("RGB")
    except FileNotFoundError:
        skips["missing image"] += 1
        return None
    except (OSError, ValueError, Image.DecompressionBombError):
        skips["bad image"] += 1
        return None
    return img, sample.caption.strip()


class ImageTextStream(torch.utils.data.IterableDataset):
    """Endless stream of (image [3, S, S], caption) for one process, reshuffled each epoch.

    Samples (list sources) or shards (tar) are dealt round-robin to (rank, worker); a shuffle buffer of
    `shuffle_buffer` samples mixes within a shard stream. `skips` counts bad samples seen by this object (in the
    main process when num_workers is 0; loader workers report theirs through the batch, see `collate`).
    """

    def __init__(
        self,
        source: str,
        augment: AugmentConfig,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        shuffle_buffer: int = 1000,
        epochs: int | None = None,
    ):
        self.kind, self.items = open_source(source)
        self.augment = augment
        self.seed, self.rank, self.world = seed, rank, world
        self.shuffle_buffer = shuffle_buffer
        self.epochs = epochs
        self.skips = SkipCounter()

    def _raw(self, rng: random.Random, slot: int, slots: int) -> Iterator[RawSample]:
        items = list(self.items)
        rng.shuffle(items)
        mine = items[slot::slots]
        if self.kind == "list":
            yield from mine
        else:
            for shard in mine:
                yield from iter_tar(shard, self.skips)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = self.rank * nw + wid, self.world * nw
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            # every process shuffles the item list the same way (same seed), then takes its own slice
            rng = random.Random(f"{self.seed}-{epoch}")
            aug_rng = random.Random(f"{self.seed}-{epoch}-{slot}")
            buffer: list[tuple[Image.Image, str]] = []
            produced = False
            for raw in self._raw(rng, slot, slots):
                got = decode(raw, self.skips)
                if got is None:
                    continue
                buffer.append(got)
                if len(buffer) >= self.shuffle_buffer:
                    img, cap = buffer.pop(aug_rng.randrange(len(buffer)))
                    produced = True
                    yield train_transform(img, self.augment, aug_rng), cap, (wid, dict(self.skips))
            aug_rng.shuffle(buffer)
            for img, cap in buffer:
                produced = True
                yield train_transform(img, self.augment, aug_rng), cap, (wid, dict(self.skips))
            if not produced:
                raise DataError(f"no usable samples for process {self.rank} worker {wid} ({dict(self.skips)})")
            epoch += 1


def collate(batch: list) -> tuple[torch.Tensor, list[str], dict]:
    """Stacks images; returns {worker id: its running skip counts} (the latest seen in the batch)."""
    images = torch.stack([b[0] for b in batch])
    captions = [b[1] for b in batch]
    skips: dict[int, dict] = {}
    for _, _, (wid, counts) in batch:
        prev = skips.get(wid, {})
        skips[wid] = counts if sum(counts.values()) >= sum(prev.values()) else prev
    return images, captions, skips


# ---------------------------------------------------------------------------------------------------------
# Labelled sets (the trainer's in-training evaluation, the synthetic world's score): one reader and one mIoU.
# The layout is `tclseg eval --dataset folder`'s; src/eval/datasets.rs reads the same files on the Rust side.


def load_eval_set(root: str, max_images: int = 0) -> tuple[list[str], list[tuple[Path, Path]]]:
    """The labelled-folder layout of `tclseg eval --dataset folder`: classes.txt (one class per line in label order;
    the first must be `background`, scored by threshold; `name: prompts` keeps the name), images/<stem>.*,
    labels/<stem>.png (255 = ignore). Returns the class names after background, and the (image, label) pairs."""
    r = Path(root)
    classes_file = r / "classes.txt"
    if not classes_file.is_file():
        raise DataError(f"{classes_file}: an evaluation set needs classes.txt")
    lines = [c.split(":")[0].strip() for c in classes_file.read_text(encoding="utf-8").splitlines() if c.strip()]
    if not lines or lines[0] != "background":
        found = repr(lines[0]) if lines else "nothing"
        raise DataError(f"{classes_file}: the first class must be 'background' (label 0), found {found}")
    classes = lines[1:]
    pairs = []
    for img in sorted((r / "images").glob("*")):
        lab = r / "labels" / (img.stem + ".png")
        if lab.is_file():
            pairs.append((img, lab))
    if not pairs:
        raise DataError(f"{r}: no images/<stem> with labels/<stem>.png")
    return classes, pairs[: max_images or None]


def miou(preds: list[np.ndarray], labels: list[np.ndarray], n_classes: int) -> float:
    """Mean over classes present (union > 0) of intersection / union, accumulated over the set; 255 ignored."""
    ious = class_iou(preds, labels, n_classes)
    present = ~np.isnan(ious)
    return float(ious[present].mean()) if present.any() else float("nan")


def class_iou(preds: list[np.ndarray], labels: list[np.ndarray], n_classes: int) -> np.ndarray:
    """IoU per class [n_classes], accumulated over the set, 255 ignored (NaN where the union is empty)."""
    inter = np.zeros(n_classes)
    union = np.zeros(n_classes)
    for p, g in zip(preds, labels, strict=True):
        valid = g != 255
        p, g = p[valid], g[valid]
        for k in range(n_classes):
            pk, gk = p == k, g == k
            inter[k] += np.logical_and(pk, gk).sum()
            union[k] += np.logical_or(pk, gk).sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)
