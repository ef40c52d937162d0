//! GPT-J's tokenizer (GPT-2 byte-level BPE) and an incremental, UTF-8-safe detokenizer.
//!
//! Encoding goes through HuggingFace `tokenizers`. Decoding does not: every GPT-2 token is a
//! fixed byte string, so we keep a table `id -> bytes` and decode by concatenating bytes. The
//! [`IncrementalDecoder`] holds back an incomplete UTF-8 sequence until the token that
//! completes it arrives, so a streamed chunk never carries half a character.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tokenizers::models::bpe::BPE;
use tokenizers::AddedToken;

use crate::error::{EngineError, Result};

/// The GPT-J tokenizer shipped with gptj (see `assets/tokenizer/README.md`).
const EMBEDDED_TOKENIZER_JSON: &[u8] = include_bytes!("../../assets/tokenizer/tokenizer.json");

/// `<|endoftext|>`: GPT-J's BOS, EOS and UNK token.
pub const GPTJ_EOS_TOKEN_ID: u32 = 50256;

/// A loaded tokenizer plus the byte table used for decoding.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    table: Arc<TokenBytes>,
    eos_token_id: u32,
    base_vocab_size: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("base_vocab_size", &self.base_vocab_size)
            .field("eos_token_id", &self.eos_token_id)
            .finish()
    }
}

/// The byte string of every token id, and which ids are special (never printed).
struct TokenBytes {
    bytes: Vec<Box<[u8]>>,
    special: Vec<bool>,
}

impl Tokenizer {
    /// GPT-J's tokenizer as shipped inside the binary.
    pub fn gptj() -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(EMBEDDED_TOKENIZER_JSON)
            .map_err(|e| EngineError::Tokenizer(format!("embedded tokenizer: {e}")))?;
        Self::from_tokenizers(inner)
    }

    /// Loads the tokenizer of a model directory: `tokenizer.json`, or else `vocab.json` +
    /// `merges.txt` (with `added_tokens.json` when present).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            let inner =
                tokenizers::Tokenizer::from_file(&json).map_err(|e| EngineError::BadFile {
                    path: json.clone(),
                    reason: e.to_string(),
                })?;
            return Self::from_tokenizers(inner);
        }
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        if vocab.is_file() && merges.is_file() {
            return Self::from_vocab_and_merges(&vocab, &merges, &dir.join("added_tokens.json"));
        }
        Err(EngineError::MissingFile {
            what: "tokenizer (tokenizer.json, or vocab.json + merges.txt)",
            path: dir.to_path_buf(),
        })
    }

    fn from_vocab_and_merges(vocab: &Path, merges: &Path, added: &Path) -> Result<Self> {
        let bad = |path: &Path, reason: String| EngineError::BadFile {
            path: path.to_path_buf(),
            reason,
        };
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .build()
            .map_err(|e| bad(vocab, e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let byte_level = tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, true, true);
        inner.with_pre_tokenizer(Some(byte_level));
        inner.with_decoder(Some(byte_level));
        inner
            .add_special_tokens([AddedToken::from("<|endoftext|>", true)])
            .map_err(|e| bad(vocab, e.to_string()))?;
        if added.is_file() {
            let text = std::fs::read_to_string(added).map_err(|e| bad(added, e.to_string()))?;
            let map: HashMap<String, u32> =
                serde_json::from_str(&text).map_err(|e| bad(added, e.to_string()))?;
            let mut extra: Vec<(u32, String)> = map.into_iter().map(|(t, id)| (id, t)).collect();
            extra.sort();
            let tokens: Vec<AddedToken> = extra
                .into_iter()
                .filter(|(_, t)| t != "<|endoftext|>")
                .map(|(_, t)| AddedToken::from(t, false))
                .collect();
            inner
                .add_tokens(tokens)
                .map_err(|e| bad(added, e.to_string()))?;
        }
        Self::from_tokenizers(inner)
    }

    fn from_tokenizers(inner: tokenizers::Tokenizer) -> Result<Self> {
        let byte_of = unicode_to_byte();
        let size = inner.get_vocab_size(true);
        let added = inner.get_added_tokens_decoder();
        let mut bytes = Vec::with_capacity(size);
        let mut special = Vec::with_capacity(size);
        for id in 0..size as u32 {
            if let Some(tok) = added.get(&id) {
                bytes.push(tok.content.as_bytes().into());
                special.push(tok.special);
                continue;
            }
            let Some(piece) = inner.id_to_token(id) else {
                // A hole in the vocabulary: decode it as nothing rather than fail.
                bytes.push(Box::default());
                special.push(true);
                continue;
            };
            let decoded: Option<Vec<u8>> =
                piece.chars().map(|c| byte_of.get(&c).copied()).collect();
            let Some(decoded) = decoded else {
                return Err(EngineError::Tokenizer(format!(
                    "token {id} ({piece:?}) is not GPT-2 byte-level BPE; GPT-J needs a byte-level tokenizer"
                )));
            };
            bytes.push(decoded.into());
            special.push(false);
        }
        let eos_token_id = inner
            .token_to_id("<|endoftext|>")
            .unwrap_or(GPTJ_EOS_TOKEN_ID);
        let base_vocab_size = inner.get_vocab_size(false);
        Ok(Self {
            inner: Arc::new(inner),
            table: Arc::new(TokenBytes { bytes, special }),
            eos_token_id,
            base_vocab_size,
        })
    }

    /// Token ids of `text`. No BOS is added (GPT-J's tokenizer adds none).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::Tokenizer(format!("cannot encode input: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens skipped; invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut dec = self.decoder();
        let mut out = String::new();
        for &id in ids {
            out.push_str(&dec.push(id));
        }
        out.push_str(&dec.finish());
        out
    }

    /// One token's own text, as log-probability listings show it: special tokens by their
    /// name (`<|endoftext|>`), invalid UTF-8 (a piece of a character) as U+FFFD, an id past
    /// the vocabulary as nothing.
    pub fn token_text(&self, id: u32) -> String {
        String::from_utf8_lossy(self.token_bytes(id)).into_owned()
    }

    /// One token's bytes (its text before UTF-8 decoding; a special token's name); empty
    /// for an id past the vocabulary.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.table.bytes.get(id as usize).map_or(&[], |b| b)
    }

    /// A fresh incremental decoder for one stream of generated tokens.
    pub fn decoder(&self) -> IncrementalDecoder {
        IncrementalDecoder {
            table: Arc::clone(&self.table),
            pending: Vec::new(),
        }
    }

    /// `<|endoftext|>`.
    pub fn eos_token_id(&self) -> u32 {
        self.eos_token_id
    }

    /// All ids the tokenizer knows, added tokens included (50400 for GPT-J).
    pub fn vocab_size(&self) -> usize {
        self.table.bytes.len()
    }

    /// The BPE vocabulary without added tokens (50257 for GPT-J). GPT-J's embedding rows past
    /// it (`<|extratoken_N|>`) were never trained, so sampling bans them.
    pub fn base_vocab_size(&self) -> usize {
        self.base_vocab_size
    }
}

/// Turns generated token ids into text as they arrive, one complete character at a time.
///
/// Owns its state (no borrow of the tokenizer), so a sequence can keep it across steps.
#[derive(Clone)]
pub struct IncrementalDecoder {
    table: Arc<TokenBytes>,
    pending: Vec<u8>,
}

impl std::fmt::Debug for IncrementalDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncrementalDecoder")
            .field("pending", &self.pending)
            .finish()
    }
}

impl IncrementalDecoder {
    /// Adds one token; returns the text it completes (possibly empty). Special tokens add nothing.
    pub fn push(&mut self, id: u32) -> String {
        let idx = id as usize;
        if let (Some(bytes), Some(false)) = (
            self.table.bytes.get(idx),
            self.table.special.get(idx).copied(),
        ) {
            self.pending.extend_from_slice(bytes);
        }
        self.take_complete()
    }

    /// Ends the stream: any incomplete character left is emitted as U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// Emits the longest prefix of `pending` that cannot change with more bytes: valid UTF-8,
    /// with invalid sequences replaced by U+FFFD, keeping only a possibly-incomplete tail.
    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Safe: from_utf8 just told us this prefix is valid.
                    out.push_str(std::str::from_utf8(&rest[..valid]).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            rest = &rest[valid + bad..];
                        }
                        None => {
                            // Incomplete sequence at the end: wait for more bytes.
                            rest = &rest[valid..];
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let start = self.pending.len() - keep;
        self.pending.drain(..start);
        out
    }
}

/// GPT-2's `bytes_to_unicode` inverted: the printable character that stands for each byte.
fn unicode_to_byte() -> HashMap<char, u8> {
    let mut printable: Vec<u8> = (b'!'..=b'~')
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.iter().map(|&b| b as u32).collect();
    let mut extra = 0u32;
    for b in 0..=255u8 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    printable
        .into_iter()
        .zip(chars)
        .filter_map(|(b, c)| char::from_u32(c).map(|c| (c, b)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Vector {
        text: String,
        ids: Vec<u32>,
    }

    fn vectors() -> Vec<Vector> {
        let text = include_str!("../../assets/tokenizer/test_vectors.json");
        serde_json::from_str(text).expect("test vectors parse")
    }

    #[test]
    fn embedded_tokenizer_matches_test_vectors() {
        let tok = Tokenizer::gptj().unwrap();
        assert_eq!(tok.vocab_size(), 50400);
        assert_eq!(tok.base_vocab_size(), 50257);
        assert_eq!(tok.eos_token_id(), 50256);
        for v in vectors() {
            assert_eq!(tok.encode(&v.text).unwrap(), v.ids, "encode {:?}", v.text);
            let expected = v.text.replace("<|endoftext|>", "");
            assert_eq!(tok.decode(&v.ids), expected, "decode {:?}", v.text);
        }
    }

    #[test]
    fn incremental_decoding_never_splits_a_character() {
        let tok = Tokenizer::gptj().unwrap();
        let text = "Unicorns 世界 🙂 café — done";
        let ids = tok.encode(text).unwrap();
        let mut dec = tok.decoder();
        let mut joined = String::new();
        for &id in &ids {
            let piece = dec.push(id);
            assert!(
                !piece.contains('\u{FFFD}'),
                "piece {piece:?} split a character"
            );
            joined.push_str(&piece);
        }
        joined.push_str(&dec.finish());
        assert_eq!(joined, text);
        // "世" is two tokens: the first alone yields nothing, the second the whole character.
        let world = tok.encode("世").unwrap();
        assert!(
            world.len() >= 2,
            "expected a multi-token character, got {world:?}"
        );
        let mut dec = tok.decoder();
        assert_eq!(dec.push(world[0]), "");
        let rest: String = world[1..].iter().map(|&id| dec.push(id)).collect();
        assert_eq!(rest, "世");
    }

    #[test]
    fn dangling_bytes_become_replacement_on_finish() {
        let tok = Tokenizer::gptj().unwrap();
        let world = tok.encode("世").unwrap();
        let mut dec = tok.decoder();
        assert_eq!(dec.push(world[0]), "");
        assert_eq!(dec.finish(), "\u{FFFD}");
    }

    #[test]
    fn vocab_and_merges_load_like_tokenizer_json() {
        // Write vocab.json + merges.txt from the embedded tokenizer's own BPE model.
        let dir = std::env::temp_dir().join(format!("gptj-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json: serde_json::Value = serde_json::from_slice(EMBEDDED_TOKENIZER_JSON).unwrap();
        std::fs::write(dir.join("vocab.json"), json["model"]["vocab"].to_string()).unwrap();
        let merges: Vec<String> = json["model"]["merges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => s.clone(),
                other => other
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_str().unwrap())
                    .collect::<Vec<_>>()
                    .join(" "),
            })
            .collect();
        std::fs::write(
            dir.join("merges.txt"),
            format!("#version: 0.2\n{}\n", merges.join("\n")),
        )
        .unwrap();
        let added: HashMap<String, u32> = (1..=143)
            .map(|i| (format!("<|extratoken_{i}|>"), 50256 + i))
            .collect();
        std::fs::write(
            dir.join("added_tokens.json"),
            serde_json::to_string(&added).unwrap(),
        )
        .unwrap();
        let tok = Tokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.vocab_size(), 50400);
        for v in vectors() {
            assert_eq!(tok.encode(&v.text).unwrap(), v.ids, "encode {:?}", v.text);
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn missing_tokenizer_names_the_directory() {
        let dir = std::env::temp_dir().join("gptj-no-tokenizer-here");
        let err = Tokenizer::from_dir(&dir).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer") && err.contains("gptj-no-tokenizer-here"),
            "{err}"
        );
    }
}
