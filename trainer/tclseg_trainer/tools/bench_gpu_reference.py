"""bench_gpu's PyTorch side: the reference batched (every window of several images in one model batch), at fp32 or
under autocast with PAMR kept in fp32, and the child process that times it (`bench_gpu --reference`)."""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..model import SIZES, TCL, TEMPLATES
from ..reference import crop_boxes, prepare
from .bench_gpu_measure import CROP, LONG_SIDE_MAX, SHORT_SIDE, STRIDE, crops_of, latency_stats
from .bench_segment import QUERIES

KP_W = 0.3


class Fp32Pamr(nn.Module):
    """PAMR with autocast switched off: its affinity divides by (1e-8 + 0.1 * local std), and 1e-8 is zero in
    float16, so flat image regions would give 0/0. tclseg's PAMR is fp32 at every precision as well."""

    def __init__(self, pamr: nn.Module):
        super().__init__()
        self.inner = pamr

    def forward(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        with torch.autocast(image.device.type, enabled=False):
            return self.inner(image.float(), masks.float())


@torch.no_grad()
def segment_batch(
    model: TCL,
    images: list[np.ndarray],
    text_emb: torch.Tensor,
    *,
    pamr: bool = True,
    kp_w: float = KP_W,
    bg_thresh: float | None = None,
    crop: int = CROP,
    stride: int = STRIDE,
    short_side: int = SHORT_SIDE,
    long_side_max: int = LONG_SIDE_MAX,
    autocast: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """`reference.segment` for several images at once: label maps [H, W] int64 (on the CPU), one per image.

    Every window of every image goes through `generate_masks` in one batch (windows of another shape, from
    images too narrow for a full window, in a batch of their own). Then, as `reference.segment_crops`: the
    background channel, the average over windows, the bilinear resize to the original size and the argmax.
    `autocast` runs the model under torch.autocast with that dtype; accumulation stays fp32.
    """
    device = text_emb.device
    prepared = [prepare(img, short_side, long_side_max).to(device) for img in images]
    n = text_emb.shape[0] + (bg_thresh is not None)
    totals = [torch.zeros(1, n, *x.shape[-2:], device=device) for x in prepared]
    counts = [torch.zeros(1, 1, *x.shape[-2:], device=device) for x in prepared]
    groups: dict[tuple[int, int], list[tuple[int, tuple[int, int, int, int]]]] = {}
    for i, x in enumerate(prepared):
        for box in crop_boxes(x.shape[-2], x.shape[-1], crop, stride):
            y1, y2, x1, x2 = box
            groups.setdefault((y2 - y1, x2 - x1), []).append((i, box))
    amp = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    for members in groups.values():
        batch = torch.cat([prepared[i][:, :, y1:y2, x1:x2] for i, (y1, y2, x1, x2) in members])
        with amp:
            masks, _ = model.generate_masks(batch, text_emb, apply_pamr=pamr, kp_w=kp_w)
        masks = masks.float()
        if bg_thresh is not None:
            masks = torch.cat([torch.full_like(masks[:, :1], float(bg_thresh)), masks], dim=1)
        for k, (i, (y1, y2, x1, x2)) in enumerate(members):
            totals[i][:, :, y1:y2, x1:x2] += masks[k : k + 1]
            counts[i][:, :, y1:y2, x1:x2] += 1
    labels = []
    for img, total, count in zip(images, totals, counts, strict=True):
        scores = F.interpolate(total / count, size=img.shape[:2], mode="bilinear", align_corners=False)[0]
        labels.append(scores.argmax(dim=0).cpu())
    return labels


def half_dtype(device: str) -> torch.dtype:
    """The autocast dtype of the reference's half-precision rows: float16 on CUDA, bfloat16 on the CPU."""
    return torch.float16 if device.startswith("cuda") else torch.bfloat16


def reference_mode(args: argparse.Namespace) -> None:
    """One (precision, batch) of the PyTorch reference, in its own process; prints one JSON row."""
    from ..tokenizer import tokenize

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    model = TCL(SIZES[args.size], seed=args.seed).eval().to(device)
    model.pamr = Fp32Pamr(model.pamr)
    text = model.build_text_embedding(QUERIES, TEMPLATES, tokenize)
    paths = sorted(Path(args.images_dir).glob("*.png"))
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    b = args.batch
    autocast = half_dtype(args.device) if args.precision == "fp16" else None
    if cuda and autocast is None:
        # fp32 means fp32 on both sides: tclseg's fp32 sessions run with TF32 off, so cuDNN's convolutions must not
        # quietly use it here (PyTorch allows it for convolutions by default).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    settings = dict(pamr=args.pamr, kp_w=KP_W, bg_thresh=args.bg_thresh, autocast=autocast)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if args.labels_out:
        out = Path(args.labels_out)
        out.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(images), b):
            chunk = images[start : start + b]
            for p, labels in zip(paths[start : start + b], segment_batch(model, chunk, text, **settings), strict=True):
                np.save(out / f"{p.stem}.npy", labels.numpy().astype(np.uint16))
    batch = [images[k % len(images)] for k in range(b)]
    for _ in range(args.warmup):
        segment_batch(model, batch, text, **settings)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    latencies = []
    for _ in range(args.iterations):
        start = time.perf_counter()
        segment_batch(model, batch, text, **settings)
        sync()
        latencies.append((time.perf_counter() - start) * 1e3)
    stats = latency_stats(latencies)
    crops = sum(crops_of(*img.shape[:2]) for img in batch)
    seconds = sum(latencies) / 1e3
    row = {
        "batch": b,
        "images_per_call": b,
        "crops_per_call": crops,
        "calls": args.iterations,
        "warmup": args.warmup,
        "latency_ms": stats,
        "images_per_s": args.iterations * b / seconds,
        "crops_per_s": args.iterations * crops / seconds,
        "device": device.type,
        "precision": args.precision,
        "compute_dtype": str(autocast or torch.float32).removeprefix("torch."),
        "pamr": args.pamr,
        "queries": len(QUERIES),
    }
    if cuda:
        row["torch_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        row["torch_max_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
        row["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        row["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    print(json.dumps(row))
