//! The CLIP BPE tokenizer, in Rust so that no Python runs at serving time.
//!
//! It reproduces OpenAI's tokenizer (and `trainer/tclseg_trainer/tokenizer.py`) on the bundle's vocabulary:
//! clean the text, lowercase it, split it with CLIP's pattern, map each piece's UTF-8 bytes to printable
//! characters, apply the BPE merges in rank order, and frame the ids with SOT/EOT in a fixed context of 77.
//!
//! Text cleaning follows what `ftfy.fix_text` + `html.unescape` do to ordinary query strings: HTML entities,
//! curly quotes, Latin ligatures, full-width forms, line breaks, control characters, NFC. ftfy's mojibake repair
//! (re-decoding text that was decoded with the wrong codec) is not reproduced: a query that *is* mojibake can get
//! different ids here. The parity corpus in tests/fixtures/tokenizer.json pins the cases we match.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use regex::Regex;
use unicode_normalization::UnicodeNormalization;

/// Number of merges CLIP uses from the vocabulary file (49152 − 256 − 2).
const MERGES: usize = 49152 - 256 - 2;

pub const SOT: &str = "<|startoftext|>";
pub const EOT: &str = "<|endoftext|>";

pub struct Tokenizer {
    encoder: HashMap<String, i64>,
    ranks: HashMap<(String, String), usize>,
    byte_chars: [char; 256],
    pattern: Regex,
    whitespace: Regex,
    sot: i64,
    eot: i64,
    cache: std::sync::Mutex<HashMap<String, Vec<i64>>>,
}

impl Tokenizer {
    /// Loads `bpe_simple_vocab_16e6.txt.gz` (gzip text: a header line, then one merge per line).
    pub fn from_vocab_file(path: &Path) -> Result<Tokenizer> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open the BPE vocabulary {}", path.display()))?;
        let mut text = String::new();
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .with_context(|| format!("{} is not a gzip-compressed text file", path.display()))?;
        Tokenizer::from_merges_text(&text)
            .with_context(|| format!("BPE vocabulary {}", path.display()))
    }

    fn from_merges_text(text: &str) -> Result<Tokenizer> {
        let merges: Vec<(String, String)> = text
            .split('\n')
            .skip(1)
            .take(MERGES)
            .map(|line| {
                let mut parts = line.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                        Ok((a.to_string(), b.to_string()))
                    }
                    _ => Err(anyhow!("malformed merge line '{line}'")),
                }
            })
            .collect::<Result<_>>()?;
        if merges.len() != MERGES {
            bail!("has {} merges, CLIP's has {MERGES}", merges.len());
        }

        let byte_chars = bytes_to_unicode();
        let mut vocab: Vec<String> = byte_order()
            .iter()
            .map(|&b| byte_chars[b as usize].to_string())
            .collect();
        let with_eow: Vec<String> = vocab.iter().map(|v| format!("{v}</w>")).collect();
        vocab.extend(with_eow);
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push(SOT.to_string());
        vocab.push(EOT.to_string());
        let encoder: HashMap<String, i64> = vocab
            .into_iter()
            .enumerate()
            .map(|(i, v)| (v, i as i64))
            .collect();
        let ranks = merges
            .into_iter()
            .enumerate()
            .map(|(i, m)| (m, i))
            .collect();
        let sot = encoder[SOT];
        let eot = encoder[EOT];
        let pattern = Regex::new(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
        )?;
        Ok(Tokenizer {
            encoder,
            ranks,
            byte_chars,
            pattern,
            whitespace: Regex::new(r"\s+")?,
            sot,
            eot,
            cache: std::sync::Mutex::new(HashMap::new()),
        })
    }

    pub fn sot(&self) -> i64 {
        self.sot
    }

    pub fn eot(&self) -> i64 {
        self.eot
    }

    /// BPE ids of `text`, without SOT/EOT.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let cleaned = clean_text(text);
        let cleaned = self.whitespace.replace_all(&cleaned, " ");
        let lowered = cleaned.trim().to_lowercase();
        let mut ids = Vec::new();
        for piece in self.pattern.find_iter(&lowered) {
            let mapped: String = piece
                .as_str()
                .bytes()
                .map(|b| self.byte_chars[b as usize])
                .collect();
            ids.extend(self.bpe(&mapped));
        }
        ids
    }

    /// `[SOT, ids..., EOT]` padded with zeros to `context`; longer texts are cut with EOT kept last.
    pub fn tokenize(&self, text: &str, context: usize) -> Vec<i64> {
        let mut out = Vec::with_capacity(context);
        out.push(self.sot);
        out.extend(self.encode(text));
        out.push(self.eot);
        if out.len() > context {
            out.truncate(context);
            if let Some(last) = out.last_mut() {
                *last = self.eot;
            }
        }
        out.resize(context, 0);
        out
    }

    fn bpe(&self, piece: &str) -> Vec<i64> {
        if let Some(special) = self
            .encoder
            .get(piece)
            .filter(|_| piece == SOT || piece == EOT)
        {
            return vec![*special];
        }
        if let Ok(cache) = self.cache.lock() {
            if let Some(ids) = cache.get(piece) {
                return ids.clone();
            }
        }
        let mut word: Vec<String> = piece.chars().map(String::from).collect();
        if let Some(last) = word.last_mut() {
            last.push_str("</w>");
        }
        while word.len() > 1 {
            // The adjacent pair with the lowest merge rank; stop when no pair is a merge.
            let best = word
                .windows(2)
                .filter_map(|w| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|r| (*r, w))
                })
                .min_by_key(|(r, _)| *r);
            let Some((_, pair)) = best else { break };
            let (first, second) = (pair[0].clone(), pair[1].clone());
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == first && word[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(std::mem::take(&mut word[i]));
                    i += 1;
                }
            }
            word = merged;
        }
        // Every symbol is in the vocabulary: single byte characters (with and without </w>) and every merge.
        let ids: Vec<i64> = word
            .iter()
            .filter_map(|s| self.encoder.get(s).copied())
            .collect();
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() < 100_000 {
                cache.insert(piece.to_string(), ids.clone());
            }
        }
        ids
    }
}

/// CLIP's printable stand-ins for the 256 byte values: printable Latin-1 bytes map to themselves, the others to
/// code points from U+0100 upward, in byte order.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        table[b as usize] = if is_printable_byte(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\u{fffd}');
            next += 1;
            c
        };
    }
    table
}

fn is_printable_byte(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The order CLIP lists single-byte symbols in its vocabulary: printable bytes first, then the rest.
fn byte_order() -> Vec<u8> {
    let mut order: Vec<u8> = (0..=255u8).filter(|&b| is_printable_byte(b)).collect();
    order.extend((0..=255u8).filter(|&b| !is_printable_byte(b)));
    order
}

/// What ftfy.fix_text and a double html.unescape do to ordinary text (see the module docs for the exception).
pub fn clean_text(text: &str) -> String {
    // ftfy unescapes once itself unless the text looks like HTML (has a '<'); then CLIP unescapes twice more.
    let text = if text.contains('<') {
        text.to_string()
    } else {
        unescape_html(text)
    };
    let text = unescape_html(&unescape_html(&text));
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            // Curly quotes become straight ones.
            '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}' => out.push('\''),
            '\u{201C}' | '\u{201D}' | '\u{201E}' | '\u{201F}' => out.push('"'),
            // Latin ligatures and full-width forms decompose (NFKC of those code points only).
            '\u{FB00}'..='\u{FB06}'
            | '\u{FF01}'..='\u{FF5E}'
            | '\u{0132}'
            | '\u{0133}'
            | '\u{013F}'
            | '\u{0140}' => out.extend(c.to_string().nfkc()),
            '\u{3000}' => out.push(' '),
            // Line breaks become \n.
            '\r' | '\u{2028}' | '\u{2029}' | '\u{0085}' => out.push('\n'),
            // Control characters other than tab and newline are dropped.
            '\u{0000}'..='\u{0008}' | '\u{000B}' | '\u{000E}'..='\u{001F}' | '\u{007F}' => {}
            _ => out.push(c),
        }
    }
    out.nfc().collect::<String>().trim().to_string()
}

/// Decodes HTML character references: numeric ones and the named ones that occur in ordinary text.
fn unescape_html(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        rest = &rest[pos..];
        match decode_reference(rest) {
            Some((decoded, used)) => {
                out.push_str(&decoded);
                rest = &rest[used..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Decodes one reference at the start of `s` (which starts with '&'); returns the text and the bytes used.
fn decode_reference(s: &str) -> Option<(String, usize)> {
    let body = &s[1..];
    if let Some(num) = body.strip_prefix('#') {
        let (digits, radix, skip) = match num.strip_prefix(['x', 'X']) {
            Some(hex) => (hex, 16, 2),
            None => (num, 10, 1),
        };
        let len = digits.chars().take_while(|c| c.is_digit(radix)).count();
        if len == 0 {
            return None;
        }
        let value = u32::from_str_radix(&digits[..len], radix).unwrap_or(u32::MAX);
        let c = match value {
            0 | 0xD800..=0xDFFF => '\u{FFFD}',
            v => char::from_u32(v).unwrap_or('\u{FFFD}'),
        };
        let semicolon = usize::from(digits[len..].starts_with(';'));
        return Some((c.to_string(), 1 + skip + len + semicolon));
    }
    const NAMED: [(&str, &str); 12] = [
        ("amp;", "&"),
        ("lt;", "<"),
        ("gt;", ">"),
        ("quot;", "\""),
        ("apos;", "'"),
        ("nbsp;", "\u{a0}"),
        ("copy;", "©"),
        ("reg;", "®"),
        ("hellip;", "…"),
        ("mdash;", "—"),
        ("ndash;", "–"),
        ("eacute;", "é"),
    ];
    NAMED
        .iter()
        .find(|(name, _)| body.starts_with(name))
        .map(|(name, value)| (value.to_string(), 1 + name.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection_onto_printable_chars() {
        let table = bytes_to_unicode();
        let mut seen: Vec<char> = table.to_vec();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 256);
        assert_eq!(table[b'a' as usize], 'a');
        assert_eq!(table[b' ' as usize], '\u{120}');
    }

    #[test]
    fn cleaning_handles_entities_quotes_and_widths() {
        assert_eq!(clean_text("  Tom &amp;amp; Jerry "), "Tom & Jerry");
        assert_eq!(clean_text("\u{201C}cat\u{201D}"), "\"cat\"");
        assert_eq!(clean_text("\u{FB01}sh"), "fish");
        assert_eq!(clean_text("\u{FF43}\u{FF41}\u{FF54}"), "cat");
        assert_eq!(clean_text("&#x41;&#66;"), "AB");
        assert_eq!(clean_text("e\u{301}"), "\u{e9}");
        assert_eq!(clean_text("a&b"), "a&b");
    }
}
