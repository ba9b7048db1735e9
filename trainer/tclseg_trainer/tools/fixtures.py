"""Regenerates the committed test fixtures, deterministically:

    python -m tclseg_trainer.tools.fixtures --out tests/fixtures

- `bundles/tiny-random/`: the tiny random TCL (seed 0, decoder gates randomized too) exported as a bundle
  (fp32 + fp16); the Rust tests and the binary's built-in model use it;
- `images/*.png`: synthetic pictures of shapes in sizes that exercise the host pipeline (smaller than one crop,
  not multiples of 16, portrait, landscape, several crops after the short-side resize);
- `golden/`: the PyTorch reference (`reference.segment`) on those images with the same weights, with and without
  PAMR: soft scores [C, H, W] float32 (.npy), label maps (.png, uint8), the text embeddings (.npy), and
  `golden.json` describing each case;
- `tokenizer.json`: Python tokenizer ids on a corpus of tricky strings, for the Rust tokenizer's parity test;
- `opencv/`: OpenCV's own output (opencv-python-headless, pinned in requirements.txt) for the Rust port of the
  official pipeline's image resize and normalization (`tests/opencv_resize.rs`): uint8 inputs and
  `cv2.resize(..., INTER_LINEAR)` outputs as PNG, and mmcv's normalization of every grey level, in `opencv.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..export import export_bundle
from ..model import SIZES, TCL, TEMPLATES, randomize_gates
from ..reference import segment
from ..tokenizer import default_vocab_path, tokenize

SEED = 0
QUERIES = ["red square", "blue circle", "green triangle"]
# (name, width, height). Every one keeps its short side at 448 after the rescale (aspect <= 2048/448), so the
# fixed-crop graphs need no padding and the bundle pipeline must match the reference exactly.
IMAGES = [("small", 37, 53), ("landscape", 100, 75), ("portrait", 90, 130), ("wide", 150, 60)]
CASES = [("pamr", True, 0.4), ("nopamr", False, 0.5)]
KP_W = 0.3

TOKENIZER_CORPUS = [
    "a photo of a cat",
    "",
    "   ",
    "A PHOTO OF A CAT",
    "Café crème brûlée",
    "naïve façade",
    "Ελληνικά Σοφία",
    "日本語のテキスト",
    "🐱 cat emoji 🐶🐶",
    "don't stop'n'go we're they'll I'd",
    "hello, world!!! ... ???",
    "tab\tseparated\nnew line\r\nwindows",
    "“curly” ‘quotes’",
    "ﬁsh and ﬂowers",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ\u3000space",
    "Tom &amp; Jerry &lt;3",
    "&amp;amp; double",
    "e\u0301 combining",
    "numbers 1234567 3.14 1e-5",
    "x" * 300,
    " ".join(["word"] * 100),
    "pottedplant",
    "tvmonitor",
    "building-other",
    "bed ",
    "<|endoftext|> inside",
    "a\u00a0non-breaking space",
    "ZWJ 👨\u200d👩\u200d👧 family",
    "Ünïcödé ÀÉÎÕÜ",
    "Привет мир",
    "مرحبا بالعالم",
    "שלום",
    "中文 字符 测试",
    "한국어 텍스트",
    "control\x07char",
    "a photo of many {}s.",
    "itap of a dog.",
    "3D-printed",
]


def draw_image(width: int, height: int, seed: int) -> np.ndarray:
    """A grey scene with a red square, a blue circle and a green triangle, placed by `seed`."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), (128, 128, 128))
    d = ImageDraw.Draw(img)
    s = max(6, min(width, height) // 3)

    def spot() -> tuple[int, int]:
        return int(rng.integers(0, max(1, width - s))), int(rng.integers(0, max(1, height - s)))

    x, y = spot()
    d.rectangle([x, y, x + s, y + s], fill=(220, 30, 30))
    x, y = spot()
    d.ellipse([x, y, x + s, y + s], fill=(30, 30, 220))
    x, y = spot()
    d.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=(30, 200, 30))
    return np.asarray(img)


# (name, input height, width, output height, width): upscales and downscales by non-integer factors, exact
# integer factors (OpenCV hands an exact 2x reduction to its area filter), odd sizes, one-pixel rows and columns,
# extreme aspect ratios; random pixels so that every rounding step shows.
OPENCV_CASES = [
    ("up_fraction", 13, 17, 29, 31),
    ("down_fraction", 61, 47, 23, 19),
    ("down_2x", 64, 48, 32, 24),
    ("down_3x", 63, 48, 21, 16),
    ("down_4x", 64, 60, 16, 15),
    ("up_2x", 16, 21, 32, 42),
    ("up_3x", 11, 9, 33, 27),
    ("down_2x_rows_only", 40, 30, 20, 29),
    ("odd", 7, 5, 11, 13),
    ("one_column", 20, 1, 37, 3),
    ("one_row", 1, 20, 3, 37),
    ("to_one_pixel", 9, 7, 1, 1),
    ("from_one_pixel", 1, 1, 5, 6),
    ("wide", 3, 150, 9, 448),
    ("tall", 150, 3, 448, 9),
    ("same_width", 30, 40, 45, 40),
]


def write_opencv_cases(out: Path, seed: int = SEED) -> None:
    """OpenCV's resize and mmcv's normalization, computed by OpenCV itself, for the Rust tests."""
    import cv2

    from ..reference import rescale_size

    rng = np.random.default_rng(seed)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cases = []
    inputs = [(name, rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (oh, ow)) for name, h, w, oh, ow in OPENCV_CASES]
    # The golden pictures at the evaluation scale: the sizes the pipeline really resizes to.
    for name, w, h in IMAGES:
        pixels = np.asarray(Image.open(out.parent / "images" / f"{name}.png").convert("RGB"))
        inputs.append((f"rescale_{name}", pixels, rescale_size(h, w)))
    for name, pixels, (oh, ow) in inputs:
        resized = cv2.resize(pixels, (ow, oh), interpolation=cv2.INTER_LINEAR)
        Image.fromarray(pixels).save(out / f"{name}.in.png")
        Image.fromarray(resized).save(out / f"{name}.out.png")
        cases.append({"name": name, "input": f"{name}.in.png", "output": f"{name}.out.png", "height": oh, "width": ow})
    # mmcv.imnormalize as mmseg's Normalize calls it (float32 mean/std from the configs, to_rgb): every grey level.
    mean = np.array([123.675, 116.28, 103.53], np.float32)
    std = np.array([58.395, 57.12, 57.375], np.float32)
    grey = np.tile(np.arange(256, dtype=np.float32)[:, None, None], (1, 1, 3))
    cv2.subtract(grey, np.float64(mean.reshape(1, -1)), grey)
    cv2.multiply(grey, 1 / np.float64(std.reshape(1, -1)), grey)
    manifest = {
        "opencv": cv2.__version__,
        "cases": cases,
        "normalized": [[float(v) for v in grey[:, 0, c]] for c in range(3)],
    }
    (out / "opencv.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def trimmed_ids(text: str) -> list[int]:
    ids = tokenize([text])[0].tolist()
    while ids and ids[-1] == 0:
        ids.pop()
    return ids


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # Non-zero gates, so that the decoder's convolutions count in the golden outputs.
    model = randomize_gates(TCL(SIZES["tiny"], seed=SEED), seed=SEED).eval()

    bundles = out / "bundles"
    bundles.mkdir(exist_ok=True)
    export_bundle(
        model,
        bundles / "tiny-random",
        name="tiny-random",
        description=f"random tiny TCL (seed {SEED}); for tests, not for use",
        provenance={"source": "random", "seed": SEED, "torch_version": torch.__version__.split("+")[0]},
        precisions=("fp32", "fp16"),
        vocab_path=default_vocab_path(),
        force=True,
    )

    images = out / "images"
    golden = out / "golden"
    for d in (images, golden):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    with torch.no_grad():
        text = model.build_text_embedding(QUERIES, TEMPLATES, tokenize)
    np.save(golden / "text_emb.npy", text.numpy().astype(np.float32))
    cases = []
    for i, (name, w, h) in enumerate(IMAGES):
        pixels = draw_image(w, h, seed=i)
        Image.fromarray(pixels).save(images / f"{name}.png")
        for case, pamr, bg in CASES:
            scores, labels = segment(model, pixels, text, pamr=pamr, kp_w=KP_W, bg_thresh=bg)
            stem = f"{name}.{case}"
            np.save(golden / f"{stem}.scores.npy", scores.numpy().astype(np.float32))
            Image.fromarray(labels.numpy().astype(np.uint8)).save(golden / f"{stem}.labels.png")
            cases.append(
                {
                    "image": f"images/{name}.png",
                    "width": w,
                    "height": h,
                    "pamr": pamr,
                    "kp_w": KP_W,
                    "bg_thresh": bg,
                    "scores": f"golden/{stem}.scores.npy",
                    "labels": f"golden/{stem}.labels.png",
                    "classes": len(QUERIES) + 1,
                }
            )
    manifest = {
        "bundle": "bundles/tiny-random",
        "seed": SEED,
        "queries": QUERIES,
        "templates": list(TEMPLATES),
        "text_emb": "golden/text_emb.npy",
        "cases": cases,
    }
    (out / "golden.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    write_opencv_cases(out / "opencv")
    corpus = [{"text": t, "ids": trimmed_ids(t)} for t in TOKENIZER_CORPUS]
    (out / "tokenizer.json").write_text(
        json.dumps(corpus, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures"))
    generate(ap.parse_args().out)


if __name__ == "__main__":
    main()
