//! The Rust CLIP tokenizer gives the same ids as the Python reference (trainer/tclseg_trainer/tokenizer.py) on a
//! corpus of tricky strings: tests/fixtures/tokenizer.json, written by the fixture generator.

use std::path::Path;

use tclseg::model::tokenizer::Tokenizer;

const CONTEXT: usize = 77;

fn tokenizer() -> Tokenizer {
    let vocab = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bundles/tiny-random/bpe_simple_vocab_16e6.txt.gz");
    Tokenizer::from_vocab_file(&vocab).expect("vocabulary loads")
}

#[test]
fn known_ids() {
    let t = tokenizer();
    assert_eq!(
        t.tokenize("a photo of a cat", CONTEXT)[..8],
        [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    );
    assert_eq!(t.tokenize("", CONTEXT)[..3], [49406, 49407, 0]);
}

#[test]
fn over_long_text_is_cut_to_77_with_eot_last() {
    let t = tokenizer();
    let ids = t.tokenize(&"cat ".repeat(200), CONTEXT);
    assert_eq!(ids.len(), CONTEXT);
    assert_eq!(ids[0], t.sot());
    assert_eq!(ids[CONTEXT - 1], t.eot());
    assert!(ids[1..CONTEXT - 1]
        .iter()
        .all(|&id| id != 0 && id != t.eot()));
}

#[test]
fn matches_the_python_reference_on_the_corpus() {
    let t = tokenizer();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer.json");
    let corpus: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).expect("corpus")).expect("json");
    assert!(corpus.len() >= 30);
    let mut mismatches = Vec::new();
    for case in &corpus {
        let text = case["text"].as_str().expect("text");
        let mut expected: Vec<i64> = case["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_i64().expect("id"))
            .collect();
        expected.resize(CONTEXT, 0);
        let got = t.tokenize(text, CONTEXT);
        if got != expected {
            mismatches.push(format!("{text:?}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}
