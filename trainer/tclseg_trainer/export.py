"""ONNX export of a TCL model into a model bundle (format 1, see ARCHITECTURE.md).

The bundle holds five graphs, each a thin wrapper around the model's own methods (`export_graphs.py`, the head as it
ships) so that the exported numbers are the reference's numbers:

    text_encoder  tokens int64 [T,77]            -> text_emb [T,E]              (not normalized)
    image_trunk   pixels [B,3,S,S]               -> tokens [B,1+G*G,W]          (CLIP blocks 1..11)
    tcl_head      tokens [B,1+G*G,W]             -> dense [B,E,4G,4G], kp_feat [B,E,G,G]  (both L2-normalized)
    mask_head     dense, kp_feat, text [N,E]     -> masks [B,N,h,w], kp_masks [B,N,h,w]
    pamr          pixels [B,3,S,S], masks        -> refined [B,N,h,w]

The bundle is written into a temporary sibling directory, every file is hashed into `model.toml`, and the
directory is renamed into place, so a reader never sees half a bundle.

Command line:
    python -m tclseg_trainer.export (--random {tiny,vit-b16} [--seed N] | --clip ViT-B-16.pt --tcl tcl.pth
                                     [--allow-unverified-clip] | --checkpoint CKPT) --out DIR [--name NAME]
                                     [--precision fp32,fp16] [--force]
Exit status: 0 written, 1 failed (one message naming the file and the problem), 2 usage error.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import tomli_w
import torch
from torch import nn

from .bundle import (
    CROP_SIZE,
    FORMAT,
    FORMAT_VERSION,
    KP_SCALE,
    KP_SHIFT,
    LONG_SIDE_MAX,
    MANIFEST_FILE,
    MASK_STRIDE,
    PAD_MULTIPLE,
    PAMR_DILATIONS,
    PAMR_ITERATIONS,
    BundleDefaults,
    open_bundle,
    sha256_file,
)
from .export_graphs import (
    ImageTrunkGraph,
    MaskHeadGraph,
    PamrGraph,
    TclHeadGraph,
    TextEncoderGraph,
    half_with_fp32_layernorms,
)
from .tokenizer import EOT_TOKEN, SOT_TOKEN, default_vocab_path
from .tokenizer import VOCAB_FILENAME as VOCAB_FILE

OPSET = 18

# role -> precision -> file name in the bundle.
GRAPH_FILES = {
    "text_encoder": {"fp32": "text_encoder.onnx"},
    "image_trunk": {"fp32": "image_trunk.fp32.onnx", "fp16": "image_trunk.fp16.onnx"},
    "tcl_head": {"fp32": "tcl_head.fp32.onnx", "fp16": "tcl_head.fp16.onnx"},
    "mask_head": {"fp32": "mask_head.onnx"},
    "pamr": {"fp32": "pamr.onnx"},
}
# Roles that get an fp16 variant; the others are small or precision-sensitive and stay fp32.
FP16_ROLES = ("image_trunk", "tcl_head")

# Standard ONNX ops that ONNX Runtime's CPU and CUDA execution providers both implement (for float, float16 and,
# where relevant, int64). An exported graph with any other op type fails the export: no Einsum, no control flow,
# no custom domains.
CUDA_SAFE_OPS = frozenset(
    {
        "Abs",
        "Add",
        "ArgMax",
        "Cast",
        "Clip",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Conv",
        "Div",
        "Equal",
        "Erf",
        "Exp",
        "Expand",
        "Flatten",
        "Gather",
        "GatherND",
        "Gemm",
        "Greater",
        "Identity",
        "LayerNormalization",
        "MatMul",
        "Max",
        "Min",
        "Mul",
        "Neg",
        "Pad",
        "Pow",
        "Range",
        "Reciprocal",
        "ReduceL2",
        "ReduceMax",
        "ReduceMean",
        "ReduceProd",
        "ReduceSum",
        "Reshape",
        "Resize",
        "Shape",
        "Sigmoid",
        "Slice",
        "Softmax",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Tanh",
        "Transpose",
        "Trilu",
        "Unsqueeze",
        "Where",
    }
)


class ExportError(Exception):
    """An export that cannot be done; the message names the file or the problem."""


# ---------------------------------------------------------------------------------------------------------------
# Reading what the export needs from the model.


def sim2mask_params(model: nn.Module) -> tuple[float, float]:
    """The learned Sim2Mask scale w and bias b (read from the model, never assumed)."""
    s2m = model.masker.sim2mask
    return float(s2m.w.detach().float().item()), float(s2m.b.detach().float().item())


def _pamr_module(model: nn.Module) -> nn.Module:
    """The model's PAMR module if it holds one, else a fresh one with the official settings."""
    for attr in ("pamr",):
        module = getattr(model, attr, None)
        if isinstance(module, nn.Module):
            return module
    from .pamr import PAMR

    return PAMR(num_iter=PAMR_ITERATIONS, dilations=PAMR_DILATIONS)


def _pamr_settings(pamr: nn.Module) -> tuple[int, list[int]]:
    iterations = getattr(pamr, "num_iter", PAMR_ITERATIONS)
    dilations = getattr(pamr, "dilations", PAMR_DILATIONS)
    return int(iterations), [int(d) for d in dilations]


# ---------------------------------------------------------------------------------------------------------------
# ONNX export of one graph.


def graph_op_types(path: Path | str) -> set[str]:
    """The op types a graph file uses (including subgraphs); ops of custom domains read 'domain::Op'."""
    import onnx

    return graph_op_types_of(onnx.load(str(path), load_external_data=False))


def _export_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    """Traces `module` with the TorchScript-based exporter (predictable Resize modes) into one .onnx file."""
    import onnx

    module.eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (predictable Resize modes); its deprecation notice and
        # the advanced-indexing note (the EOT gather's indices are never negative) are noise here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*advanced indexing.*")
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1.*")
        torch.onnx.export(
            module,
            args,
            buffer,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
            external_data=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    unsupported = sorted(graph_op_types_of(proto) - CUDA_SAFE_OPS)
    if unsupported:
        raise ExportError(f"{path.name}: the graph uses op types outside the CUDA-safe list: {', '.join(unsupported)}")
    path.write_bytes(buffer.getvalue())


def graph_op_types_of(proto: Any) -> set[str]:
    found: set[str] = set()

    def walk(graph: Any) -> None:
        for node in graph.node:
            found.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}")
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(proto.graph)
    return found


# ---------------------------------------------------------------------------------------------------------------
# The manifest (format 1).


def manifest_to_toml(manifest: dict[str, Any]) -> str:
    """Renders a manifest dict in the layout of ARCHITECTURE.md: top-level keys, the tables in order, then one
    [[files]] entry per file (path, sha256, bytes). tomli-w writes the TOML; `open_bundle` reads it back."""
    ordered = {k: v for k, v in manifest.items() if k != "files"}
    if "files" in manifest:
        ordered["files"] = [{key: entry[key] for key in ("path", "sha256", "bytes")} for entry in manifest["files"]]
    return tomli_w.dumps(ordered)


def build_manifest(
    model: nn.Module,
    *,
    name: str,
    version: str,
    description: str,
    provenance: dict[str, Any],
    graphs: dict[str, dict[str, str]],
    crop_size: int,
    pamr: nn.Module,
    files: list[dict[str, Any]],
    defaults: BundleDefaults | None = None,
) -> dict[str, Any]:
    cfg = model.config
    defaults = defaults or BundleDefaults()
    vision, text = cfg.vision, cfg.text
    w, b = sim2mask_params(model)
    iterations, dilations = _pamr_settings(pamr)
    from .model import MEAN, STD

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "description": description,
        "architecture": {
            "kind": "tcl",
            "vision_width": int(vision.width),
            "vision_layers": int(vision.layers),
            "vision_heads": int(vision.heads),
            "patch_size": int(vision.patch_size),
            "train_image_size": int(vision.image_size),
            "text_width": int(text.width),
            "text_layers": int(text.layers),
            "text_heads": int(text.heads),
            "context_length": int(text.context_length),
            "vocab_size": int(text.vocab_size),
            "embed_dim": int(vision.embed_dim),
            "mask_stride": MASK_STRIDE,
        },
        "input": {
            "crop_size": int(crop_size),
            "crop_stride": int(crop_size) // 2,
            "short_side": int(defaults.short_side),
            "long_side_max": LONG_SIDE_MAX,
            "pad_multiple": PAD_MULTIPLE,
            "mean": [float(v) for v in MEAN],
            "std": [float(v) for v in STD],
        },
        "mask": {
            "w": w,
            "b": b,
            "kp_weight": float(defaults.kp_weight),
            "kp_shift": KP_SHIFT,
            "kp_scale": KP_SCALE,
            "bg_thresh_pamr": float(defaults.bg_thresh_pamr),
            "bg_thresh": float(defaults.bg_thresh),
            "pamr_iterations": iterations,
            "pamr_dilations": dilations,
        },
        "text": {
            "vocabulary": VOCAB_FILE,
            "sot_token": SOT_TOKEN,
            "eot_token": EOT_TOKEN,
            "templates": list(defaults.templates),
        },
        "provenance": _provenance_table(provenance),
        "graphs": graphs,
        "files": files,
    }


def _provenance_table(provenance: dict[str, Any]) -> dict[str, Any]:
    """The [provenance] table: source, seed (random only), the three hashes (empty when not applicable), torch."""
    source = provenance.get("source")
    if source not in ("random", "official", "checkpoint"):
        raise ExportError(f"provenance source must be random, official or checkpoint, not {source!r}")
    table: dict[str, Any] = {"source": source}
    if source == "random":
        table["seed"] = int(provenance.get("seed", 0))
    for key in ("clip_sha256", "tcl_sha256", "checkpoint_sha256"):
        table[key] = str(provenance.get(key, "") or "")
    table["torch_version"] = str(provenance.get("torch_version") or torch.__version__.split("+")[0])
    for key, value in provenance.items():  # anything else the caller records (e.g. the checkpoint's step)
        if key not in table and isinstance(value, str | int | float | bool):
            table[key] = value
    return table


# ---------------------------------------------------------------------------------------------------------------
# Writing the bundle directory atomically.


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _install(tmp_dir: Path, out_dir: Path, force: bool) -> None:
    """Renames the finished `tmp_dir` to `out_dir`; with force, replaces an existing out_dir atomically enough:
    the old one is renamed away first, the new one renamed in, then the old one deleted."""
    if not out_dir.exists() and not out_dir.is_symlink():
        os.rename(tmp_dir, out_dir)
        _fsync_dir(out_dir.parent)
        return
    if not force:
        raise ExportError(f"{out_dir} already exists; pass --force to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    old.rmdir()
    os.rename(out_dir, old)
    try:
        os.rename(tmp_dir, out_dir)
    except OSError:
        os.rename(old, out_dir)  # put the previous bundle back
        raise
    _fsync_dir(out_dir.parent)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def _log(message: str) -> None:
    print(f"export: {message}", file=sys.stderr, flush=True)


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
    log: Callable[[str], None] | None = _log,
    defaults: BundleDefaults | None = None,
) -> dict[str, Any]:
    """Exports `model` into a bundle at `out_dir` and returns the manifest (as written to model.toml).

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
    if unknown := [p for p in precisions if p not in ("fp32", "fp16")]:
        raise ExportError(f"unknown precision(s) {', '.join(unknown)}; known: fp32, fp16")
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
    grid = crop_size // patch
    pamr = _pamr_module(model)

    model = model.eval()
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        graphs = _write_graphs(model, pamr, tmp_dir, grid=grid, crop_size=crop_size, precisions=precisions, log=log)
        shutil.copyfile(vocab_path, tmp_dir / VOCAB_FILE)

        files = []
        for path in sorted(tmp_dir.iterdir()):
            _fsync_file(path)
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
        manifest_path = tmp_dir / MANIFEST_FILE
        manifest_path.write_text(manifest_to_toml(manifest), encoding="utf-8")
        _fsync_file(manifest_path)
        open_bundle(tmp_dir, verify=False)  # the manifest reads back and passes the loader's checks
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_dir, 0o777 & ~umask)  # mkdtemp made it private; a bundle is an ordinary directory
        _fsync_dir(tmp_dir)
        _install(tmp_dir, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    total = sum(f["bytes"] for f in manifest["files"])
    log(f"wrote {out_dir} ({len(manifest['files'])} files, {total / 1e6:.1f} MB)")
    return manifest


def _write_graphs(
    model: nn.Module,
    pamr: nn.Module,
    tmp_dir: Path,
    *,
    grid: int,
    crop_size: int,
    precisions: list[str],
    log: Callable[[str], None],
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
        file = GRAPH_FILES[role][precision]
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
        lambda p: _export_graph(
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
    for precision in precisions:
        dtype = torch.float32 if precision == "fp32" else torch.float16
        variant = model if precision == "fp32" else half_model
        timed(
            "image_trunk",
            precision,
            lambda p, v=variant, d=dtype: _export_graph(
                ImageTrunkGraph(v, grid, d, pos_embed_model=model),
                (pixels,),
                p,
                ["pixels"],
                ["tokens"],
                {"pixels": {0: "B"}, "tokens": {0: "B"}},
            ),
        )
        timed(
            "tcl_head",
            precision,
            lambda p, v=variant, d=dtype: _export_graph(
                TclHeadGraph(v, grid, d),
                (trunk_tokens,),
                p,
                ["tokens"],
                ["dense", "kp_feat"],
                {"tokens": {0: "B"}, "dense": {0: "B"}, "kp_feat": {0: "B"}},
            ),
        )
    del half_model

    w, b = sim2mask_params(model)
    timed(
        "mask_head",
        "fp32",
        lambda p: _export_graph(
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
    timed(
        "pamr",
        "fp32",
        lambda p: _export_graph(
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
    p.add_argument("--tcl", type=Path, metavar="FILE", help="the official TCL checkpoint tcl.pth (with --clip)")
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
    p.add_argument("--precision", default="fp32,fp16", help="image-graph precisions, comma-separated (fp32 required)")
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
    args = p.parse_args(argv)
    if args.clip is not None and args.tcl is None:
        p.error("--clip needs --tcl")
    if args.tcl is not None and args.clip is None:
        p.error("--tcl needs --clip")
    if args.allow_unverified_clip and args.clip is None:
        p.error("--allow-unverified-clip only applies to --clip")
    if args.seed is not None and args.random is None:
        p.error("--seed only applies to --random")
    precisions = [s.strip() for s in args.precision.split(",") if s.strip()]
    if not precisions or any(s not in ("fp32", "fp16") for s in precisions):
        p.error(f"--precision {args.precision!r}: give fp32 or fp32,fp16")
    if "fp32" not in precisions:
        p.error("--precision must include fp32 (every bundle has fp32 graphs)")
    args.precisions = precisions
    return args


def bundle_defaults_from(table: Any, where: str) -> BundleDefaults:
    """BundleDefaults from a [bundle] table (a dict); unknown keys and wrong values are errors naming `where`."""
    if not isinstance(table, dict):
        raise ExportError(f"{where}: [bundle] must be a table")
    known = {f.name for f in fields(BundleDefaults)}
    if unknown := sorted(set(table) - known):
        raise ExportError(
            f"{where}: unknown key(s) bundle.{', bundle.'.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    try:
        defaults = BundleDefaults(**table)
    except TypeError as e:
        raise ExportError(f"{where}: [bundle]: {e}") from None
    if bad := defaults.problems():
        raise ExportError(f"{where}: bundle." + "; bundle.".join(bad))
    return defaults


def _defaults_from_config_file(path: Path) -> BundleDefaults:
    import tomllib

    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("bundle", {})
    except FileNotFoundError:
        raise ExportError(f"{path}: no such file (--defaults-from takes a training config)") from None
    except tomllib.TOMLDecodeError as e:
        raise ExportError(f"{path}: invalid TOML: {e}") from None
    return bundle_defaults_from(table, str(path))


def _load_model(args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any], str]:
    """The model, its provenance and a default description, from the command line's source. For a trainer
    checkpoint, `args.defaults` becomes its training config's [bundle] table unless --defaults-from set it."""
    torch_version = torch.__version__.split("+")[0]
    if args.random is not None:
        from .model import SIZES, TCL

        seed = 0 if args.seed is None else args.seed
        model = TCL(SIZES[args.random], seed=seed)
        provenance = {"source": "random", "seed": seed, "torch_version": torch_version}
        return model, provenance, f"random {args.random} TCL (seed {seed}); for tests, not for use"
    if args.clip is not None:
        from .checkpoints import build_official

        for path in (args.clip, args.tcl):
            if not path.is_file():
                raise ExportError(f"{path}: no such file")
        clip_sha256, verified = check_clip_hash(args.clip, allow_unverified=args.allow_unverified_clip)
        # The hash was checked (or knowingly waived) above; build_official need not read the file twice for it.
        built = build_official(args.clip, args.tcl, clip_sha256=None)
        model, hashes = _split_model_and_meta(built)
        provenance = {
            "source": "official",
            "clip_sha256": hashes.get("clip_sha256") or clip_sha256,
            "clip_verified": verified,
            "tcl_sha256": hashes.get("tcl_sha256") or sha256_file(args.tcl),
            "torch_version": torch_version,
        }
        description = "TCL (CVPR 2023), official checkpoint on OpenAI CLIP ViT-B/16"
        if not verified:
            description = f"TCL (CVPR 2023), official-format checkpoint on an unverified CLIP (sha256 {clip_sha256})"
        return model, provenance, description
    from .checkpoints import load_checkpoint

    if not args.checkpoint.is_file():
        raise ExportError(f"{args.checkpoint}: no such file")
    model, meta = load_checkpoint(args.checkpoint)
    meta = meta if isinstance(meta, dict) else {}
    train_config = meta.get("train_config")
    if args.defaults is None and isinstance(train_config, dict) and "bundle" in train_config:
        args.defaults = bundle_defaults_from(train_config["bundle"], f"{args.checkpoint} (its training config)")
    provenance = {
        "source": "checkpoint",
        "checkpoint_sha256": meta.get("sha256") or meta.get("checkpoint_sha256") or sha256_file(args.checkpoint),
        "torch_version": torch_version,
    }
    return model, provenance, f"TCL trained by tclseg ({args.checkpoint.name})"


def check_clip_hash(path: Path, *, allow_unverified: bool) -> tuple[str, bool]:
    """(the file's sha256, whether it is OpenAI's ViT-B/16). A different file is refused unless `allow_unverified`:
    the pinned hash is what vouches for the weights, so waiving it is the user's explicit, logged decision."""
    from .checkpoints import OPENAI_VIT_B16_SHA256

    found = sha256_file(path)
    if found == OPENAI_VIT_B16_SHA256:
        return found, True
    if not allow_unverified:
        raise ExportError(
            f"{path}: sha256 {found} is not OpenAI's CLIP ViT-B/16 ({OPENAI_VIT_B16_SHA256}); if you trust this file "
            "(a re-hosted copy, a fine-tuned CLIP), pass --allow-unverified-clip to use it anyway"
        )
    _log(
        f"warning: {path}: sha256 {found} is not OpenAI's CLIP ViT-B/16 ({OPENAI_VIT_B16_SHA256}); using it "
        "anyway (--allow-unverified-clip); the bundle records clip_verified = false and this sha256"
    )
    return found, False


def _split_model_and_meta(built: Any) -> tuple[nn.Module, dict[str, Any]]:
    """build_official may return the model alone or (model, info); take the hashes from wherever they are."""
    if isinstance(built, tuple):
        model, info = built[0], built[1] if len(built) > 1 else {}
    else:
        model, info = built, getattr(built, "provenance", {})
    return model, dict(info) if isinstance(info, dict) else {}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    from .checkpoints import CheckpointError

    start = time.perf_counter()
    try:
        if args.out.exists() and not args.force:
            raise ExportError(f"{args.out} already exists; pass --force to replace it")
        args.defaults = _defaults_from_config_file(args.defaults_from) if args.defaults_from else None
        vocab = args.vocab or default_vocab_path()
        if not vocab.is_file():
            raise ExportError(f"{vocab}: the BPE vocabulary file does not exist (run scripts/setup)")
        model, provenance, description = _load_model(args)
        _log(f"model ready in {time.perf_counter() - start:.1f} s; exporting to {args.out}")
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
    _log(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
