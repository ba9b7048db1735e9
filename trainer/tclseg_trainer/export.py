"""ONNX export of a TCL model into a model bundle (format 1, see ARCHITECTURE.md).

The bundle holds five graphs, each a thin wrapper around the model's own methods (`export_graphs.py`, the head as it
ships) so that the exported numbers are the reference's numbers:

    text_encoder  tokens int64 [T,77]            -> text_emb [T,E]              (not normalized)
    image_trunk   pixels [B,3,S,S]               -> tokens [B,1+G*G,W]          (CLIP blocks 1..11)
    tcl_head      tokens [B,1+G*G,W]             -> dense [B,E,4G,4G], kp_feat [B,E,G,G]  (both L2-normalized)
    mask_head     dense, kp_feat, text [N,E]     -> masks [B,N,h,w], kp_masks [B,N,h,w]
    pamr          pixels [B,3,S,S], masks        -> refined [B,N,h,w]
    <head>_head   tokens [B,1+G*G,W]             -> dense [B,E,G,G]  (L2-normalized; one per training-free head)

`heads` picks what the bundle carries on the one trunk: "tcl" (tcl_head + mask_head) and any of `heads.HEADS`
(maskclip, sclip, clearclip, naclip, pearl), each a `<head>_head` graph; model.toml lists them under [heads] with
the defaults each method's own evaluation uses (logit scale, PAMR, probability threshold).

A CLIP ViT-B/16 bundle also carries each exported training-free head's own protocol (`head_protocols.py`,
`tclseg segment --protocol NAME`): model.toml's [protocols.<name>] and, where the protocol's window or
position-embedding rule differs from the bundle's trunk, fp32 graphs `image_trunk_<window>[_<rule>]` and
`<head>_head_<window>` (one trunk per window and rule, shared by the protocols that need it).

The bundle is written into a temporary sibling directory, every file is hashed into `model.toml`, and the
directory is renamed into place, so a reader never sees half a bundle.

Command line:
    python -m tclseg_trainer.export (--random {tiny,vit-b16} [--seed N] | --clip ViT-B-16.pt --tcl tcl.pth
                                     [--allow-unverified-clip] | --checkpoint CKPT) --out DIR [--name NAME]
                                     [--precision fp32,fp16,int8] [--heads tcl,naclip,...] [--force]
    python -m tclseg_trainer.export --clip ViT-B-16.pt --heads naclip,sclip --out DIR   (no TCL file needed)
Exit status: 0 written, 1 failed (one message naming the file and the problem), 2 usage error.

This module writes the whole bundle and holds the command line; one graph's export and the op allow-list are in
`export_onnx.py`, the manifest and the atomic install in `export_manifest.py`, and where the command line's model
comes from in `export_sources.py`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .bundle import CROP_SIZE, MANIFEST_FILE, MASK_STRIDE, BundleDefaults, open_bundle, sha256_file
from .export_graphs import (
    ImageTrunkGraph,
    MaskHeadGraph,
    PamrGraph,
    TclHeadGraph,
    TextEncoderGraph,
    half_with_fp32_layernorms,
)
from .export_manifest import (
    build_manifest,
    fsync_file,
    install,
    manifest_to_toml,
    pamr_module,
    sim2mask_params,
)
from .export_onnx import CUDA_SAFE_OPS, ExportError, export_graph, graph_op_types, graph_op_types_of
from .export_sources import defaults_from_config_file, load_model, log, with_query_thresholds
from .head_protocols import ProtocolGraphs, bundle_protocols
from .heads import HEAD_DEFAULTS, HEADS, HeadGraph
from .quantize import quantize_graph
from .tokenizer import EOT_TOKEN, SOT_TOKEN, default_vocab_path
from .tokenizer import VOCAB_FILENAME as VOCAB_FILE

# The names other modules and the tests import from here.
__all__ = ["CUDA_SAFE_OPS", "ExportError", "export_bundle", "graph_op_types", "graph_op_types_of", "main"]

# role -> precision -> file name in the bundle.
GRAPH_FILES = {
    "text_encoder": {"fp32": "text_encoder.onnx"},
    "image_trunk": {
        "fp32": "image_trunk.fp32.onnx",
        "fp16": "image_trunk.fp16.onnx",
        "int8": "image_trunk.int8.onnx",
    },
    "tcl_head": {"fp32": "tcl_head.fp32.onnx", "fp16": "tcl_head.fp16.onnx", "int8": "tcl_head.int8.onnx"},
    "mask_head": {"fp32": "mask_head.onnx"},
    "pamr": {"fp32": "pamr.onnx"},
}
# Roles that get fp16 and int8 variants; the others are small or precision-sensitive and stay fp32.
FP16_ROLES = ("image_trunk", "tcl_head")
PRECISIONS = ("fp32", "fp16", "int8")
# Every head a bundle can carry: TCL's own and the training-free ones.
ALL_HEADS = ("tcl", *HEADS)


def head_role(head: str) -> str:
    """The [graphs] role of a head's graph."""
    return "tcl_head" if head == "tcl" else f"{head}_head"


def graph_file(role: str, precision: str) -> str:
    if role in GRAPH_FILES:
        return GRAPH_FILES[role][precision]
    return f"{role}.{precision}.onnx"


def heads_table(heads: Sequence[str]) -> dict[str, dict[str, Any]]:
    """model.toml's [heads]: kind, graph and each training-free head's defaults (`heads.HEAD_DEFAULTS`)."""
    table: dict[str, dict[str, Any]] = {}
    for head in heads:
        if head == "tcl":
            table[head] = {"kind": "tcl", "graph": "tcl_head"}
        else:
            d = HEAD_DEFAULTS[head]
            table[head] = {
                "kind": "dense",
                "graph": head_role(head),
                "logit_scale": float(d["logit_scale"]),
                "pamr": bool(d["pamr"]),
                "prob_thresh": float(d["prob_thresh"]),
            }
    return table


def check_heads(heads: Iterable[str]) -> list[str]:
    heads = list(dict.fromkeys(heads))
    if not heads:
        raise ExportError("no heads asked for: give at least one of " + ", ".join(ALL_HEADS))
    if unknown := [h for h in heads if h not in ALL_HEADS]:
        raise ExportError(f"unknown head(s) {', '.join(unknown)}; known: {', '.join(ALL_HEADS)}")
    return heads


def export_bundle(
    model: nn.Module,
    out_dir: Path | str,
    *,
    name: str | None = None,
    version: str = "1",
    description: str = "",
    provenance: dict[str, Any],
    precisions: Iterable[str] = ("fp32", "fp16"),
    crop_size: int = CROP_SIZE,
    vocab_path: Path | str,
    force: bool = False,
    log: Callable[[str], None] | None = log,
    defaults: BundleDefaults | None = None,
    heads: Sequence[str] = ("tcl",),
) -> dict[str, Any]:
    """Exports `model` into a bundle at `out_dir` and returns the manifest (as written to model.toml).

    `heads` are the heads on the shared trunk, the first being the bundle's default: "tcl" needs a TCL model's
    trained grounder; the training-free ones read only the frozen CLIP (`heads.py`).

    `precisions` chooses the image graphs' variants; fp32 is required. An existing `out_dir` is refused unless
    `force` is set; nothing is left behind when the export fails. `defaults` are the inference settings written
    into model.toml (default: the official TCL ones).
    """
    log = log or (lambda _m: None)
    if defaults is not None and (bad := defaults.problems()):
        raise ExportError("bundle defaults: " + "; ".join(bad))
    out_dir = Path(out_dir)
    precisions = list(dict.fromkeys(precisions))
    if "fp32" not in precisions:
        raise ExportError("the fp32 graphs are always exported: precisions must include fp32")
    if unknown := [p for p in precisions if p not in PRECISIONS]:
        raise ExportError(f"unknown precision(s) {', '.join(unknown)}; known: {', '.join(PRECISIONS)}")
    vocab_path = Path(vocab_path)
    if not vocab_path.is_file():
        raise ExportError(f"{vocab_path}: the BPE vocabulary file does not exist")
    patch = int(model.config.vision.patch_size)
    if crop_size <= 0 or crop_size % patch != 0:
        raise ExportError(f"crop_size {crop_size} must be a positive multiple of the patch size {patch}")
    if (out_dir.exists() or out_dir.is_symlink()) and not force:
        raise ExportError(f"{out_dir} already exists; pass --force to replace it")
    if not out_dir.parent.is_dir():
        raise ExportError(f"{out_dir.parent}: the output's parent directory does not exist")
    name = name or out_dir.name
    heads = check_heads(heads)
    grid = crop_size // patch
    pamr = pamr_module(model)
    protocols = _protocols_for(model, heads, crop_size)

    model = model.eval()
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        graphs = _write_graphs(
            model, pamr, tmp_dir, grid=grid, crop_size=crop_size, precisions=precisions, log=log, heads=heads
        )
        graphs |= _write_protocol_graphs(model, tmp_dir, [g for _, g in protocols.values()], graphs, log)
        shutil.copyfile(vocab_path, tmp_dir / VOCAB_FILE)

        files = []
        for path in sorted(tmp_dir.iterdir()):
            fsync_file(path)
            files.append({"path": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size})
        manifest = build_manifest(
            model,
            name=name,
            version=version,
            description=description,
            provenance=provenance,
            graphs=graphs,
            crop_size=crop_size,
            pamr=pamr,
            files=files,
            defaults=defaults,
        )
        manifest["heads"] = heads_table(heads)
        manifest["default_head"] = heads[0]
        if protocols:
            manifest["protocols"] = {name: table for name, (table, _) in protocols.items()}
        manifest_path = tmp_dir / MANIFEST_FILE
        manifest_path.write_text(manifest_to_toml(manifest), encoding="utf-8")
        fsync_file(manifest_path)
        open_bundle(tmp_dir, verify=False)  # the manifest reads back and passes the loader's checks
        install(tmp_dir, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    total = sum(f["bytes"] for f in manifest["files"])
    log(f"wrote {out_dir} ({len(manifest['files'])} files, {total / 1e6:.1f} MB)")
    return manifest


def _protocols_for(model: nn.Module, heads: Sequence[str], crop_size: int) -> dict[str, tuple[dict, ProtocolGraphs]]:
    """The training-free heads' own protocols, for a model of the architecture they were written for (CLIP
    ViT-B/16 at 224: width 768, patch 16); none for others (the synthetic world's tiny CLIP has its own world)."""
    vision = model.config.vision
    patch = int(vision.patch_size)
    train_grid = int(vision.image_size) // patch
    if (int(vision.width), patch, train_grid) != (768, 16, 14):
        return {}
    return bundle_protocols(list(heads), crop_size, patch, train_grid)


def _write_protocol_graphs(
    model: nn.Module,
    tmp_dir: Path,
    needs: list[ProtocolGraphs],
    graphs: dict[str, dict[str, str]],
    log: Callable[[str], None],
) -> dict[str, dict[str, str]]:
    """The protocols' trunks and head graphs the bundle does not have yet, fp32 only (a protocol is a reference
    setting, not a speed one); returns their [graphs] entries."""
    width = int(model.config.vision.width)
    patch = int(model.config.vision.patch_size)
    gen = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, str]] = {}
    for need in needs:
        grid = need.window // patch
        todo = []
        if need.trunk not in graphs and need.trunk not in out:
            pixels = torch.randn(2, 3, need.window, need.window, generator=gen)
            todo.append(
                (
                    need.trunk,
                    ImageTrunkGraph(model, grid, torch.float32, pos_embed_model=model, pos_resize=need.pos_resize),
                    (pixels,),
                    ["pixels"],
                    ["tokens"],
                    {"pixels": {0: "B"}, "tokens": {0: "B"}},
                )
            )
        if need.head not in graphs and need.head not in out:
            tokens = torch.randn(2, 1 + grid * grid, width, generator=gen)
            todo.append(
                (
                    need.head,
                    HeadGraph(model, need.method_head, grid),
                    (tokens,),
                    ["tokens"],
                    ["dense"],
                    {"tokens": {0: "B"}, "dense": {0: "B"}},
                )
            )
        for role, module, args, inputs, outputs, axes in todo:
            file = graph_file(role, "fp32")
            start = time.perf_counter()
            export_graph(module, args, tmp_dir / file, inputs, outputs, axes)
            log(f"{file}: {time.perf_counter() - start:.1f} s, {(tmp_dir / file).stat().st_size / 1e6:.1f} MB")
            out[role] = {"fp32": file}
    return out


def _write_graphs(
    model: nn.Module,
    pamr: nn.Module,
    tmp_dir: Path,
    *,
    grid: int,
    crop_size: int,
    precisions: list[str],
    log: Callable[[str], None],
    heads: Sequence[str] = ("tcl",),
) -> dict[str, dict[str, str]]:
    """Exports every graph into tmp_dir; returns the [graphs] table."""
    cfg = model.config
    width, embed = int(cfg.vision.width), int(cfg.vision.embed_dim)
    context = int(cfg.text.context_length)
    side = grid * MASK_STRIDE
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    def unit(*shape: int, dim: int) -> torch.Tensor:
        x = rand(*shape)
        return x / x.norm(dim=dim, keepdim=True)

    graphs: dict[str, dict[str, str]] = {}

    def timed(role: str, precision: str, fn: Callable[[Path], None]) -> None:
        file = graph_file(role, precision)
        start = time.perf_counter()
        fn(tmp_dir / file)
        size = (tmp_dir / file).stat().st_size
        log(f"{file}: {time.perf_counter() - start:.1f} s, {size / 1e6:.1f} MB")
        graphs.setdefault(role, {})[precision] = file

    tokens = torch.zeros(2, context, dtype=torch.long)
    tokens[:, 0] = SOT_TOKEN
    tokens[0, 1:4] = torch.tensor([320, 1929, EOT_TOKEN])
    tokens[1, 1:3] = torch.tensor([1929, EOT_TOKEN])
    timed(
        "text_encoder",
        "fp32",
        lambda p: export_graph(
            TextEncoderGraph(model),
            (tokens,),
            p,
            ["tokens"],
            ["text_emb"],
            {"tokens": {0: "T"}, "text_emb": {0: "T"}},
        ),
    )

    pixels = rand(2, 3, crop_size, crop_size)
    trunk_tokens = rand(2, 1 + grid * grid, width)
    half_model = half_with_fp32_layernorms(model) if "fp16" in precisions else None
    for precision in [p for p in precisions if p != "int8"]:
        dtype = torch.float32 if precision == "fp32" else torch.float16
        variant = model if precision == "fp32" else half_model
        timed(
            "image_trunk",
            precision,
            lambda p, v=variant, d=dtype: export_graph(
                ImageTrunkGraph(v, grid, d, pos_embed_model=model),
                (pixels,),
                p,
                ["pixels"],
                ["tokens"],
                {"pixels": {0: "B"}, "tokens": {0: "B"}},
            ),
        )
        if "tcl" in heads:
            timed(
                "tcl_head",
                precision,
                lambda p, v=variant, d=dtype: export_graph(
                    TclHeadGraph(v, grid, d),
                    (trunk_tokens,),
                    p,
                    ["tokens"],
                    ["dense", "kp_feat"],
                    {"tokens": {0: "B"}, "dense": {0: "B"}, "kp_feat": {0: "B"}},
                ),
            )
        for head in (h for h in heads if h != "tcl"):
            timed(
                head_role(head),
                precision,
                lambda p, v=variant, d=dtype, h=head: export_graph(
                    HeadGraph(v, h, grid, d),
                    (trunk_tokens,),
                    p,
                    ["tokens"],
                    ["dense"],
                    {"tokens": {0: "B"}, "dense": {0: "B"}},
                ),
            )
    del half_model
    if "int8" in precisions:
        # Quantized from the fp32 graphs just written (weights per channel, activations at run time). The
        # training-free heads are small next to the trunk and stay fp32/fp16.
        for role in [r for r in FP16_ROLES if r != "tcl_head" or "tcl" in heads]:
            timed(
                role,
                "int8",
                lambda p, r=role: quantize_graph(tmp_dir / GRAPH_FILES[r]["fp32"], p, mode="dynamic"),
            )
    if "tcl" not in heads:
        return _write_shared_graphs(graphs, timed, pamr, pixels, rand, crop_size=crop_size, side=side)

    w, b = sim2mask_params(model)
    timed(
        "mask_head",
        "fp32",
        lambda p: export_graph(
            MaskHeadGraph(w, b),
            (unit(2, embed, side, side, dim=1), unit(2, embed, grid, grid, dim=1), unit(3, embed, dim=1)),
            p,
            ["dense", "kp_feat", "text"],
            ["masks", "kp_masks"],
            {
                "dense": {0: "B", 2: "h", 3: "w"},
                "kp_feat": {0: "B", 2: "g_h", 3: "g_w"},
                "text": {0: "N"},
                "masks": {0: "B", 1: "N", 2: "h", 3: "w"},
                "kp_masks": {0: "B", 1: "N", 2: "h", 3: "w"},
            },
        ),
    )
    return _write_shared_graphs(graphs, timed, pamr, pixels, rand, crop_size=crop_size, side=side)


def _write_shared_graphs(
    graphs: dict[str, dict[str, str]],
    timed: Callable[[str, str, Callable[[Path], None]], None],
    pamr: nn.Module,
    pixels: torch.Tensor,
    rand: Callable[..., torch.Tensor],
    *,
    crop_size: int,
    side: int,
) -> dict[str, dict[str, str]]:
    """The graphs every head uses after its scores: PAMR."""
    timed(
        "pamr",
        "fp32",
        lambda p: export_graph(
            PamrGraph(pamr, crop_size, side),
            (pixels, torch.sigmoid(rand(2, 3, side, side))),
            p,
            ["pixels", "masks"],
            ["refined"],
            {"pixels": {0: "B"}, "masks": {0: "B", 1: "N"}, "refined": {0: "B", 1: "N"}},
        ),
    )
    return graphs


# ---------------------------------------------------------------------------------------------------------------
# Command line.


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # exit status 2 with argparse's usage line
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = _Parser(
        prog="python -m tclseg_trainer.export",
        description="Export a TCL model as a tclseg model bundle (ONNX graphs + model.toml).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--random", choices=["tiny", "vit-b16"], help="random weights of a named size")
    src.add_argument("--clip", type=Path, metavar="FILE", help="OpenAI CLIP ViT-B-16.pt (with --tcl)")
    src.add_argument("--checkpoint", type=Path, metavar="FILE", help="a trainer checkpoint")
    p.add_argument(
        "--tcl",
        type=Path,
        metavar="FILE",
        help="the official TCL checkpoint tcl.pth (with --clip); adds the TCL head",
    )
    p.add_argument(
        "--heads",
        default=None,
        metavar="LIST",
        help=f"heads on the shared trunk, comma-separated, the first is the default ({', '.join(ALL_HEADS)}); "
        "default: tcl, with --clip alone: all training-free heads",
    )
    p.add_argument(
        "--allow-unverified-clip",
        action="store_true",
        help="accept a --clip file whose sha256 is not OpenAI's ViT-B/16 (a re-hosted copy, a fine-tuned CLIP): "
        "its weights are then unchecked, and the bundle records that and the file's sha256",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for --random (default 0)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="bundle directory to create")
    p.add_argument("--name", help="bundle name (default: the output directory's name)")
    p.add_argument("--version", default="1", help="bundle version string (default 1)")
    p.add_argument("--description", default=None, help="one-line description")
    p.add_argument(
        "--precision",
        default="fp32,fp16",
        help="image-graph precisions, comma-separated: fp32 (required), fp16, int8 (quantized from fp32)",
    )
    p.add_argument("--crop-size", type=int, default=CROP_SIZE, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=Path, default=None, help="BPE vocabulary (default: .deps/clip or TCLSEG_BPE_VOCAB)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.add_argument(
        "--defaults-from",
        type=Path,
        metavar="CONFIG",
        help="take the bundle's inference defaults from this training config's [bundle] table "
        "(default: the checkpoint's own training config, else the official settings)",
    )
    p.add_argument(
        "--query-thresholds",
        type=Path,
        metavar="FILE",
        help="per-query background thresholds for [mask.query_thresholds]: a TOML file of `name = threshold` lines "
        "(as `synthetic.py calibrate` writes), replacing any from the defaults",
    )
    args = p.parse_args(argv)
    heads = [h.strip() for h in args.heads.split(",") if h.strip()] if args.heads is not None else None
    if args.clip is not None and args.tcl is None:
        if heads is None:
            heads = list(HEADS)
        if "tcl" in heads:
            p.error("the tcl head needs --tcl")
    if heads is None:
        heads = ["tcl"]
    if unknown := [h for h in heads if h not in ALL_HEADS]:
        p.error(f"--heads: unknown head(s) {', '.join(unknown)}; known: {', '.join(ALL_HEADS)}")
    if not heads:
        p.error("--heads: give at least one head")
    args.head_list = heads
    if args.tcl is not None and args.clip is None:
        p.error("--tcl needs --clip")
    if args.allow_unverified_clip and args.clip is None:
        p.error("--allow-unverified-clip only applies to --clip")
    if args.seed is not None and args.random is None:
        p.error("--seed only applies to --random")
    precisions = [s.strip() for s in args.precision.split(",") if s.strip()]
    if not precisions or any(s not in PRECISIONS for s in precisions):
        p.error(f"--precision {args.precision!r}: give fp32 and any of fp16, int8 (e.g. fp32,fp16,int8)")
    if "fp32" not in precisions:
        p.error("--precision must include fp32 (every bundle has fp32 graphs)")
    args.precisions = precisions
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    from .checkpoints import CheckpointError

    start = time.perf_counter()
    try:
        if args.out.exists() and not args.force:
            raise ExportError(f"{args.out} already exists; pass --force to replace it")
        args.defaults = defaults_from_config_file(args.defaults_from) if args.defaults_from else None
        vocab = args.vocab or default_vocab_path()
        if not vocab.is_file():
            raise ExportError(f"{vocab}: the BPE vocabulary file does not exist (run scripts/setup)")
        model, provenance, description = load_model(args)
        if args.query_thresholds is not None:
            args.defaults = with_query_thresholds(args.defaults or BundleDefaults(), args.query_thresholds)
        log(f"model ready in {time.perf_counter() - start:.1f} s; exporting to {args.out}")
        export_bundle(
            model,
            args.out,
            name=args.name,
            version=args.version,
            description=args.description if args.description is not None else description,
            provenance=provenance,
            precisions=args.precisions,
            crop_size=args.crop_size,
            vocab_path=vocab,
            force=args.force,
            defaults=args.defaults,
            heads=args.head_list,
        )
    except (ExportError, CheckpointError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = e.filename if e.filename else "a file"
        print(f"export: error: {where}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("export: interrupted; nothing was written", file=sys.stderr)
        return 1
    log(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
