"""The bundle's manifest (model.toml, format 1) and the atomic install of a finished bundle directory.

What the manifest records is read from the model (Sim2Mask's learned w and b, PAMR's settings), never assumed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import tomli_w
import torch
from torch import nn

from .bundle import (
    FORMAT,
    FORMAT_VERSION,
    KP_SCALE,
    KP_SHIFT,
    LONG_SIDE_MAX,
    MASK_STRIDE,
    PAD_MULTIPLE,
    PAMR_DILATIONS,
    PAMR_ITERATIONS,
    BundleDefaults,
)
from .export_onnx import ExportError
from .tokenizer import EOT_TOKEN, SOT_TOKEN
from .tokenizer import VOCAB_FILENAME as VOCAB_FILE

# ---------------------------------------------------------------------------------------------------------------
# Reading what the export needs from the model.


def sim2mask_params(model: nn.Module) -> tuple[float, float]:
    """The learned Sim2Mask scale w and bias b (read from the model, never assumed)."""
    s2m = model.masker.sim2mask
    return float(s2m.w.detach().float().item()), float(s2m.b.detach().float().item())


def pamr_module(model: nn.Module) -> nn.Module:
    """The model's PAMR module if it holds one, else a fresh one with the official settings."""
    for attr in ("pamr",):
        module = getattr(model, attr, None)
        if isinstance(module, nn.Module):
            return module
    from .pamr import PAMR

    return PAMR(num_iter=PAMR_ITERATIONS, dilations=PAMR_DILATIONS)


def pamr_settings(pamr: nn.Module) -> tuple[int, list[int]]:
    iterations = getattr(pamr, "num_iter", PAMR_ITERATIONS)
    dilations = getattr(pamr, "dilations", PAMR_DILATIONS)
    return int(iterations), [int(d) for d in dilations]


# ---------------------------------------------------------------------------------------------------------------
# ONNX export of one graph.


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
    iterations, dilations = pamr_settings(pamr)
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
            # Only bundles that carry calibrated thresholds have the table (the official model's has none).
            **(
                {"query_thresholds": {k: float(v) for k, v in sorted(defaults.query_thresholds.items())}}
                if defaults.query_thresholds
                else {}
            ),
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


def fsync_dir(path: Path) -> None:
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


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def install(tmp_dir: Path, out_dir: Path, force: bool) -> None:
    """Renames the finished `tmp_dir` to `out_dir`; with force, replaces an existing out_dir atomically enough:
    the old one is renamed away first, the new one renamed in, then the old one deleted.

    First the folder gets the mode of an ordinary directory (mkdtemp made it private) and is fsync'd, so every
    writer of a bundle (export, quantize) publishes it the same way."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_dir, 0o777 & ~umask)
    fsync_dir(tmp_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        os.rename(tmp_dir, out_dir)
        fsync_dir(out_dir.parent)
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
    fsync_dir(out_dir.parent)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
