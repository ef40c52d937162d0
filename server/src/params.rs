/*!
Generation parameters: from the wire, to validated per-sequence settings.

Parse, don't validate: a request's `parameters` object becomes [`RequestParams`] (every field
optional, each type- and range-checked, unknown names refused), and
[`Defaults::resolve`] combines it with the server's defaults and one prompt's length into a
[`Plan`], the only thing the generation code takes.

Lengths follow HuggingFace `generate`, as the seed service did: `max_length` and
`min_length` count the prompt, `max_new_tokens` and `min_new_tokens` count only new tokens.
A request may give one of each pair. An explicit length that does not fit the context window
is an error; a server default is clamped to fit.

Every error names the field (`parameters.top_p`), the allowed range and the value given,
and, for per-prompt checks, the instance.
*/

use gptj_engine::SamplingParams;
use serde_json::{Map, Value};

use crate::cli::GenerationArgs;

/// Most stop strings per request.
pub const MAX_STOP_SEQUENCES: usize = 8;
/// Longest stop string, in bytes.
pub const MAX_STOP_LEN: usize = 256;

/// A request that is malformed or asks for something out of range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// The body is not JSON.
    #[error("request body is not valid JSON: {0}")]
    BadJson(String),
    /// The body is JSON but not an object.
    #[error("request body must be a JSON object, got {0}")]
    BodyNotObject(String),
    /// A required field is absent.
    #[error("missing `{field}` ({what})")]
    Missing {
        /// The field's path.
        field: String,
        /// What it should hold.
        what: &'static str,
    },
    /// A field has the wrong JSON type.
    #[error("`{field}` must be {expected}, got {got}")]
    WrongType {
        /// The field's path.
        field: String,
        /// What it must be.
        expected: &'static str,
        /// What it is.
        got: String,
    },
    /// A field's value is outside its range.
    #[error("`{field}` must be {range}, got {value}")]
    OutOfRange {
        /// The field's path.
        field: String,
        /// The allowed range, in words.
        range: String,
        /// The value given.
        value: String,
    },
    /// A field this route does not know.
    #[error("unknown parameter `{field}`; known parameters: {known}")]
    UnknownField {
        /// The field's path.
        field: String,
        /// The names this route knows.
        known: String,
    },
    /// `instances` has no element.
    #[error("`instances` is empty: give at least one prompt")]
    EmptyInstances,
    /// More instances than `--max-instances`.
    #[error("too many instances: {given} given, at most {max} allowed per request")]
    TooManyInstances {
        /// How many were given.
        given: usize,
        /// The limit.
        max: usize,
    },
    /// More sequences than `--max-sequences-per-request`.
    #[error(
        "too many sequences: {prompts} prompt(s) x {per_prompt} sequence(s) each = {total}, \
         at most {max} allowed per request"
    )]
    TooManySequences {
        /// Prompts in the request.
        prompts: usize,
        /// Sequences asked for each.
        per_prompt: usize,
        /// Their product.
        total: usize,
        /// The limit.
        max: usize,
    },
    /// A prompt with no text.
    #[error("{at}: the prompt is empty")]
    EmptyPrompt {
        /// Which prompt.
        at: String,
    },
    /// A prompt that fills the context window by itself.
    #[error(
        "{at}: the prompt is {prompt_tokens} tokens; the context window is {context} tokens, \
         which must leave room for at least one new token"
    )]
    PromptTooLong {
        /// Which prompt.
        at: String,
        /// Its length.
        prompt_tokens: usize,
        /// The context window.
        context: usize,
    },
    /// `max_length` does not exceed the prompt's length.
    #[error(
        "{at}: `{field}` is {value} but the prompt is already {prompt_tokens} tokens; \
         `{field}` counts the prompt, so it must be greater than {prompt_tokens} \
         (or give `max_new_tokens` instead)"
    )]
    MaxLengthTooShort {
        /// Which prompt.
        at: String,
        /// The field's path.
        field: String,
        /// The value given.
        value: usize,
        /// The prompt's length.
        prompt_tokens: usize,
    },
    /// Prompt plus generation exceeds the context window.
    #[error(
        "{at}: the prompt ({prompt_tokens} tokens) plus {new_tokens} new tokens (`{field}`) is \
         {} tokens, over the context window of {context} tokens", prompt_tokens + new_tokens
    )]
    ContextOverflow {
        /// Which prompt.
        at: String,
        /// The field that set the length.
        field: String,
        /// The prompt's length.
        prompt_tokens: usize,
        /// New tokens asked for.
        new_tokens: usize,
        /// The context window.
        context: usize,
    },
    /// Two fields that set the same thing.
    #[error("`{a}` and `{b}` set the same limit in two ways: give only one of them")]
    Conflict {
        /// One field's path.
        a: String,
        /// The other's.
        b: String,
    },
    /// The minimum length exceeds the maximum.
    #[error(
        "{at}: the minimum of {min} new tokens (from `{min_field}`) is more than the maximum \
         of {max} new tokens (from `{max_field}`)"
    )]
    MinOverMax {
        /// Which prompt.
        at: String,
        /// The minimum, in new tokens.
        min: usize,
        /// The maximum, in new tokens.
        max: usize,
        /// Where the minimum came from.
        min_field: String,
        /// Where the maximum came from.
        max_field: String,
    },
    /// A field we understand but do not implement with the given value.
    #[error("`{field}`: {message}")]
    Unsupported {
        /// The field's path.
        field: String,
        /// Why.
        message: String,
    },
    /// The scheduler refused the job as it stands (it could never fit, or is malformed).
    #[error("{0}")]
    Refused(String),
    /// The tokenizer could not encode a prompt.
    #[error("{at}: cannot tokenize the prompt: {message}")]
    Tokenize {
        /// Which prompt.
        at: String,
        /// The tokenizer's message.
        message: String,
    },
}

impl ValidationError {
    /// The field the error is about, when there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Missing { field: f, .. }
            | Self::WrongType { field: f, .. }
            | Self::OutOfRange { field: f, .. }
            | Self::UnknownField { field: f, .. }
            | Self::MaxLengthTooShort { field: f, .. }
            | Self::ContextOverflow { field: f, .. }
            | Self::Unsupported { field: f, .. } => Some(f),
            Self::Conflict { a, .. } => Some(a),
            _ => None,
        }
    }
}

type Result<T, E = ValidationError> = std::result::Result<T, E>;

/// A short description of a JSON value for error messages: its type and, for scalars, the
/// value (long strings cut).
pub fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("a boolean ({b})"),
        Value::Number(n) => format!("a number ({n})"),
        Value::String(s) => {
            let cut: String = s.chars().take(40).collect();
            let dots = if cut.len() < s.len() { "..." } else { "" };
            format!("a string ({:?}{dots})", cut)
        }
        Value::Array(a) => format!("an array of {} element(s)", a.len()),
        Value::Object(_) => "an object".into(),
    }
}

/// Parses a request body: JSON, and an object.
pub fn parse_body(bytes: &[u8]) -> Result<Map<String, Value>> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| ValidationError::BadJson(e.to_string()))?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(ValidationError::BodyNotObject(describe(&other))),
    }
}

// ===== typed field readers =====

/// A non-negative integer within `[min, max]`; integral floats (`100.0`) are accepted.
pub fn read_uint(field: &str, v: &Value, min: u64, max: u64) -> Result<u64> {
    let range = || {
        if max == u64::MAX {
            format!("an integer >= {min}")
        } else {
            format!("an integer in [{min}, {max}]")
        }
    };
    let n = match v {
        Value::Number(n) => n,
        other => {
            return Err(ValidationError::WrongType {
                field: field.into(),
                expected: "an integer",
                got: describe(other),
            })
        }
    };
    let value = if let Some(u) = n.as_u64() {
        u
    } else if let Some(f) = n
        .as_f64()
        .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1.8e19)
    {
        f as u64
    } else if n.as_i64().is_some() || n.as_f64().is_some_and(|f| f.fract() == 0.0) {
        return Err(ValidationError::OutOfRange {
            field: field.into(),
            range: range(),
            value: n.to_string(),
        });
    } else {
        return Err(ValidationError::WrongType {
            field: field.into(),
            expected: "an integer",
            got: describe(v),
        });
    };
    if value < min || value > max {
        return Err(ValidationError::OutOfRange {
            field: field.into(),
            range: range(),
            value: value.to_string(),
        });
    }
    Ok(value)
}

/// A finite number that passes `ok`, whose range is described by `range`.
pub fn read_float(field: &str, v: &Value, range: &str, ok: impl Fn(f64) -> bool) -> Result<f64> {
    let f = match v {
        Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        other => {
            return Err(ValidationError::WrongType {
                field: field.into(),
                expected: "a number",
                got: describe(other),
            })
        }
    };
    if !f.is_finite() || !ok(f) {
        return Err(ValidationError::OutOfRange {
            field: field.into(),
            range: range.into(),
            value: v.to_string(),
        });
    }
    Ok(f)
}

/// A boolean.
pub fn read_bool(field: &str, v: &Value) -> Result<bool> {
    v.as_bool().ok_or_else(|| ValidationError::WrongType {
        field: field.into(),
        expected: "a boolean",
        got: describe(v),
    })
}

/// A string.
pub fn read_string<'a>(field: &str, v: &'a Value) -> Result<&'a str> {
    v.as_str().ok_or_else(|| ValidationError::WrongType {
        field: field.into(),
        expected: "a string",
        got: describe(v),
    })
}

/// Stop strings: one string or an array of them, non-empty, at most [`MAX_STOP_SEQUENCES`].
pub fn read_stop(field: &str, v: &Value) -> Result<Vec<String>> {
    let items: Vec<&Value> = match v {
        Value::String(_) => vec![v],
        Value::Array(a) => a.iter().collect(),
        other => {
            return Err(ValidationError::WrongType {
                field: field.into(),
                expected: "a string or an array of strings",
                got: describe(other),
            })
        }
    };
    if items.len() > MAX_STOP_SEQUENCES {
        return Err(ValidationError::OutOfRange {
            field: field.into(),
            range: format!("at most {MAX_STOP_SEQUENCES} strings"),
            value: format!("{} strings", items.len()),
        });
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let f = format!("{field}[{i}]");
            let s = read_string(&f, item)?;
            if s.is_empty() || s.len() > MAX_STOP_LEN {
                return Err(ValidationError::OutOfRange {
                    field: f,
                    range: format!("a non-empty string of at most {MAX_STOP_LEN} bytes"),
                    value: describe(item),
                });
            }
            Ok(s.to_owned())
        })
        .collect()
}

// ===== request parameters =====

/// A request's generation parameters, type- and range-checked, all optional.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestParams {
    /// Total length (prompt included) at most.
    pub max_length: Option<usize>,
    /// Total length (prompt included) at least.
    pub min_length: Option<usize>,
    /// New tokens at most.
    pub max_new_tokens: Option<usize>,
    /// New tokens at least.
    pub min_new_tokens: Option<usize>,
    /// Sample or decode greedily.
    pub do_sample: Option<bool>,
    /// Temperature, >= 0.
    pub temperature: Option<f32>,
    /// Top-k, >= 0 (0 = off).
    pub top_k: Option<usize>,
    /// Top-p, in (0, 1].
    pub top_p: Option<f32>,
    /// Repetition penalty, > 0.
    pub repetition_penalty: Option<f32>,
    /// Seed of the first sequence.
    pub seed: Option<u64>,
    /// Sequences per prompt.
    pub num_return_sequences: Option<usize>,
    /// Stop strings.
    pub stop: Option<Vec<String>>,
    /// Prompt included in the returned text.
    pub return_full_text: Option<bool>,
    /// Where each field came from, for messages (`parameters.max_length`).
    pub prefix: String,
    /// The request's own names for parameters whose wire name differs from ours
    /// (OpenAI's `max_tokens` for `max_new_tokens`), for messages.
    pub wire_names: &'static [(&'static str, &'static str)],
}

/// The parameter names of KServe V1 `parameters` (and of OIP generate, plus `max_tokens`).
pub const KNOWN_PARAMETERS: &[&str] = &[
    "max_length",
    "min_length",
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "seed",
    "num_return_sequences",
    "stop",
    "return_full_text",
];

/// Upper bound accepted for length fields before the per-prompt checks (the context window
/// decides the real limit).
pub const MAX_LENGTH_FIELD: u64 = 1 << 20;

impl RequestParams {
    /// Parses a `parameters` object. `prefix` is its path (`parameters`); `aliases` maps
    /// extra accepted names to a known one (OIP's `max_tokens` -> `max_new_tokens`).
    pub fn from_object(
        obj: &Map<String, Value>,
        prefix: &str,
        aliases: &[(&str, &str)],
        max_return_sequences: usize,
    ) -> Result<Self> {
        let mut p = RequestParams {
            prefix: prefix.to_owned(),
            ..Default::default()
        };
        for (name, value) in obj {
            let field = format!("{prefix}.{name}");
            let canonical = aliases
                .iter()
                .find(|(alias, _)| alias == name)
                .map_or(name.as_str(), |(_, to)| *to);
            if value.is_null() && KNOWN_PARAMETERS.contains(&canonical) {
                continue;
            }
            if canonical != name && obj.contains_key(canonical) {
                return Err(ValidationError::Conflict {
                    a: field,
                    b: format!("{prefix}.{canonical}"),
                });
            }
            p.set(canonical, &field, value, max_return_sequences)
                .map_err(|e| match e {
                    ValidationError::UnknownField { field, .. } => {
                        let mut known: Vec<&str> = KNOWN_PARAMETERS.to_vec();
                        known.extend(aliases.iter().map(|(a, _)| *a));
                        ValidationError::UnknownField {
                            field,
                            known: known.join(", "),
                        }
                    }
                    other => other,
                })?;
        }
        p.check_pairs()?;
        Ok(p)
    }

    /// Sets one known parameter from JSON.
    pub fn set(
        &mut self,
        name: &str,
        field: &str,
        v: &Value,
        max_return_sequences: usize,
    ) -> Result<()> {
        let len = |v| read_uint(field, v, 0, MAX_LENGTH_FIELD).map(|n| n as usize);
        match name {
            "max_length" => {
                self.max_length = Some(read_uint(field, v, 1, MAX_LENGTH_FIELD)? as usize)
            }
            "min_length" => self.min_length = Some(len(v)?),
            "max_new_tokens" => {
                self.max_new_tokens = Some(read_uint(field, v, 1, MAX_LENGTH_FIELD)? as usize)
            }
            "min_new_tokens" => self.min_new_tokens = Some(len(v)?),
            "do_sample" => self.do_sample = Some(read_bool(field, v)?),
            "temperature" => {
                self.temperature = Some(read_float(field, v, "a number >= 0", |t| t >= 0.0)? as f32)
            }
            "top_k" => {
                self.top_k = Some(read_uint(field, v, 0, u64::MAX)?.min(u32::MAX as u64) as usize)
            }
            "top_p" => {
                self.top_p =
                    Some(
                        read_float(field, v, "a number in (0, 1]", |p| p > 0.0 && p <= 1.0)? as f32,
                    )
            }
            "repetition_penalty" => {
                self.repetition_penalty =
                    Some(read_float(field, v, "a number > 0", |r| r > 0.0)? as f32)
            }
            "seed" => self.seed = Some(read_uint(field, v, 0, u64::MAX)?),
            "num_return_sequences" => {
                self.num_return_sequences =
                    Some(read_uint(field, v, 1, max_return_sequences as u64)? as usize)
            }
            "stop" => self.stop = Some(read_stop(field, v)?),
            "return_full_text" => self.return_full_text = Some(read_bool(field, v)?),
            _ => {
                return Err(ValidationError::UnknownField {
                    field: field.into(),
                    known: KNOWN_PARAMETERS.join(", "),
                })
            }
        }
        Ok(())
    }

    /// The path of parameter `name` in the request (`parameters.top_p`, or `top_p` at the top
    /// level).
    pub fn path(&self, name: &str) -> String {
        let name = self
            .wire_names
            .iter()
            .find(|(ours, _)| *ours == name)
            .map_or(name, |(_, theirs)| theirs);
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Refuses a request that sets both fields of a pair.
    pub fn check_pairs(&self) -> Result<()> {
        let f = |n: &str| self.path(n);
        if self.max_length.is_some() && self.max_new_tokens.is_some() {
            return Err(ValidationError::Conflict {
                a: f("max_length"),
                b: f("max_new_tokens"),
            });
        }
        if self.min_length.is_some() && self.min_new_tokens.is_some() {
            return Err(ValidationError::Conflict {
                a: f("min_length"),
                b: f("min_new_tokens"),
            });
        }
        Ok(())
    }
}

// ===== defaults and resolution =====

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

impl Defaults {
    /// Checks the flags' values; the error names the flag.
    pub fn from_args(a: &GenerationArgs) -> Result<Self, String> {
        let sampling = SamplingParams {
            do_sample: a.do_sample,
            temperature: a.temperature,
            top_k: a.top_k as usize,
            top_p: a.top_p,
            repetition_penalty: a.repetition_penalty,
            min_new_tokens: 0,
            seed: 0,
        };
        sampling.validate().map_err(|e| {
            format!("generation defaults (flags --temperature, --top-p, --repetition-penalty): {e}")
        })?;
        if a.max_new_tokens == 0 || a.max_length == Some(0) {
            return Err(
                "generation defaults: `--max-new-tokens` and `--max-length` must be >= 1".into(),
            );
        }
        if a.num_return_sequences == 0 {
            return Err("generation defaults: `--num-return-sequences` must be >= 1".into());
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

    /// Whether `generated_text` includes the prompt.
    pub fn return_full_text(&self, p: &RequestParams) -> bool {
        p.return_full_text.unwrap_or(self.return_full_text)
    }

    /// Combines `p` with the defaults for one prompt of `prompt_tokens` tokens in a model
    /// whose context window is `context`; `at` names the prompt in messages (`instance 2`).
    pub fn resolve(
        &self,
        p: &RequestParams,
        prompt_tokens: usize,
        context: usize,
        at: &str,
    ) -> Result<Plan> {
        let field = |n: &str| p.path(n);
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
        let too_short = |field: String, value: usize| ValidationError::MaxLengthTooShort {
            at: at.into(),
            field,
            value,
            prompt_tokens,
        };
        // The maximum, and whether the request asked for it (explicit lengths must fit).
        let (max_new, max_field, explicit) = if let Some(n) = p.max_new_tokens {
            (n, field("max_new_tokens"), true)
        } else if let Some(l) = p.max_length {
            if l <= prompt_tokens {
                return Err(too_short(field("max_length"), l));
            }
            (l - prompt_tokens, field("max_length"), true)
        } else if let Some(l) = self.max_length {
            if l <= prompt_tokens {
                return Err(too_short("--max-length (the server's default)".into(), l));
            }
            ((l - prompt_tokens).min(room), "--max-length".into(), false)
        } else {
            (
                self.max_new_tokens.min(room),
                "--max-new-tokens".into(),
                false,
            )
        };
        if explicit && max_new > room {
            return Err(ValidationError::ContextOverflow {
                at: at.into(),
                field: max_field,
                prompt_tokens,
                new_tokens: max_new,
                context,
            });
        }
        let (min_new, min_field, min_explicit) = if let Some(n) = p.min_new_tokens {
            (n, field("min_new_tokens"), true)
        } else if let Some(l) = p.min_length {
            (l.saturating_sub(prompt_tokens), field("min_length"), true)
        } else if let Some(l) = self.min_length {
            (
                l.saturating_sub(prompt_tokens),
                "--min-length".into(),
                false,
            )
        } else {
            (self.min_new_tokens, "--min-new-tokens".into(), false)
        };
        let min_new = if min_new > max_new {
            if explicit || min_explicit {
                return Err(ValidationError::MinOverMax {
                    at: at.into(),
                    min: min_new,
                    max: max_new,
                    min_field,
                    max_field,
                });
            }
            max_new
        } else {
            min_new
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
            max_new_tokens: max_new,
            stop: p.stop.clone().unwrap_or_default(),
            return_full_text: self.return_full_text(p),
        })
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
    /// Whether the returned text starts with the prompt.
    pub return_full_text: bool,
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
    use super::*;
    use clap::Parser;
    use serde_json::json;

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

    fn params(v: Value) -> Result<RequestParams> {
        RequestParams::from_object(v.as_object().unwrap(), "parameters", &[], 16)
    }

    #[test]
    fn lengths_count_the_prompt() {
        let d = defaults(&[]);
        let p = params(json!({"min_length": 150, "max_length": 200})).unwrap();
        let plan = d.resolve(&p, 20, 2048, "instance 0").unwrap();
        assert_eq!(plan.max_new_tokens, 180);
        assert_eq!(plan.sampling.min_new_tokens, 130);
    }

    #[test]
    fn default_is_clamped_explicit_is_refused() {
        let d = defaults(&["--max-new-tokens", "100"]);
        let plan = d
            .resolve(&RequestParams::default(), 2000, 2048, "i")
            .unwrap();
        assert_eq!(plan.max_new_tokens, 48);
        let p = params(json!({"max_new_tokens": 100})).unwrap();
        let e = d.resolve(&p, 2000, 2048, "instance 3").unwrap_err();
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
        let p = params(json!({"max_length": 10})).unwrap();
        let msg = d
            .resolve(&p, 12, 2048, "instance 0")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("parameters.max_length") && msg.contains("12 tokens"),
            "{msg}"
        );
    }

    #[test]
    fn min_over_max() {
        let d = defaults(&[]);
        let p = params(json!({"min_new_tokens": 30, "max_new_tokens": 20})).unwrap();
        assert!(matches!(
            d.resolve(&p, 5, 2048, "i"),
            Err(ValidationError::MinOverMax { .. })
        ));
        // A default minimum above an explicit maximum is an error too; a default one is clamped.
        let d = defaults(&["--min-new-tokens", "40", "--max-new-tokens", "30"]);
        let plan = d.resolve(&RequestParams::default(), 5, 2048, "i").unwrap();
        assert_eq!(plan.sampling.min_new_tokens, 30);
    }

    #[test]
    fn field_errors_name_field_and_range() {
        let cases = [
            (json!({"temperature": -1}), "parameters.temperature", ">= 0"),
            (
                json!({"temperature": "hot"}),
                "parameters.temperature",
                "a number",
            ),
            (json!({"top_p": 0}), "parameters.top_p", "(0, 1]"),
            (json!({"top_p": 1.5}), "parameters.top_p", "(0, 1]"),
            (json!({"top_k": -3}), "parameters.top_k", ">= 0"),
            (json!({"top_k": 2.5}), "parameters.top_k", "integer"),
            (
                json!({"repetition_penalty": 0}),
                "parameters.repetition_penalty",
                "> 0",
            ),
            (json!({"max_length": 0}), "parameters.max_length", "[1,"),
            (
                json!({"num_return_sequences": 17}),
                "parameters.num_return_sequences",
                "[1, 16]",
            ),
            (
                json!({"do_sample": "yes"}),
                "parameters.do_sample",
                "boolean",
            ),
            (json!({"stop": [1]}), "parameters.stop[0]", "string"),
            (json!({"stop": ""}), "parameters.stop[0]", "non-empty"),
            (
                json!({"temprature": 1}),
                "parameters.temprature",
                "known parameters",
            ),
            (
                json!({"max_length": 10, "max_new_tokens": 5}),
                "parameters.max_length",
                "only one",
            ),
        ];
        for (body, field, needle) in cases {
            let msg = params(body.clone()).unwrap_err().to_string();
            assert!(msg.contains(field) && msg.contains(needle), "{body}: {msg}");
        }
    }

    #[test]
    fn nulls_are_absent_and_integral_floats_accepted() {
        let p = params(json!({"temperature": null, "max_length": 100.0})).unwrap();
        assert_eq!(p.temperature, None);
        assert_eq!(p.max_length, Some(100));
    }

    #[test]
    fn seeds_derive_per_sequence() {
        let d = defaults(&[]);
        let p = params(json!({"seed": 7, "num_return_sequences": 3})).unwrap();
        let plan = d.resolve(&p, 5, 2048, "i").unwrap();
        assert_eq!(plan.seeds, vec![7, 8, 9]);
        assert_eq!(plan.sampling_for(2).seed, 9);
    }

    #[test]
    fn aliases() {
        let obj = json!({"max_tokens": 5});
        let p = RequestParams::from_object(
            obj.as_object().unwrap(),
            "parameters",
            &[("max_tokens", "max_new_tokens")],
            4,
        )
        .unwrap();
        assert_eq!(p.max_new_tokens, Some(5));
        let obj = json!({"max_tokens": 5, "max_new_tokens": 6});
        assert!(RequestParams::from_object(
            obj.as_object().unwrap(),
            "parameters",
            &[("max_tokens", "max_new_tokens")],
            4
        )
        .is_err());
    }

    #[test]
    fn bad_defaults_name_the_flag() {
        let e = Defaults::from_args(&T::parse_from(["t", "--top-p", "2"]).g).unwrap_err();
        assert!(e.contains("top_p"), "{e}");
    }
}
