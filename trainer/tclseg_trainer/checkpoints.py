"""Loading the official weights and saving/loading trainer checkpoints, with every mismatch reported.

- OpenAI CLIP ViT-B/16 (`ViT-B-16.pt`): the TorchScript archive OpenAI distributes, or a plain state dict.
  Its sha256 is pinned.
- The official TCL release (`tcl.pth`, GitHub release v1.0.0 of kakaobrain/tcl): a grounder-only state dict
  under "model". No hash is published for it (neither in the repository nor in its README), so we compute
  and return it for provenance instead of checking it.
- Trainer checkpoints: {"format": "tclseg-trainer-checkpoint", "config": ..., "state_dict": ...}.

Every problem raises `CheckpointError` naming the file, the key, what was expected and what was found.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .model import SIZES, TCL, TCLConfig

OPENAI_VIT_B16_SHA256 = "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"
TCL_RELEASE_URL = "https://github.com/kakaobrain/tcl/releases/download/v1.0.0/tcl.pth"

CHECKPOINT_FORMAT = "tclseg-trainer-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1

# Entries of OpenAI's TorchScript archive that are hyper-parameters, not weights.
_OPENAI_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size")

# The official loader tolerates exactly these missing keys: the frozen CLIP (not shipped in tcl.pth) and
# the loss temperatures (used only by training). Matched from the start of the key, like re.match.
TCL_MISSING_WHITELIST = (r"clip_.+_encoder\..+", r".+_loss\..+")


class CheckpointError(RuntimeError):
    pass


class LoadedWeights(NamedTuple):
    state_dict: dict[str, torch.Tensor]
    sha256: str
    path: Path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Streaming sha256 (never reads the whole file into memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _existing(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: file not found")
    return p


def _check_hash(path: Path, expected: str | None) -> str:
    found = sha256_file(path)
    if expected is not None and found != expected.lower():
        raise CheckpointError(f"{path}: sha256 mismatch: expected {expected.lower()}, found {found}")
    return found


def _tensor_dict(obj: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{path}: not a {what}: expected a dict of tensors, found {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: key {k!r}: expected a tensor, found {type(v).__name__}")
    return obj


def _torch_load(path: Path, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zips, foreign files: all "not a checkpoint"
        raise CheckpointError(f"{path}: not a {what} (torch.load failed: {e})") from e


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips with a code/ directory; torch.save zips have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in name for name in z.namelist())


# ----------------------------------------------------------------------------------------------------------
# OpenAI CLIP


def load_openai_clip(path: str | os.PathLike, expected_sha256: str | None = OPENAI_VIT_B16_SHA256) -> LoadedWeights:
    """Read OpenAI CLIP weights (TorchScript archive or plain state dict) as fp32, keyed by OpenAI's names.

    `expected_sha256=None` skips the hash check (tests, other CLIP sizes); the hash is returned regardless.
    Keys and shapes are checked when the weights are applied (`apply_openai_clip`, `check_state_dict`).
    """
    p = _existing(path)
    digest = _check_hash(p, expected_sha256)
    if _is_torchscript(p):
        # OpenAI ships a TorchScript archive; its state dict carries the weights under the usual names.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
                sd = dict(torch.jit.load(str(p), map_location="cpu").state_dict())
        except Exception as e:
            raise CheckpointError(f"{p}: not a CLIP checkpoint (broken TorchScript archive: {e})") from e
    else:
        sd = _torch_load(p, "CLIP checkpoint")
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
    sd = _tensor_dict(sd, p, "CLIP checkpoint")
    for key in _OPENAI_NON_WEIGHTS:
        sd.pop(key, None)
    # The archive stores most weights in fp16; the model runs (and is exported) from fp32.
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    return LoadedWeights(sd, digest, p)


def openai_to_tcl_key(key: str) -> str | None:
    """Where an OpenAI CLIP weight lives in TCL (None: not used by TCL, i.e. logit_scale)."""
    if key == "logit_scale":
        return None
    if key.startswith("visual.ln_post."):
        return "clip_image_encoder.clip_proj.ln." + key[len("visual.ln_post.") :]
    if key == "visual.proj":
        return "clip_image_encoder.clip_proj.proj"
    if key.startswith("visual."):
        return "clip_image_encoder.clip_visual." + key[len("visual.") :]
    return "clip_text_encoder." + key


def check_state_dict(
    expected: dict[str, torch.Tensor],
    found: dict[str, torch.Tensor],
    path: str | os.PathLike,
    allowed_missing: tuple[str, ...] = (),
) -> None:
    """Raise CheckpointError unless `found` has exactly the keys and shapes of `expected`.

    Keys of `expected` matching a regex of `allowed_missing` may be absent. Nothing unexpected is allowed.
    """
    for key, value in found.items():
        if key not in expected:
            raise CheckpointError(f"{path}: unexpected key {key!r} (shape {tuple(value.shape)}) not in the model")
        want = tuple(expected[key].shape)
        if tuple(value.shape) != want:
            raise CheckpointError(f"{path}: key {key!r}: wrong shape: expected {want}, found {tuple(value.shape)}")
    for key in expected:
        if key not in found and not any(re.match(pat, key) for pat in allowed_missing):
            raise CheckpointError(
                f"{path}: missing key {key!r}: expected shape {tuple(expected[key].shape)}, found nothing"
            )


def load_clip_into(module: torch.nn.Module, weights: LoadedWeights) -> None:
    """Load OpenAI-named weights into a `clip.CLIP` module (strict keys and shapes)."""
    check_state_dict(module.state_dict(), weights.state_dict, weights.path)
    module.load_state_dict(weights.state_dict)


def tcl_to_openai_key(key: str) -> str:
    """Inverse of `openai_to_tcl_key` for TCL's `clip_*` keys."""
    if key.startswith("clip_image_encoder.clip_proj.ln."):
        return "visual.ln_post." + key[len("clip_image_encoder.clip_proj.ln.") :]
    if key == "clip_image_encoder.clip_proj.proj":
        return "visual.proj"
    if key.startswith("clip_image_encoder.clip_visual."):
        return "visual." + key[len("clip_image_encoder.clip_visual.") :]
    return key[len("clip_text_encoder.") :]


@torch.no_grad()
def apply_openai_clip(model: TCL, weights: LoadedWeights) -> None:
    """Put CLIP's weights into TCL's frozen encoders, then re-copy them into the grounder (MaskCLIP init)."""
    # Check in OpenAI's names: those are what a user can look up in the file.
    expected = {tcl_to_openai_key(k): v for k, v in model.state_dict().items() if k.startswith("clip_")}
    expected["logit_scale"] = torch.zeros([])  # present in CLIP files, unused by TCL
    check_state_dict(expected, weights.state_dict, weights.path, allowed_missing=("logit_scale$",))
    mapped = {openai_to_tcl_key(k): v for k, v in weights.state_dict.items() if openai_to_tcl_key(k) is not None}
    model.load_state_dict(mapped, strict=False)
    model.init_grounder_from_clip()


# ----------------------------------------------------------------------------------------------------------
# Official TCL release


def load_tcl(path: str | os.PathLike, expected_sha256: str | None = None) -> LoadedWeights:
    """Read the official grounder-only `tcl.pth` ({"model": state_dict} or a bare state dict).

    There is no published hash for tcl.pth; the computed sha256 is returned so it can be recorded.
    """
    p = _existing(path)
    digest = _check_hash(p, expected_sha256)
    obj = _torch_load(p, "TCL checkpoint")
    if isinstance(obj, dict) and "model" in obj:
        obj = obj["model"]
    sd = _tensor_dict(obj, p, "TCL checkpoint")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    return LoadedWeights(sd, digest, p)


@torch.no_grad()
def apply_tcl(model: TCL, weights: LoadedWeights) -> None:
    """Load tcl.pth into the model: unexpected keys and non-whitelisted missing keys are errors."""
    check_state_dict(model.state_dict(), weights.state_dict, weights.path, TCL_MISSING_WHITELIST)
    model.load_state_dict(weights.state_dict, strict=False)


def build_official(
    clip_path: str | os.PathLike,
    tcl_path: str | os.PathLike,
    *,
    config: TCLConfig | None = None,
    clip_sha256: str | None = OPENAI_VIT_B16_SHA256,
) -> TCL:
    """The released model: OpenAI CLIP ViT-B/16 + tcl.pth. `model.provenance` records both hashes."""
    model = TCL(config if config is not None else SIZES["vit-b16"])
    clip = load_openai_clip(clip_path, clip_sha256)
    apply_openai_clip(model, clip)
    tcl = load_tcl(tcl_path)
    apply_tcl(model, tcl)
    model.provenance = {"source": "official", "clip_sha256": clip.sha256, "tcl_sha256": tcl.sha256}
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# Trainer checkpoints


def save_checkpoint(path: str | os.PathLike, model: TCL, config: TCLConfig, **extra: Any) -> str:
    """Write a trainer checkpoint atomically (temp file in the same directory, then rename).

    Returns the sha256 of the written file. `extra` entries (step, optimizer state, ...) are stored as is.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "config": config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sha256_file(p)


def load_checkpoint(path: str | os.PathLike) -> tuple[TCL, dict[str, Any]]:
    """Rebuild a model from a trainer checkpoint. meta holds everything but the state dict, plus sha256."""
    p = _existing(path)
    digest = sha256_file(p)
    obj = _torch_load(p, "trainer checkpoint")
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{p}: key 'format': expected {CHECKPOINT_FORMAT!r}, found {found!r}")
    for key in ("config", "state_dict"):
        if key not in obj:
            raise CheckpointError(f"{p}: missing key {key!r}: expected a trainer checkpoint entry, found nothing")
    try:
        config = TCLConfig.from_dict(obj["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: key 'config': expected a TCLConfig dict, found an invalid one ({e})") from e
    sd = _tensor_dict(obj["state_dict"], p, "trainer checkpoint state dict")
    model = TCL(config)
    check_state_dict(model.state_dict(), sd, p)
    model.load_state_dict(sd)
    model.provenance = {"source": "checkpoint", "checkpoint_sha256": digest}
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    meta["sha256"] = digest
    return model.eval(), meta
