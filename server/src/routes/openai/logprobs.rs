/*!
OpenAI's log-probability listings: chat's `logprobs.content` ([`chat_entry`]: one object per
token with its `top_logprobs`), and the legacy completions `logprobs` object ([`Listing`]),
four parallel arrays over the listed tokens:

```json
{"tokens": ["Hello", ","], "token_logprobs": [null, -2.1],
 "top_logprobs": [null, {",": -2.1, " world": -2.3}], "text_offset": [0, 5]}
```

- `tokens`: each token's own text ([`Tokenizer::token_text`]: special tokens by name, a
  piece of a UTF-8 character as U+FFFD).
- `token_logprobs`: the model's log-probability of the token given everything before it;
  `null` for the first prompt token, which nothing precedes.
- `top_logprobs`: the `logprobs` most likely tokens at that position, plus the token itself
  when it is not among them (so up to `logprobs + 1` entries, as OpenAI documents); keys are
  token texts, so two tokens with the same text (two pieces of characters) show once.
- `text_offset`: where each token's text starts, in characters, counted over the prompt
  followed by the completion: the first generated token's offset is the prompt's length
  whether or not the prompt is echoed.
*/

use gptj_scheduler::{TokenLogprob, Tokenizer};
use serde_json::{json, Map, Value};

/// A `logprobs` object being built, token by token.
#[derive(Debug, Default)]
pub struct Listing {
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<usize>,
    /// Where the next token's text starts, in characters.
    offset: usize,
}

impl Listing {
    /// An empty listing whose first token starts at character `offset`.
    pub fn at(offset: usize) -> Self {
        Self {
            offset,
            ..Self::default()
        }
    }

    /// The listing of a prompt (`ids`, with `logprobs[i]` about `ids[i + 1]`), from offset 0.
    pub fn prompt(tokenizer: &Tokenizer, ids: &[u32], logprobs: &[TokenLogprob]) -> Self {
        let mut l = Self::at(0);
        if let Some(&first) = ids.first() {
            l.add(tokenizer.token_text(first), Value::Null, Value::Null);
        }
        for lp in logprobs {
            l.push(tokenizer, lp);
        }
        l
    }

    /// Adds a token with its log-probability.
    pub fn push(&mut self, tokenizer: &Tokenizer, lp: &TokenLogprob) {
        let text = tokenizer.token_text(lp.id);
        let mut top = Map::new();
        for &(id, logprob) in &lp.top {
            top.entry(tokenizer.token_text(id))
                .or_insert_with(|| number(logprob));
        }
        top.entry(text.clone())
            .or_insert_with(|| number(lp.logprob));
        self.add(text, number(lp.logprob), Value::Object(top));
    }

    /// Continues at character `offset` (after an echoed prompt: its text's length, which the
    /// token texts miss when a character is split between tokens).
    pub fn resume_at(mut self, offset: usize) -> Self {
        self.offset = offset;
        self
    }

    /// Where the next token would start.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The `logprobs` object.
    pub fn to_json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }

    fn add(&mut self, text: String, logprob: Value, top: Value) {
        self.text_offset.push(self.offset);
        self.offset += text.chars().count();
        self.tokens.push(Value::String(text));
        self.token_logprobs.push(logprob);
        self.top_logprobs.push(top);
    }
}

/// One token of chat completions' `logprobs.content`: its text, log-probability and bytes
/// (which keep what the text cannot: a piece of a UTF-8 character), and the `top` most likely
/// tokens at its position in the same form.
pub fn chat_entry(tokenizer: &Tokenizer, lp: &TokenLogprob) -> Value {
    let one = |id: u32, logprob: f32| {
        json!({
            "token": tokenizer.token_text(id),
            "logprob": number(logprob),
            "bytes": tokenizer.token_bytes(id),
        })
    };
    let mut entry = one(lp.id, lp.logprob);
    entry["top_logprobs"] = lp.top.iter().map(|&(id, l)| one(id, l)).collect();
    entry
}

/// A log-probability as JSON: `-inf` (a token the model rules out entirely) has no JSON
/// number, so it is written as the most negative f32.
fn number(x: f32) -> Value {
    let x = if x.is_finite() { x } else { f32::MIN };
    json!(x)
}
