//! What to send: prompts of a given number of tokens (fixed or uniform in a range) or read
//! from a JSONL file, each with the number of tokens to generate.

use std::path::Path;

use anyhow::{bail, Context};
use gptj_engine::Tokenizer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

/// A token count: fixed, or uniform over an inclusive range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    /// Always this many.
    Fixed(usize),
    /// Uniform in `lo..=hi`.
    Uniform(usize, usize),
}

impl std::str::FromStr for Length {
    type Err = String;

    /// `128` or `64..256` (inclusive).
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{s}` is not a length such as 128 or 64..256"))
        };
        let l = match s.split_once("..") {
            Some((a, b)) => {
                let (lo, hi) = (num(a)?, num(b.trim_start_matches('='))?);
                if lo > hi {
                    return Err(format!("`{s}`: the range is empty"));
                }
                Length::Uniform(lo, hi)
            }
            None => Length::Fixed(num(s)?),
        };
        match l {
            Length::Fixed(0) | Length::Uniform(0, _) => Err(format!("`{s}`: lengths must be >= 1")),
            l => Ok(l),
        }
    }
}

impl Length {
    fn sample(self, rng: &mut impl Rng) -> usize {
        match self {
            Length::Fixed(n) => n,
            Length::Uniform(lo, hi) => rng.random_range(lo..=hi),
        }
    }
}

/// One request to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// Position in the workload.
    pub index: usize,
    /// The prompt text.
    pub prompt: String,
    /// Its tokens (GPT-J's tokenizer).
    pub prompt_ids: Vec<u32>,
    /// New tokens to generate (the request asks for exactly this many).
    pub output_tokens: usize,
}

/// One line of a `--dataset` file.
#[derive(Debug, Deserialize)]
struct DatasetLine {
    prompt: String,
    #[serde(default, alias = "max_tokens", alias = "max_new_tokens")]
    output_tokens: Option<usize>,
}

/// Words that are one GPT-J token each with a leading space; prompts are made of them so a
/// prompt of `n` words is exactly `n` tokens.
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has", "there",
    "been", "if", "more", "when", "will", "would", "who", "so", "no", "time", "people", "water",
    "house", "river", "light", "music", "garden", "winter", "summer", "city", "story", "world",
    "small", "great", "old", "new", "long", "little", "young", "black", "white", "red", "green",
    "dog", "cat", "horse", "bird", "tree", "road", "book", "school", "market", "ship", "train",
    "morning", "night", "day", "year", "family", "friend", "king", "army", "game", "money",
];

/// Makes prompts of random words with exactly the requested number of tokens.
pub struct PromptMaker {
    tokenizer: Tokenizer,
    words: Vec<(String, u32)>,
}

impl PromptMaker {
    /// Uses GPT-J's tokenizer.
    pub fn new() -> anyhow::Result<Self> {
        let tokenizer = Tokenizer::gptj().context("cannot load GPT-J's tokenizer")?;
        let mut words = Vec::new();
        for w in WORDS {
            let text = format!(" {w}");
            let ids = tokenizer.encode(&text)?;
            if let [id] = ids[..] {
                words.push((text, id));
            }
        }
        if words.len() < 10 {
            bail!("the tokenizer splits too many common words; cannot make prompts");
        }
        Ok(Self { tokenizer, words })
    }

    /// The tokenizer prompts are counted with.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// A prompt of exactly `tokens` tokens.
    pub fn prompt(&self, tokens: usize, rng: &mut impl Rng) -> (String, Vec<u32>) {
        let mut text = String::new();
        let mut ids = Vec::with_capacity(tokens);
        for _ in 0..tokens {
            let (w, id) = &self.words[rng.random_range(0..self.words.len())];
            text.push_str(w);
            ids.push(*id);
        }
        (text, ids)
    }
}

/// `requests` requests: random-word prompts of `prompt` tokens, `output` new tokens each.
pub fn synthetic(
    maker: &PromptMaker,
    requests: usize,
    prompt: Length,
    output: Length,
    seed: u64,
) -> Vec<Planned> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..requests)
        .map(|index| {
            let n = prompt.sample(&mut rng);
            let (prompt, prompt_ids) = maker.prompt(n, &mut rng);
            Planned {
                index,
                prompt,
                prompt_ids,
                output_tokens: output.sample(&mut rng),
            }
        })
        .collect()
}

/// `requests` requests from a JSONL file of `{"prompt": "...", "output_tokens": N}` lines
/// (`output_tokens` may also be spelled `max_tokens` or `max_new_tokens`, and defaults to
/// `output`), taken in order and cycled.
pub fn from_jsonl(
    maker: &PromptMaker,
    path: &Path,
    requests: usize,
    output: Length,
    seed: u64,
) -> anyhow::Result<Vec<Planned>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the dataset {}", path.display()))?;
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: DatasetLine = serde_json::from_str(line).with_context(|| {
            format!(
                "{}:{}: expected {{\"prompt\": \"...\", \"output_tokens\": N}}",
                path.display(),
                i + 1
            )
        })?;
        if l.prompt.is_empty() {
            bail!("{}:{}: the prompt is empty", path.display(), i + 1);
        }
        lines.push(l);
    }
    if lines.is_empty() {
        bail!("the dataset {} has no lines", path.display());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(requests);
    for index in 0..requests {
        let l = &lines[index % lines.len()];
        out.push(Planned {
            index,
            prompt_ids: maker.tokenizer().encode(&l.prompt)?,
            prompt: l.prompt.clone(),
            output_tokens: l.output_tokens.unwrap_or_else(|| output.sample(&mut rng)),
        });
    }
    Ok(out)
}

/// Arrival offsets in seconds of a Poisson process at `rate` per second: exponential gaps.
pub fn poisson_arrivals(n: usize, rate: f64, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            let u: f64 = rng.random::<f64>();
            t += -(1.0 - u).ln() / rate;
            t
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_parse() {
        assert_eq!("128".parse(), Ok(Length::Fixed(128)));
        assert_eq!("64..256".parse(), Ok(Length::Uniform(64, 256)));
        assert_eq!("64..=256".parse(), Ok(Length::Uniform(64, 256)));
        assert!("0".parse::<Length>().is_err());
        assert!("9..3".parse::<Length>().is_err());
        assert!("x".parse::<Length>().is_err());
    }

    #[test]
    fn prompts_have_exactly_the_requested_tokens() {
        let maker = PromptMaker::new().unwrap();
        let reqs = synthetic(&maker, 20, Length::Uniform(1, 300), Length::Fixed(7), 1);
        for r in &reqs {
            assert_eq!(maker.tokenizer().encode(&r.prompt).unwrap(), r.prompt_ids);
            assert_eq!(r.output_tokens, 7);
        }
        // Distinct prompts, so the prefix cache does not share work between requests.
        assert_ne!(reqs[0].prompt_ids, reqs[1].prompt_ids);
        assert_eq!(
            reqs,
            synthetic(&maker, 20, Length::Uniform(1, 300), Length::Fixed(7), 1)
        );
    }

    #[test]
    fn poisson_gaps_average_one_over_the_rate() {
        let a = poisson_arrivals(20_000, 4.0, 3);
        assert!(a.windows(2).all(|w| w[1] > w[0]));
        let mean_gap = a.last().unwrap() / a.len() as f64;
        assert!((mean_gap - 0.25).abs() < 0.01, "{mean_gap}");
    }
}
