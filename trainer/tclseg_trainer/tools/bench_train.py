"""Training throughput of one process.

    python -m tclseg_trainer.tools.bench_train [--size tiny] [--batch 32] [--steps 20]

Times `train.train_step` (forward with every loss, backward, clip, AdamW) on random batches, after 3 warm-up
steps, so data loading is excluded. Prints samples/s and the process's peak resident memory (CPU) or peak
allocated memory (CUDA).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch

from .. import train as T


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tclseg_trainer.tools.bench_train")
    p.add_argument("--size", default="tiny")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--amp", default="none")
    p.add_argument("--unfrozen", action="store_true", help="phase 2: the copied block trains too")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    cfg = T.TrainConfig()
    cfg.model.size = args.size
    cfg.optim.amp = args.amp
    cfg.optim.unfreeze_step = 0 if args.unfrozen else 10**9
    model = T.build_model(cfg).to(device)
    opt = T.build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
    text = torch.randn(args.batch, model.config.text.embed_dim, generator=g).to(device)
    for step in range(3):
        T.train_step(model, opt, scaler, images, text, step, cfg, args.batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for step in range(3, 3 + args.steps):
        T.train_step(model, opt, scaler, images, text, step, cfg, args.batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    print(
        json.dumps(
            {
                "size": args.size,
                "batch": args.batch,
                "image_size": args.image_size,
                "threads": args.threads,
                "device": device.type,
                "cpu": platform.processor() or platform.machine(),
                "unfrozen": args.unfrozen,
                "steps": args.steps,
                "samples_per_s": round(args.steps * args.batch / dt, 2),
                "peak_mib": round(peak, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
