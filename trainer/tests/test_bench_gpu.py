"""bench_gpu: the batched reference against reference.segment, the FLOP count against an independent formula, the
derived figures, and (slow) the whole harness on the CPU with the tiny model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tclseg_trainer.model import SIZES, TCL, TCLConfig
from tclseg_trainer.pamr import PAMR
from tclseg_trainer.reference import segment
from tclseg_trainer.tools import bench_gpu
from tclseg_trainer.tools.bench_gpu import derive
from tclseg_trainer.tools.bench_gpu_measure import (
    count_flops,
    crops_of,
    latency_stats,
    matmul_ceiling,
    parse_batches,
    parse_image_size,
)
from tclseg_trainer.tools.bench_gpu_reference import Fp32Pamr, segment_batch

ROOT = Path(__file__).resolve().parents[2]

# Small windows keep the tiny model fast; the window logic does not depend on the size.
SMALL = dict(crop=64, stride=32, short_side=64, long_side_max=512)
# Mixed sizes in one call; 20x400 rescales to 26x512, whose windows (26x64) are narrower than the others.
SIZES_HW = [(40, 40), (90, 60), (50, 120), (150, 200), (20, 400)]


def random_images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8) for hw in SIZES_HW]


@pytest.mark.parametrize("pamr,bg", [(True, 0.4), (False, 0.5), (False, None)])
def test_batched_reference_gives_reference_segment_labels(tiny_model, tiny_text, pamr, bg):
    images = random_images()
    batched = segment_batch(tiny_model, images, tiny_text, pamr=pamr, kp_w=0.3, bg_thresh=bg, **SMALL)
    assert len(batched) == len(images)
    for img, labels in zip(images, batched, strict=True):
        _, want = segment(tiny_model, img, tiny_text, pamr=pamr, kp_w=0.3, bg_thresh=bg, **SMALL)
        assert labels.shape == want.shape == img.shape[:2]
        assert labels.dtype == torch.int64
        # Several windows per model call may round differently from one window per call; labels barely move.
        assert (labels == want).float().mean().item() >= 0.999
    if bg is not None:
        assert any((labels == 0).any() for labels in batched), "the background threshold is in effect"


def test_half_precision_keeps_pamr_in_fp32():
    # A flat image: the local std is 0 and PAMR's 1e-8 guard is 0 in float16, so plain autocast gives 0/0.
    image = torch.full((1, 3, 16, 16), 0.5)
    masks = torch.rand(1, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    pamr = PAMR()
    want = pamr(image, masks)
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.isnan(pamr(image, masks)).all()
        got = Fp32Pamr(pamr)(image, masks)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_batched_reference_under_bf16_autocast_mostly_agrees(make_tiny, tiny_text):
    model = make_tiny()
    model.pamr = Fp32Pamr(model.pamr)
    images = random_images(1)
    fp32 = segment_batch(model, images, tiny_text, bg_thresh=0.4, **SMALL)
    bf16 = segment_batch(model, images, tiny_text, bg_thresh=0.4, autocast=torch.bfloat16, **SMALL)
    equal = sum(int((a == b).sum()) for a, b in zip(fp32, bf16, strict=True))
    total = sum(a.numel() for a in fp32)
    assert equal / total >= 0.97


def expected_gmac(cfg: TCLConfig, crop: int, queries: int) -> dict[str, float]:
    """Multiply-adds of one window, from the architecture alone (tcl.md §1.1-1.5)."""
    v = cfg.vision
    c, e, g = v.width, v.embed_dim, crop // v.patch_size
    tokens = 1 + g * g
    full_block = 12 * tokens * c * c + 2 * tokens * tokens * c  # qkv 3C², out C², MLP 8C²; QKᵀ and AV
    self_only_block = 10 * tokens * c * c  # v and out projections, MLP
    patch_embed = g * g * c * 3 * v.patch_size**2
    decoder = sum(2 * (g * 2**s) ** 2 * c * c * cfg.decoder_kernel_size**2 for s in range(1, cfg.decoder_layers + 1))
    side = g * 2**cfg.decoder_layers
    return {
        "trunk": (patch_embed + (v.layers - 1) * full_block) / 1e9,
        "grounder_block": self_only_block / 1e9,
        "decoder": decoder / 1e9,
        "image_proj": side * side * c * e / 1e9,
        "kp_branch": (self_only_block + g * g * c * e) / 1e9,
        "mask_head": queries * e * (side * side + g * g) / 1e9,
    }


@pytest.mark.parametrize("size", ["tiny", "vit-b16"])
def test_flop_count_matches_the_architecture(size):
    got = count_flops(SIZES[size], crop=448, queries=3)
    want = expected_gmac(SIZES[size], 448, 3)
    for part, value in want.items():
        assert got[f"{part}_gmac"] == pytest.approx(value, rel=1e-9), part
    assert got["total_gmac"] == pytest.approx(sum(want.values()), rel=1e-9)
    assert got["total_gflop"] == pytest.approx(2 * got["total_gmac"])


def test_vit_b16_crop_is_about_250_gmac():
    """tcl.md §1.5 estimates ~78 GMAC for the ViT and ~166 for the decoder at a 448 crop (~250 in all).

    The model as run costs 253.0: the trunk is 11 full blocks + patch embedding (72.0; the 12th block runs twice,
    token by token, as the grounder's copy and as the kp branch: 4.63 each), the decoder 166.5, the grounder's
    ln_post/proj at 112x112 4.9, the kp projection 0.3, the cosine maps 0.02.
    """
    got = count_flops(SIZES["vit-b16"])
    assert got["total_gmac"] == pytest.approx(250.0, rel=0.15)
    assert got["total_gmac"] == pytest.approx(252.985, abs=1e-3)
    assert got["decoder_gmac"] == pytest.approx(166.47, abs=0.01)
    assert got["trunk_gmac"] + got["grounder_block_gmac"] + got["kp_branch_gmac"] == pytest.approx(81.56, abs=0.01)
    # The whole window through generate_masks (no PAMR) counts the same as its parts.
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = TCL(SIZES["vit-b16"], seed=0).eval()
        pixels, text = torch.empty(1, 3, 448, 448), torch.empty(3, 512)
    counter = FlopCounterMode(display=False)
    with counter:
        model.generate_masks(pixels, text, apply_pamr=False, kp_w=0.3)
    assert counter.get_total_flops() == pytest.approx(got["total_gflop"] * 1e9, rel=1e-12)


def test_latency_stats_interpolate_like_the_rust_bench():
    s = latency_stats([4.0, 1.0, 3.0, 2.0, 10.0])
    assert (s["p50"], s["mean"], s["min"], s["max"]) == (3.0, 4.0, 1.0, 10.0)
    assert s["p95"] == pytest.approx(8.8)


def test_crop_count_follows_the_rescale():
    assert crops_of(1080, 1920) == 3  # 448x796
    assert crops_of(48, 64) == 2  # 448x597
    assert crops_of(500, 500) == 1


def test_bad_arguments_name_the_option():
    with pytest.raises(SystemExit, match="--batches"):
        parse_batches("1,0")
    with pytest.raises(SystemExit, match="--batches"):
        parse_batches("x")
    with pytest.raises(SystemExit, match="--image-size"):
        parse_image_size("1920")
    assert parse_image_size("1920x1080") == (1920, 1080)


def row(impl: str, precision: str, batch: int, images_per_s: float, crops_per_call: int) -> dict:
    return {
        "impl": impl,
        "precision": precision,
        "batch": batch,
        "images_per_s": images_per_s,
        "crops_per_s": images_per_s * crops_per_call / batch,
    }


def test_derived_figures_and_goals():
    rows = [
        row("torch", "fp32", 1, 2.0, 3),
        row("torch", "fp16", 1, 4.0, 3),
        row("tclseg", "fp32", 1, 3.0, 3),
        row("tclseg", "fp16", 1, 7.0, 3),
        row("torch", "fp32", 4, 2.5, 12),
        row("torch", "fp16", 4, 5.0, 12),
        row("tclseg", "fp32", 4, 4.0, 12),
        row("tclseg", "fp16", 4, 8.0, 12),
    ]
    labels = [
        {"batch": 1, "tclseg_fp16_vs_tclseg_fp32": 99.9},
        {"batch": 4, "tclseg_fp16_vs_tclseg_fp32": 99.0},
    ]
    flops = {"total_gflop": 500.0}
    ceiling = {"tflops": 100.0}
    ratios, goals = derive(rows, labels, flops, ceiling, [1, 4])
    assert ratios[0] == {
        "batch": 1,
        "tclseg_fp16_over_torch_fp32": 3.5,
        "tclseg_fp16_over_torch_fp16": 1.75,
        "tclseg_fp32_over_torch_fp32": 1.5,
    }
    assert ratios[1]["tclseg_fp16_over_torch_fp32"] == pytest.approx(3.2)
    # tclseg fp16 at batch 4: 8 images/s x 3 crops x 500 GFLOP = 12 TFLOP/s, 12 % of 100.
    t16 = next(r for r in rows if (r["impl"], r["precision"], r["batch"]) == ("tclseg", "fp16", 4))
    assert t16["achieved_tflops"] == pytest.approx(12.0)
    assert t16["ceiling_percent"] == pytest.approx(12.0)
    met = {(g["goal"], g["batch"]): g["met"] for g in goals}
    assert met == {
        ("tclseg_fp16_over_torch_fp32", 1): True,
        ("tclseg_fp16_over_torch_fp16", 1): True,
        ("tclseg_fp16_over_torch_fp32", 4): True,
        ("tclseg_fp16_over_torch_fp16", 4): True,
        ("labels_fp16_vs_fp32_percent", 1): True,
        ("labels_fp16_vs_fp32_percent", 4): False,
        ("ceiling_percent_at_largest_batch", 4): False,
    }


def test_matmul_ceiling_on_the_cpu_is_labelled_fp32():
    c = matmul_ceiling("cpu", n=128, reps=2)
    assert c["dtype"] == "float32" and "cpu" in c["what"]
    assert c["tflops"] == pytest.approx(2 * 128**3 / c["seconds_per_matmul"] / 1e12)
    assert c["tflops"] > 0


def tclseg_with_bench() -> Path:
    for profile in ("debug", "release"):
        path = ROOT / "target" / profile / "tclseg"
        if path.is_file() and subprocess.run([path, "models", "bench", "--help"], capture_output=True).returncode == 0:
            return path
    pytest.skip("no tclseg with `models bench` is built (cargo build; scripts/test builds it before pytest)")


@pytest.mark.slow
def test_the_harness_on_the_cpu_with_the_tiny_model(tmp_path):
    out = tmp_path / "results.json"
    result = bench_gpu.main(
        [
            "--tclseg",
            str(tclseg_with_bench()),
            "--device",
            "cpu",
            "--size",
            "tiny",
            "--batches",
            "1,2",
            "--images",
            "2",
            "--image-size",
            "64x48",
            "--warmup",
            "0",
            "--iterations",
            "1",
            "--threads",
            "2",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {(r["impl"], r["precision"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {(i, p, b) for i in ("torch", "tclseg") for p in ("fp32", "fp16") for b in (1, 2)}
    for key, r in rows.items():
        b = r["batch"]
        assert r["images_per_call"] == b and r["calls"] == 1, key
        assert r["crops_per_call"] == 2 * b, f"{key}: 64x48 rescales to 448x597, two windows"
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p95"] <= lat["max"]
        assert r["images_per_s"] == pytest.approx(1e3 * b / lat["mean"])
        assert r["peak_rss_mib"] > 0
        assert r["achieved_tflops"] == pytest.approx(r["crops_per_s"] * result["flops"]["total_gflop"] / 1e3)
    assert rows[("torch", "fp16", 1)]["compute_dtype"] == "bfloat16"
    for r in result["ratios"]:
        b = r["batch"]
        t16 = rows[("tclseg", "fp16", b)]["images_per_s"]
        assert r["tclseg_fp16_over_torch_fp32"] == pytest.approx(t16 / rows[("torch", "fp32", b)]["images_per_s"])
        assert r["tclseg_fp16_over_torch_fp16"] == pytest.approx(t16 / rows[("torch", "fp16", b)]["images_per_s"])
    # The bundle is the reference's weights exported: tclseg fp32 labels the images as the batched reference does.
    for entry in result["labels"]:
        assert entry["pixels"] == 2 * 64 * 48
        assert entry["tclseg_fp32_vs_torch_fp32"] >= 99.9
        assert 0.0 <= entry["tclseg_fp16_vs_tclseg_fp32"] <= 100.0
    assert {g["goal"] for g in result["goals"]} == set(bench_gpu.GOALS)
    assert all(g["met"] == (g["value"] >= g["target"]) for g in result["goals"])
    assert result["ceiling"]["dtype"] == "float32"
