"""CPU low precision, side by side in one run: torch fp32 and bf16 autocast against tclseg fp32 and int8.

    python -m tclseg_trainer.tools.bench_lowprec --tclseg target/release/tclseg [--size vit-b16]
        [--batches 1,2] [--images 2] [--image-size 640x480] [--threads 2] [--out results.json]

The harness is `bench_gpu`'s (same random bundle, images, child processes, peak RSS, label agreement), with the
rows a CPU-only machine cares about: the reference fp32 and under `torch.autocast(bfloat16)` (`bench_gpu
--reference --precision fp16` on the CPU), and `tclseg models bench` at fp32 and int8 (the bundle's int8 copy is
made once with `quantize.add_int8`). Each row also records the CPU flags and, for tclseg, the kernels the engine
reports. Labels are compared with tclseg fp32 on every image at every batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from ..model import SIZES
from ..quantize import add_int8
from .bench_gpu_measure import agreement, cpu_name, json_lines, parse_batches, parse_image_size, run_child
from .bench_segment import QUERIES, ensure_bundle, make_images


def cpu_flags() -> list[str]:
    """The /proc/cpuinfo flags that decide the matrix kernels."""
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tclseg", default="target/release/tclseg")
    ap.add_argument("--size", default="vit-b16", choices=sorted(SIZES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--image-size", default="640x480")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--bg-thresh", type=float, default=0.0, help="0: labels are the argmax (see bench_gpu)")
    ap.add_argument("--work", default="target/bench-lowprec")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    batches = parse_batches(args.batches)
    width, height = parse_image_size(args.image_size)
    work = Path(args.work)
    bundle = ensure_bundle(args.tclseg, args.size, args.seed, work)
    int8_bundle = bundle.with_name(bundle.name + "-int8")
    if not (int8_bundle / "model.toml").is_file():
        print(f"quantizing {bundle} into {int8_bundle} ...", file=sys.stderr)
        add_int8(bundle, int8_bundle, force=True)
    images = work / f"images-{width}x{height}-{args.images}"
    shutil.rmtree(images, ignore_errors=True)
    stems = [p.stem for p in make_images(images, args.images, seed=args.seed, size=(width, height))]
    labels_root = work / "labels"
    shutil.rmtree(labels_root, ignore_errors=True)
    common = ["--warmup", str(args.warmup), "--iterations", str(args.iterations), "--bg-thresh", str(args.bg_thresh)]

    rows: list[dict] = []
    for name, precision in (("fp32", "fp32"), ("bf16-autocast", "fp16")):
        for b in batches:
            print(f"torch {name}, batch {b} ...", file=sys.stderr)
            cmd = [sys.executable, "-m", "tclseg_trainer.tools.bench_gpu", "--reference", "--size", args.size]
            cmd += ["--seed", str(args.seed), "--device", "cpu", "--threads", str(args.threads)]
            cmd += ["--precision", precision, "--batch", str(b), "--images-dir", str(images)]
            cmd += ["--labels-out", str(labels_root / f"torch-{name}" / f"b{b}"), *common]
            stdout, memory = run_child(cmd, False)
            rows.append({"impl": "torch", **json_lines(stdout)[-1], **memory, "mode": name})
    for precision, model in (("fp32", bundle), ("int8", int8_bundle)):
        for b in batches:
            print(f"tclseg {precision}, batch {b} ...", file=sys.stderr)
            cmd = [args.tclseg, "models", "bench", "--model", str(model), "--images", str(images)]
            cmd += ["--batch", str(b), "--device", "cpu", "--precision", precision, "--threads", str(args.threads)]
            cmd += ["--save-labels", str(labels_root / f"tclseg-{precision}"), *common, "--pamr"]
            for q in QUERIES:
                cmd += ["-q", q]
            stdout, memory = run_child(cmd, False)
            rows.append({"impl": "tclseg", **json_lines(stdout)[-1], **memory, "mode": precision})

    by = {(r["impl"], r["mode"], r["batch"]): r for r in rows}
    labels = []
    for b in batches:
        ref = labels_root / "tclseg-fp32" / f"b{b}"

        def vs_ref(name: str, ext: str, b: int = b, ref: Path = ref) -> float:
            return agreement(labels_root / name / f"b{b}", ext, ref, ".png", stems)

        labels.append(
            {
                "batch": b,
                "tclseg_int8_vs_fp32": vs_ref("tclseg-int8", ".png"),
                "torch_bf16_vs_tclseg_fp32": vs_ref("torch-bf16-autocast", ".npy"),
                "torch_fp32_vs_tclseg_fp32": vs_ref("torch-fp32", ".npy"),
            }
        )
    result = {
        "meta": {
            "cpu": cpu_name(),
            "cpu_flags": cpu_flags(),
            "load_average": os.getloadavg(),
            "size": args.size,
            "images": args.images,
            "image_size": f"{width}x{height}",
            "batches": batches,
            "warmup": args.warmup,
            "iterations": args.iterations,
            "threads": args.threads,
            "tclseg": args.tclseg,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
        "rows": rows,
        "labels": labels,
    }
    m = result["meta"]
    print(f"cpu: {m['cpu']}; flags: {' '.join(m['cpu_flags'])}; load average {m['load_average'][0]:.1f}")
    print(f"{'impl':7} {'mode':14} {'batch':>5} {'images/s':>9} {'p50 ms':>9} {'RSS MiB':>8} {'vs torch fp32':>13}")
    for r in rows:
        base = by[("torch", "fp32", r["batch"])]["images_per_s"]
        print(
            f"{r['impl']:7} {r['mode']:14} {r['batch']:>5} {r['images_per_s']:9.4f} {r['latency_ms']['p50']:9.0f} "
            f"{r['peak_rss_mib']:8.0f} {r['images_per_s'] / base:12.2f}x  {r.get('kernels', '')}"
        )
    for e in labels:
        print(
            f"labels batch {e['batch']} (% of pixels as tclseg fp32): tclseg int8 {e['tclseg_int8_vs_fp32']:.3f}, "
            f"torch bf16 {e['torch_bf16_vs_tclseg_fp32']:.3f}, torch fp32 {e['torch_fp32_vs_tclseg_fp32']:.3f}"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
