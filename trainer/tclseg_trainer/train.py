"""TCL training (tcl.md §3): `python -m tclseg_trainer.train --config FILE [--resume]`, alone or under torchrun.

One process, or one per GPU under `torchrun` (NCCL on GPU, gloo on CPU). Each process takes `batch_size`
images; texts, masked-image embeddings and region similarities are gathered across processes *with gradients*
(losses.gather_with_grad), and the trainable gradients are averaged over processes by one all-reduce per step,
so D processes compute exactly the one-process step on the global batch.

Schedule: AdamW (betas 0.9/0.999, eps 1e-6, wd 0.05; 1-D params and `.bias` without decay), LR scaled by
global_batch / 4096, linear warm-up from 1e-4 x peak, cosine to the min LR; gradients clipped to 5.0; AMP fp16
with a GradScaler or bf16. Until `unfreeze_step` the grounder's copied ViT block is frozen (in the optimizer,
without gradients) and in eval mode. With `ema_decay` > 0 a moving average of the weights (ema.py) is what `val`
scores and best.pt holds; a run without `[eval]` data writes the final average as best.pt.

Output: one JSON object per line on stdout ({"event": "progress" | "eval" | "checkpoint" | "skipped" |
"interrupted" | "done", ...}); `tclseg train` turns them into log lines. SIGINT/SIGTERM finish the current step,
write a checkpoint and exit with status 130.

The config's tables, defaults and checks are in `train_config.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from .checkpoints import CheckpointError, apply_openai_clip, load_checkpoint, load_openai_clip, save_checkpoint
from .data import AugmentConfig, DataError, ImageTextStream, SkipCounter, collate, load_eval_set, miou
from .ema import WeightAverage
from .losses import tcl_losses
from .model import SIZES, TCL
from .tokenizer import Tokenizer
from .train_config import ConfigError, EvalCfg, OptimCfg, TrainConfig, load_config

EXIT_INTERRUPTED = 130


# ---------------------------------------------------------------------------------------------------------
# Model, optimizer, schedule


def build_model(cfg: TrainConfig) -> TCL:
    kind, _, file = cfg.model.init.partition(":")
    if kind == "checkpoint":
        model, _ = load_checkpoint(file)
        if model.config != SIZES[cfg.model.size]:
            raise ConfigError(f"{file}: the checkpoint's model is not model.size {cfg.model.size!r}")
        return model
    model = TCL(SIZES[cfg.model.size], seed=cfg.model.seed)
    if kind == "clip":
        apply_openai_clip(model, load_openai_clip(file, expected_sha256=None))
        model.init_grounder_from_clip()
    return model


def copied_block(model: TCL) -> torch.nn.Module:
    return model.masker.image_encoder.backbone


# What trains: the grounder (copied block, decoder, image_proj, Sim2Mask) and the two temperatures.
TRAINABLE_PREFIXES = ("masker.", "tcli_loss.", "tclf_loss.")


def trainable_named_params(model: TCL) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters under TRAINABLE_PREFIXES."""
    return [(n, p) for n, p in model.named_parameters() if n.startswith(TRAINABLE_PREFIXES)]


def set_phase(model: TCL, step: int, unfreeze_step: int) -> None:
    """Frozen encoders stay frozen; the copied block trains only from unfreeze_step (eval mode before)."""
    model.clip_text_encoder.requires_grad_(False)
    model.clip_image_encoder.requires_grad_(False)
    for _, p in trainable_named_params(model):
        p.requires_grad_(True)
    unfrozen = step >= unfreeze_step
    copied_block(model).requires_grad_(unfrozen)
    model.train(True)
    copied_block(model).train(unfrozen)


def build_optimizer(model: TCL, cfg: OptimCfg) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in trainable_named_params(model):
        (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_at(step: int, cfg: OptimCfg, global_batch: int) -> float:
    """Linear warm-up from warmup_start x peak to the peak, then cosine to the min LR (both scaled by batch)."""
    scale = global_batch / cfg.lr_batch
    peak, low = cfg.base_lr * scale, cfg.min_lr * scale
    if step < cfg.warmup_steps:
        start = cfg.warmup_start * peak
        return start + (peak - start) * step / cfg.warmup_steps
    t_max = max(1, cfg.steps - cfg.warmup_steps)
    t = min(step - cfg.warmup_steps, t_max)
    return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * t / t_max))


# ---------------------------------------------------------------------------------------------------------
# Distributed helpers


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_dist() else (0, 1)


def init_distributed() -> torch.device:
    """Joins the torchrun group when WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU); returns this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and os.environ.get("TCLSEG_TRAIN_DEVICE", "") != "cpu"
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not is_dist():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """One all-reduce over the flattened gradients, divided by the number of processes."""
    if not is_dist() or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    i = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[i : i + n].view_as(g))
        i += n


# ---------------------------------------------------------------------------------------------------------
# One step


@dataclass
class StepState:
    step: int = 0
    best_miou: float = -1.0


def amp_context(device: torch.device, amp: str):
    if amp == "none":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def gumbel_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The straight-through noise depends only on (seed, step): identical for every process count and on resume."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def train_step(
    model: TCL,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    images: torch.Tensor,
    text_emb: torch.Tensor,
    step: int,
    cfg: TrainConfig,
    global_batch: int,
) -> dict[str, float]:
    """Forward, backward, all-reduce, clip, optimizer step. Returns the loss terms (this process's) and lr."""
    set_phase(model, step, cfg.optim.unfreeze_step)
    lr = lr_at(step, cfg.optim, global_batch)
    for g in optimizer.param_groups:
        g["lr"] = lr
    params = [p for _, p in trainable_named_params(model)]
    optimizer.zero_grad(set_to_none=True)
    with amp_context(images.device, cfg.optim.amp):
        terms = tcl_losses(model, images, text_emb, cfg.loss, generator=gumbel_generator(cfg.seed, step, images.device))
    loss = terms["loss"]
    if scaler is not None:
        scaler.scale(loss).backward()
        average_gradients(params)
        scaler.unscale_(optimizer)
    else:
        loss.backward()
        average_gradients(params)
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.optim.clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    out = {k: float(v.detach()) for k, v in terms.items()}
    out["lr"] = lr
    out["grad_norm"] = float(grad_norm)
    return out


@torch.no_grad()
def encode_captions(model: TCL, tokenizer: Tokenizer, captions: list[str], device: torch.device) -> torch.Tensor:
    return model.encode_text(tokenizer(captions).to(device)).float()


# ---------------------------------------------------------------------------------------------------------
# Evaluation: mIoU on a labelled set


@torch.no_grad()
def evaluate(model: TCL, cfg: EvalCfg, tokenizer: Tokenizer, templates: list[str]) -> float:
    """mIoU on cfg.data through the PyTorch reference; `templates` are the bundle's (used when cfg.templates is
    "custom")."""
    from .reference import segment

    classes, pairs = load_eval_set(cfg.data, cfg.max_images)
    was_training = model.training
    model.eval()
    templates = templates if cfg.templates == "custom" else ["{}"]
    device = next(model.parameters()).device
    text = model.build_text_embedding(classes, templates, tokenizer).to(device)
    preds, gts = [], []
    for img_path, lab_path in pairs:
        img = np.asarray(Image.open(img_path).convert("RGB"))
        _, labels = segment(
            model,
            img,
            text,
            pamr=False,
            kp_w=cfg.kp_w,
            bg_thresh=cfg.bg_thresh,
            crop=cfg.crop,
            stride=cfg.crop // 2,
            short_side=cfg.short_side,
        )
        preds.append(labels.numpy())
        gts.append(np.asarray(Image.open(lab_path)))
    model.train(was_training)
    return miou(preds, gts, len(classes) + 1)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state(gen_device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if gen_device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(gen_device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def checkpoint_files(d: Path) -> list[Path]:
    return sorted(d.glob("ckpt-*.pt"))


def write_checkpoint(
    d: Path,
    model: TCL,
    optimizer,
    scaler,
    state: StepState,
    cfg: TrainConfig,
    device,
    name: str | None = None,
    average: WeightAverage | None = None,
) -> Path:
    """Atomic (temp file + rename, in checkpoints.save_checkpoint); prunes to keep_last periodic checkpoints. The
    model's own weights go in; `average` (periodic checkpoints only) rides along so that a resume continues it."""
    path = d / (name or f"ckpt-{state.step:08d}.pt")
    extra = {"weight_average": average.state_dict()} if average is not None else {}
    save_checkpoint(
        path,
        model,
        model.config,
        step=state.step,
        best_miou=state.best_miou,
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict() if scaler is not None else None,
        scheduler={"kind": "warmup-cosine", "step": state.step},
        rng=_rng_state(device),
        train_config=cfg.to_dict(),
        **extra,
    )
    if name is None:
        for old in checkpoint_files(d)[: -cfg.checkpoint.keep_last]:
            old.unlink(missing_ok=True)
    return path


def restore(path: Path, model: TCL, optimizer, scaler, device, average: WeightAverage | None = None) -> StepState:
    loaded, meta = load_checkpoint(path)
    model.load_state_dict(loaded.state_dict())
    obj = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("optimizer", "step", "rng"):
        if key not in obj:
            raise CheckpointError(f"{path}: missing key {key!r}: not a resumable training checkpoint")
    optimizer.load_state_dict(obj["optimizer"])
    if scaler is not None and obj.get("scaler"):
        scaler.load_state_dict(obj["scaler"])
    _set_rng_state(obj["rng"], device)
    if average is not None:
        if "weight_average" in obj:
            try:
                average.load_state_dict(obj["weight_average"])
            except KeyError as e:
                raise CheckpointError(f"{path}: {e.args[0]}") from None
        else:
            average.restart(model)
            emit("warning", message=f"{path} has no weight average (optim.ema_decay was 0): it restarts here")
    return StepState(step=int(obj["step"]), best_miou=float(obj.get("best_miou", -1.0)))


# ---------------------------------------------------------------------------------------------------------
# The loop


def emit(event: str, **fields: Any) -> None:
    if rank_world()[0] == 0:
        print(json.dumps({"event": event, **fields}), flush=True)


class _Stop:
    requested = False

    @classmethod
    def install(cls) -> None:
        def handler(signum, _frame):
            cls.requested = True

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


def train(cfg: TrainConfig, resume: bool = False, max_steps: int | None = None) -> dict:
    """Runs until optim.steps (or max_steps more steps); returns a summary. Call init_distributed() first."""
    rank, world = rank_world()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available() and os.environ.get("TCLSEG_TRAIN_DEVICE", "") != "cpu"
        else torch.device("cpu")
    )
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    global_batch = cfg.data.batch_size * world
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler(device.type) if cfg.optim.amp == "fp16" else None
    tokenizer = Tokenizer()
    ckpt_dir = Path(cfg.checkpoint.dir)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    average = WeightAverage(model, cfg.optim.ema_decay, TRAINABLE_PREFIXES) if cfg.optim.ema_decay > 0 else None
    state = StepState()
    if resume:
        found = checkpoint_files(ckpt_dir)
        if not found:
            raise CheckpointError(f"{ckpt_dir}: --resume given but there is no ckpt-*.pt to resume from")
        state = restore(found[-1], model, optimizer, scaler, device, average)
        emit("resumed", step=state.step, checkpoint=str(found[-1]))

    data_seed = cfg.seed if not resume or cfg.data.resume == "fast-forward" else cfg.seed + 7919 * state.step
    aug = AugmentConfig(
        cfg.data.image_size,
        cfg.data.scale_min,
        cfg.data.hflip,
        cfg.data.color_jitter,
        cfg.data.rand_augment,
        cfg.data.erase_p,
    )
    stream = ImageTextStream(cfg.data.train, aug, data_seed, rank, world, cfg.data.shuffle_buffer)
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.workers,
        collate_fn=collate,
        drop_last=True,  # partial=False
        persistent_workers=cfg.data.workers > 0,
    )
    batches = iter(loader)
    if resume and cfg.data.resume == "fast-forward":
        for _ in range(state.step):
            next(batches)

    writer = None
    if cfg.log.tensorboard and rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(ckpt_dir / "tb"))
        except ImportError:
            emit("warning", message="log.tensorboard is set but the tensorboard package is not installed")

    _Stop.install()
    end = cfg.optim.steps if max_steps is None else min(cfg.optim.steps, state.step + max_steps)
    skips_by_worker: dict[int, dict] = {}
    t0, s0 = time.monotonic(), state.step
    last: dict[str, float] = {}
    while state.step < end:
        images, captions, skips = next(batches)
        skips_by_worker.update(skips)
        images = images.to(device, non_blocking=True)
        text = encode_captions(model, tokenizer, captions, device)
        last = train_step(model, optimizer, scaler, images, text, state.step, cfg, global_batch)
        if average is not None:
            average.update(model)
        state.step += 1
        if state.step % cfg.log.every == 0 or state.step == end:
            rate = (state.step - s0) / max(1e-9, time.monotonic() - t0)
            skipped = SkipCounter()
            for c in skips_by_worker.values():
                skipped.update(c)
            emit(
                "progress",
                step=state.step,
                steps=cfg.optim.steps,
                steps_per_s=round(rate, 4),
                samples_per_s=round(rate * global_batch, 2),
                eta_s=round((cfg.optim.steps - state.step) / rate) if rate > 0 else None,
                skipped=skipped.total,
                **{k: round(v, 6) for k, v in last.items()},
            )
            if writer is not None:
                for k, v in last.items():
                    writer.add_scalar(f"train/{k}", v, state.step)
        if cfg.eval.data and (state.step % cfg.eval.every == 0 or state.step == cfg.optim.steps):
            with average.swapped_in(model) if average is not None else contextlib.nullcontext():
                score = evaluate(model, cfg.eval, tokenizer, cfg.bundle.templates) if rank == 0 else 0.0
                if rank == 0 and score > state.best_miou:
                    state.best_miou = score
                    write_checkpoint(ckpt_dir, model, optimizer, scaler, state, cfg, device, name="best.pt")
            emit("eval", step=state.step, miou=round(score, 6))
            if writer is not None:
                writer.add_scalar("eval/miou", score, state.step)
        stop = _Stop.requested
        if is_dist():
            flag = torch.tensor([int(stop)], device=device)
            dist.all_reduce(flag)
            stop = bool(flag.item())
        if state.step % cfg.checkpoint.every == 0 or state.step == end or stop:
            if rank == 0:
                path = write_checkpoint(ckpt_dir, model, optimizer, scaler, state, cfg, device, average=average)
                emit("checkpoint", step=state.step, path=str(path))
            if rank == 0 and average is not None and not cfg.eval.data and state.step == cfg.optim.steps:
                with average.swapped_in(model):  # nothing scores the average: the final one is the one to export
                    write_checkpoint(ckpt_dir, model, optimizer, scaler, state, cfg, device, name="best.pt")
        if stop:
            emit("interrupted", step=state.step)
            break
    if writer is not None:
        writer.close()
    summary = {"step": state.step, "best_miou": state.best_miou, "interrupted": _Stop.requested, **last}
    if not _Stop.requested:
        emit("done", **summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tclseg_trainer.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="training config (TOML)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in checkpoint.dir")
    p.add_argument("--check", action="store_true", help="validate the config and the data source, then exit")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many more steps")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
        if args.check:
            ImageTextStream(cfg.data.train, AugmentConfig())
            if cfg.eval.data:
                load_eval_set(cfg.eval.data)
            print(json.dumps({"event": "config-ok", "config": cfg.to_dict()}))
            return 0
    except (ConfigError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    threads = os.environ.get("TCLSEG_TRAIN_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    init_distributed()
    try:
        summary = train(cfg, resume=args.resume, max_steps=args.max_steps)
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if is_dist():
            dist.destroy_process_group()
    return EXIT_INTERRUPTED if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
