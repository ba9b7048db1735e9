"""ONNX export and bundles: every graph against the PyTorch model, the op whitelist, the manifest and its
hashes, atomic writing, and the export CLI.

Relative error is max|onnx - torch| / max|torch| over the whole output tensor.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tclseg_trainer.bundle import BundleError, open_bundle
from tclseg_trainer.export import CUDA_SAFE_OPS, ExportError, export_bundle, graph_op_types
from tclseg_trainer.model import SIZES, TCL, normalize, randomize_gates
from tclseg_trainer.tokenizer import default_vocab_path, tokenize

CROP = 448
TOL = {"fp32": 1e-4, "fp16": 1e-2}


def rel_err(got: np.ndarray, want: torch.Tensor) -> float:
    want = want.detach().float().numpy()
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = randomize_gates(TCL(SIZES["tiny"], seed=11), seed=11).eval()
    out = tmp_path_factory.mktemp("export") / "tiny"
    export_bundle(
        model,
        out,
        provenance={"source": "random", "seed": 11},
        vocab_path=default_vocab_path(),
        log=None,
    )
    return model, open_bundle(out)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_image_graphs_match_the_model(tiny, precision):
    model, bundle = tiny
    g = CROP // model.config.vision.patch_size
    pixels = torch.randn(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = model.trunk_tokens(pixels)
        dense = normalize(model.grounder_dense(tokens, (g, g)), 1)
        kp = normalize(model.kp_features(tokens, (g, g)), 1)
    (got_tokens,) = session(bundle.graph("image_trunk", precision)).run(None, {"pixels": pixels.numpy()})
    assert rel_err(got_tokens, tokens) <= TOL[precision]
    got_dense, got_kp = session(bundle.graph("tcl_head", precision)).run(None, {"tokens": tokens.numpy()})
    assert got_dense.shape == (2, model.config.vision.embed_dim, 4 * g, 4 * g)
    assert rel_err(got_dense, dense) <= TOL[precision]
    assert rel_err(got_kp, kp) <= TOL[precision]


def test_polyphase_stage_equals_upsample_then_conv():
    """The export's low-resolution form of a decoder stage computes exactly what the model's stage does."""
    from tclseg_trainer.export_graphs import PolyphaseUpConv

    model = randomize_gates(TCL(SIZES["tiny"], seed=3), seed=4).eval()
    gen = torch.Generator().manual_seed(5)
    for stage in model.masker.image_encoder.decoder.decoder.net:
        assert float(stage.conv.gate.gate) != 0.0
        with torch.no_grad():
            for size in [(5, 7), (1, 1), (14, 14)]:
                x = torch.randn(2, model.config.vision.width, *size, generator=gen)
                want = stage(x)
                got = PolyphaseUpConv(stage, torch.float32)(x)
                assert got.shape == want.shape
                assert rel_err(got.numpy(), want) <= 1e-5


def test_text_graph_matches_the_model(tiny):
    model, bundle = tiny
    tokens = tokenize(["a photo of a cat", "", "x" * 200, "Ünïcödé 🐱"])
    with torch.no_grad():
        want = model.encode_text(tokens)
    (got,) = session(bundle.graph("text_encoder")).run(None, {"tokens": tokens.numpy()})
    assert got.shape == tuple(want.shape)
    assert rel_err(got, want) <= TOL["fp32"]


def test_mask_head_and_pamr_match_the_model(tiny):
    model, bundle = tiny
    e, g = model.config.vision.embed_dim, CROP // 16
    gen = torch.Generator().manual_seed(2)
    dense = normalize(torch.randn(2, e, 4 * g, 4 * g, generator=gen), 1)
    kp_feat = normalize(torch.randn(2, e, g, g, generator=gen), 1)
    text = normalize(torch.randn(3, e, generator=gen), -1)
    w, b = model.masker.sim2mask.w, model.masker.sim2mask.b
    with torch.no_grad():
        masks = torch.sigmoid(w * model.cosine_map(dense, text) + b)
        kp = torch.sigmoid((model.cosine_map(kp_feat, text) - 0.25) * 10.0)
        kp = torch.nn.functional.interpolate(kp, size=(4 * g, 4 * g), mode="bilinear", align_corners=False)
    got_masks, got_kp = session(bundle.graph("mask_head")).run(
        None, {"dense": dense.numpy(), "kp_feat": kp_feat.numpy(), "text": text.numpy()}
    )
    assert rel_err(got_masks, masks) <= TOL["fp32"]
    assert rel_err(got_kp, kp) <= TOL["fp32"]

    pixels = torch.randn(2, 3, CROP, CROP, generator=gen)
    with torch.no_grad():
        image = torch.nn.functional.interpolate(pixels, size=(4 * g, 4 * g), mode="bilinear", align_corners=True)
        refined = model.pamr(image, masks)
    (got,) = session(bundle.graph("pamr")).run(None, {"pixels": pixels.numpy(), "masks": masks.numpy()})
    assert rel_err(got, refined) <= TOL["fp32"]


def test_graphs_use_only_cuda_safe_ops(tiny):
    _, bundle = tiny
    for role in ("text_encoder", "image_trunk", "tcl_head", "mask_head", "pamr"):
        for precision in bundle.precisions(role):
            ops = graph_op_types(bundle.graph(role, precision))
            assert ops <= CUDA_SAFE_OPS, f"{role} {precision}: {sorted(ops - CUDA_SAFE_OPS)}"
            assert "Einsum" not in ops


def test_manifest_records_weights_and_hashes(tiny):
    model, bundle = tiny
    manifest = tomllib.loads((bundle.dir / "model.toml").read_text())
    assert manifest["format"] == "tclseg-bundle" and manifest["format_version"] == 1
    assert manifest["mask"]["w"] == pytest.approx(float(model.masker.sim2mask.w.detach()))
    assert manifest["architecture"]["embed_dim"] == model.config.vision.embed_dim
    assert manifest["provenance"] == {**manifest["provenance"], "source": "random", "seed": 11}
    listed = {f["path"] for f in manifest["files"]}
    on_disk = {p.name for p in bundle.dir.iterdir()} - {"model.toml"}
    assert listed == on_disk


def test_bundle_defaults_reach_the_manifest(tiny, tmp_path):
    """A recipe's [bundle] table (from --defaults-from, or the checkpoint's own training config) sets the inference
    defaults in model.toml; bad values are refused naming the key, and nothing is written."""
    from tclseg_trainer.checkpoints import save_checkpoint

    # Exported without defaults (the module's bundle): the official settings.
    manifest = tomllib.loads((tiny[1].dir / "model.toml").read_text())
    assert manifest["input"]["short_side"] == 448 and manifest["mask"]["kp_weight"] == 0.3
    assert len(manifest["text"]["templates"]) == 9

    table = {"short_side": 224, "kp_weight": 0.0, "bg_thresh": 0.45, "templates": ["{}", "a {}"]}
    model = TCL(SIZES["tiny"], seed=3)
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, model, model.config, train_config={"bundle": table})
    run = run_cli("--checkpoint", str(ckpt), "--precision", "fp32", "--out", str(tmp_path / "trained"))
    assert run.returncode == 0, run.stderr
    manifest = tomllib.loads((tmp_path / "trained" / "model.toml").read_text())
    assert manifest["input"]["short_side"] == 224 and manifest["mask"]["kp_weight"] == 0.0
    assert manifest["mask"]["bg_thresh"] == 0.45 and manifest["mask"]["bg_thresh_pamr"] == 0.4
    assert manifest["text"]["templates"] == ["{}", "a {}"]

    config = tmp_path / "recipe.toml"
    config.write_text('[bundle]\ntemplates = ["there is a {}"]\nkp_weigth = 0.1\n')
    run = run_cli("--checkpoint", str(ckpt), "--defaults-from", str(config), "--out", str(tmp_path / "typo"))
    assert run.returncode == 1 and "recipe.toml" in run.stderr and "bundle.kp_weigth" in run.stderr, run.stderr
    config.write_text('[bundle]\ntemplates = ["there is a {}"]\n')
    run = run_cli(
        "--checkpoint",
        str(ckpt),
        "--defaults-from",
        str(config),
        "--precision",
        "fp32",
        "--out",
        str(tmp_path / "override"),
    )
    assert run.returncode == 0, run.stderr
    manifest = tomllib.loads((tmp_path / "override" / "model.toml").read_text())
    assert manifest["text"]["templates"] == ["there is a {}"] and manifest["input"]["short_side"] == 448
    assert not (tmp_path / "typo").exists()


def test_query_thresholds_reach_the_manifest_and_the_runner(tiny, tmp_path):
    """export --query-thresholds writes [mask.query_thresholds]; bundles without them have no such table; a value
    out of range is refused naming the file, and nothing is written."""
    from tclseg_trainer.bundle_infer import BundleRunner
    from tclseg_trainer.checkpoints import save_checkpoint

    assert "query_thresholds" not in tomllib.loads((tiny[1].dir / "model.toml").read_text())["mask"]
    model = TCL(SIZES["tiny"], seed=3)
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, model, model.config)
    thresholds = tmp_path / "thresholds.toml"
    thresholds.write_text("green = 0.55\nwhite = 0.6\n")
    out = tmp_path / "calibrated"
    run = run_cli(
        "--checkpoint", str(ckpt), "--precision", "fp32", "--query-thresholds", str(thresholds), "--out", str(out)
    )
    assert run.returncode == 0, run.stderr
    manifest = tomllib.loads((out / "model.toml").read_text())
    assert manifest["mask"]["query_thresholds"] == {"green": 0.55, "white": 0.6}
    assert BundleRunner(out).calibrated_thresholds(["red", " green", "white"]) == [None, 0.55, 0.6]

    thresholds.write_text("green = 1.5\n")
    run = run_cli("--checkpoint", str(ckpt), "--query-thresholds", str(thresholds), "--out", str(tmp_path / "bad"))
    assert run.returncode == 1 and "thresholds.toml" in run.stderr and "query_thresholds.green" in run.stderr
    assert not (tmp_path / "bad").exists()


def copy_bundle(bundle, dst: Path) -> Path:
    dst.mkdir()
    for p in bundle.dir.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_damaged_bundles_are_refused_naming_the_file(tiny, tmp_path):
    _, bundle = tiny
    d = copy_bundle(bundle, tmp_path / "missing")
    (d / "pamr.onnx").unlink()
    with pytest.raises(BundleError, match="pamr.onnx"):
        open_bundle(d)

    d = copy_bundle(bundle, tmp_path / "corrupt")
    data = bytearray((d / "mask_head.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "mask_head.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="mask_head.onnx"):
        open_bundle(d)

    d = copy_bundle(bundle, tmp_path / "malformed")
    (d / "model.toml").write_text("format = [unclosed\n")
    with pytest.raises(BundleError, match="model.toml"):
        open_bundle(d)


def test_export_refuses_to_overwrite_and_force_replaces(tiny, tmp_path):
    model, _ = tiny
    out = tmp_path / "b"
    kwargs = {"provenance": {"source": "random", "seed": 11}, "vocab_path": default_vocab_path(), "log": None}
    export_bundle(model, out, precisions=("fp32",), **kwargs)
    first = (out / "model.toml").read_bytes()
    with pytest.raises(ExportError, match="already exists"):
        export_bundle(model, out, precisions=("fp32",), **kwargs)
    assert (out / "model.toml").read_bytes() == first
    export_bundle(model, out, precisions=("fp32", "fp16"), force=True, **kwargs)
    assert "fp16" in open_bundle(out).precisions("image_trunk")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"], "no temporary folders left behind"


def test_failed_export_leaves_nothing(tiny, tmp_path):
    model, _ = tiny
    with pytest.raises(ExportError):
        export_bundle(model, tmp_path / "x", provenance={}, vocab_path=tmp_path / "no-vocab.gz", log=None)
    with pytest.raises(ExportError):
        export_bundle(
            model,
            tmp_path / "y",
            provenance={},
            vocab_path=default_vocab_path(),
            precisions=("fp8",),
            log=None,
        )
    assert list(tmp_path.iterdir()) == []


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tclseg_trainer.export", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_exit_codes(tmp_path):
    ok = run_cli("--random", "tiny", "--precision", "fp32", "--out", str(tmp_path / "ok"))
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "ok" / "model.toml").is_file()
    again = run_cli("--random", "tiny", "--out", str(tmp_path / "ok"))
    assert again.returncode == 1 and "already exists" in again.stderr
    missing = run_cli("--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "c"))
    assert missing.returncode == 1 and "nope.pt" in missing.stderr and "Traceback" not in missing.stderr
    usage = run_cli("--out", str(tmp_path / "u"))
    assert usage.returncode == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


def test_cli_checks_the_official_clip_hash(tmp_path):
    clip = tmp_path / "ViT-B-16.pt"
    tcl = tmp_path / "tcl.pth"
    torch.save({"visual.proj": torch.zeros(768, 512)}, clip)
    torch.save({"model": {}}, tcl)
    run = run_cli("--clip", str(clip), "--tcl", str(tcl), "--out", str(tmp_path / "b"))
    assert run.returncode == 1
    assert "ViT-B-16.pt" in run.stderr and "5806e77c" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "b").exists()


def test_cli_accepts_an_unverified_clip_only_when_told(tmp_path, monkeypatch, capsys):
    """A CLIP whose sha256 is not OpenAI's is refused naming --allow-unverified-clip; with it the export succeeds and
    the bundle records clip_verified = false and the file's sha256 (the log says so too)."""
    from tclseg_trainer import checkpoints, export
    from tclseg_trainer.bundle import sha256_file
    from tclseg_trainer.clip import CLIP

    tiny = SIZES["tiny"]
    # The official path builds a ViT-B/16; a tiny stand-in of the same layout keeps this test fast.
    monkeypatch.setitem(checkpoints.SIZES, "vit-b16", tiny)
    torch.manual_seed(5)
    clip = tmp_path / "ViT-B-16.pt"
    torch.save(CLIP(tiny.vision, tiny.text).state_dict(), clip)
    donor = TCL(tiny, seed=7)
    tcl = tmp_path / "tcl.pth"
    torch.save({"model": {k: v for k, v in donor.state_dict().items() if k.startswith("masker.")}}, tcl)
    out = tmp_path / "bundle"
    args = ["--clip", str(clip), "--tcl", str(tcl), "--precision", "fp32", "--out", str(out)]

    assert export.main(args) == 1
    err = capsys.readouterr().err
    assert "--allow-unverified-clip" in err and sha256_file(clip) in err and str(clip) in err, err
    assert not out.exists()

    assert export.main([*args, "--allow-unverified-clip"]) == 0
    err = capsys.readouterr().err
    assert f"sha256 {sha256_file(clip)} is not OpenAI's" in err and "using it anyway" in err, err
    provenance = tomllib.loads((out / "model.toml").read_text())["provenance"]
    assert provenance["source"] == "official" and provenance["clip_verified"] is False
    assert provenance["clip_sha256"] == sha256_file(clip) and provenance["tcl_sha256"] == sha256_file(tcl)

    usage = run_cli("--random", "tiny", "--allow-unverified-clip", "--out", str(tmp_path / "u"))
    assert usage.returncode == 2 and "--allow-unverified-clip only applies to --clip" in usage.stderr
