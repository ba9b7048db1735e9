"""Bundles with training-free heads (`export --heads`): each head graph against `heads.dense_features`, the [heads]
table, a CLIP-only bundle without TCL's graphs, and the command line's head checks."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tclseg_trainer.bundle import open_bundle
from tclseg_trainer.clip import CLIP
from tclseg_trainer.export import ExportError, export_bundle
from tclseg_trainer.heads import HEAD_DEFAULTS, HEADS, dense_features
from tclseg_trainer.model import SIZES, TCL
from tclseg_trainer.tokenizer import default_vocab_path

CROP = 64
TOL = {"fp32": 1e-4, "fp16": 2e-2}


def session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    model = TCL(SIZES["tiny"], seed=12).eval()
    out = tmp_path_factory.mktemp("heads") / "b"
    export_bundle(
        model,
        out,
        provenance={"source": "random", "seed": 12},
        vocab_path=default_vocab_path(),
        crop_size=CROP,
        log=None,
        heads=("naclip", "tcl", *[h for h in HEADS if h != "naclip"]),
    )
    return model, out


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_head_graph_matches_dense_features(bundle, precision):
    model, out = bundle
    b = open_bundle(out)
    g = CROP // model.config.vision.patch_size
    pixels = torch.randn(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tokens = model.trunk_tokens(pixels)
    for head in HEADS:
        (got,) = session(b.graph(f"{head}_head", precision)).run(None, {"tokens": tokens.numpy()})
        with torch.no_grad():
            want = dense_features(model, head, tokens, (g, g)).numpy()
        assert got.shape == want.shape == (2, model.config.vision.embed_dim, g, g), head
        err = float(np.abs(got - want).max())
        assert err < TOL[precision], (head, precision, err)


def test_manifest_lists_the_heads_with_their_defaults(bundle):
    _, out = bundle
    manifest = tomllib.loads((out / "model.toml").read_text())
    assert manifest["default_head"] == "naclip"
    assert manifest["heads"]["tcl"] == {"kind": "tcl", "graph": "tcl_head"}
    for head in HEADS:
        spec = manifest["heads"][head]
        assert spec["kind"] == "dense" and spec["graph"] == f"{head}_head"
        assert spec["logit_scale"] == HEAD_DEFAULTS[head]["logit_scale"]
        files = manifest["graphs"][spec["graph"]]
        assert set(files) == {"fp32", "fp16"}
        listed = {f["path"] for f in manifest["files"]}
        assert set(files.values()) <= listed  # hashed like every graph


def test_unknown_heads_are_refused(tmp_path):
    model = TCL(SIZES["tiny"], seed=1)
    with pytest.raises(ExportError, match="unknown head.*gem.*known: tcl, maskclip"):
        export_bundle(model, tmp_path / "x", provenance={}, vocab_path=default_vocab_path(), heads=["gem"], log=None)
    assert list(tmp_path.iterdir()) == []


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tclseg_trainer.export", *args], capture_output=True, text=True, timeout=300
    )


def test_clip_alone_makes_a_bundle_of_training_free_heads(tmp_path, monkeypatch, capsys):
    """`--clip` without `--tcl`: no TCL graphs, the heads asked for on the trunk, CLIP's weights in them."""
    from tclseg_trainer import checkpoints, export

    tiny = SIZES["tiny"]
    monkeypatch.setitem(checkpoints.SIZES, "vit-b16", tiny)
    clip_model = CLIP(tiny.vision, tiny.text, seed=8)
    clip = tmp_path / "ViT-B-16.pt"
    torch.save(clip_model.state_dict(), clip)
    out = tmp_path / "b"
    args = ["--clip", str(clip), "--allow-unverified-clip", "--heads", "sclip,naclip", "--precision", "fp32"]
    assert export.main([*args, "--crop-size", str(CROP), "--out", str(out)]) == 0, capsys.readouterr().err
    b = open_bundle(out)
    manifest = tomllib.loads((out / "model.toml").read_text())
    assert set(manifest["heads"]) == {"sclip", "naclip"} and manifest["default_head"] == "sclip"
    assert "tcl_head" not in manifest["graphs"] and "mask_head" not in manifest["graphs"]
    assert manifest["provenance"]["source"] == "official" and manifest["provenance"]["tcl_sha256"] == ""
    g = CROP // tiny.vision.patch_size
    pixels = torch.randn(1, 3, CROP, CROP, generator=torch.Generator().manual_seed(4))
    (tokens,) = session(b.graph("image_trunk")).run(None, {"pixels": pixels.numpy()})
    (got,) = session(b.graph("naclip_head")).run(None, {"tokens": tokens})
    with torch.no_grad():
        # The bundle's trunk graph resizes the position embedding by TCL's rule (issue 19: not yet the heads' own).
        want = dense_features(clip_model.visual, "naclip", pixels, pos_resize="size").numpy()
    assert got.shape == (1, tiny.vision.embed_dim, g, g)
    assert float(np.abs(got - want).max()) < 1e-4


def test_cli_head_usage_errors(tmp_path):
    no_tcl = run_cli("--clip", str(tmp_path / "c.pt"), "--heads", "tcl,naclip", "--out", str(tmp_path / "a"))
    assert no_tcl.returncode == 2 and "the tcl head needs --tcl" in no_tcl.stderr
    unknown = run_cli("--random", "tiny", "--heads", "naclip,gem", "--out", str(tmp_path / "b"))
    assert unknown.returncode == 2 and "unknown head(s) gem" in unknown.stderr
    assert list(tmp_path.iterdir()) == []
