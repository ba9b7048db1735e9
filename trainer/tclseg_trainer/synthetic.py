"""The synthetic world: image-caption pairs of coloured shapes, to show TCL works end to end on a CPU.

    python -m tclseg_trainer.synthetic generate --out DIR [--train N] [--eval N] [--seed S]
    python -m tclseg_trainer.synthetic pretrain --data DIR/train --out clip.pt [--steps N]

`generate` writes
- `DIR/train/<i>.png` + `<i>.txt`: 1-3 shapes (circle, square, triangle, cross) in one of 6 colours, some with a
  stripe texture, on a varied background (flat, gradient, noise or stripes). The caption names a random non-empty
  subset of the objects, in random order and phrasing ("a red circle and a blue square", "square, green; circle").
  The masks are not written for the training split.
- `DIR/eval/{classes.txt, images/<i>.png, labels/<i>.png}`: held-out images with their label maps (class k = the
  k-th shape name, 0 background), used only for evaluation.

`pretrain` trains a tiny CLIP (both encoders of a `TCL("tiny")`) contrastively on the pairs, with no masks, and
writes a trainer checkpoint whose grounder is a fresh copy of that CLIP, i.e. step 0 of TCL = MaskCLIP.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .checkpoints import save_checkpoint
from .data import AugmentConfig, ImageTextStream, collate
from .losses import clip_image_embedding, info_nce
from .model import SIZES, TCL
from .tokenizer import Tokenizer

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 30),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
}
SIZE = 224


def _background(rng: random.Random, size: int) -> np.ndarray:
    kind = rng.choice(["flat", "gradient", "noise", "stripes"])
    base = np.array([rng.randint(40, 200) for _ in range(3)], dtype=np.float32) * 0.6
    if kind == "flat":
        img = np.broadcast_to(base, (size, size, 3)).copy()
    elif kind == "gradient":
        other = np.array([rng.randint(20, 160) for _ in range(3)], dtype=np.float32)
        t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
        img = np.broadcast_to(base * (1 - t) + other * t, (size, size, 3)).copy()
    elif kind == "noise":
        nrng = np.random.default_rng(rng.getrandbits(32))
        img = base + nrng.normal(0, 25, (size, size, 3)).astype(np.float32)
    else:
        period = rng.randint(6, 20)
        y = np.arange(size)[:, None] + np.arange(size)[None, :] * rng.choice([0, 1])
        band = ((y // period) % 2).astype(np.float32)[..., None]
        img = base + band * 40
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_mask(shape: str, cx: int, cy: int, r: int, size: int) -> np.ndarray:
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=1)
    else:
        w = max(3, r // 3)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=1)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=1)
    return np.asarray(m, dtype=bool)


def draw_scene(rng: random.Random, size: int = SIZE) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """(RGB image, label map, [(colour, shape)] in drawing order). Later shapes occlude earlier ones."""
    img = _background(rng, size)
    labels = np.zeros((size, size), dtype=np.uint8)
    objects = []
    shapes = rng.sample(SHAPES, rng.randint(1, 3))  # each shape at most once per image
    for shape in shapes:
        colour = rng.choice(list(COLOURS))
        r = rng.randint(size // 9, size // 4)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        m = _shape_mask(shape, cx, cy, r, size)
        col = np.array(COLOURS[colour], dtype=np.int16)
        fill = np.broadcast_to(col, (size, size, 3)).copy()
        if rng.random() < 0.3:  # stripe texture
            band = ((np.arange(size)[:, None] // 5) % 2).astype(np.int16)[..., None]
            fill = fill - band * 60
        img[m] = np.clip(fill[m], 0, 255).astype(np.uint8)
        labels[m] = SHAPES.index(shape) + 1
        objects.append((colour, shape))
    return img, labels, objects


def caption_for(objects: list[tuple[str, str]], rng: random.Random) -> str:
    named = rng.sample(objects, rng.randint(1, len(objects)))
    phrases = [f"{c} {s}" if rng.random() < 0.8 else s for c, s in named]
    phrases = [("a " + p) if rng.random() < 0.5 else p for p in phrases]
    joiner = rng.choice([" and ", ", ", " with ", "; "])
    lead = rng.choice(["", "", "a picture of ", "there is "])
    return lead + joiner.join(phrases)


def generate(out: Path, n_train: int, n_eval: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    train, ev = out / "train", out / "eval"
    train.mkdir(parents=True, exist_ok=True)
    (ev / "images").mkdir(parents=True, exist_ok=True)
    (ev / "labels").mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        img, _, objects = draw_scene(rng)
        Image.fromarray(img).save(train / f"{i:06d}.png")
        (train / f"{i:06d}.txt").write_text(caption_for(objects, rng), encoding="utf-8")
    eval_rng = random.Random(seed + 1_000_000)
    queries = {}
    for i in range(n_eval):
        img, labels, objects = draw_scene(eval_rng)
        Image.fromarray(img).save(ev / "images" / f"{i:04d}.png")
        Image.fromarray(labels).save(ev / "labels" / f"{i:04d}.png")
        queries[f"{i:04d}.png"] = sorted({s for _, s in objects})
    (ev / "classes.txt").write_text("\n".join(SHAPES) + "\n", encoding="utf-8")
    (ev / "objects.json").write_text(json.dumps(queries, indent=1), encoding="utf-8")


def pretrain_clip(
    data: str, out: Path, steps: int, batch: int = 64, lr: float = 1e-3, seed: int = 0, log_every: int = 50
) -> dict:
    """Contrastive CLIP pretraining of the tiny model's encoders on the pairs; the grounder is then re-copied."""
    torch.manual_seed(seed)
    model = TCL(SIZES["tiny"], seed=seed)
    model.clip_image_encoder.requires_grad_(True)
    model.clip_text_encoder.requires_grad_(True)
    params = list(model.clip_image_encoder.parameters()) + list(model.clip_text_encoder.parameters())
    scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    opt = torch.optim.AdamW([*params, scale], lr=lr, weight_decay=0.05)
    tok = Tokenizer()
    aug = AugmentConfig(size=SIZE, scale_min=0.5, color_jitter=0.0, rand_augment=False, erase_p=0.0)
    loader = torch.utils.data.DataLoader(
        ImageTextStream(data, aug, seed=seed, shuffle_buffer=256), batch_size=batch, collate_fn=collate, drop_last=True
    )
    it = iter(loader)
    model.clip_image_encoder.train()
    t0 = time.monotonic()
    loss = torch.tensor(0.0)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        images, captions, _ = next(it)
        img = clip_image_embedding(model, images)
        txt = model.encode_text(tok(captions))
        loss = info_nce(img, txt, img, txt, 0, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % log_every == 0:
            acc = (F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()).argmax(1).eq(torch.arange(batch))
            print(
                json.dumps(
                    {
                        "event": "pretrain",
                        "step": step + 1,
                        "loss": round(loss.item(), 4),
                        "batch_acc": round(acc.float().mean().item(), 3),
                        "steps_per_s": round((step + 1) / (time.monotonic() - t0), 2),
                    }
                ),
                flush=True,
            )
    model.clip_image_encoder.requires_grad_(False)
    model.clip_text_encoder.requires_grad_(False)
    model.init_grounder_from_clip()
    model.provenance = {"source": "synthetic-clip-pretrain", "steps": steps, "seed": seed}
    save_checkpoint(out, model, model.config, pretrain={"steps": steps, "final_loss": loss.item()})
    return {"final_loss": loss.item()}


def score(pred_dir: Path, eval_dir: Path, seed: int = 0) -> dict:
    """mIoU of `<stem>.labels.png` maps in pred_dir (as `tclseg segment --format labels` writes them) against
    eval_dir/labels, plus two baselines on the same pixels: uniform random labels and all-background."""
    from .train import load_eval_set, miou

    classes, pairs = load_eval_set(str(eval_dir))
    preds, gts, rand, bg = [], [], [], []
    rng = np.random.default_rng(seed)
    for img, lab in pairs:
        p = pred_dir / f"{img.stem}.labels.png"
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no prediction for {img.name}")
        g = np.asarray(Image.open(lab))
        preds.append(np.asarray(Image.open(p)))
        gts.append(g)
        rand.append(rng.integers(0, len(classes) + 1, g.shape))
        bg.append(np.zeros_like(g))
    n = len(classes) + 1
    return {
        "images": len(pairs),
        "miou": miou(preds, gts, n),
        "chance_uniform": miou(rand, gts, n),
        "all_background": miou(bg, gts, n),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tclseg_trainer.synthetic", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--train", type=int, default=4000)
    g.add_argument("--eval", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    pr = sub.add_parser("pretrain")
    pr.add_argument("--data", required=True)
    pr.add_argument("--out", type=Path, required=True)
    pr.add_argument("--steps", type=int, default=1500)
    pr.add_argument("--batch", type=int, default=64)
    pr.add_argument("--lr", type=float, default=1e-3)
    pr.add_argument("--seed", type=int, default=0)
    sc = sub.add_parser("score", help="mIoU of tclseg segment label maps against the eval labels")
    sc.add_argument("--pred", type=Path, required=True)
    sc.add_argument("--eval", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(int(__import__("os").environ.get("TCLSEG_TRAIN_THREADS", "1")))
    if args.cmd == "score":
        print(json.dumps(score(args.pred, args.eval)))
    elif args.cmd == "generate":
        generate(args.out, args.train, args.eval, args.seed)
    else:
        pretrain_clip(args.data, args.out, args.steps, args.batch, args.lr, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
