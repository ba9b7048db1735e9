"""bench_gpu's measurement helpers: argument parsing, latency statistics, the windows of an image, a benchmark child
run with its peak memory (RSS, and GPU memory sampled from nvidia-smi), label agreement between saved label maps,
the FLOPs of one crop, and the matrix-throughput ceiling they are compared against."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..model import TCL, TCLConfig
from ..reference import crop_boxes, rescale_size
from .bench_segment import QUERIES, peak_rss_of

# The bundle's input settings (export's defaults, the official ones): what tclseg and reference.segment use.
CROP, STRIDE, SHORT_SIDE, LONG_SIDE_MAX = 448, 224, 448, 2048


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


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cpus"
    except OSError:
        pass
    return f"{os.cpu_count()} cpus"
