//! Turning a sequence's tokens into the text it streams: incremental detokenization plus
//! stop strings.
//!
//! A stop string is matched on the *text*, not on tokens, since a string such as `"\n\n"`
//! may be one token or two. The text that may be the beginning of a stop string is held back
//! until the next token shows whether it is (then the job ends before it) or not (then it is
//! released). So a client never receives any part of a stop string.

use gptj_engine::IncrementalDecoder;

/// What a new token produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Text to emit now (possibly empty).
    Text(String),
    /// The text reached stop string `stop`; `text` is what to emit before it. The job ends.
    Stopped { text: String, stop: String },
}

/// The text side of one sequence: its decoder, its stop strings and the text held back.
#[derive(Debug)]
pub(crate) struct TextOutput {
    decoder: IncrementalDecoder,
    stop: Vec<String>,
    /// Decoded text not emitted yet. Every stop string match starts inside it: text leaves
    /// `pending` only once no stop string can start in it.
    pending: String,
}

impl TextOutput {
    /// `stop` must not contain empty strings (the handle refuses them).
    pub(crate) fn new(decoder: IncrementalDecoder, stop: Vec<String>) -> Self {
        Self {
            decoder,
            stop,
            pending: String::new(),
        }
    }

    /// Adds one generated token.
    pub(crate) fn push(&mut self, id: u32) -> Pushed {
        let piece = self.decoder.push(id);
        if self.stop.is_empty() {
            return Pushed::Text(piece);
        }
        self.pending.push_str(&piece);
        if let Some((at, stop)) = self.first_stop() {
            let text = self.pending[..at].to_string();
            self.pending.clear();
            return Pushed::Stopped { text, stop };
        }
        let keep = self.held_back();
        let text = self.pending[..self.pending.len() - keep].to_string();
        self.pending.drain(..self.pending.len() - keep);
        Pushed::Text(text)
    }

    /// Ends the stream (EOS or length): everything held back, plus any incomplete character
    /// as U+FFFD. Text from a stop string onwards is still cut.
    pub(crate) fn finish(&mut self) -> String {
        let tail = self.decoder.finish();
        self.pending.push_str(&tail);
        if let Some((at, _)) = self.first_stop() {
            self.pending.truncate(at);
        }
        std::mem::take(&mut self.pending)
    }

    /// Earliest stop-string match in `pending`: (byte offset, the string).
    fn first_stop(&self) -> Option<(usize, String)> {
        self.stop
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, _)| *at)
            .map(|(at, s)| (at, s.clone()))
    }

    /// Length in bytes of the longest suffix of `pending` that is a proper prefix of a stop
    /// string (and so must wait for the next token).
    fn held_back(&self) -> usize {
        let mut keep = 0;
        for s in &self.stop {
            for (k, _) in s.char_indices().skip(1) {
                // `s[..k]` ends at a char boundary of `s` and starts with a char-start byte,
                // so `pending.len() - k` is a char boundary of `pending` when it matches.
                if k > keep && self.pending.ends_with(&s[..k]) {
                    keep = k;
                }
            }
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gptj_engine::Tokenizer;

    fn tok() -> &'static Tokenizer {
        crate::testing::tokenizer()
    }

    /// Feeds `text`'s tokens one by one; returns the emitted pieces and the stop, if any.
    fn run(text: &str, stop: &[&str]) -> (Vec<String>, Option<String>) {
        let ids = tok().encode(text).unwrap();
        let mut out = TextOutput::new(
            tok().decoder(),
            stop.iter().map(|s| s.to_string()).collect(),
        );
        let mut pieces = Vec::new();
        for id in ids {
            match out.push(id) {
                Pushed::Text(t) => pieces.push(t),
                Pushed::Stopped { text, stop } => {
                    pieces.push(text);
                    return (pieces, Some(stop));
                }
            }
        }
        pieces.push(out.finish());
        (pieces, None)
    }

    #[test]
    fn without_stop_strings_text_streams_as_decoded() {
        let (pieces, stop) = run("Hello world, again.", &[]);
        assert_eq!(pieces.concat(), "Hello world, again.");
        assert_eq!(stop, None);
    }

    #[test]
    fn stop_string_ends_the_text_and_is_not_emitted() {
        let (pieces, stop) = run("The answer is 42.\nQuestion: next", &["\nQuestion:"]);
        assert_eq!(pieces.concat(), "The answer is 42.");
        assert_eq!(stop.as_deref(), Some("\nQuestion:"));
        // No piece ever carried part of the stop string.
        assert!(pieces.iter().all(|p| !p.contains('\n')), "{pieces:?}");
    }

    #[test]
    fn a_stop_string_inside_a_token_cuts_mid_token() {
        // "world" is one token; the stop string is its middle.
        let (pieces, stop) = run("Hello world", &["orl"]);
        assert_eq!(pieces.concat(), "Hello w");
        assert_eq!(stop.as_deref(), Some("orl"));
    }

    #[test]
    fn a_false_start_is_released() {
        // "\nQ" looks like the start of "\nQuestion:" but the text goes elsewhere.
        let (pieces, stop) = run("a\nQuick fox", &["\nQuestion:"]);
        assert_eq!(pieces.concat(), "a\nQuick fox");
        assert_eq!(stop, None);
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        let (pieces, stop) = run("one two three", &["three", "two"]);
        assert_eq!(pieces.concat(), "one ");
        assert_eq!(stop.as_deref(), Some("two"));
    }

    #[test]
    fn held_back_text_is_flushed_at_the_end() {
        let (pieces, stop) = run("ends with STO", &["STOP"]);
        assert_eq!(pieces.concat(), "ends with STO");
        assert_eq!(stop, None);
    }

    #[test]
    fn multibyte_stop_strings_hold_back_on_char_boundaries() {
        let (pieces, stop) = run("café au lait ☕ fin", &["☕"]);
        assert_eq!(pieces.concat(), "café au lait ");
        assert_eq!(stop.as_deref(), Some("☕"));
        let (pieces, _) = run("naïve ☕☕ x", &["☕☕☕"]);
        assert_eq!(pieces.concat(), "naïve ☕☕ x");
    }
}
