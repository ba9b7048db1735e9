"""Throughput benchmark on one device: the PyTorch reference and tclseg, fp32 and fp16, at several batch sizes.

    python -m tclseg_trainer.tools.bench_gpu --tclseg target/release/tclseg [--device cuda] [--size vit-b16]
        [--batches 1,8,32] [--images 8] [--image-size 1920x1080] [--out results.json]

In one run, on the same device, images and random weights:

1. exports the random bundle of `--size`/`--seed` if it is not there (`bench_segment.ensure_bundle`) and writes
   `--images` synthetic pictures of `--image-size` (`bench_segment.make_images`);
2. PyTorch reference, batched (`bench_gpu_reference.segment_batch`: reference.py's preparation, windows,
   `generate_masks` with PAMR and the kp blend, background and argmax, with every crop of a call's images in one
   model batch), fp32 eager and then half precision through `torch.autocast` (float16 on CUDA, bfloat16 on the
   CPU), PAMR kept in fp32 as tclseg keeps it; one child process per (precision, batch);
3. `tclseg models bench` at fp32 and fp16, one child process per (precision, batch);
4. label agreement between tclseg fp16, tclseg fp32 and the reference, on every image at every batch size;
5. the FLOPs of one crop through trunk + grounder + kp branch + mask head (`FlopCounterMode`, as the model is
   written: the exported graphs compute the same function with fewer multiplies, which does not count);
6. the matrix ceiling: large bf16 matmuls on CUDA (fp32 on the CPU, labelled so).

Per child it measures latency per call (p50/p95), images/s, crops/s, peak RSS (os.wait4), and on CUDA the GPU
memory in use (nvidia-smi, sampled) and torch's own peak allocation. Then it prints one table, the ratios and
label agreement against the goals, and writes everything to `--out` as JSON.

The PyTorch side runs as `python -m tclseg_trainer.tools.bench_gpu --reference ...` (an internal mode, in
`bench_gpu_reference.py`); the measuring, FLOP counting and the ceiling are in `bench_gpu_measure.py`. This module
runs the children, derives the ratios and checks them against the goals.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from ..model import SIZES, TEMPLATES
from .bench_gpu_measure import (
    CROP,
    agreement,
    count_flops,
    cpu_name,
    crops_of,
    json_lines,
    matmul_ceiling,
    parse_batches,
    parse_image_size,
    run_child,
)
from .bench_gpu_reference import reference_mode
from .bench_segment import QUERIES, ensure_bundle, make_images

GOALS = {
    "tclseg_fp16_over_torch_fp32": 3.0,
    "tclseg_fp16_over_torch_fp16": 1.5,
    "labels_fp16_vs_fp32_percent": 99.5,
    "ceiling_percent_at_largest_batch": 40.0,
}


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


if __name__ == "__main__":
    main()
