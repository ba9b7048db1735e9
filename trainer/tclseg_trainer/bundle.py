"""Reading a model bundle (format 1): `model.toml` plus the files it lists, each checked by size and sha256.

ARCHITECTURE.md documents the layout; `export.py` writes it and the Rust runtime (`src/model/bundle.rs`) reads it
with the same checks. Every error names the bundle directory and, where it applies, the file.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

FORMAT = "tclseg-bundle"
FORMAT_VERSION = 1
MANIFEST_FILE = "model.toml"

# Inference constants of the official evaluation (reference/tcl.md §4, §5): what model.toml carries by default.
CROP_SIZE = 448
CROP_STRIDE = 224
SHORT_SIDE = 448
LONG_SIDE_MAX = 2048
PAD_MULTIPLE = 16
MASK_STRIDE = 4
KP_WEIGHT = 0.3
KP_SHIFT = 0.25
KP_SCALE = 10.0
BG_THRESH_PAMR = 0.4
BG_THRESH = 0.5
PAMR_ITERATIONS = 10
PAMR_DILATIONS = (1, 2, 4, 8, 12, 24)


def _official_templates() -> list[str]:
    from .model import TEMPLATES

    return list(TEMPLATES)


@dataclass
class BundleDefaults:
    """The inference defaults a bundle carries in model.toml, which `tclseg segment`/`serve`/`eval` use unless told
    otherwise. The official TCL evaluation settings by default; a training recipe whose world differs (the synthetic
    one: 224-pixel images, captions without photo templates) sets its own in the config's [bundle] table."""

    short_side: int = SHORT_SIDE
    kp_weight: float = KP_WEIGHT
    bg_thresh_pamr: float = BG_THRESH_PAMR
    bg_thresh: float = BG_THRESH
    templates: list[str] = field(default_factory=_official_templates)
    # Per query name, a background threshold calibrated on held-out images with PAMR ([mask.query_thresholds]:
    # background where that query wins with a lower score, on top of bg_thresh_pamr). Empty: none (the official
    # model's; the synthetic recipe's `synthetic.py calibrate` measures its six colour words).
    query_thresholds: dict[str, float] = field(default_factory=dict)

    def problems(self) -> list[str]:
        """What is wrong with these values, as `key: reason` lines (empty when they are usable)."""
        out = []
        if self.short_side < PAD_MULTIPLE:
            out.append(f"short_side {self.short_side}: must be >= {PAD_MULTIPLE}")
        if not 0.0 <= self.kp_weight <= 1.0:
            out.append(f"kp_weight {self.kp_weight}: must be in [0, 1]")
        for key in ("bg_thresh_pamr", "bg_thresh"):
            if not 0.0 < getattr(self, key) < 1.0:
                out.append(f"{key} {getattr(self, key)}: must be in (0, 1)")
        if not isinstance(self.query_thresholds, dict):
            out.append("query_thresholds: must be a table of name = threshold")
        else:
            for name, t in self.query_thresholds.items():
                if not (isinstance(name, str) and name.strip()):
                    out.append(f"query_thresholds: {name!r} is not a query name")
                elif not (isinstance(t, int | float) and 0.0 < t < 1.0):
                    out.append(f"query_thresholds.{name} {t!r}: must be in (0, 1)")
        if not self.templates:
            out.append('templates: give at least one, e.g. ["{}"]')
        for t in self.templates:
            if not isinstance(t, str) or t.count("{}") != 1:
                out.append(f"templates: {t!r} must contain '{{}}' exactly once (where the query name goes)")
        return out


# Graph roles every bundle provides, in the order they run.
REQUIRED_GRAPHS = ("text_encoder", "image_trunk", "pamr")
# The graphs the TCL head needs: in every bundle without a [heads] table, and in one whose [heads] has "tcl".
TCL_GRAPHS = ("tcl_head", "mask_head")
# [heads.<name>] kinds: "tcl" (tcl_head + mask_head) or "dense" (a graph tokens -> dense [B,E,G,G], see heads.py).
HEAD_KINDS = ("tcl", "dense")
PRECISIONS = ("fp32", "fp16", "int8")

# The tables of a manifest and the keys each must have (more keys are tolerated inside a table).
REQUIRED_KEYS = {
    "architecture": (
        "kind",
        "vision_width",
        "vision_layers",
        "vision_heads",
        "patch_size",
        "train_image_size",
        "text_width",
        "text_layers",
        "text_heads",
        "context_length",
        "vocab_size",
        "embed_dim",
        "mask_stride",
    ),
    "input": ("crop_size", "crop_stride", "short_side", "long_side_max", "pad_multiple", "mean", "std"),
    "mask": (
        "w",
        "b",
        "kp_weight",
        "kp_shift",
        "kp_scale",
        "bg_thresh_pamr",
        "bg_thresh",
        "pamr_iterations",
        "pamr_dilations",
    ),
    "text": ("vocabulary", "sot_token", "eot_token", "templates"),
}
TOP_LEVEL_KEYS = {
    "format",
    "format_version",
    "name",
    "version",
    "description",
    "architecture",
    "input",
    "mask",
    "text",
    "provenance",
    "graphs",
    "files",
    "heads",
    "default_head",
    "protocols",
}


class BundleError(Exception):
    """A bundle that cannot be used; the message names the bundle and the file."""

    def __init__(self, bundle_dir: Path | str, message: str, file: str | None = None):
        self.bundle_dir = Path(bundle_dir)
        self.file = file
        where = f"model bundle {self.bundle_dir}"
        super().__init__(f"{where}: {message}")


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Lowercase hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    bytes: int


@dataclass
class Bundle:
    """A bundle whose manifest parsed (and, after `open_bundle(verify=True)`, whose files matched)."""

    dir: Path
    manifest: dict[str, Any]
    files: list[FileEntry]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def architecture(self) -> dict[str, Any]:
        return self.manifest["architecture"]

    @property
    def input(self) -> dict[str, Any]:
        return self.manifest["input"]

    @property
    def mask(self) -> dict[str, Any]:
        return self.manifest["mask"]

    @property
    def text(self) -> dict[str, Any]:
        return self.manifest["text"]

    @property
    def provenance(self) -> dict[str, Any]:
        return self.manifest.get("provenance", {})

    @property
    def vocabulary(self) -> Path:
        return self.dir / self.manifest["text"]["vocabulary"]

    def precisions(self, role: str) -> list[str]:
        return sorted(self.manifest["graphs"].get(role, {}))

    def graph(self, role: str, precision: str = "fp32") -> Path:
        """Path of a graph; roles that exist only in fp32 (text encoder, mask head, PAMR) fall back to fp32."""
        by_precision = self.manifest["graphs"].get(role)
        if by_precision is None:
            raise BundleError(self.dir, f"[graphs] has no '{role}' graph")
        file = by_precision.get(precision) or by_precision.get("fp32")
        if file is None:
            raise BundleError(self.dir, f"[graphs] '{role}' has neither {precision} nor fp32")
        return self.dir / file

    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def verify(self) -> None:
        """Checks every listed file's presence, size and sha256; raises BundleError on the first problem."""
        for entry in self.files:
            path = self.dir / entry.path
            if not path.is_file():
                raise BundleError(
                    self.dir,
                    f"{entry.path} is listed in {MANIFEST_FILE} but missing; re-export the bundle or copy it again",
                    entry.path,
                )
            size = path.stat().st_size
            if size != entry.bytes:
                raise BundleError(
                    self.dir,
                    f"{entry.path} has {size} bytes, {MANIFEST_FILE} says {entry.bytes}; "
                    "the copy is truncated or the file was replaced",
                    entry.path,
                )
            found = sha256_file(path)
            if found != entry.sha256.lower():
                raise BundleError(
                    self.dir,
                    f"{entry.path} has sha256 {found}, {MANIFEST_FILE} says {entry.sha256}; "
                    "the file is corrupted or was replaced",
                    entry.path,
                )


def _malformed(bundle_dir: Path, message: str) -> BundleError:
    return BundleError(bundle_dir, f"{MANIFEST_FILE} is malformed: {message}", MANIFEST_FILE)


def _is_plain_name(path: str) -> bool:
    """A file name inside the bundle: relative, no '..', no absolute or drive parts."""
    if not path or "\\" in path:
        return False
    parts = PurePosixPath(path).parts
    return not PurePosixPath(path).is_absolute() and all(p not in ("", ".", "..") for p in parts)


def check_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> list[FileEntry]:
    """Checks a parsed manifest's shape; returns its [[files]] entries. Mirrors the Rust loader's checks."""
    unknown = sorted(set(manifest) - TOP_LEVEL_KEYS)
    if unknown:
        raise _malformed(bundle_dir, f"unknown top-level key(s) {', '.join(unknown)}")
    for key in ("format", "format_version", "name", "version", "graphs", "files", *REQUIRED_KEYS):
        if key not in manifest:
            raise _malformed(bundle_dir, f"missing '{key}'")
    if manifest["format"] != FORMAT:
        raise _malformed(bundle_dir, f"format is {manifest['format']!r}, expected {FORMAT!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise _malformed(
            bundle_dir,
            f"format_version is {manifest['format_version']!r}, this reader knows {FORMAT_VERSION}",
        )
    for table, keys in REQUIRED_KEYS.items():
        if not isinstance(manifest[table], dict):
            raise _malformed(bundle_dir, f"[{table}] must be a table")
        missing = [k for k in keys if k not in manifest[table]]
        if missing:
            raise _malformed(bundle_dir, f"[{table}] lacks {', '.join(missing)}")

    raw_files = manifest["files"]
    if not isinstance(raw_files, list) or not raw_files:
        raise _malformed(bundle_dir, "[[files]] must list at least one file")
    files: list[FileEntry] = []
    for i, item in enumerate(raw_files):
        if not isinstance(item, dict) or set(item) != {"path", "sha256", "bytes"}:
            raise _malformed(bundle_dir, f"[[files]] entry {i} must have exactly path, sha256 and bytes")
        path, digest, size = item["path"], item["sha256"], item["bytes"]
        if not isinstance(path, str) or not _is_plain_name(path) or path == MANIFEST_FILE:
            raise _malformed(bundle_dir, f"[[files]] path {path!r} must be a plain file name inside the bundle")
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdefABCDEF" for c in digest)):
            raise _malformed(bundle_dir, f"[[files]] '{path}': sha256 must be 64 hex digits")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _malformed(bundle_dir, f"[[files]] '{path}': bytes must be a non-negative integer")
        files.append(FileEntry(path, digest.lower(), size))
    listed = {f.path for f in files}
    if len(listed) != len(files):
        raise _malformed(bundle_dir, "[[files]] lists a path twice")

    graphs = manifest["graphs"]
    if not isinstance(graphs, dict):
        raise _malformed(bundle_dir, "[graphs] must be a table")
    heads = manifest.get("heads", {"tcl": {"kind": "tcl"}})
    if not isinstance(heads, dict) or not heads:
        raise _malformed(bundle_dir, "[heads] must be a table with at least one head")
    required = list(REQUIRED_GRAPHS)
    for head, spec in heads.items():
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind not in HEAD_KINDS:
            raise _malformed(bundle_dir, f"[heads.{head}] kind must be one of {', '.join(HEAD_KINDS)}")
        required += TCL_GRAPHS if kind == "tcl" else [spec.get("graph")]
    if manifest.get("default_head", next(iter(heads))) not in heads:
        raise _malformed(bundle_dir, f"default_head {manifest['default_head']!r} is not in [heads]")
    for role in required:
        if not isinstance(role, str) or not isinstance(graphs.get(role), dict):
            raise _malformed(bundle_dir, f"[graphs] has no '{role}' graph")
        if "fp32" not in graphs[role]:
            raise _malformed(bundle_dir, f"[graphs] '{role}' has no fp32 graph")
    for role, by_precision in graphs.items():
        if not isinstance(by_precision, dict):
            raise _malformed(bundle_dir, f"[graphs] '{role}' must map precision to file")
        for precision, file in by_precision.items():
            if precision not in PRECISIONS:
                raise _malformed(
                    bundle_dir, f"[graphs] '{role}' has precision {precision!r}; known: {', '.join(PRECISIONS)}"
                )
            if file not in listed:
                raise _malformed(bundle_dir, f"[graphs] '{role}'.{precision} = {file!r} is not listed in [[files]]")
    if manifest["text"]["vocabulary"] not in listed:
        raise _malformed(bundle_dir, f"[text] vocabulary {manifest['text']['vocabulary']!r} is not listed in [[files]]")

    arch, inp = manifest["architecture"], manifest["input"]
    patch, crop = arch["patch_size"], inp["crop_size"]
    if not (isinstance(patch, int) and isinstance(crop, int) and patch > 0 and crop > 0 and crop % patch == 0):
        raise _malformed(bundle_dir, f"[input] crop_size {crop!r} must be a positive multiple of patch_size {patch!r}")
    if not (isinstance(inp["crop_stride"], int) and 0 < inp["crop_stride"] <= crop):
        raise _malformed(bundle_dir, f"[input] crop_stride {inp['crop_stride']!r} must be between 1 and {crop}")
    stride = arch["mask_stride"]
    if not (isinstance(stride, int) and stride > 0 and patch % stride == 0):
        raise _malformed(bundle_dir, f"[architecture] mask_stride {stride!r} must divide patch_size {patch}")
    for key in ("mean", "std"):
        values = inp[key]
        if not (isinstance(values, list) and len(values) == 3 and all(isinstance(v, int | float) for v in values)):
            raise _malformed(bundle_dir, f"[input] {key} must be three numbers")
    if any(not v > 0 for v in inp["std"]):
        raise _malformed(bundle_dir, "[input] std values must be positive")
    return files


def open_bundle(bundle_dir: Path | str, *, verify: bool = True) -> Bundle:
    """Reads `bundle_dir/model.toml`, checks it and (by default) every listed file's size and sha256."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(bundle_dir, "not a directory (give the folder that holds model.toml)")
    manifest_path = bundle_dir / MANIFEST_FILE
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleError(bundle_dir, f"{MANIFEST_FILE} is missing", MANIFEST_FILE) from None
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(bundle_dir, f"cannot read {MANIFEST_FILE}: {e}", MANIFEST_FILE) from None
    try:
        manifest = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _malformed(bundle_dir, str(e)) from None
    files = check_manifest(bundle_dir, manifest)
    bundle = Bundle(bundle_dir, manifest, files)
    if verify:
        bundle.verify()
    return bundle
