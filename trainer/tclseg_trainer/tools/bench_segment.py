"""Benchmark: `tclseg segment` against the PyTorch reference on the same images, weights and settings.

    python -m tclseg_trainer.tools.bench_segment --tclseg target/release/tclseg [--size vit-b16] [--images 6]

In one run it (1) exports the random bundle of `--size`/`--seed` if it is not there yet, (2) writes synthetic
test images, (3) runs `tclseg segment` and (4) the PyTorch reference (`reference.segment`, the same random
weights rebuilt from the same seed) each in its own process with the same thread count, then prints
images/s, peak RSS, their ratios, and how many label pixels agree. Steady-state throughput is measured over
the image loop only (model loading and text encoding excluded on both sides); total wall time is printed too.

The reference side runs as `python -m tclseg_trainer.tools.bench_segment --reference ...` (an internal mode).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

QUERIES = ["red square", "blue circle", "green triangle"]


def make_images(folder: Path, count: int, seed: int = 0, size: tuple[int, int] | None = None) -> list[Path]:
    """Synthetic photos of shapes (all cheaper than real decode work): a mix of sizes and orientations, or all
    `size` = (width, height)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [size] if size is not None else [(640, 480), (480, 640), (800, 600), (500, 500), (1024, 576), (448, 336)]
    paths = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(60, 200, 3)))
        d = ImageDraw.Draw(img)
        # 60 px margin and 40 px smallest shape, scaled down for images under 120 px (same draws otherwise).
        margin, lo = min(60, min(w, h) // 2), min(40, max(1, min(w, h) // 4))
        for _ in range(4):
            x, y = int(rng.integers(0, w - margin)), int(rng.integers(0, h - margin))
            s = int(rng.integers(lo, max(lo + 1, min(w, h) // 2)))
            colour = tuple(int(v) for v in rng.integers(0, 255, 3))
            [d.rectangle, d.ellipse][int(rng.integers(0, 2))]([x, y, x + s, y + s], fill=colour)
        path = folder / f"img{i:03d}.png"
        img.save(path)
        paths.append(path)
    return paths


def ensure_bundle(tclseg: str, size: str, seed: int, work: Path) -> Path:
    """The random bundle of `size`/`seed` under `work`, exported with `tclseg models export` if it is not there."""
    bundle = work / f"bundle-{size}-seed{seed}"
    if not (bundle / "model.toml").is_file():
        print(f"exporting the random {size} bundle to {bundle} ...", file=sys.stderr)
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [tclseg, "models", "export", "--random", size, "--seed", str(seed), "--out", str(bundle), "--force"],
            check=True,
        )
    return bundle


def peak_rss_of(
    cmd: list[str], env: dict[str, str] | None = None, on_spawn: Callable[[int], None] | None = None
) -> tuple[float, float, str, str]:
    """(wall seconds, peak RSS MiB, stdout, stderr) of one child process, via os.wait4. `on_spawn(pid)` runs
    once the child is started (e.g. to sample its GPU memory while it runs)."""
    start = time.perf_counter()
    out_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-{os.getpid()}-{time.time_ns()}.out"
    err_path = out_path.with_suffix(".err")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        if on_spawn is not None:
            on_spawn(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stdout, stderr = out_path.read_text(), err_path.read_text()
    out_path.unlink()
    err_path.unlink()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{stderr[-3000:]}")
    return wall, usage.ru_maxrss / 1024.0, stdout, stderr


def reference_mode(args: argparse.Namespace) -> None:
    """The PyTorch side, in its own process: build the weights, then time the image loop."""
    import torch

    from ..model import SIZES, TCL, TEMPLATES
    from ..reference import segment
    from ..tokenizer import tokenize

    torch.set_num_threads(args.threads)
    model = TCL(SIZES[args.size], seed=args.seed).eval()
    with torch.no_grad():
        text = model.build_text_embedding(QUERIES, TEMPLATES, tokenize)
    paths = sorted(Path(args.images_dir).glob("*.png"))
    out = Path(args.labels_out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for p in paths:
        img = np.asarray(Image.open(p).convert("RGB"))
        _, labels = segment(model, img, text, pamr=True, kp_w=0.3, bg_thresh=args.bg_thresh)
        np.save(out / f"{p.stem}.npy", labels.numpy().astype(np.uint16))
    seconds = time.perf_counter() - start
    print(json.dumps({"images": len(paths), "loop_seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tclseg", default="target/release/tclseg")
    ap.add_argument("--size", default="vit-b16", choices=["vit-b16", "tiny"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--work", default="target/bench-segment")
    ap.add_argument(
        "--bg-thresh",
        type=float,
        default=0.0,
        help="background score on both sides (default 0: labels are the classes' argmax, so the agreement means "
        "something on random weights, whose scores sit under the bundle's 0.4 everywhere)",
    )
    ap.add_argument(
        "--min-agreement",
        type=float,
        default=None,
        help="exit 1 when fewer than this fraction of label pixels agree (a parity check, e.g. 0.999)",
    )
    ap.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--images-dir", help=argparse.SUPPRESS)
    ap.add_argument("--labels-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reference:
        reference_mode(args)
        return

    work = Path(args.work)
    bundle = ensure_bundle(args.tclseg, args.size, args.seed, work)
    images = work / "images"
    make_images(images, args.images)
    out = work / "out"

    cmd = [
        args.tclseg,
        "segment",
        str(images),
        "--out",
        str(out),
        "--model",
        str(bundle),
        "--device",
        args.device,
        "--precision",
        args.precision,
        "--threads",
        str(args.threads),
        "--jobs",
        "1",
        "--batch",
        "1",
        "--force",
        "--format",
        "labels",
        "--bg-thresh",
        str(args.bg_thresh),
    ]
    for q in QUERIES:
        cmd += ["-q", q]
    t_wall, t_rss, t_out, _ = peak_rss_of(cmd)
    t_ips = float(t_out.split(" images/s")[0].rsplit(" ", 1)[-1])

    ref_labels = work / "reference-labels"
    ref_cmd = [
        sys.executable,
        "-m",
        "tclseg_trainer.tools.bench_segment",
        "--reference",
        "--size",
        args.size,
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
        "--images-dir",
        str(images),
        "--labels-out",
        str(ref_labels),
        "--bg-thresh",
        str(args.bg_thresh),
    ]
    r_wall, r_rss, r_out, _ = peak_rss_of(ref_cmd)
    r = json.loads(r_out.strip().splitlines()[-1])
    r_ips = r["images"] / r["loop_seconds"]

    agree = total = foreground = 0
    for p in sorted(images.glob("*.png")):
        ours = np.asarray(Image.open(out / f"{p.stem}.labels.png"))
        ref = np.load(ref_labels / f"{p.stem}.npy")
        agree += int((ours.astype(np.int64) == ref.astype(np.int64)).sum())
        foreground += int((ref != 0).sum())
        total += ref.size

    print(
        f"images: {args.images} synthetic ({args.size} random bundle, seed {args.seed}, {args.precision}, "
        f"{args.device}, {args.threads} threads, PAMR on, 3 queries x 9 templates)"
    )
    print(f"{'':12} {'images/s':>9} {'peak RSS MiB':>13} {'wall s':>8}")
    print(f"{'tclseg':12} {t_ips:9.3f} {t_rss:13.0f} {t_wall:8.1f}")
    print(f"{'pytorch ref':12} {r_ips:9.3f} {r_rss:13.0f} {r_wall:8.1f}")
    print(f"ratio tclseg/reference: throughput {t_ips / r_ips:.2f}x, peak RSS {t_rss / r_rss:.2f}x")
    print(
        f"label agreement: {100.0 * agree / total:.3f} % of {total} pixels "
        f"({100.0 * foreground / total:.1f} % of them not background in the reference)"
    )
    if args.min_agreement is not None and agree / total < args.min_agreement:
        raise SystemExit(f"label agreement {agree / total:.5f} is under {args.min_agreement}")


if __name__ == "__main__":
    main()
