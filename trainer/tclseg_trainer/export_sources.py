"""Where the command line's model comes from (random weights, the official CLIP + TCL checkpoints, a trainer
checkpoint), with its provenance, and the inference defaults a training config's [bundle] table sets."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .bundle import BundleDefaults, sha256_file
from .export_onnx import ExportError


def log(message: str) -> None:
    print(f"export: {message}", file=sys.stderr, flush=True)


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


def _read_toml(path: Path, takes: str) -> dict[str, Any]:
    """A TOML file's table; a missing file or bad TOML is an ExportError naming it (`takes`: what the flag wants)."""
    import tomllib

    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path}: no such file ({takes})") from None
    except tomllib.TOMLDecodeError as e:
        raise ExportError(f"{path}: invalid TOML: {e}") from None


def with_query_thresholds(defaults: BundleDefaults, path: Path) -> BundleDefaults:
    """`defaults` with [mask.query_thresholds] read from a TOML file of `name = threshold` lines."""
    table = _read_toml(path, "--query-thresholds takes `name = threshold` lines")
    out = replace(defaults, query_thresholds=table)
    if bad := out.problems():
        raise ExportError(f"{path}: " + "; ".join(bad))
    return out


def defaults_from_config_file(path: Path) -> BundleDefaults:
    table = _read_toml(path, "--defaults-from takes a training config").get("bundle", {})
    return bundle_defaults_from(table, str(path))


def load_model(args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any], str]:
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
            if path is not None and not path.is_file():
                raise ExportError(f"{path}: no such file")
        clip_sha256, verified = check_clip_hash(args.clip, allow_unverified=args.allow_unverified_clip)
        if args.tcl is None:
            return _clip_only(args.clip, clip_sha256, verified, torch_version)
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


def _clip_only(path: Path, clip_sha256: str, verified: bool, torch_version: str) -> tuple[nn.Module, dict, str]:
    """OpenAI's CLIP alone, in a TCL model's frame (its grounder is never exported: the bundle has training-free
    heads only)."""
    from . import checkpoints
    from .model import TCL

    model = TCL(checkpoints.SIZES["vit-b16"], seed=0)
    checkpoints.apply_openai_clip(model, checkpoints.load_openai_clip(path, None))
    provenance = {
        "source": "official",  # the official CLIP weights; tcl_sha256 stays empty (no TCL file)
        "clip_sha256": clip_sha256,
        "clip_verified": verified,
        "torch_version": torch_version,
    }
    return model.eval(), provenance, "training-free heads on OpenAI CLIP ViT-B/16"


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
    log(
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
