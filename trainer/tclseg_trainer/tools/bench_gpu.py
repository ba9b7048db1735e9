"""Throughput benchmark on one device: the PyTorch reference and tclseg, fp32 and fp16, at several batch sizes.

    python -m tclseg_trainer.tools.bench_gpu --tclseg target/release/tclseg [--device cuda] [--size vit-b16]
        [--batches 1,8,32] [--images 8] [--image-size 1920x1080] [--out results.json]

In one run, on the same device, images and random weights:

1. exports the random bundle of `--size`/`--seed` if it is not there (`bench_segment.ensure_bundle`) and writes
   `--images` synthetic pictures of `--image-size` (`bench_segment.make_images`);
2. PyTorch reference, batched (`segment_batch` below: reference.py's preparation, windows, `generate_masks` with
   PAMR and the kp blend, background and argmax, with every crop of a call's images in one model batch), fp32
   eager and then half precision through `torch.autocast` (float16 on CUDA, bfloat16 on the CPU), PAMR kept in
   fp32 as tclseg keeps it; one child process per (precision, batch);
3. `tclseg models bench` at fp32 and fp16, one child process per (precision, batch);
4. label agreement between tclseg fp16, tclseg fp32 and the reference, on every image at every batch size;
5. the FLOPs of one crop through trunk + grounder + kp branch + mask head (`FlopCounterMode`, as the model is
   written: the exported graphs compute the same function with fewer multiplies, which does not count);
6. the matrix ceiling: large bf16 matmuls on CUDA (fp32 on the CPU, labelled so).

Per child it measures latency per call (p50/p95), images/s, crops/s, peak RSS (os.wait4), and on CUDA the GPU
memory in use (nvidia-smi, sampled) and torch's own peak allocation. Then it prints one table, the ratios and
label agreement against the goals, and writes everything to `--out` as JSON.

The PyTorch side runs as `python -m tclseg_trainer.tools.bench_gpu --reference ...` (an internal mode).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..model import SIZES, TCL, TEMPLATES, TCLConfig
from ..reference import crop_boxes, prepare, rescale_size
from .bench_segment import QUERIES, ensure_bundle, make_images, peak_rss_of

# The bundle's input settings (export's defaults, the official ones): what tclseg and reference.segment use.
CROP, STRIDE, SHORT_SIDE, LONG_SIDE_MAX = 448, 224, 448, 2048
KP_W = 0.3

GOALS = {
    "tclseg_fp16_over_torch_fp32": 3.0,
    "tclseg_fp16_over_torch_fp16": 1.5,
    "labels_fp16_vs_fp32_percent": 99.5,
    "ceiling_percent_at_largest_batch": 40.0,
}


# ----------------------------------------------------------------------------------------------------------
# The batched reference


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


# ----------------------------------------------------------------------------------------------------------
# Measurement helpers


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(p) for p in text.split(",")]
    except ValueError:
        raise SystemExit(f"--batches {text}: give whole numbers, comma-separated, e.g. 1,8,32") from None
    if not batches or min(batches) < 1:
        raise SystemExit(f"--batches {text}: every batch size must be at least 1")
    return batches


def parse_image_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--image-size {text}: give WIDTHxHEIGHT, e.g. 1920x1080") from None
    if w < 1 or h < 1:
        raise SystemExit(f"--image-size {text}: both sides must be at least 1")
    return w, h


def latency_stats(latencies_ms: list[float]) -> dict[str, float]:
    """p50/p95 (linear interpolation, as `tclseg models bench`), mean, min, max."""
    a = np.asarray(latencies_ms, dtype=np.float64)
    p50, p95 = np.percentile(a, [50, 95])
    return {"p50": float(p50), "p95": float(p95), "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max())}


def crops_of(height: int, width: int) -> int:
    """Sliding windows of one image after the rescale (as the engine and reference.segment cut them)."""
    return len(crop_boxes(*rescale_size(height, width, SHORT_SIDE, LONG_SIDE_MAX), CROP, STRIDE))


class GpuMemorySampler:
    """Peak GPU memory of one process while it runs, from `nvidia-smi` every `interval` seconds.

    Per process (`--query-compute-apps`) when nvidia-smi lists the child's pid; in a container whose pids
    nvidia-smi does not see, the device's used memory above what was in use when the child started.
    """

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.pid: int | None = None
        self.per_process = 0.0
        self.device_peak = 0.0
        self.baseline = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("nvidia-smi") is not None

    @staticmethod
    def _query(*args: str) -> list[list[str]]:
        out = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True, text=True)
        if out.returncode != 0:
            return []
        return [[f.strip() for f in line.split(",")] for line in out.stdout.splitlines() if line.strip()]

    def _device_used(self) -> float:
        rows = self._query("--query-gpu=memory.used")
        return max((float(r[0]) for r in rows if r and r[0].replace(".", "").isdigit()), default=0.0)

    def start(self, pid: int) -> None:
        self.pid = pid
        self.baseline = self._device_used()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for row in self._query("--query-compute-apps=pid,used_memory"):
                if len(row) == 2 and row[0] == str(self.pid) and row[1].isdigit():
                    self.per_process = max(self.per_process, float(row[1]))
            self.device_peak = max(self.device_peak, self._device_used())
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, float | str | None]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.per_process > 0:
            return {"gpu_mem_mib": self.per_process, "gpu_mem_method": "nvidia-smi, this process"}
        if self.device_peak > 0:
            return {
                "gpu_mem_mib": max(0.0, self.device_peak - self.baseline),
                "gpu_mem_method": "nvidia-smi, device used above the start (pid not visible)",
            }
        return {"gpu_mem_mib": None, "gpu_mem_method": None}


def run_child(cmd: list[str], sample_gpu: bool) -> tuple[str, dict]:
    """Runs one benchmark child (this package importable in it): (stdout, memory figures)."""
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    sampler = GpuMemorySampler() if sample_gpu and GpuMemorySampler.available() else None
    try:
        _, rss, stdout, _ = peak_rss_of(cmd, env=env, on_spawn=sampler.start if sampler else None)
    finally:
        gpu = sampler.stop() if sampler else {"gpu_mem_mib": None, "gpu_mem_method": None}
    return stdout, {"peak_rss_mib": rss, **gpu}


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def read_labels(path: Path) -> np.ndarray:
    """A saved label map: the reference's .npy or tclseg's label PNG (palette indices)."""
    if path.suffix == ".npy":
        return np.load(path).astype(np.int64)
    return np.asarray(Image.open(path)).astype(np.int64)


def agreement(a_dir: Path, a_ext: str, b_dir: Path, b_ext: str, stems: list[str]) -> float:
    """Percentage of equal label pixels over the images `stems`."""
    equal = total = 0
    for stem in stems:
        a, b = read_labels(a_dir / f"{stem}{a_ext}"), read_labels(b_dir / f"{stem}{b_ext}")
        if a.shape != b.shape:
            raise SystemExit(f"label maps of {stem} differ in size: {a_dir} {a.shape}, {b_dir} {b.shape}")
        equal += int((a == b).sum())
        total += a.size
    return 100.0 * equal / total


# ----------------------------------------------------------------------------------------------------------
# FLOPs and the matrix ceiling


def count_flops(config: TCLConfig, crop: int = CROP, queries: int = len(QUERIES)) -> dict[str, float]:
    """Multiply-accumulates (GMAC) of one `crop`x`crop` window through each part of the model, as written.

    The model is built on the meta device: shapes only, nothing is computed. FlopCounterMode counts matrix
    products and convolutions (2 FLOPs per MAC); element-wise work (LayerNorm, GELU, softmax, sigmoid) is not
    counted. PAMR's neighbour gathers are one-hot convolutions, so they show up as "FLOPs"; they are reported
    apart and left out of the total.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = TCL(config, seed=0).eval()
        pixels = torch.empty(1, 3, crop, crop)
        text = torch.empty(queries, config.vision.embed_dim)
    grid = (crop // config.vision.patch_size, crop // config.vision.patch_size)
    head = model.masker.image_encoder.decoder

    def gmac(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            out = fn()
        return counter.get_total_flops() / 2e9, out

    parts: dict[str, float] = {}
    parts["trunk"], tokens = gmac(lambda: model.trunk_tokens(pixels))
    parts["grounder_block"], x = gmac(lambda: model.grounder_block.forward_self_only(tokens))
    fmap = x[:, 1:].transpose(1, 2).reshape(1, x.shape[2], *grid)
    parts["decoder"], x = gmac(lambda: head.decoder(fmap))
    parts["image_proj"], dense = gmac(lambda: head.image_proj(x))
    parts["kp_branch"], kp = gmac(lambda: model.kp_features(tokens, grid))
    cos_dense, masks = gmac(lambda: model.cosine_map(dense, text))
    cos_kp, _ = gmac(lambda: model.cosine_map(kp, text))
    parts["mask_head"] = cos_dense + cos_kp
    small = torch.empty(1, 3, *masks.shape[-2:], device="meta")
    pamr_gathers, _ = gmac(lambda: model.pamr(small, masks))
    grounder = parts["grounder_block"] + parts["decoder"] + parts["image_proj"]
    total = sum(parts.values())
    return {
        **{f"{k}_gmac": v for k, v in parts.items()},
        "grounder_gmac": grounder,
        "total_gmac": total,
        "total_gflop": 2.0 * total,
        "pamr_gathers_gmac_not_counted": pamr_gathers,
        "crop": crop,
        "queries": queries,
    }


def matmul_ceiling(device: str, n: int | None = None, reps: int = 10) -> dict[str, float | str | int]:
    """Measured matrix throughput: n x n x n products, after warm-up. bf16 on CUDA; fp32 on the CPU."""
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    n = n or (8192 if cuda else 1024)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    seconds = (time.perf_counter() - start) / reps
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "n": n,
        "reps": reps,
        "seconds_per_matmul": seconds,
        "tflops": 2.0 * n**3 / seconds / 1e12,
        "what": f"{'bf16' if cuda else 'fp32 (cpu)'} {n}x{n}x{n} matmul",
    }


# ----------------------------------------------------------------------------------------------------------
# The reference child


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


# ----------------------------------------------------------------------------------------------------------
# The harness


def derive(
    rows: list[dict],
    labels: list[dict],
    flops: dict[str, float],
    ceiling: dict,
    batches: list[int],
) -> tuple[list[dict], list[dict]]:
    """Adds achieved TFLOP/s and % of the ceiling to every row; returns (ratios per batch, goal checks)."""
    for r in rows:
        r["achieved_tflops"] = r["crops_per_s"] * flops["total_gflop"] / 1e3
        r["ceiling_percent"] = 100.0 * r["achieved_tflops"] / ceiling["tflops"]
    by = {(r["impl"], r["precision"], r["batch"]): r for r in rows}
    ratios = []
    for b in batches:
        t16, r32, r16 = by[("tclseg", "fp16", b)], by[("torch", "fp32", b)], by[("torch", "fp16", b)]
        ratios.append(
            {
                "batch": b,
                "tclseg_fp16_over_torch_fp32": t16["images_per_s"] / r32["images_per_s"],
                "tclseg_fp16_over_torch_fp16": t16["images_per_s"] / r16["images_per_s"],
                "tclseg_fp32_over_torch_fp32": by[("tclseg", "fp32", b)]["images_per_s"] / r32["images_per_s"],
            }
        )
    goals = []
    for r in ratios:
        for key in ("tclseg_fp16_over_torch_fp32", "tclseg_fp16_over_torch_fp16"):
            goals.append({"goal": key, "batch": r["batch"], "value": r[key], "target": GOALS[key]})
    for entry in labels:
        goals.append(
            {
                "goal": "labels_fp16_vs_fp32_percent",
                "batch": entry["batch"],
                "value": entry["tclseg_fp16_vs_tclseg_fp32"],
                "target": GOALS["labels_fp16_vs_fp32_percent"],
            }
        )
    largest = max(batches)
    goals.append(
        {
            "goal": "ceiling_percent_at_largest_batch",
            "batch": largest,
            "value": by[("tclseg", "fp16", largest)]["ceiling_percent"],
            "target": GOALS["ceiling_percent_at_largest_batch"],
        }
    )
    for g in goals:
        g["met"] = g["value"] >= g["target"]
    return ratios, goals


def print_report(result: dict) -> None:
    meta, flops, ceiling = result["meta"], result["flops"], result["ceiling"]
    print(
        f"device: {meta['device']} ({meta['device_name']}), torch {meta['torch']}; {meta['images']} images "
        f"{meta['image_size']} ({meta['crops_per_image']} crops of {CROP} each); {meta['size']} random bundle "
        f"(seed {meta['seed']}), {len(QUERIES)} queries x {len(TEMPLATES)} templates, PAMR "
        f"{'on' if meta['pamr'] else 'off'}; {meta['warmup']} warm-up + {meta['iterations']} timed calls"
    )
    print(
        f"per {CROP} crop: {flops['total_gmac']:.1f} GMAC = {flops['total_gflop']:.1f} GFLOP "
        f"(trunk {flops['trunk_gmac']:.1f}, grounder {flops['grounder_gmac']:.1f} = block "
        f"{flops['grounder_block_gmac']:.1f} + decoder {flops['decoder_gmac']:.1f} + proj "
        f"{flops['image_proj_gmac']:.1f}, kp {flops['kp_branch_gmac']:.2f}, mask head {flops['mask_head_gmac']:.3f}; "
        f"PAMR gathers {flops['pamr_gathers_gmac_not_counted']:.2f} not counted)"
    )
    print(f"matrix ceiling: {ceiling['what']}: {ceiling['tflops']:.2f} TFLOP/s")
    mem_key = "gpu_mem_mib" if meta["device"] == "cuda" else "peak_rss_mib"
    mem_name = "GPU MiB" if meta["device"] == "cuda" else "RSS MiB"
    print(
        f"{'impl':7} {'prec':5} {'dtype':9} {'batch':>5} {'images/s':>9} {'crops/s':>9} {'p50 ms':>9} "
        f"{'p95 ms':>9} {mem_name:>8} {'TFLOP/s':>8} {'% ceil':>7}"
    )
    for r in result["rows"]:
        mem = r.get(mem_key)
        print(
            f"{r['impl']:7} {r['precision']:5} {r['compute_dtype']:9} {r['batch']:>5} {r['images_per_s']:9.3f} "
            f"{r['crops_per_s']:9.3f} {r['latency_ms']['p50']:9.1f} {r['latency_ms']['p95']:9.1f} "
            f"{'-' if mem is None else f'{mem:.0f}':>8} {r['achieved_tflops']:8.3f} {r['ceiling_percent']:7.2f}"
        )
    print("ratios (images/s):")
    for r in result["ratios"]:
        print(
            f"  batch {r['batch']:>3}: tclseg fp16 / torch fp32 {r['tclseg_fp16_over_torch_fp32']:.2f}x, "
            f"tclseg fp16 / torch fp16 {r['tclseg_fp16_over_torch_fp16']:.2f}x, "
            f"tclseg fp32 / torch fp32 {r['tclseg_fp32_over_torch_fp32']:.2f}x"
        )
    print("label agreement (% of pixels):")
    for e in result["labels"]:
        print(
            f"  batch {e['batch']:>3}: tclseg fp16 vs fp32 {e['tclseg_fp16_vs_tclseg_fp32']:.3f}, "
            f"tclseg fp16 vs torch fp32 {e['tclseg_fp16_vs_torch_fp32']:.3f}, "
            f"tclseg fp32 vs torch fp32 {e['tclseg_fp32_vs_torch_fp32']:.3f}, "
            f"torch fp16 vs fp32 {e['torch_fp16_vs_torch_fp32']:.3f} ({e['pixels']} pixels)"
        )
    print("goals:")
    for g in result["goals"]:
        print(
            f"  {g['goal']} (batch {g['batch']}): {g['value']:.3f} against >= {g['target']:g}: "
            f"{'met' if g['met'] else 'NOT met'}"
        )
    for note in result["notes"]:
        print(f"note: {note}")


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tclseg", default="target/release/tclseg")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", default="vit-b16", choices=sorted(SIZES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", default="1,8,32", help="images per call, comma-separated")
    ap.add_argument("--images", type=int, default=8, help="synthetic images (a batch cycles through them)")
    ap.add_argument("--image-size", default="1920x1080", help="WIDTHxHEIGHT of the synthetic images")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per child")
    ap.add_argument("--iterations", type=int, default=10, help="timed calls per child")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of either side")
    ap.add_argument("--no-pamr", dest="pamr", action="store_false", help="skip PAMR on both sides")
    ap.add_argument(
        "--bg-thresh",
        type=float,
        default=0.0,
        help="background score on both sides (default 0: labels are the classes' argmax, so label agreement means "
        "something on random weights, whose scores sit under the bundle's thresholds everywhere)",
    )
    ap.add_argument("--work", default="target/bench-gpu", help="bundle, images and label maps go here")
    ap.add_argument("--out", type=Path, default=None, help="write every figure here as JSON")
    ap.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--precision", choices=["fp32", "fp16"], help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--images-dir", help=argparse.SUPPRESS)
    ap.add_argument("--labels-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reference:
        reference_mode(args)
        return None

    batches = parse_batches(args.batches)
    width, height = parse_image_size(args.image_size)
    if args.images < 1:
        raise SystemExit("--images must be at least 1")
    if args.iterations < 1:
        raise SystemExit("--iterations must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: PyTorch sees no CUDA device here")
    work = Path(args.work)
    bundle = ensure_bundle(args.tclseg, args.size, args.seed, work)
    images = work / f"images-{width}x{height}-{args.images}"
    shutil.rmtree(images, ignore_errors=True)
    stems = [p.stem for p in make_images(images, args.images, seed=args.seed, size=(width, height))]
    labels_root = work / "labels"
    shutil.rmtree(labels_root, ignore_errors=True)
    cuda = args.device == "cuda"
    common = [
        "--warmup",
        str(args.warmup),
        "--iterations",
        str(args.iterations),
        "--bg-thresh",
        str(args.bg_thresh),
    ]

    rows: list[dict] = []
    for precision in ("fp32", "fp16"):
        for b in batches:
            print(f"torch {precision}, batch {b} ...", file=sys.stderr)
            cmd = [
                sys.executable,
                "-m",
                "tclseg_trainer.tools.bench_gpu",
                "--reference",
                "--size",
                args.size,
                "--seed",
                str(args.seed),
                "--device",
                args.device,
                "--threads",
                str(args.threads),
                "--precision",
                precision,
                "--batch",
                str(b),
                "--images-dir",
                str(images),
                "--labels-out",
                str(labels_root / f"torch-{precision}" / f"b{b}"),
                *common,
                *([] if args.pamr else ["--no-pamr"]),
            ]
            stdout, memory = run_child(cmd, cuda)
            rows.append({"impl": "torch", **json_lines(stdout)[-1], **memory})
    for precision in ("fp32", "fp16"):
        for b in batches:
            print(f"tclseg {precision}, batch {b} ...", file=sys.stderr)
            cmd = [
                args.tclseg,
                "models",
                "bench",
                "--model",
                str(bundle),
                "--images",
                str(images),
                "--batch",
                str(b),
                "--device",
                args.device,
                "--precision",
                precision,
                "--threads",
                str(args.threads),
                "--save-labels",
                str(labels_root / f"tclseg-{precision}"),
                *common,
                *(["--pamr"] if args.pamr else ["--no-pamr"]),
            ]
            for q in QUERIES:
                cmd += ["-q", q]
            stdout, memory = run_child(cmd, cuda)
            row = json_lines(stdout)[-1]
            row["compute_dtype"] = {"fp32": "float32", "fp16": "float16"}[precision]
            rows.append({"impl": "tclseg", **row, **memory})

    labels = []
    for b in batches:
        t32, t16 = labels_root / "tclseg-fp32" / f"b{b}", labels_root / "tclseg-fp16" / f"b{b}"
        r32, r16 = labels_root / "torch-fp32" / f"b{b}", labels_root / "torch-fp16" / f"b{b}"
        labels.append(
            {
                "batch": b,
                "tclseg_fp16_vs_tclseg_fp32": agreement(t16, ".png", t32, ".png", stems),
                "tclseg_fp16_vs_torch_fp32": agreement(t16, ".png", r32, ".npy", stems),
                "tclseg_fp32_vs_torch_fp32": agreement(t32, ".png", r32, ".npy", stems),
                "torch_fp16_vs_torch_fp32": agreement(r16, ".npy", r32, ".npy", stems),
                "pixels": width * height * len(stems),
            }
        )

    flops = count_flops(SIZES[args.size])
    if not cuda:
        torch.set_num_threads(args.threads)
    ceiling = matmul_ceiling(args.device)
    ratios, goals = derive(rows, labels, flops, ceiling, batches)
    notes = [
        "FLOPs are those of the model as written (trunk + grounder + kp branch + mask head, 2 per MAC); the "
        "exported graphs reach the same function with fewer multiplies (polyphase, Winograd), not counted.",
        "Both sides decode the images once, outside the timing; each call includes the CPU rescale, the model, "
        "PAMR, the crop average, the resize to the image and the argmax.",
        "The reference's half-precision rows run the model under torch.autocast with PAMR in fp32.",
    ]
    if not cuda:
        notes.append(
            "cpu: the reference's half-precision rows use bfloat16 autocast (float16 autocast is for CUDA); "
            "tclseg fp16 on the CPU runs through ONNX Runtime's inserted casts; the ceiling is an fp32 matmul. "
            "The goals are for a GPU: these are smoke figures."
        )
    result = {
        "meta": {
            "device": args.device,
            "device_name": torch.cuda.get_device_name() if cuda else cpu_name(),
            "torch": torch.__version__,
            "size": args.size,
            "seed": args.seed,
            "bundle": str(bundle),
            "images": args.images,
            "image_size": f"{width}x{height}",
            "crops_per_image": crops_of(height, width),
            "batches": batches,
            "warmup": args.warmup,
            "iterations": args.iterations,
            "threads": args.threads,
            "pamr": args.pamr,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
        "flops": flops,
        "ceiling": ceiling,
        "rows": rows,
        "ratios": ratios,
        "labels": labels,
        "goals": goals,
        "notes": notes,
    }
    print_report(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cpus"
    except OSError:
        pass
    return f"{os.cpu_count()} cpus"


if __name__ == "__main__":
    main()
