"""The synthetic world: image-caption pairs of coloured shapes, to show TCL works end to end on a CPU.

    python -m tclseg_trainer.tools.synthetic generate --out DIR [--train N] [--eval N] [--seed S]
    python -m tclseg_trainer.tools.synthetic pretrain --out clip.pt [--steps N] [--size small] [--background-words]
    python -m tclseg_trainer.tools.synthetic seed-config --config CONFIG --seed N --out DIR
    python -m tclseg_trainer.tools.synthetic pick RUN_DIR...
    python -m tclseg_trainer.tools.synthetic calibrate --bundle DIR --val DIR/val --out thresholds.toml
    python -m tclseg_trainer.tools.synthetic samples --out samples/shapes [--n 4]
    python -m tclseg_trainer.tools.synthetic score --pred DIR --eval DIR/eval
    python -m tclseg_trainer.tools.synthetic table --eval DIR/eval "step 0=PRED0" "trained=PRED1"

`generate` writes
- `DIR/train/<i>.png` + `<i>.txt`: 1-3 shapes (circle, square, triangle, cross), each in a different one of 6
  colours, some with a stripe texture, on a varied background (flat, gradient, noise or stripes). The caption names a
  random non-empty subset of the objects, in random order and phrasing ("a red circle and a blue square", "there is
  green cross; a white square"); 9 in 10 phrases name the colour. No masks are written for the training split.
- `DIR/{val,eval,eval-shapes}/{classes.txt, images/<i>.png, labels/<i>.png}`: held-out images with label maps
  (0 background). `val` (labelled by colour) picks checkpoints, seeds and thresholds; `eval` (by colour) and
  `eval-shapes` (the same images, by shape) are scored at the end only.

`pretrain` trains a CLIP (both encoders of a `TCL(SIZES[size])`; the recipe's is "small") contrastively on fresh pairs
drawn on the fly, with no masks, and writes a trainer checkpoint whose grounder is a copy of that CLIP, i.e. step 0 of
TCL = MaskCLIP.

`seed-config` and `pick` are the recipe's seed selection: the training config once per seed, then the run whose
best.pt scored highest on `val`. `calibrate` then measures a background threshold per colour word on `val`, through
the bundle as the engine runs it (PAMR, the bundle's window and scale), for the bundle's [mask.query_thresholds].

Why colours: in the CPU budget the CLIP learns colour words (zero-shot 100 % on single objects) but not shape
words (chance, 23-30 %, after 600-1000 steps), so colour names are what the grounder can learn to localise.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import tomli_w
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..checkpoints import save_checkpoint
from ..data import class_iou, collate, load_eval_set, miou, to_normalized_tensor
from ..losses import clip_image_embedding, info_nce
from ..model import SIZES, TCL
from ..tokenizer import Tokenizer

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
    """(RGB image, object map, [(colour, shape)] in drawing order). The object map holds 0 for background and i for
    the i-th object (later objects occlude earlier ones). Within an image no two objects share a shape or a colour,
    so "the red one" and "the circle" each name one object."""
    img = _background(rng, size)
    objmap = np.zeros((size, size), dtype=np.uint8)
    n = rng.randint(1, 3)
    objects = list(zip(rng.sample(list(COLOURS), n), rng.sample(SHAPES, n), strict=True))
    for i, (colour, shape) in enumerate(objects, start=1):
        r = rng.randint(size // 7, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        m = _shape_mask(shape, cx, cy, r, size)
        col = np.array(COLOURS[colour], dtype=np.int16)
        fill = np.broadcast_to(col, (size, size, 3)).copy()
        if rng.random() < 0.3:  # stripe texture
            band = ((np.arange(size)[:, None] // 5) % 2).astype(np.int16)[..., None]
            fill = fill - band * 60
        img[m] = np.clip(fill[m], 0, 255).astype(np.uint8)
        objmap[m] = i
    return img, objmap, objects


# What a held-out set labels objects by: the class names, and where the name sits in a (colour, shape) object.
CLASSES = {"colour": (list(COLOURS), 0), "shape": (list(SHAPES), 1)}


def label_map(objmap: np.ndarray, objects: list[tuple[str, str]], by: str) -> np.ndarray:
    """Class labels from an object map: by "colour" (class k = the k-th of COLOURS) or "shape" (of SHAPES)."""
    names, field_index = CLASSES[by]
    lut = np.zeros(256, dtype=np.uint8)
    for i, obj in enumerate(objects, start=1):
        lut[i] = names.index(obj[field_index]) + 1
    return lut[objmap]


def caption_for(objects: list[tuple[str, str]], rng: random.Random) -> str:
    named = rng.sample(objects, rng.randint(1, len(objects)))
    phrases = [f"{c} {s}" if rng.random() < 0.9 else s for c, s in named]
    phrases = [("a " + p) if rng.random() < 0.5 else p for p in phrases]
    joiner = rng.choice([" and ", ", ", " with ", "; "])
    lead = rng.choice(["", "", "a picture of ", "there is "])
    return lead + joiner.join(phrases)


# The held-out sets `generate` writes: (labelled by, seed offset). `val` picks checkpoints and thresholds during
# training; `eval` (colours) and `eval-shapes` (the same images, labelled by shape) are only scored at the end.
EVAL_SETS = {"val": ("colour", 2_000_000), "eval": ("colour", 1_000_000), "eval-shapes": ("shape", 1_000_000)}


def generate(out: Path, n_train: int, n_eval: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    train = out / "train"
    train.mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        img, _, objects = draw_scene(rng)
        Image.fromarray(img).save(train / f"{i:06d}.png")
        (train / f"{i:06d}.txt").write_text(caption_for(objects, rng), encoding="utf-8")
    for name, (by, offset) in EVAL_SETS.items():
        ev = out / name
        (ev / "images").mkdir(parents=True, exist_ok=True)
        (ev / "labels").mkdir(parents=True, exist_ok=True)
        eval_rng = random.Random(seed + offset)
        classes, field_index = CLASSES[by]
        present = {}
        for i in range(n_eval):
            img, objmap, objects = draw_scene(eval_rng)
            Image.fromarray(img).save(ev / "images" / f"{i:04d}.png")
            Image.fromarray(label_map(objmap, objects, by)).save(ev / "labels" / f"{i:04d}.png")
            present[f"{i:04d}.png"] = sorted(obj[field_index] for obj in objects)
        (ev / "classes.txt").write_text("\n".join(["background", *classes]) + "\n", encoding="utf-8")
        (ev / "objects.json").write_text(json.dumps(present, indent=1), encoding="utf-8")


def write_samples(out: Path, n: int, seed: int = 7) -> None:
    """The README's sample images (`<i>.png`, drawn like the held-out ones) and `queries.toml`: one query per colour
    name, drawn in its own colour in the overlays."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"samples-{seed}")
    for i in range(n):
        img, _, _ = draw_scene(rng)
        Image.fromarray(img).save(out / f"shapes-{i}.png")
    lines = ["# tclseg segment --queries: the colour names the synthetic-shapes model was trained on (its captions)."]
    for name, (r, g, b) in COLOURS.items():
        lines += ["", "[[query]]", f'name = "{name}"', f'colour = "#{r:02x}{g:02x}{b:02x}"']
    (out / "queries.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


class SceneStream(torch.utils.data.IterableDataset):
    """Endless fresh (image [3, S, S] normalised, caption) pairs drawn on the fly: pretraining never sees a pair
    twice, so a small CLIP cannot memorise captions. Each loader worker draws from its own seed. With
    `background_words`, 7 captions in 10 also name the background (" on a teal background", BACKGROUND_WORDS)."""

    def __init__(self, seed: int = 0, background_words: bool = False):
        self.seed = seed
        self.background_words = background_words

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(f"{self.seed}-{info.id if info else 0}")
        while True:
            img, objmap, objects = draw_scene(rng)
            caption = caption_for(objects, rng)
            if self.background_words and (objmap == 0).any() and rng.random() < 0.7:
                caption += f" on a {background_word(img[objmap == 0].mean(axis=0))} background"
            yield to_normalized_tensor(Image.fromarray(img)), caption, (0, {})


# Words for the backgrounds' colours, none of them an object colour (issue 21; notes, sections 9 and 10; the recipe
# pretrains with them).
# Green objects lose to dull green backgrounds; captions that call such a background "olive" give the CLIP a reason
# to tell the two apart. Each word's RGB is a typical background of `_background` (channels 24-120).
BACKGROUND_WORDS = {
    "olive": (60, 90, 30),
    "teal": (30, 90, 90),
    "navy": (30, 40, 100),
    "maroon": (100, 30, 30),
    "plum": (90, 40, 90),
    "grey": (70, 70, 70),
    "brown": (100, 70, 30),
    "black": (25, 25, 25),
}


def background_word(rgb: np.ndarray) -> str:
    """The BACKGROUND_WORDS entry nearest (squared RGB distance) to a background's mean colour."""
    return min(BACKGROUND_WORDS, key=lambda w: float(((np.asarray(rgb) - BACKGROUND_WORDS[w]) ** 2).sum()))


# Pretraining objectives: which image embedding meets the caption in the contrastive loss.
# - "cls": CLIP's own, the CLS token after all blocks (nothing asks the patch tokens to say what they show);
# - "dense": the CLS loss plus the same loss on the mean over patches of the MaskCLIP features (the self-only last
#   block + ln_post/proj, i.e. exactly what the grounder starts from), so each patch's own embedding has to carry
#   the words for what lies under it.
OBJECTIVES = ("cls", "dense")


def pretrain_image_embeddings(model: TCL, images: torch.Tensor, objective: str) -> list[torch.Tensor]:
    """The image embeddings [B, C] the contrastive loss compares with the captions, one per term (see OBJECTIVES)."""
    if objective == "cls":
        return [clip_image_embedding(model, images)]
    trunk = model.trunk
    grid = (images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size)
    tokens = model.trunk_tokens(images)
    cls = model.clip_image_encoder.clip_proj(trunk.transformer.resblocks[-1](tokens)[:, 0])
    dense = model.kp_features(tokens, grid)  # [B, C, h, w]
    return [cls, dense.mean(dim=(2, 3))]


def pretrain_clip(
    out: Path,
    steps: int,
    batch: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    log_every: int = 50,
    workers: int = 1,
    objective: str = "cls",
    size: str = "tiny",
    background_words: bool = False,
) -> dict:
    """Contrastive CLIP pretraining of the `size` model's encoders on fresh pairs (`SceneStream`, naming backgrounds
    with `background_words`); the grounder is then re-copied from the trained CLIP, so the checkpoint is step 0 of
    TCL (= MaskCLIP)."""
    torch.manual_seed(seed)
    model = TCL(SIZES[size], seed=seed)
    model.clip_image_encoder.requires_grad_(True)
    model.clip_text_encoder.requires_grad_(True)
    params = list(model.clip_image_encoder.parameters()) + list(model.clip_text_encoder.parameters())
    scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    opt = torch.optim.AdamW([*params, scale], lr=lr, weight_decay=0.05)
    tok = Tokenizer()
    loader = torch.utils.data.DataLoader(
        SceneStream(seed, background_words),
        batch_size=batch,
        collate_fn=collate,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
    )
    it = iter(loader)
    model.clip_image_encoder.train()
    t0 = time.monotonic()
    loss = torch.tensor(0.0)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        images, captions, _ = next(it)
        embs = pretrain_image_embeddings(model, images, objective)
        img = embs[0]
        txt = model.encode_text(tok(captions))
        loss = sum(info_nce(e, txt, e, txt, 0, scale) for e in embs) / len(embs)
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
    model.provenance = {"source": "synthetic-clip-pretrain", "steps": steps, "seed": seed, "objective": objective}
    save_checkpoint(out, model, model.config, pretrain={"steps": steps, "final_loss": loss.item()})
    return {"final_loss": loss.item()}


def score(pred_dir: Path, eval_dir: Path, seed: int = 0) -> dict:
    """mIoU of `<stem>.labels.png` maps in pred_dir (as `tclseg segment --format labels` writes them) against
    eval_dir/labels, plus two baselines on the same pixels: uniform random labels and all-background; `per_class`
    holds each one's IoU per class (background first)."""
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
    names = ["background", *classes]
    scored = {"miou": preds, "chance_uniform": rand, "all_background": bg}
    return {
        "images": len(pairs),
        **{key: miou(ps, gts, n) for key, ps in scored.items()},
        "per_class": {
            key: dict(zip(names, [round(float(v), 4) for v in class_iou(ps, gts, n)], strict=True))
            for key, ps in scored.items()
        },
    }


def table(eval_dir: Path, rows: list[tuple[str, Path]]) -> str:
    """The held-out table `scripts/synthetic-world` prints (markdown, IoU x 100): chance and all-background, then one
    row per (name, prediction directory); mIoU and IoU per class, background first."""
    results = [(name, score(pred, eval_dir)) for name, pred in rows]
    if not results:
        raise ValueError("table: no predictions to score")
    first = results[0][1]
    names = list(first["per_class"]["miou"])
    lines = [
        "| predictor | mIoU | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]

    def line(name: str, total: float, per: dict) -> str:
        cells = ["-" if math.isnan(per[c]) else f"{100 * per[c]:.1f}" for c in names]
        return f"| {name} | {100 * total:.1f} | " + " | ".join(cells) + " |"

    lines.append(line("chance (uniform random labels)", first["chance_uniform"], first["per_class"]["chance_uniform"]))
    lines.append(line("all background", first["all_background"], first["per_class"]["all_background"]))
    lines += [line(name, r["miou"], r["per_class"]["miou"]) for name, r in results]
    return "\n".join(lines)


def seed_config(config: Path, seed: int, out: Path) -> Path:
    """A copy of the training config `config` with `seed` set and its checkpoints in `out`/seed-<seed>, written to
    `out`/seed-<seed>.toml with every path made absolute (they were relative to `config`'s folder). It edits the TOML
    table rather than a loaded TrainConfig so the copy keeps the file's own keys (a TrainConfig's dict holds tuples,
    which TOML writes as arrays that the config loader then rejects); the path keys are those load_config resolves."""
    d = tomllib.loads(config.read_text(encoding="utf-8"))
    base = config.resolve().parent

    def absolute(path: str) -> str:
        return path if Path(path).is_absolute() else str((base / path).resolve())

    d["seed"] = seed
    d.setdefault("checkpoint", {})["dir"] = str((out / f"seed-{seed}").resolve())
    d["data"]["train"] = ",".join(absolute(x.strip()) for x in d["data"]["train"].split(","))
    if d.get("eval", {}).get("data"):
        d["eval"]["data"] = absolute(d["eval"]["data"])
    kind, _, file = d["model"]["init"].partition(":")
    if file:
        d["model"]["init"] = f"{kind}:{absolute(file)}"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"seed-{seed}.toml"
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(tomli_w.dumps(d), encoding="utf-8")
    tmp.replace(path)
    return path


# The per-query thresholds `calibrate` tries, above the bundle's own background threshold (which stays a floor: the
# engine's constant background class), and how many passes over the queries it makes.
CALIBRATION_STEP = 0.05
CALIBRATION_STEPS = 8
CALIBRATION_ROUNDS = 2


def search_query_thresholds(scores: np.ndarray, labels: np.ndarray, floor: float) -> tuple[list[float], float, float]:
    """Per-query background thresholds that maximise mIoU (background included) on a labelled set, and the mIoU
    before and after. scores [N, Q, H, W]: each query's score per pixel (no background class); labels [N, H, W]: 0
    background, q + 1 query q. A pixel is labelled with its best query unless that query's score is under the
    query's threshold (or `floor`, the bundle's own), as the engine does. Coordinate ascent over a grid above the
    floor, CALIBRATION_ROUNDS passes; a threshold moves only for a strictly better mIoU, so ties keep the lower one."""
    q = scores.shape[1]
    best_q = scores.argmax(axis=1)
    best_s = np.take_along_axis(scores, best_q[:, None], axis=1)[:, 0].astype(np.float32)
    truth = labels.astype(np.int64).ravel()
    winner = best_q.astype(np.int64).ravel()
    score = best_s.ravel()

    def miou_at(th: list[float]) -> float:
        limit = np.maximum(np.asarray(th, dtype=np.float32), np.float32(floor))
        return miou([np.where(score >= limit[winner], winner + 1, 0)], [truth], q + 1)

    grid = [
        round(floor + CALIBRATION_STEP * k, 4) for k in range(CALIBRATION_STEPS + 1) if floor + CALIBRATION_STEP * k < 1
    ]
    th = [floor] * q
    before = current = miou_at(th)
    for _ in range(CALIBRATION_ROUNDS):
        for k in range(q):
            for t in grid:
                trial = [*th[:k], t, *th[k + 1 :]]
                if (m := miou_at(trial)) > current + 1e-9:
                    th, current = trial, m
    return th, before, current


def calibrate(bundle: Path, val_dir: Path, out: Path) -> dict[str, float]:
    """Per colour word of `val_dir`'s classes, the background threshold `search_query_thresholds` finds on its
    images through `bundle` (the engine's algorithm, PAMR on, the bundle's window and scale); writes the ones above
    the bundle's bg_thresh_pamr to `out` as `name = threshold` lines (export's --query-thresholds)."""
    from ..bundle_infer import BundleRunner

    classes, pairs = load_eval_set(str(val_dir))
    runner = BundleRunner(bundle)
    floor = float(runner.bundle.mask["bg_thresh_pamr"])
    text = runner.text_embedding(classes)
    scores, labels = [], []
    for img, lab in pairs:
        s, _ = runner.segment(np.asarray(Image.open(img).convert("RGB")), text, pamr=True)
        scores.append(s.astype(np.float16))
        labels.append(np.asarray(Image.open(lab)))
    th, before, after = search_query_thresholds(np.stack(scores).astype(np.float32), np.stack(labels), floor)
    found = {name: t for name, t in zip(classes, th, strict=True) if t > floor}
    print(
        f"calibrate: {len(pairs)} images of {val_dir}: mIoU {100 * before:.1f} at {floor} for every query, "
        f"{100 * after:.1f} with " + (", ".join(f"{k} {v}" for k, v in found.items()) or "no change"),
        file=sys.stderr,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(tomli_w.dumps(found), encoding="utf-8")
    tmp.replace(out)
    return found


def pick_best(runs: list[Path]) -> tuple[Path, list[tuple[Path, float]]]:
    """The run folder whose best.pt scored highest on `val` during training (the trainer's own selection score), and
    every run's score. Only `val` decides: the held-out `eval` images are never read here."""
    scores = []
    for run in runs:
        ckpt = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
        scores.append((run, float(ckpt["best_miou"])))
    best = max(scores, key=lambda rs: rs[1])[0]
    return best, scores


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tclseg_trainer.tools.synthetic", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--train", type=int, default=4000)
    g.add_argument("--eval", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    pr = sub.add_parser("pretrain", help="a CLIP of one of model.SIZES, contrastively, on pairs drawn on the fly")
    pr.add_argument("--out", type=Path, required=True)
    pr.add_argument("--steps", type=int, default=1500)
    pr.add_argument("--batch", type=int, default=64)
    pr.add_argument("--lr", type=float, default=1e-3)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--objective", choices=OBJECTIVES, default="cls", help="see OBJECTIVES")
    pr.add_argument("--size", choices=list(SIZES), default="tiny", help="a key of model.SIZES")
    pr.add_argument("--background-words", action="store_true", help="captions also name the background (notes, §9)")
    sa = sub.add_parser("samples", help="the README's sample images and their queries")
    sa.add_argument("--out", type=Path, required=True)
    sa.add_argument("--n", type=int, default=4)
    sc = sub.add_parser("score", help="mIoU of tclseg segment label maps against the eval labels")
    sc.add_argument("--pred", type=Path, required=True)
    sc.add_argument("--eval", type=Path, required=True)
    ta = sub.add_parser("table", help="markdown table of mIoU and IoU per class: baselines, then each NAME=PRED_DIR")
    ta.add_argument("--eval", type=Path, required=True)
    ta.add_argument("rows", nargs="+", metavar="NAME=PRED_DIR")
    se = sub.add_parser("seed-config", help="a copy of a training config with another seed and checkpoint folder")
    se.add_argument("--config", type=Path, required=True)
    se.add_argument("--seed", type=int, required=True)
    se.add_argument("--out", type=Path, required=True, help="writes OUT/seed-N.toml; checkpoints go to OUT/seed-N")
    pk = sub.add_parser("pick", help="the training run whose best.pt scored highest on val")
    pk.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    ca = sub.add_parser("calibrate", help="per-query background thresholds measured on val through a bundle")
    ca.add_argument("--bundle", type=Path, required=True)
    ca.add_argument("--val", type=Path, required=True, help="a labelled held-out set (DIR/val)")
    ca.add_argument("--out", type=Path, required=True, help="TOML file of name = threshold, for export")
    args = p.parse_args(argv)
    torch.set_num_threads(int(__import__("os").environ.get("TCLSEG_TRAIN_THREADS", "1")))
    if args.cmd == "score":
        print(json.dumps(score(args.pred, args.eval)))
    elif args.cmd == "table":
        if bad := [r for r in args.rows if "=" not in r]:
            p.error(f"table: {bad[0]!r} is not NAME=PRED_DIR")
        print(table(args.eval, [(name, Path(d)) for name, d in (r.rsplit("=", 1) for r in args.rows)]))
    elif args.cmd == "seed-config":
        print(seed_config(args.config, args.seed, args.out))
    elif args.cmd == "pick":
        best, scores = pick_best(args.runs)
        for run, miou in scores:
            print(f"{run}: val mIoU {100 * miou:.1f}", file=sys.stderr)
        print(best)
    elif args.cmd == "calibrate":
        calibrate(args.bundle, args.val, args.out)
    elif args.cmd == "samples":
        write_samples(args.out, args.n)
    elif args.cmd == "generate":
        generate(args.out, args.train, args.eval, args.seed)
    else:
        pretrain_clip(
            args.out,
            args.steps,
            args.batch,
            args.lr,
            args.seed,
            objective=args.objective,
            size=args.size,
            background_words=args.background_words,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
