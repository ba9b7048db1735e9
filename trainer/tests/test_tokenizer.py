from __future__ import annotations

import pytest
import torch

from tclseg_trainer.tokenizer import EOT_TOKEN, SOT_TOKEN, Tokenizer, tokenize

# Expected ids were produced once with OpenAI's reference tokenizer (CLIP simple_tokenizer.py).
CASES = {
    "a photo of a cat": [320, 1125, 539, 320, 2368],
    "Café naïve Ünïcödé": [15304, 1097, 35689, 563, 6522, 77, 35689, 66, 7255, 67, 4166],
    "😀 emoji 🐈\u200d⬛!": [7334, 16327, 2074, 230, 4244, 7930, 249, 256],
    "Hello,   world!!  \n\t tabs": [3306, 267, 1002, 748, 29163],
    "don't we'll I'M": [847, 713, 649, 1342, 328, 880],
    "&amp;amp; &lt;b&gt;": [261, 283, 321, 285],
    "building-other": [2307, 268, 1010],
    "bed ": [2722],
    "3.14159 and 42": [274, 269, 272, 275, 272, 276, 280, 537, 275, 273],
    "日本語のテキスト": [39121, 44353, 34002, 252, 21575, 2429, 228, 47121, 32421, 486],
    "<|endoftext|> hi": [49407, 1883],
    "mojibake: cafÃ©": [617, 3252, 11878, 281, 15304],
    "": [],
    "   ": [],
}


def test_photo_of_a_cat_exact(tokenizer: Tokenizer):
    row = tokenizer.tokenize("a photo of a cat")[0]
    assert row[:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert row[7:].eq(0).all()
    assert row.dtype == torch.int64 and row.shape == (77,)


@pytest.mark.parametrize("text", list(CASES))
def test_ids_match_openai(tokenizer: Tokenizer, text: str):
    assert tokenizer.encode(text) == CASES[text]
    row = tokenizer.tokenize(text)[0].tolist()
    n = len(CASES[text])
    assert row[: n + 2] == [SOT_TOKEN, *CASES[text], EOT_TOKEN]


def test_case_insensitive(tokenizer: Tokenizer):
    assert torch.equal(tokenizer.tokenize("A PHOTO of a CaT"), tokenizer.tokenize("a photo of a cat"))


def test_batch_shape_and_roundtrip(tokenizer: Tokenizer):
    out = tokenizer.tokenize(["a dog", "two cats on a sofa", ""])
    assert out.shape == (3, 77)
    assert out[2, :2].tolist() == [SOT_TOKEN, EOT_TOKEN]
    assert tokenizer.decode(tokenizer.encode("two cats on a sofa")).strip() == "two cats on a sofa"


def test_truncation_keeps_eot_last(tokenizer: Tokenizer):
    text = " ".join(f"word{i}" for i in range(100))
    row = tokenizer.tokenize(text)[0]
    assert row.shape == (77,)
    assert row[0] == SOT_TOKEN and row[-1] == EOT_TOKEN
    assert row[1:-1].tolist() == tokenizer.encode(text)[:75]
    assert int(row.argmax()) == 76  # the text encoder reads the feature at argmax = EOT
    with pytest.raises(ValueError, match="context"):
        tokenizer.tokenize(text, truncate=False)


def test_exactly_77_is_not_truncated(tokenizer: Tokenizer):
    text = " ".join(["cat"] * 75)
    row = tokenizer.tokenize(text)[0]
    assert row.tolist() == [SOT_TOKEN, *([2368] * 75), EOT_TOKEN]


def test_missing_vocab_is_a_clear_error(tmp_path, monkeypatch):
    missing = tmp_path / "nope.txt.gz"
    with pytest.raises(FileNotFoundError, match="scripts/setup") as e:
        Tokenizer(missing)
    assert str(missing) in str(e.value)
    monkeypatch.setenv("TCLSEG_BPE_VOCAB", str(missing))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        tokenize("a cat")
