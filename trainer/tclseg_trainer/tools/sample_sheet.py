"""What the README's main command shows on the sample images: a contact sheet and the objects it finds.

    python -m tclseg_trainer.tools.sample_sheet sheet --inputs samples/shapes --outputs out/samples --out docs/x.png
    python -m tclseg_trainer.tools.sample_sheet found --outputs out/samples [--samples-seed 7]

Both read `tclseg segment samples/shapes --queries samples/shapes/queries.toml --out out/samples`'s own files
(`<stem>.overlay.jpg`, `<stem>.labels.png`), so they show the command as a user runs it, not a re-rendering.

`sheet` pastes the inputs above their overlays and their label maps (drawn in the label PNG's own palette: each
query's colour on black, so what was found stands out even where the overlay's tint matches the object), four images
a row, into one PNG (`scripts/contact-sheet` writes the README's). `found` redraws each sample's label map from the
generator (`synthetic.write_samples`'s seed: the samples carry no labels) and counts an object as found when the
pixels labelled with its colour's query overlap its visible pixels at IoU >= 0.5; it prints one JSON line per object
and a summary line.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import synthetic as S

COLUMNS = 4
GAP = 6
CAPTION = 16


def sample_paths(inputs: Path) -> list[Path]:
    """The README's sample images in order (`shapes-0.png`, `shapes-1.png`, ...)."""
    paths = sorted(inputs.glob("shapes-*.png"), key=lambda p: int(p.stem.split("-")[-1]))
    if not paths:
        raise FileNotFoundError(f"{inputs}: no shapes-*.png")
    return paths


def contact_sheet(inputs: Path, outputs: Path, out: Path) -> Image.Image:
    """Inputs above their overlays above their label maps, COLUMNS images a row; each tile captioned with its file."""
    paths = sample_paths(inputs)
    tiles = []
    for p in paths:
        files = [p, outputs / f"{p.stem}.overlay.jpg", outputs / f"{p.stem}.labels.png"]
        if missing := [f for f in files if not f.is_file()]:
            raise FileNotFoundError(f"{missing[0]}: run tclseg segment on {inputs} first")
        tiles.append([(Image.open(f).convert("RGB"), f.name) for f in files])
    size = tiles[0][0][0].size
    rows = (len(tiles) + COLUMNS - 1) // COLUMNS
    cell_w, cell_h = size[0] + GAP, size[1] + CAPTION + GAP
    per = len(tiles[0])
    sheet = Image.new("RGB", (COLUMNS * cell_w + GAP, rows * per * cell_h + GAP), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, column in enumerate(tiles):
        x = GAP + (i % COLUMNS) * cell_w
        for k, (tile, label) in enumerate(column):
            y = GAP + ((i // COLUMNS) * per + k) * cell_h
            draw.text((x, y), label, fill=(0, 0, 0))
            sheet.paste(tile.resize(size), (x, y + CAPTION))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    return sheet


def sample_labels(n: int, seed: int = 7) -> list[tuple[np.ndarray, np.ndarray, list[str]]]:
    """(image, colour label map, colours of its objects) per sample, redrawn as `write_samples` drew them."""
    rng = random.Random(f"samples-{seed}")
    out = []
    for _ in range(n):
        img, objmap, objects = S.draw_scene(rng)
        out.append((img, S.label_map(objmap, objects, "colour"), [c for c, _ in objects]))
    return out


def objects_found(inputs: Path, outputs: Path, seed: int = 7, min_iou: float = 0.5) -> list[dict]:
    """One row per generated object: its sample, colour, visible pixels, IoU with its query's pixels, found."""
    paths = sample_paths(inputs)
    colours = list(S.COLOURS)  # queries.toml lists the colours in this order: label k is colours[k - 1]
    rows = []
    for p, (img, labels, objects) in zip(paths, sample_labels(len(paths), seed), strict=True):
        if not np.array_equal(np.asarray(Image.open(p).convert("RGB")), img):
            raise ValueError(f"{p}: not the generator's sample (seed {seed}); labels cannot be redrawn")
        pred = np.asarray(Image.open(outputs / f"{p.stem}.labels.png"))
        for colour in objects:
            k = colours.index(colour) + 1
            gt, pk = labels == k, pred == k
            union = np.logical_or(gt, pk).sum()
            iou = float(np.logical_and(gt, pk).sum() / union) if union else 0.0
            row = {"image": p.name, "object": colour, "pixels": int(gt.sum()), "iou": round(iou, 3)}
            rows.append({**row, "found": iou >= min_iou})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tclseg_trainer.tools.sample_sheet", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sh = sub.add_parser("sheet", help="inputs above overlays, one PNG")
    sh.add_argument("--inputs", type=Path, default=Path("samples/shapes"))
    sh.add_argument("--outputs", type=Path, required=True, help="tclseg segment's --out")
    sh.add_argument("--out", type=Path, required=True)
    fo = sub.add_parser("found", help="objects found (IoU >= 0.5) against the generator's label maps")
    fo.add_argument("--inputs", type=Path, default=Path("samples/shapes"))
    fo.add_argument("--outputs", type=Path, required=True, help="tclseg segment's --out")
    fo.add_argument("--samples-seed", type=int, default=7)
    args = p.parse_args(argv)
    if args.cmd == "sheet":
        contact_sheet(args.inputs, args.outputs, args.out)
        print(f"wrote {args.out}")
        return 0
    rows = objects_found(args.inputs, args.outputs, args.samples_seed)
    for r in rows:
        print(json.dumps(r))
    found = sum(r["found"] for r in rows)
    missed = [f"{r['image']}:{r['object']}" for r in rows if not r["found"]]
    print(json.dumps({"objects": len(rows), "found": found, "missed": missed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
