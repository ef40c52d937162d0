//! From what a request set to what each of its sequences runs with: the server's defaults
//! ([`Defaults`], from the flags) fill what the request left out, and one prompt's length
//! turns HuggingFace's total lengths into new-token counts ([`Defaults::resolve`] gives a
//! [`Plan`]).
//!
//! Lengths follow HuggingFace `generate`, as the seed service did: `max_length` and
//! `min_length` count the prompt, `max_new_tokens` and `min_new_tokens` only new tokens. An
//! explicit length that does not fit the context window is an error; a server default is
//! clamped to fit.

use gptj_engine::{Penalties, SamplingParams};
use gptj_scheduler::LogprobsRequest;

use super::{Dialect, RequestParams, ValidationError};
use crate::cli::GenerationArgs;

/// A generation default the flags set to a value no request could use.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DefaultsError {
    /// A sampling flag is out of range.
    #[error("generation defaults (flags --temperature, --top-p, --repetition-penalty): {0}")]
    Sampling(String),
    /// A length flag is zero.
    #[error("generation defaults: `{0}` must be >= 1")]
    Zero(&'static str),
}

/// The server's defaults for every parameter (the `--temperature`... flags), validated.
#[derive(Debug, Clone)]
pub struct Defaults {
    max_new_tokens: usize,
    max_length: Option<usize>,
    min_new_tokens: usize,
    min_length: Option<usize>,
    sampling: SamplingParams,
    seed: Option<u64>,
    num_return_sequences: usize,
    return_full_text: bool,
}

/// Where a length limit came from: the request (by the table's parameter name) or a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Request(&'static str),
    Flag(&'static str),
}

/// A length limit in new tokens, and where it came from.
#[derive(Debug, Clone, Copy)]
struct Bound {
    tokens: usize,
    source: Source,
}

impl Bound {
    fn explicit(&self) -> bool {
        matches!(self.source, Source::Request(_))
    }

    fn field(&self, dialect: &Dialect) -> String {
        match self.source {
            Source::Request(name) => dialect.path(name),
            Source::Flag(flag) => flag.to_owned(),
        }
    }
}

impl Defaults {
    /// Checks the flags' values.
    pub fn from_args(a: &GenerationArgs) -> Result<Self, DefaultsError> {
        let sampling = SamplingParams {
            do_sample: a.do_sample,
            temperature: a.temperature,
            top_k: a.top_k as usize,
            top_p: a.top_p,
            repetition_penalty: a.repetition_penalty,
            min_new_tokens: 0,
            seed: 0,
        };
        sampling
            .validate()
            .map_err(|e| DefaultsError::Sampling(e.to_string()))?;
        if a.max_new_tokens == 0 {
            return Err(DefaultsError::Zero("--max-new-tokens"));
        }
        if a.max_length == Some(0) {
            return Err(DefaultsError::Zero("--max-length"));
        }
        if a.num_return_sequences == 0 {
            return Err(DefaultsError::Zero("--num-return-sequences"));
        }
        Ok(Self {
            max_new_tokens: a.max_new_tokens as usize,
            max_length: a.max_length.map(|n| n as usize),
            min_new_tokens: a.min_new_tokens as usize,
            min_length: a.min_length.map(|n| n as usize),
            sampling,
            seed: a.seed,
            num_return_sequences: a.num_return_sequences as usize,
            return_full_text: a.return_full_text,
        })
    }

    /// Sequences per prompt that `p` asks for.
    pub fn num_return_sequences(&self, p: &RequestParams) -> usize {
        p.num_return_sequences.unwrap_or(self.num_return_sequences)
    }

    /// Whether the returned text includes the prompt.
    pub fn return_full_text(&self, p: &RequestParams) -> bool {
        p.return_full_text.unwrap_or(self.return_full_text)
    }

    /// Combines `p` with the defaults for one prompt of `prompt_tokens` tokens in a model
    /// whose context window is `context`. `dialect` names the fields in messages and `at`
    /// the prompt (`instance 2`).
    pub fn resolve(
        &self,
        p: &RequestParams,
        dialect: &Dialect,
        prompt_tokens: usize,
        context: usize,
        at: &str,
    ) -> Result<Plan, ValidationError> {
        if prompt_tokens == 0 {
            return Err(ValidationError::EmptyPrompt { at: at.into() });
        }
        if prompt_tokens >= context {
            return Err(ValidationError::PromptTooLong {
                at: at.into(),
                prompt_tokens,
                context,
            });
        }
        let room = context - prompt_tokens;
        let max = self.max_bound(p, dialect, prompt_tokens, room, at)?;
        if max.explicit() && max.tokens > room {
            return Err(ValidationError::ContextOverflow {
                at: at.into(),
                field: max.field(dialect),
                prompt_tokens,
                new_tokens: max.tokens,
                context,
            });
        }
        let min = self.min_bound(p, prompt_tokens);
        let min_new = if p.ignore_eos == Some(true) {
            // End-of-text is suppressed until the maximum, so only the maximum (or a stop
            // string or token) ends the sequence.
            max.tokens
        } else if min.tokens > max.tokens {
            if max.explicit() || min.explicit() {
                return Err(ValidationError::MinOverMax {
                    at: at.into(),
                    min: min.tokens,
                    max: max.tokens,
                    min_field: min.field(dialect),
                    max_field: max.field(dialect),
                });
            }
            max.tokens
        } else {
            min.tokens
        };
        let d = &self.sampling;
        let sampling = SamplingParams {
            do_sample: p.do_sample.unwrap_or(d.do_sample),
            temperature: p.temperature.unwrap_or(d.temperature),
            top_k: p.top_k.unwrap_or(d.top_k),
            top_p: p.top_p.unwrap_or(d.top_p),
            repetition_penalty: p.repetition_penalty.unwrap_or(d.repetition_penalty),
            min_new_tokens: min_new,
            seed: 0,
        };
        let n = self.num_return_sequences(p);
        let seeds = match p.seed.or(self.seed) {
            Some(s) => (0..n as u64).map(|j| s.wrapping_add(j)).collect(),
            None => (0..n).map(|_| rand::random::<u64>()).collect(),
        };
        Ok(Plan {
            sampling,
            seeds,
            max_new_tokens: max.tokens,
            stop: p.stop.clone().unwrap_or_default(),
            stop_token_ids: p.stop_token_ids.clone().unwrap_or_default(),
            penalties: Penalties {
                presence: p.presence_penalty.unwrap_or(0.0),
                frequency: p.frequency_penalty.unwrap_or(0.0),
                logit_bias: p.logit_bias.clone().unwrap_or_default(),
            },
            return_full_text: self.return_full_text(p),
            cache_salt: p.cache_salt.clone(),
            logprobs: p.logprobs.map(|top| LogprobsRequest {
                top,
                prompt: self.return_full_text(p),
            }),
        })
    }

    /// The most new tokens: the request's `max_new_tokens` or `max_length`, else the
    /// server's default clamped to the room left.
    fn max_bound(
        &self,
        p: &RequestParams,
        dialect: &Dialect,
        prompt_tokens: usize,
        room: usize,
        at: &str,
    ) -> Result<Bound, ValidationError> {
        let too_short = |field: String, value: usize| ValidationError::MaxLengthTooShort {
            at: at.into(),
            field,
            value,
            prompt_tokens,
        };
        Ok(if let Some(n) = p.max_new_tokens {
            Bound {
                tokens: n,
                source: Source::Request("max_new_tokens"),
            }
        } else if let Some(l) = p.max_length {
            if l <= prompt_tokens {
                return Err(too_short(dialect.path("max_length"), l));
            }
            Bound {
                tokens: l - prompt_tokens,
                source: Source::Request("max_length"),
            }
        } else if let Some(l) = self.max_length {
            if l <= prompt_tokens {
                return Err(too_short("--max-length (the server's default)".into(), l));
            }
            Bound {
                tokens: (l - prompt_tokens).min(room),
                source: Source::Flag("--max-length"),
            }
        } else {
            Bound {
                tokens: self.max_new_tokens.min(room),
                source: Source::Flag("--max-new-tokens"),
            }
        })
    }

    /// The fewest new tokens before end-of-text may end the sequence.
    fn min_bound(&self, p: &RequestParams, prompt_tokens: usize) -> Bound {
        if let Some(n) = p.min_new_tokens {
            Bound {
                tokens: n,
                source: Source::Request("min_new_tokens"),
            }
        } else if let Some(l) = p.min_length {
            Bound {
                tokens: l.saturating_sub(prompt_tokens),
                source: Source::Request("min_length"),
            }
        } else if let Some(l) = self.min_length {
            Bound {
                tokens: l.saturating_sub(prompt_tokens),
                source: Source::Flag("--min-length"),
            }
        } else {
            Bound {
                tokens: self.min_new_tokens,
                source: Source::Flag("--min-new-tokens"),
            }
        }
    }
}

/// What to generate for one prompt: the settings of each of its sequences.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Sampling settings shared by the prompt's sequences (their seeds differ).
    pub sampling: SamplingParams,
    /// One seed per returned sequence: with a request seed `s`, sequence `j` uses `s + j`
    /// (wrapping); without one, each is random.
    pub seeds: Vec<u64>,
    /// New tokens at most.
    pub max_new_tokens: usize,
    /// Stop strings (generation ends when the text contains one; it is not returned).
    pub stop: Vec<String>,
    /// Token ids that end generation when produced (their text is not returned).
    pub stop_token_ids: Vec<u32>,
    /// OpenAI's presence and frequency penalties and logit bias.
    pub penalties: Penalties,
    /// Whether the returned text starts with the prompt.
    pub return_full_text: bool,
    /// The request's prefix-cache salt.
    pub cache_salt: Option<String>,
    /// Log-probabilities to report (with the prompt's when the text starts with it).
    pub logprobs: Option<LogprobsRequest>,
}

impl Plan {
    /// The sampling settings of sequence `j`.
    pub fn sampling_for(&self, j: usize) -> SamplingParams {
        SamplingParams {
            seed: self.seeds[j],
            ..self.sampling.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use serde_json::{json, Value};

    use super::*;
    use crate::params::{Limits, Names, ParamsReader};

    const KSERVE: Dialect = Dialect {
        prefix: "parameters",
        aliases: &[],
        names: Names::All,
    };

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        g: GenerationArgs,
    }

    fn defaults(args: &[&str]) -> Defaults {
        let mut v = vec!["t"];
        v.extend_from_slice(args);
        Defaults::from_args(&T::parse_from(v).g).unwrap()
    }

    fn params(v: Value) -> RequestParams {
        ParamsReader::new(
            KSERVE,
            Limits {
                max_sequences: 16,
                max_prompts: 4,
            },
        )
        .read_object(v.as_object().unwrap())
        .unwrap()
    }

    fn resolve(
        d: &Defaults,
        p: &RequestParams,
        prompt: usize,
        at: &str,
    ) -> Result<Plan, ValidationError> {
        d.resolve(p, &KSERVE, prompt, 2048, at)
    }

    #[test]
    fn lengths_count_the_prompt() {
        let d = defaults(&[]);
        let p = params(json!({"min_length": 150, "max_length": 200}));
        let plan = resolve(&d, &p, 20, "instance 0").unwrap();
        assert_eq!(plan.max_new_tokens, 180);
        assert_eq!(plan.sampling.min_new_tokens, 130);
    }

    #[test]
    fn default_is_clamped_explicit_is_refused() {
        let d = defaults(&["--max-new-tokens", "100"]);
        let plan = resolve(&d, &RequestParams::default(), 2000, "i").unwrap();
        assert_eq!(plan.max_new_tokens, 48);
        let p = params(json!({"max_new_tokens": 100}));
        let e = resolve(&d, &p, 2000, "instance 3").unwrap_err();
        assert!(matches!(e, ValidationError::ContextOverflow { .. }));
        let msg = e.to_string();
        assert!(
            msg.contains("instance 3") && msg.contains("2048") && msg.contains("max_new_tokens"),
            "{msg}"
        );
    }

    #[test]
    fn max_length_must_exceed_prompt() {
        let d = defaults(&[]);
        let p = params(json!({"max_length": 10}));
        let msg = resolve(&d, &p, 12, "instance 0").unwrap_err().to_string();
        assert!(
            msg.contains("parameters.max_length") && msg.contains("12 tokens"),
            "{msg}"
        );
    }

    #[test]
    fn min_over_max() {
        let d = defaults(&[]);
        let p = params(json!({"min_new_tokens": 30, "max_new_tokens": 20}));
        assert!(matches!(
            resolve(&d, &p, 5, "i"),
            Err(ValidationError::MinOverMax { .. })
        ));
        // A default minimum above an explicit maximum is an error too; a default one is clamped.
        let d = defaults(&["--min-new-tokens", "40", "--max-new-tokens", "30"]);
        let plan = resolve(&d, &RequestParams::default(), 5, "i").unwrap();
        assert_eq!(plan.sampling.min_new_tokens, 30);
    }

    #[test]
    fn ignore_eos_runs_to_the_maximum() {
        let d = defaults(&["--max-new-tokens", "40"]);
        let p = params(json!({"ignore_eos": true, "min_new_tokens": 3}));
        let plan = resolve(&d, &p, 5, "i").unwrap();
        assert_eq!(
            (plan.max_new_tokens, plan.sampling.min_new_tokens),
            (40, 40)
        );
        let p = params(json!({"ignore_eos": true, "max_length": 25}));
        assert_eq!(resolve(&d, &p, 5, "i").unwrap().sampling.min_new_tokens, 20);
        let p = params(json!({"ignore_eos": false, "stop_token_ids": [7, 9]}));
        let plan = resolve(&d, &p, 5, "i").unwrap();
        assert_eq!(plan.sampling.min_new_tokens, 0);
        assert_eq!(plan.stop_token_ids, vec![7, 9]);
    }

    #[test]
    fn seeds_derive_per_sequence() {
        let d = defaults(&[]);
        let p = params(json!({"seed": 7, "num_return_sequences": 3}));
        let plan = resolve(&d, &p, 5, "i").unwrap();
        assert_eq!(plan.seeds, vec![7, 8, 9]);
        assert_eq!(plan.sampling_for(2).seed, 9);
    }

    #[test]
    fn bad_defaults_name_the_flag() {
        let e = Defaults::from_args(&T::parse_from(["t", "--top-p", "2"]).g).unwrap_err();
        assert!(e.to_string().contains("top_p"), "{e}");
        let e = Defaults::from_args(&T::parse_from(["t", "--num-return-sequences", "0"]).g)
            .unwrap_err();
        assert_eq!(e, DefaultsError::Zero("--num-return-sequences"));
    }
}
