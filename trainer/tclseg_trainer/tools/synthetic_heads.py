"""Held-out mIoU of every head on the synthetic world, through `tclseg eval` (issue 19's second measurement).

    python -m tclseg_trainer.tools.synthetic_heads --clip runs/synthetic/clip.pt --world runs/synthetic/world \\
        --trained models/synthetic-shapes [--tclseg target/release/tclseg] [--work runs/synthetic/heads]

It exports one bundle from the pretrained tiny CLIP (`--clip`, what `synthetic.py pretrain` wrote and TCL training
started from): the training-free heads (MaskCLIP, SCLIP, ClearCLIP, NACLIP, PEARL) and TCL's head at step 0 (its
grounder is the CLIP's own last block copied, i.e. MaskCLIP upsampled), all on one shared trunk, at the trained
bundle's crop size and with the synthetic config's inference defaults. Each head of that bundle and the trained
bundle's TCL head are then scored by `tclseg eval --dataset folder` on each held-out set of `--sets` (`eval`, by
colour, by default; `eval-shapes` labels the same images by shape), each head at its own defaults (TCL: PAMR on,
the bundle's background threshold; a training-free head: its [heads] table's PAMR and probability threshold). Beside
them: uniform random labels (chance) and all background, on the same pixels. It prints a Markdown table (mIoU in
%) and writes the figures as JSON to `<work>/heads.json`.

The trained bundle's CLIP must be the one `--clip` names (TCL freezes it) for the rows to compare like for like.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
from PIL import Image

from ..data import load_eval_set, miou

TRAINING_FREE = ["maskclip", "sclip", "clearclip", "naclip", "pearl"]
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "synthetic.toml"


def export_heads(clip: Path, out: Path, crop_size: int) -> None:
    """The step-0 bundle with every head on the one trunk (fp32 only: this is a measurement)."""
    from .. import export

    argv = [
        "--checkpoint", str(clip),
        "--out", str(out),
        "--crop-size", str(crop_size),
        "--precision", "fp32",
        "--heads", ",".join(["tcl", *TRAINING_FREE]),
        "--defaults-from", str(CONFIG),
        "--force",
    ]  # fmt: skip
    if export.main(argv) != 0:
        raise SystemExit(f"export of {clip} failed")


def eval_miou(tclseg: str, bundle: Path, head: str, root: Path, report: Path, threads: int) -> float:
    """mIoU (%) of one head of `bundle` on the labelled folder `root`, through `tclseg eval`."""
    cmd = [
        tclseg, "eval", "--dataset", "folder", "--root", str(root), "--model", str(bundle), "--head", head,
        "--device", "cpu", "--threads", str(threads), "--out", str(report),
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    return float(json.loads(report.read_text(encoding="utf-8"))["miou"])


def baselines(root: Path, seed: int = 0) -> dict[str, float]:
    """Uniform random labels and all background on `root`'s labels, mIoU in %."""
    classes, pairs = load_eval_set(str(root))
    rng = np.random.default_rng(seed)
    gts = [np.asarray(Image.open(lab)) for _, lab in pairs]
    n = len(classes) + 1
    return {
        "chance": 100 * miou([rng.integers(0, n, g.shape) for g in gts], gts, n),
        "all background": 100 * miou([np.zeros_like(g) for g in gts], gts, n),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tclseg_trainer.tools.synthetic_heads", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--clip", type=Path, required=True, help="the pretrained tiny CLIP checkpoint (runs/synthetic/clip.pt)"
    )
    p.add_argument("--world", type=Path, required=True, help="the generated world (runs/synthetic/world)")
    p.add_argument("--trained", type=Path, required=True, help="the TCL-trained bundle on that CLIP")
    p.add_argument("--tclseg", default="target/release/tclseg", help="the tclseg binary")
    p.add_argument("--work", type=Path, default=Path("runs/synthetic/heads"), help="bundle and reports go here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sets", default="eval", help="held-out sets of the world, comma-separated (eval, eval-shapes)")
    args = p.parse_args(argv)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    for path in (args.clip, args.trained / "model.toml", *(args.world / s / "classes.txt" for s in sets)):
        if not path.is_file():
            p.error(f"{path}: no such file")
    crop = tomllib.loads((args.trained / "model.toml").read_text(encoding="utf-8"))["input"]["crop_size"]
    args.work.mkdir(parents=True, exist_ok=True)
    bundle = args.work / "bundle"
    export_heads(args.clip, bundle, crop)

    rows: dict[str, dict[str, float]] = {}
    runs = [("TCL trained", args.trained, "tcl"), ("TCL step 0", bundle, "tcl")]
    runs += [(h, bundle, h) for h in TRAINING_FREE]
    for name, model, head in runs:
        for s in sets:
            report = args.work / f"{name.replace(' ', '-')}-{s}.json"
            rows.setdefault(name, {})[s] = eval_miou(args.tclseg, model, head, args.world / s, report, args.threads)
    for s in sets:
        for name, v in baselines(args.world / s).items():
            rows.setdefault(name, {})[s] = v
    (args.work / "heads.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print("| predictor | " + " | ".join(f"`{s}` mIoU" for s in sets) + " |")
    print("|---|" + "---|" * len(sets))
    for name, by_set in rows.items():
        print(f"| {name} | " + " | ".join(f"{by_set[s]:.1f}" for s in sets) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
