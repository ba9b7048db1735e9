"""tclseg's training-free heads against each method's official code, on the same weights and photos.

    python -m tclseg_trainer.tools.heads_parity --official .official \
        --python-official ~/.cache/tclseg/venv-official-*/bin/python --photos .official/photos

`scripts/test-heads-official` prepares everything (`scripts/setup-heads-official`: the official repositories at
pinned commits in .official/<name>, the official venv and photos of the TCL comparison) and runs this. One run:

1. writes seeded random CLIP ViT-B/16 weights under OpenAI's key names, fp16 like OpenAI's `ViT-B-16.pt` (the
   file every official loader here reads: their `clip.load`, or open_clip's `load_openai_model` for ClearCLIP);
2. cuts scikit-image's photos to a few sizes (PNG files both sides read, so no resampler differs);
3. runs each method's official segmentor (the `official` subcommand in the official venv, one process per
   repository, all at once: three of them ship different packages named `clip`) through its own dense path: sliding
   window, logits resized to the image, its refinement (PEARL's text-aware Laplacian propagation), its softmax at its
   logit scale; the logits before the softmax, the probabilities and the labels are saved;
4. runs our heads (`tclseg_trainer.heads`) in PyTorch on the same pixels;
5. runs the binary, `tclseg segment --head X --protocol X`, on a bundle exported from the same weights file
   (`export --clip`, every compared head on one trunk) under each method's own protocol as the bundle carries it
   (head_protocols.py: window, stride, short side, CLIP's statistics, the 80 templates, logit fusion), on photos
   already at the protocol's short side (its rescale is then the identity: both sides see the same pixels); its
   probabilities come from the 16-bit score PNGs (`--format scores`, steps of 1.5e-5), its labels from the label
   PNG (class + 1: a training-free head's threshold class 0 comes first);
6. prints, per method, photo and size, the largest |Δ| of the logits (cosine similarities, what the heads output)
   and of the probabilities, and the share of equal labels; fails unless every case meets the goal.

The official model code runs unchanged. What stands in for its frameworks (mmengine, mmseg 1.x: a registry, the
`BaseSegmentor` base class, `SegDataPreProcessor`'s settings holder and `PixelData`) only wraps it; see
`install_framework_shims`. Settings are each class's defaults (its paper's protocol: window, stride, logit scale),
with PAMR off (NACLIP's default is on: it is an optional refinement on top of the head, compared elsewhere) and no
probability threshold (labels are the plain argmax). Inputs are normalised as their `SegDataPreProcessor` does
(RGB, CLIP's mean and std on the 0..255 scale).

ClearCLIP builds its CLIP in fp16 and casts the input to fp16 in `predict`; on the CPU we build it in fp32
(`create_model(..., precision='fp32')`) and call `forward_slide` and `postprocess_result` as `predict` does, minus
the cast: fp16 rounding alone moves scores by ~1e-3, far over the goal, and says nothing about the method. MaskCLIP
is compared against ClearCLIP's `model_type='MaskCLIP'` (the value path, no residual, no FFN) with ClearCLIP's
protocol; TCL's own MaskCLIP stage is compared against kakaobrain/tcl by `official_parity`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

SEED = 0
QUERIES = ["person", "cat", "coffee cup", "sky"]
# The goal (issue 19): dense scores within 1e-4, labels at least 99.9 % equal.
MAX_SCORE_DIFF = 1e-4
MIN_LABEL_AGREEMENT = 0.999

# ClearCLIP's segmentor, which also runs MaskCLIP (model_type="MaskCLIP": the value path, no residual, no FFN).
CLEARCLIP = {
    "repo": "clearclip",
    "module": "clearclip_segmentor",
    "class": "ClearCLIPSegmentation",
    "kwargs": {
        "clip_type": "CLIP",
        "vit_type": "ViT-B/16",
        "model_type": "ClearCLIP",
        "ignore_residual": True,
        "prob_thd": 0.0,
        "logit_scale": 50,
        "slide_stride": 224,
        "slide_crop": 448,
    },
}
# Per method: the official repository folder (in .official), the module and class of its segmentor, and the
# keyword arguments it is built with (besides clip_path/name_path/device): each class's defaults, written out.
METHODS: dict[str, dict] = {
    "maskclip": {**CLEARCLIP, "kwargs": {**CLEARCLIP["kwargs"], "model_type": "MaskCLIP"}},
    "sclip": {
        "repo": "sclip",
        "module": "clip_segmentor",
        "class": "CLIPForSegmentation",
        "kwargs": {"pamr_steps": 0, "prob_thd": 0.0, "logit_scale": 40, "slide_stride": 112, "slide_crop": 224},
    },
    "clearclip": CLEARCLIP,
    "naclip": {
        "repo": "naclip",
        "module": "naclip",
        "class": "NACLIP",
        "kwargs": {
            "arch": "reduced",
            "attn_strategy": "naclip",
            "gaussian_std": 5.0,
            "pamr_steps": 0,
            "prob_thd": 0.0,
            "logit_scale": 40,
            "slide_stride": 112,
            "slide_crop": 224,
        },
    },
    "pearl": {
        "repo": "pearl",
        "module": "pearl_ovss",
        "class": "PEARL",
        "kwargs": {
            "arch": "reduced",
            "attn_strategy": "pearl",
            "prob_thd": 0.0,
            "logit_scale": 40,
            "slide_stride": 112,
            "slide_crop": 224,
            "use_kk": True,
            "alpha_kk": 0.08,
            "align_solver": "polar",
            "polar_iters": 5,
            # Its text-aware Laplacian propagation (TLP, default "on") is post-processing that heads.py does not
            # have yet: the head itself (Procrustes-aligned attention) is compared.
            "use_prop": "off",
            "grid": 80,
        },
    },
}

# The test images: (name, photo, size (w, h) to resize to, or None to keep it). They exercise one window at the
# native 14x14 grid (224x224); overlapping windows with the last one pushed back inside and, for ClearCLIP's 448
# windows, a side shorter than the window and no multiple of 16 (chelsea as it is, 451x300: ClearCLIP pads that
# window to whole patches, the others' patch embedding drops the remainder), with a grid the position embedding is
# resized to; and 336 on the short side, as the methods' VOC protocol rescales.
IMAGES = [
    ("astronaut-224", "astronaut.png", (224, 224)),
    ("chelsea", "chelsea.png", None),
    ("coffee-336", "coffee.png", (504, 336)),
]
# `--quick` without the binary: the one image that covers every path above but the native grid. With the binary,
# `--quick` (scripts/test) compares all three sides on one photo per head, the binary's at its protocol's short side.
QUICK_IMAGES = ["chelsea"]
# The binary's photos (name, photo, short side): cut to each protocol's short side (head_protocols.py) keeping the
# photo's aspect ratio. coffee is 3:2 (several windows in both directions), astronaut square.
BINARY_PHOTOS = [("coffee", "coffee.png"), ("astronaut", "astronaut.png")]
QUICK_BINARY_PHOTOS = ["coffee"]

# CLIP's normalisation as every method's SegDataPreProcessor has it (RGB, on the 0..255 scale).
PIXEL_MEAN = (122.771, 116.746, 104.094)
PIXEL_STD = (68.501, 66.632, 70.323)


def load_pixels(path: Path):
    """The photo as the official data path hands it to `predict`: [1, 3, H, W] float32, RGB, normalised."""
    import torch
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    x = (rgb - np.asarray(PIXEL_MEAN, np.float32)) / np.asarray(PIXEL_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


# ---------------------------------------------------------------------------------------------------------------
# The official side (runs in the official venv; imports nothing from tclseg_trainer but this module).


def install_framework_shims() -> None:
    """Stand-ins for the mmengine / mmseg 1.x names the official segmentors import. None of them computes:
    `BaseSegmentor` is an `nn.Module` that keeps its `data_preprocessor`, the registry's decorator returns the class
    unchanged, `SegDataPreProcessor` holds its settings (we normalise the input as it would, in `load_pixels`), and
    `PixelData` / `SegDataSample` hold what `postprocess_result` stores. ClearCLIP's module also imports BLIP's
    retrieval model at the top (used only with clip_type='BLIP'), which would need `transformers`: it raises if
    called."""
    import torch.nn as nn

    from .official_side import _import_only_module

    class BaseSegmentor(nn.Module):
        def __init__(self, data_preprocessor=None, init_cfg=None):
            super().__init__()
            self.data_preprocessor = data_preprocessor

    class SegDataPreProcessor:
        def __init__(self, **settings):
            self.settings = settings

    class PixelData:
        def __init__(self, **fields):
            self.__dict__.update(fields)

    class Registry:
        def register_module(self, *_args, **_kwargs):
            return lambda cls: cls

    modules = {
        "mmengine": {},
        "mmengine.structures": {"PixelData": PixelData},
        "mmseg": {},
        "mmseg.models": {},
        "mmseg.models.segmentors": {"BaseSegmentor": BaseSegmentor},
        "mmseg.models.data_preprocessor": {"SegDataPreProcessor": SegDataPreProcessor},
        "mmseg.registry": {"MODELS": Registry()},
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
    for name in ("BLIP", "BLIP.models"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["BLIP.models.blip_retrieval"] = _import_only_module(
        "BLIP.models.blip_retrieval", "ClearCLIP uses BLIP only with clip_type='BLIP'"
    )


class SegDataSample:
    """What the segmentors read (`metainfo`) and write (`set_data`) on mmseg's data sample."""

    def __init__(self, metainfo: dict):
        self.metainfo = metainfo

    def set_data(self, fields: dict) -> None:
        self.__dict__.update(fields)


def build_official(method: str, repo: Path, clip: Path, names: Path):
    """The official segmentor of `method`, on the CPU, loading `clip` where it would download OpenAI's file."""
    import importlib

    import torch

    spec = METHODS[method]
    os.chdir(repo)  # they read their configs and prompt files by relative path
    sys.path.insert(0, str(repo))
    install_framework_shims()
    module = importlib.import_module(spec["module"])
    if spec["repo"] == "clearclip":
        # open_clip fetches "openai" weights by URL: hand it the file instead, and build in fp32 (module docstring).
        import open_clip.openai

        open_clip.openai.download_pretrained_from_url = lambda url, cache_dir=None: str(clip)
        create_model = module.create_model

        def create_model_fp32(name, pretrained=None, precision="fp32", **kwargs):
            return create_model(name, pretrained=pretrained, precision="fp32", **kwargs)

        module.create_model = create_model_fp32
        segmentor = getattr(module, spec["class"])(name_path=str(names), device="cpu", **spec["kwargs"])
    else:
        segmentor = getattr(module, spec["class"])(str(clip), str(names), device=torch.device("cpu"), **spec["kwargs"])
    return segmentor.eval()


def run_official(segmentor, method: str, pixels) -> dict:
    """One image through the official dense path; the logits `postprocess_result` is given, its probabilities
    and labels."""
    import torch

    captured = {}
    postprocess = segmentor.postprocess_result

    def capture(seg_logits, data_samples):
        captured["logits"] = seg_logits.detach().clone()
        return postprocess(seg_logits, data_samples)

    segmentor.postprocess_result = capture
    h, w = pixels.shape[-2:]
    meta = {"ori_shape": (h, w), "img_shape": (h, w), "pad_shape": (h, w), "padding_size": [0, 0, 0, 0]}
    samples = [SegDataSample(meta)]
    with torch.no_grad():
        if METHODS[method]["repo"] == "clearclip":
            # `predict` minus its fp16 cast (module docstring).
            logits = segmentor.forward_slide(pixels, [meta], segmentor.slide_stride, segmentor.slide_crop)
            samples = segmentor.postprocess_result(logits, samples)
        else:
            samples = segmentor.predict(pixels, samples)
    segmentor.postprocess_result = postprocess
    return {
        "logits": captured["logits"][0].float().numpy(),
        "probs": samples[0].seg_logits.data.float().numpy(),
        "labels": samples[0].pred_sem_seg.data[0].numpy().astype(np.int64),
    }


def official_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="heads_parity official", description="one method's official code")
    ap.add_argument("--methods", required=True, help="comma-separated methods of one official repository")
    ap.add_argument("--official", required=True, type=Path, help="the folder holding the checkouts")
    ap.add_argument("--clip", required=True, type=Path)
    ap.add_argument("--images", required=True, type=Path)
    ap.add_argument("--queries", required=True, help="JSON list of class names")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    images = sorted(args.images.resolve().glob("*.png"))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = out / f"names-{args.methods.replace(',', '-')}.txt"
    names.write_text("".join(f"{q}\n" for q in json.loads(args.queries)))
    methods = args.methods.split(",")
    repos = {METHODS[m]["repo"] for m in methods}
    if len(repos) != 1:
        raise SystemExit(f"heads-parity: {methods} are not all from one official repository")
    repo = (args.official / repos.pop()).resolve()
    started = time.perf_counter()
    segmentor = build_official(methods[0], repo, args.clip.resolve(), names)
    built = time.perf_counter() - started
    for method in methods:
        # ClearCLIP's MaskCLIP is the same segmentor with another `model_type`, an attribute its forward reads:
        # set it rather than build (and encode the 80 x N prompts) again.
        for key, value in METHODS[method]["kwargs"].items():
            if key in ("model_type", "logit_scale", "slide_stride", "slide_crop"):
                setattr(segmentor, key, value)
        folder = out / method
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "text.npy", segmentor.query_features.float().numpy())
        for path in images:
            result = run_official(segmentor, method, load_pixels(path))
            for key, value in result.items():
                np.save(folder / f"{path.stem}.{key}.npy", value)
    print(
        f"heads-parity: official {args.methods}: built in {built:.1f} s, {len(images)} images in "
        f"{time.perf_counter() - started - built:.1f} s",
        file=sys.stderr,
    )


# ---------------------------------------------------------------------------------------------------------------
# The driver (runs in the trainer's venv).


def make_images(photos: Path, folder: Path, only: list[str] | None = None) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, source, size in IMAGES:
        if only is not None and name not in only:
            continue
        src = photos / source
        if not src.is_file():
            raise SystemExit(f"{src}: missing (scripts/setup-heads-official unpacks the photos)")
        image = Image.open(src).convert("RGB")
        if size is not None and image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        path = folder / f"{name}.png"
        image.save(path)
        paths.append(path)
    return paths


def protocol_short_side(method: str) -> int:
    """The short side of `method`'s own protocol without a dataset (what `segment --protocol` rescales to)."""
    from ..head_protocols import PROTOCOLS

    defaults = PROTOCOLS[method].defaults
    assert defaults is not None
    return defaults.short_side


def make_binary_images(photos: Path, folder: Path, shorts: set[int], only: list[str] | None) -> dict[int, list[Path]]:
    """Per short side: the photos resized (bilinear, PIL) so that their short side is it, long side in proportion."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[int, list[Path]] = {}
    for short in sorted(shorts):
        for name, source in BINARY_PHOTOS:
            if only is not None and name not in only:
                continue
            image = Image.open(photos / source).convert("RGB")
            w, h = image.size
            size = (round(w * short / h), short) if w >= h else (short, round(h * short / w))
            path = folder / f"{name}-{short}.png"
            image.resize(size, Image.Resampling.BILINEAR).save(path)
            out.setdefault(short, []).append(path)
    return out


def export_bundle_cmd(clip: Path, methods: list[str], out: Path) -> list[str]:
    """The export of one bundle with every compared head on one trunk from the official-format weights file."""
    cmd = [sys.executable, "-m", "tclseg_trainer.export", "--clip", str(clip), "--allow-unverified-clip"]
    cmd += ["--heads", ",".join(methods), "--crop-size", "224", "--precision", "fp32", "--out", str(out)]
    return cmd + ["--force"]


def run_binary(tclseg: str, bundle: Path, method: str, images: list[Path], queries: list[str], out: Path, threads: int):
    """`tclseg segment --head M --protocol M` on `images`; per image: probabilities [N, H, W] and labels [H, W]
    (the label PNG less one: its class 0 is the threshold class)."""
    from PIL import Image

    cmd = [tclseg, "segment", "--model", str(bundle), "--head", method, "--protocol", method]
    cmd += ["--format", "labels,scores", "--threads", str(threads), "--out", str(out), "--force"]
    for q in queries:
        cmd += ["--query", q]
    cmd += [str(p) for p in images]
    print(f"heads-parity: binary {method}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    results = {}
    for path in images:
        labels = np.asarray(Image.open(out / f"{path.stem}.labels.png")).astype(np.int64) - 1
        probs = np.stack(
            [
                np.asarray(Image.open(out / f"{path.stem}.score{q + 1}.png"), dtype=np.float64) / 65535.0
                for q in range(len(queries))
            ]
        )
        results[path.stem] = {"probs": probs, "labels": labels}
    return results


def compare_binary(official: Path, ours: dict[str, np.ndarray], name: str) -> dict:
    """As `compare`, for the binary: probabilities (from 16-bit PNGs) and labels; it has no logits output."""
    ref = {k: np.load(official / f"{name}.{k}.npy") for k in ("probs", "labels")}
    for key in ("probs", "labels"):
        if ours[key].shape != ref[key].shape:
            raise SystemExit(f"heads-parity: binary {name}: our {key} {ours[key].shape} vs official {ref[key].shape}")
    return {
        "logits": 0.0,
        "probs": float(np.abs(ours["probs"] - ref["probs"]).max()),
        "labels_equal": float((ours["labels"] == ref["labels"]).mean()),
        "classes": int(len(np.unique(ref["labels"]))),
    }


def official_templates(checkout: Path) -> list:
    """The 80 ImageNet prompt templates every method encodes its class names with, read from the official
    checkout's `prompts/imagenet_template.py` at run time (never copied here)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("official_prompts", checkout / "prompts" / "imagenet_template.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.openai_imagenet_template)


def templates_differ(templates: list) -> bool:
    """Whether the checkout's templates differ from the ones the bundle's protocols carry."""
    from ..head_protocols import IMAGENET_TEMPLATES

    return [t("{}") for t in templates] != list(IMAGENET_TEMPLATES)


def load_our_clip(clip: Path):
    """Our CLIP (`tclseg_trainer.clip`) from the official-format file, as the exporter reads it (fp16 -> fp32)."""
    from ..checkpoints import load_clip_into, load_openai_clip
    from ..clip import CLIP
    from ..model import SIZES

    size = SIZES["vit-b16"]
    model = CLIP(size.vision, size.text)
    load_clip_into(model, load_openai_clip(clip, expected_sha256=None))
    return model.eval()


def our_text(model, queries: list[str], templates: list):
    """Per class: the mean of the L2-normalised template embeddings, L2-normalised (what every method does)."""
    import torch
    import torch.nn.functional as F

    from ..tokenizer import tokenize

    rows = []
    with torch.no_grad():
        for query in queries:
            feats = F.normalize(model.encode_text(tokenize([t(query) for t in templates])), dim=-1)
            rows.append(F.normalize(feats.mean(dim=0), dim=-1))
    return torch.stack(rows)


def windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """The sliding windows (y1, y2, x1, x2) of the methods' `forward_slide`: a grid of `stride` steps, the last
    window pushed back inside the image; a side shorter than the crop is taken whole."""
    out = []
    h_grids = max(h - crop + stride - 1, 0) // stride + 1
    w_grids = max(w - crop + stride - 1, 0) // stride + 1
    for i in range(h_grids):
        for j in range(w_grids):
            y2, x2 = min(i * stride + crop, h), min(j * stride + crop, w)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


def run_ours(model, method: str, pixels, text) -> dict:
    """Our head (`heads.dense_features`) under the method's protocol: per window, cosine logits at the patch grid
    upsampled bilinearly to the window, averaged where windows overlap, softmax at the method's logit scale."""
    import torch
    import torch.nn.functional as F

    from ..heads import dense_features

    settings = METHODS[method]["kwargs"]
    crop, stride = settings["slide_crop"], settings["slide_stride"]
    patch = model.visual.patch_size
    _, _, h, w = pixels.shape
    preds = torch.zeros(1, text.shape[0], h, w)
    count = torch.zeros(1, 1, h, w)
    with torch.no_grad():
        for y1, y2, x1, x2 in windows(h, w, crop, stride):
            window = pixels[:, :, y1:y2, x1:x2]
            wh, ww = window.shape[-2:]
            if METHODS[method]["repo"] == "clearclip":
                # ClearCLIP pads a window to whole patches (zeros, split left/right and top/bottom), cuts back after.
                pad_w, pad_h = -ww % patch, -wh % patch
                left, top = pad_w // 2, pad_h // 2
                window = F.pad(window, (left, pad_w - left, top, pad_h - top))
                full = window.shape[-2:]
            else:
                # The others' stride-16 patch embedding drops a remainder; logits still stretch over the window.
                left, top, full = 0, 0, (wh, ww)
                window = window[:, :, : wh - wh % patch, : ww - ww % patch]
            feats = dense_features(model.visual, method, window)
            logits = torch.einsum("behw,ne->bnhw", feats, text.float())
            logits = F.interpolate(logits, size=full, mode="bilinear", align_corners=False)
            preds[:, :, y1:y2, x1:x2] += logits[:, :, top : top + wh, left : left + ww]
            count[:, :, y1:y2, x1:x2] += 1
    logits = (preds / count)[0]
    probs = (logits * settings["logit_scale"]).softmax(dim=0)
    return {"logits": logits.numpy(), "probs": probs.numpy(), "labels": probs.argmax(dim=0).numpy().astype(np.int64)}


def compare(official: Path, ours: dict[str, np.ndarray], name: str) -> dict:
    """max |Δ| of logits and probabilities, share of equal labels, and how many classes the official labels use."""
    ref = {k: np.load(official / f"{name}.{k}.npy") for k in ("logits", "probs", "labels")}
    for key in ("logits", "probs", "labels"):
        if ours[key].shape != ref[key].shape:
            raise SystemExit(f"heads-parity: {name}: our {key} {ours[key].shape} vs official {ref[key].shape}")
    return {
        "logits": float(np.abs(ours["logits"].astype(np.float64) - ref["logits"]).max()),
        "probs": float(np.abs(ours["probs"].astype(np.float64) - ref["probs"]).max()),
        "labels_equal": float((ours["labels"] == ref["labels"]).mean()),
        "classes": int(len(np.unique(ref["labels"]))),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "official":
        official_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description="tclseg's training-free heads against each method's official code")
    ap.add_argument("--official", required=True, type=Path, help="folder of the checkouts (.official)")
    ap.add_argument("--python-official", required=True, help="the official environment's Python")
    ap.add_argument("--photos", required=True, type=Path, help="folder with scikit-image's sample photos")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--tclseg", default="target/release/tclseg", help="the binary ('' to skip it)")
    ap.add_argument("--work", default="target/heads-parity", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"one photo per head ({', '.join(QUICK_BINARY_PHOTOS)} at its protocol's short side; "
        f"{', '.join(QUICK_IMAGES)} without the binary) and two classes (scripts/test)",
    )
    ap.add_argument("--reuse-official", action="store_true", help="keep the official outputs of an earlier run")
    ap.add_argument("--max-score-diff", type=float, default=MAX_SCORE_DIFF)
    ap.add_argument("--min-label-agreement", type=float, default=MIN_LABEL_AGREEMENT)
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"heads-parity: unknown method(s) {unknown} (known: {', '.join(METHODS)})")

    from .official_parity import write_official_weights

    started = time.perf_counter()
    work = args.work
    for stale in ("images", "images-binary", "tclseg") + (() if args.reuse_official else ("official",)):
        shutil.rmtree(work / stale, ignore_errors=True)
    # The binary's photos, at each compared method's protocol short side.
    binary = bool(args.tclseg)
    if args.quick and binary:
        images = []
    else:
        images = make_images(args.photos, work / "images", QUICK_IMAGES if args.quick else None)
    if binary and not Path(args.tclseg).is_file():
        raise SystemExit(f"heads-parity: {args.tclseg}: no such binary (build it, or --tclseg '' to skip it)")
    shorts = {protocol_short_side(m) for m in methods} if binary else set()
    binary_images = make_binary_images(
        args.photos, work / "images-binary", shorts, QUICK_BINARY_PHOTOS if args.quick else None
    )
    clip, _ = write_official_weights(work / "weights", seed=args.seed)
    trainer_dir = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=trainer_dir)
    queries = QUERIES[:2] if args.quick else QUERIES
    groups: dict[str, list[str]] = {}
    for method in methods:
        groups.setdefault(METHODS[method]["repo"], []).append(method)
    # Per method: the photos it is compared on (the binary's only at its protocol's short side).
    method_images = {m: images + (binary_images.get(protocol_short_side(m), []) if binary else []) for m in methods}
    t_official = time.perf_counter()
    exporter = None
    if binary:
        # The bundle is exported while the official code runs.
        export_cmd = export_bundle_cmd(clip, methods, work / "bundle")
        print(f"heads-parity: export: {' '.join(export_cmd)}", file=sys.stderr, flush=True)
        exporter = subprocess.Popen(export_cmd, env=env, stdout=subprocess.DEVNULL)
    if not args.reuse_official:
        # One process per repository (three ship different packages named `clip`), all at once, each on its
        # methods' photos.
        threads = max(1, args.threads // len(groups))
        procs = []
        for repo, group in groups.items():
            folder = work / "images" / f"for-{repo}"
            folder.mkdir(parents=True, exist_ok=True)
            for path in {p for m in group for p in method_images[m]}:
                shutil.copyfile(path, folder / path.name)
            cmd = [args.python_official, "-m", "tclseg_trainer.tools.heads_parity", "official"]
            cmd += ["--methods", ",".join(group), "--official", str(args.official), "--clip", str(clip)]
            cmd += ["--images", str(folder), "--queries", json.dumps(queries)]
            cmd += ["--out", str(work / "official"), "--threads", str(threads)]
            print(f"heads-parity: official {','.join(group)}: {' '.join(cmd)}", file=sys.stderr, flush=True)
            procs.append((group, subprocess.Popen(cmd, env=env)))
        failed = [",".join(group) for group, proc in procs if proc.wait() != 0]
        if failed:
            raise SystemExit(f"heads-parity: the official code of {', '.join(failed)} failed (its output is above)")
    t_official = time.perf_counter() - t_official
    if exporter is not None and exporter.wait() != 0:
        raise SystemExit("heads-parity: the bundle export failed (its output is above)")
    model = load_our_clip(clip)
    rows, failures, texts = [], [], {}
    t_ours = time.perf_counter()
    for method in methods:
        official = work / "official" / method
        templates = official_templates(args.official / METHODS[method]["repo"])
        key = tuple(t("{}") for t in templates)
        if key not in texts:
            texts[key] = our_text(model, queries, templates)
        text = texts[key]
        text_diff = float(np.abs(text.numpy() - np.load(official / "text.npy")).max())
        if templates_differ(templates):
            raise SystemExit(f"heads-parity: {method}: head_protocols.IMAGENET_TEMPLATES differ from the checkout's")
        for path in method_images[method]:
            ours = run_ours(model, method, load_pixels(path), text)
            row = {"method": method, "image": path.stem, "text": text_diff, **compare(official, ours, path.stem)}
            row["size"] = f"{ours['labels'].shape[1]}x{ours['labels'].shape[0]}"
            rows.append(row)
            print(f"heads-parity: {method} {path.stem}: {row}", file=sys.stderr, flush=True)
    t_ours = time.perf_counter() - t_ours
    t_binary = time.perf_counter()
    for method in methods if binary else []:
        official = work / "official" / method
        shots = binary_images.get(protocol_short_side(method), [])
        out = work / "tclseg" / method
        results = run_binary(args.tclseg, work / "bundle", method, shots, queries, out, args.threads)
        for path in shots:
            ours = results[path.stem]
            row = {"method": f"{method}/bin", "image": path.stem, "text": 0.0}
            row |= compare_binary(official, ours, path.stem)
            row["size"] = f"{ours['labels'].shape[1]}x{ours['labels'].shape[0]}"
            rows.append(row)
            print(f"heads-parity: binary {method} {path.stem}: {row}", file=sys.stderr, flush=True)
    t_binary = time.perf_counter() - t_binary

    photos = len({p.name for paths in method_images.values() for p in paths})
    print(
        "official heads (NACLIP, SCLIP, ClearCLIP + its MaskCLIP, PEARL; pinned commits) vs tclseg_trainer.heads "
        "and, as <method>/bin, `tclseg segment --head M --protocol M` (no logits output: |Δlogits| 0 there); "
        f"seeded random ViT-B/16 weights (seed {args.seed}) in OpenAI's format, {photos} scikit-image photos, "
        f"{len(queries)} classes x 80 templates, fp32 CPU; max |Δ| over every pixel and class"
    )
    print(
        f"{'method':<10} {'image':<14} {'size':>8} {'|Δtext|':>9} {'|Δlogits|':>10} {'|Δprobs|':>9} "
        f"{'labels equal':>13} {'classes':>7}"
    )
    for r in rows:
        ok = r["probs"] <= args.max_score_diff and r["logits"] <= args.max_score_diff
        ok = ok and r["labels_equal"] >= args.min_label_agreement
        print(
            f"{r['method']:<10} {r['image']:<14} {r['size']:>8} {r['text']:9.1e} {r['logits']:10.1e} "
            f"{r['probs']:9.1e} {100 * r['labels_equal']:12.3f}% {r['classes']:>7}" + ("" if ok else "  FAIL")
        )
        if not ok:
            failures.append(f"{r['method']}/{r['image']}")
    (work / "summary.json").write_text(json.dumps(rows, indent=2))
    print(
        f"wall time {time.perf_counter() - started:.0f} s: official code {t_official:.0f} s, "
        f"ours {t_ours:.0f} s, binary {t_binary:.0f} s ({args.threads} threads)"
    )
    goal = (
        f"max |Δ| of logits and probabilities <= {args.max_score_diff:g}, "
        f"labels >= {100 * args.min_label_agreement:.1f} % equal"
    )
    if failures:
        raise SystemExit(f"heads-parity: FAILED the goal ({goal}) on {len(failures)} case(s): {', '.join(failures)}")
    print(f"heads-parity: every case meets the goal ({goal})")


if __name__ == "__main__":
    main()
