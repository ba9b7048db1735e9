"""Why the synthetic-world model segments badly: measurements on held-out labelled sets (issue 21).

    python -m tclseg_trainer.tools.synthetic_diag CHECKPOINT_OR_BUNDLE --fit DIR/val --test DIR/eval
    python -m tclseg_trainer.tools.synthetic_diag CHECKPOINT --rewards

For a trainer checkpoint (a pretrained tiny CLIP = step 0, or a TCL-trained one) it prints one JSON object with
- `probe`: a linear classifier per patch (multinomial logistic regression) fitted on the `--fit` set's labels and
  scored on `--test`, on the frozen trunk tokens (what the grounder reads) and on the MaskCLIP features (what step 0
  compares with the text). Its pixel mIoU (patch labels upsampled) is the ceiling of a grounder that reads those
  tokens patch by patch; the labels are used here only, never in training.
- `step0` / `grounder` (the step-0 head, w = 10, b = -2.5, and the model's own), `queries`: per colour class, the
  soft mask sigmoid(w cos + b), before any background threshold and without PAMR, averaged over the pixels of that
  class, of the other objects and of the background; the AUROC of the cosine map for "pixel is this class" against
  every other pixel (near 1: the ranking is right; near 0.5: the word is not localised; under 0.5: it points
  elsewhere); and the share of the class's pixels whose best query is the right one.
- `miou_no_pamr_by_bg_thresh`: mIoU of argmax over the classes, background where the best mask is under t.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..checkpoints import load_checkpoint
from ..data import load_eval_set, miou, to_normalized_tensor
from ..losses import clip_image_embedding, extended_info_nce, info_nce
from ..model import TCL
from ..tokenizer import Tokenizer
from .synthetic import COLOURS, caption_for, draw_scene

TEMPLATES = ["{}", "a {}", "there is a {}", "a picture of a {}"]


def _load(eval_dir: Path) -> tuple[list[str], torch.Tensor, np.ndarray]:
    classes, pairs = load_eval_set(str(eval_dir))
    images = torch.stack([to_normalized_tensor(Image.open(i)) for i, _ in pairs])
    labels = np.stack([np.asarray(Image.open(lab)) for _, lab in pairs])
    return classes, images, labels


class Features:
    """What the measurements read from a model, from a trainer checkpoint or an exported bundle (its ONNX graphs:
    the committed `models/synthetic-shapes` has no checkpoint)."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_dir():
            import tomllib

            import onnxruntime as ort

            toml = tomllib.loads((path / "model.toml").read_text(encoding="utf-8"))
            self.patch = toml["architecture"]["patch_size"]
            self.w, self.b = toml["mask"]["w"], toml["mask"]["b"]
            graphs = toml["graphs"]
            self.sessions = {
                k: ort.InferenceSession(str(path / graphs[k]["fp32"]))
                for k in ("image_trunk", "tcl_head", "text_encoder")
            }
            self.model = None
        else:
            self.model, _ = load_checkpoint(path)
            self.model.eval()
            self.patch = self.model.patch_size
            s2m = self.model.masker.sim2mask
            self.w, self.b = float(s2m.w), float(s2m.b)

    @torch.no_grad()
    def dense(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"trunk": tokens before the last block, "step0": the frozen self-only last block + proj (= the step-0
        grounder, before its identity decoder), "grounder": the grounder's embedding} as [B, C, h, w]."""
        grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)
        if self.model is None:
            tokens = self.sessions["image_trunk"].run(None, {"pixels": images.numpy()})[0]
            dense, kp = self.sessions["tcl_head"].run(None, {"tokens": tokens})
            tokens = torch.from_numpy(tokens)
            trunk = tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
            return {"trunk": trunk, "step0": torch.from_numpy(kp), "grounder": torch.from_numpy(dense)}
        tokens = self.model.trunk_tokens(images)
        return {
            "trunk": self.model._tokens_to_map(tokens, grid),
            "step0": self.model.kp_features(tokens, grid),
            "grounder": self.model.grounder_dense(tokens, grid),
        }

    @torch.no_grad()
    def text(self, classes: list[str]) -> torch.Tensor:
        """[N, C] normalised: per class the mean of the un-normalised template embeddings (TCL's recipe)."""
        tokens = Tokenizer()([t.format(c) for c in classes for t in TEMPLATES])
        if self.model is None:
            emb = torch.from_numpy(self.sessions["text_encoder"].run(None, {"tokens": tokens.numpy()})[0])
        else:
            emb = self.model.encode_text(tokens)
        return F.normalize(emb.reshape(len(classes), len(TEMPLATES), -1).mean(1), dim=-1)


def patch_majority(labels: np.ndarray, patch: int, n: int) -> np.ndarray:
    """[B, H, W] labels -> [B, h, w] the most frequent label in each patch."""
    B, H, W = labels.shape
    blocks = (
        labels.reshape(B, H // patch, patch, W // patch, patch)
        .transpose(0, 1, 3, 2, 4)
        .reshape(B, H // patch, W // patch, -1)
    )
    counts = np.stack([(blocks == k).sum(-1) for k in range(n)], axis=-1)
    return counts.argmax(-1)


def linear_probe(fx: torch.Tensor, fy: np.ndarray, tx: torch.Tensor, n: int, steps: int = 500) -> np.ndarray:
    """Fits softmax regression on features [B, C, h, w] with patch labels [B, h, w]; predicts [B', h, w] for tx."""
    x = fx.permute(0, 2, 3, 1).reshape(-1, fx.shape[1])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x = (x - mu) / sd
    y = torch.from_numpy(fy.reshape(-1)).long()
    lin = torch.nn.Linear(x.shape[1], n)
    opt = torch.optim.LBFGS(lin.parameters(), lr=0.5, max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y) + 1e-4 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    t = (tx.permute(0, 2, 3, 1).reshape(-1, tx.shape[1]) - mu) / sd
    with torch.no_grad():
        return lin(t).argmax(-1).reshape(tx.shape[0], tx.shape[2], tx.shape[3]).numpy()


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = score[positive], score[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    # Mann-Whitney U with average ranks for ties (masks saturate, so ties are common)
    _, inverse, counts = np.unique(np.concatenate([pos, neg]), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@torch.no_grad()
def diagnose(path: Path, fit_dir: Path, test_dir: Path) -> dict:
    feats = Features(path)
    classes, fit_images, fit_labels = _load(fit_dir)
    _, images, labels = _load(test_dir)
    n = len(classes) + 1
    p = feats.patch
    out: dict = {"model": str(path), "w": round(feats.w, 3), "b": round(feats.b, 3), "probe": {}}
    fit_feats, test_feats = feats.dense(fit_images), feats.dense(images)
    for name in fit_feats:
        fx, tx, scale = fit_feats[name], test_feats[name], fit_feats[name].shape[-1] // (fit_images.shape[-1] // p)
        if scale > 1:  # the grounder's stride-4 map: probe it on the patch grid's pixels it paints
            fx, tx = F.avg_pool2d(fx, scale), F.avg_pool2d(tx, scale)
        with torch.enable_grad():
            pred = linear_probe(fx, patch_majority(fit_labels, p, n), tx, n)
        up = pred.repeat(p, axis=1).repeat(p, axis=2)
        acc = float((pred == patch_majority(labels, p, n)).mean())
        out["probe"][name] = {"patch_acc": round(acc, 3), "pixel_miou": round(100 * miou(list(up), list(labels), n), 1)}
    text = feats.text(classes)
    step0 = (10.0, -2.5)  # Sim2Mask's initial w, b: the step-0 grounder's
    for key, feat, (w, b) in (
        ("step0", test_feats["step0"], step0),
        ("grounder", test_feats["grounder"], (feats.w, feats.b)),
    ):
        sim = TCL.cosine_map(feat, text)
        sim = F.interpolate(sim, size=images.shape[-2:], mode="bilinear", align_corners=False).numpy()
        masks = 1 / (1 + np.exp(-(w * sim + b)))
        queries = {}
        for k, name in enumerate(classes, start=1):
            inside = labels == k
            if not inside.any():
                continue
            others = (labels != k) & (labels != 0)
            queries[name] = {
                "mask_in": round(float(masks[:, k - 1][inside].mean()), 3),
                "mask_other_objects": round(float(masks[:, k - 1][others].mean()), 3),
                "mask_background": round(float(masks[:, k - 1][labels == 0].mean()), 3),
                "auroc": round(auroc(sim[:, k - 1], inside), 3),
                "argmax_acc_in": round(float((sim.argmax(1)[inside] == k - 1).mean()), 3),
            }
        best, arg = masks.max(1), masks.argmax(1) + 1
        sweep = {}
        for t in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
            sweep[str(t)] = round(100 * miou(list(np.where(best < t, 0, arg)), list(labels), n), 1)
        out[key] = {"queries": queries, "miou_no_pamr_by_bg_thresh": sweep}
    return out


def named_by(caption: str, colour: str, shape: str) -> bool:
    """Whether a caption of `caption_for` names the object: its "colour shape" phrase, or its shape bare."""
    if f"{colour} {shape}" in caption:
        return True
    return shape in caption and not any(f"{c} {shape}" in caption for c in COLOURS)


@torch.no_grad()
def rewards(checkpoint: Path, batch: int = 32, seed: int = 5) -> dict:
    """TCL's image-level (tcli) and feature-level (tclf) losses of one batch of fresh pairs, for masks given by
    hand instead of the grounder's: what would the losses prefer? Lower is preferred. Families (mask of image b for
    caption n): "oracle" = b's objects that caption n names; "all_objects" = every object of b; "full" = all
    ones; "background" = all but the objects; "grounder" = the checkpoint's own soft masks."""
    import random

    model, _ = load_checkpoint(checkpoint)
    model.eval()
    rng = random.Random(seed)
    scenes = [draw_scene(rng) for _ in range(batch)]
    captions = [caption_for(objs, rng) for _, _, objs in scenes]
    images = torch.stack([to_normalized_tensor(Image.fromarray(img)) for img, _, _ in scenes])
    text = model.encode_text(Tokenizer()(captions))
    grid = (images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size)
    tokens = model.trunk_tokens(images)
    emb = model.grounder_dense(tokens, grid)
    size = emb.shape[-2:]
    objmaps = torch.from_numpy(np.stack([o for _, o, _ in scenes])).long()
    small = F.interpolate(objmaps[:, None].float(), size=size, mode="nearest")[:, 0].long()  # [B, h, w]
    oracle = torch.zeros(batch, batch, *size)
    for b, (_, _, objs) in enumerate(scenes):
        for n, cap in enumerate(captions):
            for i, (c, sh) in enumerate(objs, start=1):
                if named_by(cap, c, sh):
                    oracle[b, n] += (small[b] == i).float()
    objects = (small > 0).float()[:, None].expand(batch, batch, *size)
    own = model.masker.sim2mask(model.cosine_map(emb, text))
    families = {
        "oracle": oracle,
        "all_objects": objects,
        "full": torch.ones_like(oracle),
        "background": 1 - objects,
        "grounder": own,
    }
    out: dict = {"checkpoint": str(checkpoint), "batch": batch}
    for name, m in families.items():
        diag = m[torch.arange(batch), torch.arange(batch)][:, None]
        hard = F.interpolate((diag > 0.5).float(), size=images.shape[-2:], mode="nearest")
        masked = clip_image_embedding(model, images * hard)
        tcli = info_nce(masked, text, masked, text, 0, model.tcli_loss.logit_scale)
        tclf = extended_info_nce(m, emb, text, 0, model.tclf_loss.logit_scale)
        out[name] = {
            "tcli": round(tcli.item(), 3),
            "tclf": round(tclf.item(), 3),
            "pos_area": round(diag.mean().item(), 3),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tclseg_trainer.tools.synthetic_diag", description=__doc__.splitlines()[0]
    )
    ap.add_argument("checkpoints", type=Path, nargs="+", help="trainer checkpoints or bundle folders")
    ap.add_argument("--fit", type=Path, help="labelled set the probe is fitted on (val)")
    ap.add_argument("--test", type=Path, help="labelled set everything is scored on (eval)")
    ap.add_argument("--rewards", action="store_true", help="only the loss-versus-mask-family table (no sets)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for c in args.checkpoints:
        if args.rewards:
            print(json.dumps(rewards(c)), flush=True)
        else:
            print(json.dumps(diagnose(c, args.fit, args.test)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
