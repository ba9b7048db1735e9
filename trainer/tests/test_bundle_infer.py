"""The whole-image pipeline through the exported graphs (bundle_infer, what the Rust engine mirrors) against the
PyTorch reference (`reference.segment`): label maps >= 99.9 % equal, soft scores close, with and without PAMR,
for the tiny model. At the ViT-B/16 size the same graphs are checked through the binary itself, which is what
ships: against the PyTorch reference by scripts/test's acceptance step, and against the official TCL code, with
and without PAMR, by scripts/test-official."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tclseg_trainer.bundle_infer import BundleRunner
from tclseg_trainer.export import export_bundle
from tclseg_trainer.model import SIZES, TCL, TEMPLATES, randomize_gates
from tclseg_trainer.reference import segment
from tclseg_trainer.tokenizer import default_vocab_path, tokenize
from tclseg_trainer.tools.fixtures import QUERIES, draw_image


def build(size: str, seed: int, out, precisions=("fp32",)):
    model = randomize_gates(TCL(SIZES[size], seed=seed), seed=seed).eval()
    export_bundle(
        model,
        out,
        provenance={"source": "random", "seed": seed},
        vocab_path=default_vocab_path(),
        precisions=precisions,
        log=None,
    )
    runner = BundleRunner(out, threads=2)
    with torch.no_grad():
        text = model.build_text_embedding(QUERIES, TEMPLATES, tokenize)
    return model, runner, text


def compare(model, runner, text, image, pamr: bool, bg: float, precision_tol: float = 1e-4):
    ref_scores, ref_labels = segment(model, image, text, pamr=pamr, kp_w=0.3, bg_thresh=bg)
    ours_text = runner.text_embedding(QUERIES)
    assert np.abs(ours_text - text.numpy()).max() <= 1e-5
    scores, labels = runner.segment(image, ours_text, pamr=pamr, kp_w=0.3, bg_thresh=bg)
    diff = float(np.abs(scores - ref_scores.numpy()).max())
    agreement = float((labels == ref_labels.numpy()).mean())
    print(f"pamr={pamr}: max |dscore| {diff:.2e}, labels {100 * agreement:.4f} % equal")
    assert agreement >= 0.999
    assert diff <= precision_tol


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build("tiny", 5, tmp_path_factory.mktemp("tiny") / "b", precisions=("fp32", "fp16"))


@pytest.mark.parametrize("pamr,bg", [(True, 0.4), (False, 0.5)])
@pytest.mark.parametrize("w,h", [(37, 53), (120, 90), (70, 160), (200, 64)])
def test_tiny_matches_reference(tiny, w, h, pamr, bg):
    model, runner, text = tiny
    compare(model, runner, text, draw_image(w, h, seed=w), pamr, bg)


def test_tiny_fp16_labels_match_fp32(tiny, tmp_path):
    model, runner, text = tiny
    fp16 = BundleRunner(runner.bundle, precision="fp16", threads=2)
    image = draw_image(120, 90, seed=3)
    t = runner.text_embedding(QUERIES)
    s32, l32 = runner.segment(image, t, pamr=True, bg_thresh=0.4)
    s16, l16 = fp16.segment(image, t, pamr=True, bg_thresh=0.4)
    assert np.abs(s16 - s32).max() <= 1e-2
    assert (l16 == l32).mean() >= 0.99
