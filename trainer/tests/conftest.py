"""Shared fixtures: a seeded tiny TCL model, the CLIP tokenizer and the built `tclseg` binary."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tclseg_trainer.model import SIZES, TCL
from tclseg_trainer.tokenizer import Tokenizer

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="session")
def tiny_model() -> TCL:
    """Shared, read-only: tests that modify weights must build their own (`make_tiny`)."""
    return TCL(SIZES["tiny"], seed=0).eval()


@pytest.fixture
def make_tiny():
    def make(seed: int = 0) -> TCL:
        return TCL(SIZES["tiny"], seed=seed).eval()

    return make


@pytest.fixture(scope="session")
def tiny_text(tiny_model: TCL) -> torch.Tensor:
    """Three normalised random 'class embeddings' for the tiny model."""
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(3, tiny_model.config.vision.embed_dim, generator=g)
    return torch.nn.functional.normalize(emb, dim=-1)


@pytest.fixture
def one_thread():
    """Runs a test with 1 torch thread and restores the count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tclseg_binary() -> Path:
    """The `tclseg` that cargo built (debug first, else release); a test that needs it is skipped without one."""
    root = Path(__file__).resolve().parents[2]
    for profile in ("debug", "release"):
        path = root / "target" / profile / "tclseg"
        if path.is_file():
            return path
    pytest.skip("tclseg is not built (cargo build; scripts/test builds it before pytest)")
