//! The generation parameters: one table ([`PARAMETERS`]) of every parameter's name, the
//! values it takes and where its default comes from, which every protocol's parser and the
//! API docs draw from, and [`RequestParams`], what a request set.
//!
//! A protocol names the parameters its own way ([`Dialect`]): KServe puts them in a
//! `parameters` object under HuggingFace's names, OpenAI at the top level under its own
//! (`max_tokens`, `n`, `echo`). The dialect maps wire names to the table's, and back for
//! messages, so a range is stated once however many protocols accept the parameter.

use serde_json::{Map, Value};

use super::json::{
    read_bool, read_float, read_logit_bias, read_stop, read_string, read_token_ids, read_uint,
};
use super::ValidationError;
use crate::cli::GenerationArgs;

type Result<T, E = ValidationError> = std::result::Result<T, E>;

/// Upper bound accepted for length fields before the per-prompt checks (the context window
/// decides the real limit).
pub const MAX_LENGTH_FIELD: u64 = 1 << 20;

/// A request's generation parameters, type- and range-checked, all optional (absent: the
/// server's default applies).
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
    /// The request's prefix-cache salt.
    pub cache_salt: Option<String>,
    /// End-of-text does not end the sequence: it runs to its maximum (vLLM's `ignore_eos`).
    pub ignore_eos: Option<bool>,
    /// Token ids that end the sequence when generated (vLLM's `stop_token_ids`).
    pub stop_token_ids: Option<Vec<u32>>,
    /// OpenAI's presence penalty, in [-2, 2].
    pub presence_penalty: Option<f32>,
    /// OpenAI's frequency penalty, in [-2, 2].
    pub frequency_penalty: Option<f32>,
    /// OpenAI's logit bias: (token id, bias in [-100, 100]).
    pub logit_bias: Option<Vec<(u32, f32)>>,
    /// Report log-probabilities with this many alternatives per token (OpenAI's legacy
    /// completions `logprobs`).
    pub logprobs: Option<usize>,
}

/// Limits that depend on the server's flags.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most sequences one request may ask for (`--max-sequences-per-request`): the upper
    /// bound of `num_return_sequences`.
    pub max_sequences: usize,
    /// Most prompts (instances) in one request (`--max-instances`).
    pub max_prompts: usize,
}

/// The values a parameter takes, and where a parsed value is stored.
#[derive(Clone, Copy)]
pub enum Kind {
    /// An integer in `[min, max]`.
    Uint {
        /// Smallest value.
        min: u64,
        /// Largest value.
        max: UintMax,
        /// Stores the value.
        store: fn(&mut RequestParams, u64),
    },
    /// A finite number.
    Float {
        /// Which numbers.
        range: FloatRange,
        /// Stores the value.
        store: fn(&mut RequestParams, f64),
    },
    /// A boolean.
    Bool {
        /// Stores the value.
        store: fn(&mut RequestParams, bool),
    },
    /// One string or an array of them ([`read_stop`]'s rules).
    Stop {
        /// Stores the value.
        store: fn(&mut RequestParams, Vec<String>),
    },
    /// A non-empty string of at most [`MAX_TEXT_LEN`] bytes.
    Text {
        /// Stores the value.
        store: fn(&mut RequestParams, String),
    },
    /// OpenAI's `logit_bias` object ([`read_logit_bias`]'s rules).
    Bias {
        /// Stores the value.
        store: fn(&mut RequestParams, Vec<(u32, f32)>),
    },
    /// An array of token ids ([`read_token_ids`]'s rules; the vocabulary is checked when
    /// the job is submitted).
    TokenIds {
        /// Stores the value.
        store: fn(&mut RequestParams, Vec<u32>),
    },
}

/// Longest text parameter, in bytes.
pub const MAX_TEXT_LEN: usize = 256;

/// The upper bound of an integer parameter.
#[derive(Debug, Clone, Copy)]
pub enum UintMax {
    /// No bound.
    None,
    /// [`MAX_LENGTH_FIELD`]; the context window is checked per prompt.
    Length,
    /// [`Limits::max_sequences`].
    Sequences,
    /// This number.
    At(u64),
}

/// The numbers a float parameter takes.
#[derive(Debug, Clone, Copy)]
pub enum FloatRange {
    /// `>= 0`.
    NonNegative,
    /// `> 0`.
    Positive,
    /// `(0, 1]`.
    UnitInterval,
    /// `[-2, 2]` (OpenAI's penalties).
    Penalty,
}

impl FloatRange {
    /// The range in words, as messages and docs say it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::NonNegative => "a number >= 0",
            Self::Positive => "a number > 0",
            Self::UnitInterval => "a number in (0, 1]",
            Self::Penalty => "a number in [-2, 2]",
        }
    }

    fn contains(self, x: f64) -> bool {
        match self {
            Self::NonNegative => x >= 0.0,
            Self::Positive => x > 0.0,
            Self::UnitInterval => x > 0.0 && x <= 1.0,
            Self::Penalty => (-2.0..=2.0).contains(&x),
        }
    }
}

/// One generation parameter.
pub struct Param {
    /// Its name (HuggingFace's, as KServe V1 takes it).
    pub name: &'static str,
    /// What it takes.
    pub kind: Kind,
    /// The flag whose value applies when a request does not set it.
    pub default_flag: &'static str,
    /// That flag's value, for the docs (`None`: unset).
    pub default: fn(&GenerationArgs) -> Option<String>,
    /// One line for the docs.
    pub doc: &'static str,
}

/// Every generation parameter. The order is the docs' order.
pub const PARAMETERS: &[Param] = &[
    Param::uint("max_length", 1, UintMax::Length, |p, v| p.max_length = Some(v as usize))
        .default("--max-length", |a| a.max_length.map(|v| v.to_string()))
        .doc("total length at most, prompt included (HuggingFace's `max_length`)"),
    Param::uint("min_length", 0, UintMax::Length, |p, v| p.min_length = Some(v as usize))
        .default("--min-length", |a| a.min_length.map(|v| v.to_string()))
        .doc("total length at least, prompt included; end-of-text is suppressed until then"),
    Param::uint("max_new_tokens", 1, UintMax::Length, |p, v| {
        p.max_new_tokens = Some(v as usize)
    })
    .default("--max-new-tokens", |a| Some(a.max_new_tokens.to_string()))
    .doc("new tokens at most (instead of `max_length`)"),
    Param::uint("min_new_tokens", 0, UintMax::Length, |p, v| {
        p.min_new_tokens = Some(v as usize)
    })
    .default("--min-new-tokens", |a| Some(a.min_new_tokens.to_string()))
    .doc("new tokens at least (instead of `min_length`)"),
    Param::bool("do_sample", |p, v| p.do_sample = Some(v))
        .default("--do-sample", |a| Some(a.do_sample.to_string()))
        .doc("sample (true) or decode greedily (false)"),
    Param::float("temperature", FloatRange::NonNegative, |p, v| p.temperature = Some(v as f32))
        .default("--temperature", |a| Some(a.temperature.to_string()))
        .doc("logits are divided by it; 0 is greedy"),
    Param::uint("top_k", 0, UintMax::None, |p, v| {
        p.top_k = Some(v.min(u64::from(u32::MAX)) as usize)
    })
    .default("--top-k", |a| Some(a.top_k.to_string()))
    .doc("keep the k most likely tokens; 0 turns it off"),
    Param::float("top_p", FloatRange::UnitInterval, |p, v| p.top_p = Some(v as f32))
        .default("--top-p", |a| Some(a.top_p.to_string()))
        .doc("nucleus sampling mass; 1 turns it off"),
    Param::float("repetition_penalty", FloatRange::Positive, |p, v| {
        p.repetition_penalty = Some(v as f32)
    })
    .default("--repetition-penalty", |a| Some(a.repetition_penalty.to_string()))
    .doc("HuggingFace's penalty on tokens already in the context; 1 turns it off"),
    Param::uint("seed", 0, UintMax::None, |p, v| p.seed = Some(v))
        .default("--seed", |a| a.seed.map(|v| v.to_string()))
        .doc("seed of the first sequence (sequence j uses seed + j); random without one"),
    Param::uint("num_return_sequences", 1, UintMax::Sequences, |p, v| {
        p.num_return_sequences = Some(v as usize)
    })
    .default("--num-return-sequences", |a| Some(a.num_return_sequences.to_string()))
    .doc("sequences to generate for each prompt"),
    Param::stop("stop", |p, v| p.stop = Some(v)).doc(
        "stop strings (up to 8, each 1 to 256 bytes): generation ends at the first; it is not returned",
    ),
    Param::bool("return_full_text", |p, v| p.return_full_text = Some(v))
        .default("--return-full-text", |a| Some(a.return_full_text.to_string()))
        .doc("whether the returned text starts with the prompt (the flag is V1's default; OIP and OpenAI default to false)"),
    Param::text("cache_salt", |p, v| p.cache_salt = Some(v)).doc(
        "vLLM's prefix-cache salt: the request reuses cached prompt prefixes only of requests with the same salt (and tenant)",
    ),
    Param::bool("ignore_eos", |p, v| p.ignore_eos = Some(v))
        .doc("keep generating past end-of-text, up to the maximum (vLLM's; `true` sets the minimum to the maximum)"),
    Param::token_ids("stop_token_ids", |p, v| p.stop_token_ids = Some(v))
        .doc("token ids (up to 64, each in the vocabulary) that end generation when produced; the token's text is not returned (vLLM's)"),
    Param::float("presence_penalty", FloatRange::Penalty, |p, v| {
        p.presence_penalty = Some(v as f32)
    })
    .doc("OpenAI's: subtracted once from the logit of every token already generated; 0 turns it off"),
    Param::float("frequency_penalty", FloatRange::Penalty, |p, v| {
        p.frequency_penalty = Some(v as f32)
    })
    .doc("OpenAI's: subtracted from a token's logit once per time it was generated; 0 turns it off"),
    Param::bias("logit_bias", |p, v| p.logit_bias = Some(v))
        .doc("OpenAI's: added to the logits of the given token ids (keys are ids as strings)"),
    Param::uint("logprobs", 0, UintMax::At(MAX_LOGPROBS), |p, v| p.logprobs = Some(v as usize))
        .doc("OpenAI completions only: report each token's log-probability and this many most likely alternatives (with `echo`, the prompt's too)"),
];

/// The most alternatives `logprobs` may ask for (OpenAI's legacy completions limit).
pub const MAX_LOGPROBS: u64 = 5;

/// The parameter named `name` in the table.
pub fn param(name: &str) -> Option<&'static Param> {
    PARAMETERS.iter().find(|p| p.name == name)
}

impl Param {
    const fn new(name: &'static str, kind: Kind) -> Self {
        Self {
            name,
            kind,
            default_flag: "",
            default: |_| None,
            doc: "",
        }
    }

    const fn uint(
        name: &'static str,
        min: u64,
        max: UintMax,
        store: fn(&mut RequestParams, u64),
    ) -> Self {
        Self::new(name, Kind::Uint { min, max, store })
    }

    const fn float(
        name: &'static str,
        range: FloatRange,
        store: fn(&mut RequestParams, f64),
    ) -> Self {
        Self::new(name, Kind::Float { range, store })
    }

    const fn bool(name: &'static str, store: fn(&mut RequestParams, bool)) -> Self {
        Self::new(name, Kind::Bool { store })
    }

    const fn stop(name: &'static str, store: fn(&mut RequestParams, Vec<String>)) -> Self {
        Self::new(name, Kind::Stop { store })
    }

    const fn text(name: &'static str, store: fn(&mut RequestParams, String)) -> Self {
        Self::new(name, Kind::Text { store })
    }

    const fn bias(name: &'static str, store: fn(&mut RequestParams, Vec<(u32, f32)>)) -> Self {
        Self::new(name, Kind::Bias { store })
    }

    const fn token_ids(name: &'static str, store: fn(&mut RequestParams, Vec<u32>)) -> Self {
        Self::new(name, Kind::TokenIds { store })
    }

    /// The flag that sets the default, and how to read its value from the parsed flags.
    const fn default(
        self,
        flag: &'static str,
        value: fn(&GenerationArgs) -> Option<String>,
    ) -> Self {
        Self {
            default_flag: flag,
            default: value,
            ..self
        }
    }

    const fn doc(self, doc: &'static str) -> Self {
        Self { doc, ..self }
    }

    /// The range in words, as messages and docs say it.
    pub fn range(&self, limits: Limits) -> String {
        match self.kind {
            Kind::Uint { min, max, .. } => match max {
                UintMax::None => format!("an integer >= {min}"),
                UintMax::Length => format!("an integer in [{min}, {MAX_LENGTH_FIELD}]"),
                UintMax::Sequences => format!("an integer in [{min}, {}]", limits.max_sequences),
                UintMax::At(max) => format!("an integer in [{min}, {max}]"),
            },
            Kind::Float { range, .. } => range.describe().to_owned(),
            Kind::Bool { .. } => "a boolean".to_owned(),
            Kind::Stop { .. } => "a string or an array of strings".to_owned(),
            Kind::Text { .. } => format!("a string of 1 to {MAX_TEXT_LEN} bytes"),
            Kind::TokenIds { .. } => "an array of integers >= 0".to_owned(),
            Kind::Bias { .. } => {
                "an object from token ids to numbers in [-100, 100] (at most 300)".to_owned()
            }
        }
    }

    /// Reads `v` (at `field`, for messages) and stores it in `p`.
    fn read_into(
        &self,
        p: &mut RequestParams,
        field: &str,
        v: &Value,
        limits: Limits,
    ) -> Result<()> {
        match self.kind {
            Kind::Uint { min, max, store } => {
                let max = match max {
                    UintMax::None => u64::MAX,
                    UintMax::Length => MAX_LENGTH_FIELD,
                    UintMax::Sequences => limits.max_sequences as u64,
                    UintMax::At(max) => max,
                };
                store(p, read_uint(field, v, min, max)?);
            }
            Kind::Float { range, store } => store(
                p,
                read_float(field, v, range.describe(), |x| range.contains(x))?,
            ),
            Kind::Bool { store } => store(p, read_bool(field, v)?),
            Kind::Stop { store } => store(p, read_stop(field, v)?),
            Kind::Text { store } => {
                let text = read_string(field, v)?;
                if text.is_empty() || text.len() > MAX_TEXT_LEN {
                    return Err(ValidationError::OutOfRange {
                        field: field.into(),
                        range: self.range(limits),
                        value: super::describe(v),
                    });
                }
                store(p, text.to_owned())
            }
            Kind::TokenIds { store } => store(p, read_token_ids(field, v)?),
            Kind::Bias { store } => store(p, read_logit_bias(field, v)?),
        }
        Ok(())
    }
}

/// How a protocol names the parameters on the wire.
#[derive(Debug, Clone, Copy)]
pub struct Dialect {
    /// The object the parameters sit in (`parameters`), or `""` for the top level.
    pub prefix: &'static str,
    /// Wire names that differ from the table's: `(wire, table)`.
    pub aliases: &'static [(&'static str, &'static str)],
    /// Which of the table's own names the wire accepts as they are.
    pub names: Names,
}

/// Which of the table's names a dialect accepts under their own name.
#[derive(Debug, Clone, Copy)]
pub enum Names {
    /// Every one but [`ONLY_NAMED`].
    All,
    /// Only these (the others only through an alias, or not at all).
    Only(&'static [&'static str]),
}

/// Parameters a dialect takes only by naming them in [`Names::Only`]: `logprobs` has a place
/// in OpenAI's completions answer and none in KServe's V1 or V2 answers.
pub const ONLY_NAMED: &[&str] = &["logprobs"];

impl Names {
    fn contains(self, name: &str) -> bool {
        match self {
            Names::All => !ONLY_NAMED.contains(&name),
            Names::Only(list) => list.contains(&name),
        }
    }
}

impl Dialect {
    /// The table's parameter that wire name `wire` sets, if any.
    pub fn lookup(&self, wire: &str) -> Option<&'static Param> {
        if let Some((_, to)) = self.aliases.iter().find(|(a, _)| *a == wire) {
            return param(to);
        }
        self.names.contains(wire).then(|| param(wire)).flatten()
    }

    /// The wire name of the table's parameter `name`: its own where the dialect accepts it,
    /// else its alias.
    pub fn wire_name(&self, name: &'static str) -> &'static str {
        if self.names.contains(name) {
            return name;
        }
        self.aliases
            .iter()
            .find(|(_, to)| *to == name)
            .map_or(name, |(a, _)| a)
    }

    /// The path of wire name `wire` in a request (`parameters.top_p`, or `top_p`).
    pub fn path_of_wire(&self, wire: &str) -> String {
        if self.prefix.is_empty() {
            wire.to_owned()
        } else {
            format!("{}.{wire}", self.prefix)
        }
    }

    /// The path of the table's parameter `name` in a request, for messages.
    pub fn path(&self, name: &'static str) -> String {
        self.path_of_wire(self.wire_name(name))
    }

    /// Every wire name the dialect accepts, for "known parameters" messages.
    pub fn known(&self) -> Vec<&'static str> {
        let mut out: Vec<&str> = PARAMETERS
            .iter()
            .map(|p| p.name)
            .filter(|n| self.names.contains(n))
            .collect();
        out.extend(self.aliases.iter().map(|(a, _)| *a));
        out
    }
}

/// Parses generation parameters as a protocol sends them, field by field, and checks the
/// pairs that set one limit two ways.
#[derive(Debug)]
pub struct ParamsReader {
    dialect: Dialect,
    limits: Limits,
    params: RequestParams,
    /// Table names already set, with the wire name that set them.
    seen: Vec<(&'static str, String)>,
}

impl ParamsReader {
    /// A reader for `dialect`.
    pub fn new(dialect: Dialect, limits: Limits) -> Self {
        Self {
            dialect,
            limits,
            params: RequestParams::default(),
            seen: Vec::new(),
        }
    }

    /// Reads wire field `wire`. `Ok(false)` if the dialect has no such parameter (the caller
    /// decides whether that is an error: a protocol has fields of its own). A null value
    /// counts as absent.
    pub fn read(&mut self, wire: &str, v: &Value) -> Result<bool> {
        let Some(param) = self.dialect.lookup(wire) else {
            return Ok(false);
        };
        if v.is_null() {
            return Ok(true);
        }
        let field = self.dialect.path_of_wire(wire);
        if let Some((_, other)) = self.seen.iter().find(|(n, _)| *n == param.name) {
            return Err(ValidationError::Conflict {
                a: self.dialect.path_of_wire(other),
                b: field,
            });
        }
        param.read_into(&mut self.params, &field, v, self.limits)?;
        self.seen.push((param.name, wire.to_owned()));
        Ok(true)
    }

    /// Reads a whole `parameters` object: every key must be a parameter.
    pub fn read_object(mut self, obj: &Map<String, Value>) -> Result<RequestParams> {
        for (k, v) in obj {
            if !self.read(k, v)? {
                return Err(self.unknown(k, &[]));
            }
        }
        self.finish()
    }

    /// The error for an unknown field `wire`; `also` lists the protocol's own fields.
    pub fn unknown(&self, wire: &str, also: &[&str]) -> ValidationError {
        let mut known: Vec<&str> = also.to_vec();
        known.extend(self.dialect.known());
        ValidationError::UnknownField {
            field: self.dialect.path_of_wire(wire),
            known: known.join(", "),
        }
    }

    /// The parameters as far as read, for a protocol to adjust before [`Self::finish`].
    pub fn params_mut(&mut self) -> &mut RequestParams {
        &mut self.params
    }

    /// Checks the pairs (`max_length` or `max_new_tokens`, not both) and returns the
    /// parameters.
    pub fn finish(self) -> Result<RequestParams> {
        let p = &self.params;
        let path = |n| self.dialect.path(n);
        if p.max_length.is_some() && p.max_new_tokens.is_some() {
            return Err(ValidationError::Conflict {
                a: path("max_length"),
                b: path("max_new_tokens"),
            });
        }
        if p.min_length.is_some() && p.min_new_tokens.is_some() {
            return Err(ValidationError::Conflict {
                a: path("min_length"),
                b: path("min_new_tokens"),
            });
        }
        Ok(self.params)
    }
}

/// The parameters table as Markdown, for docs/api.md (a test keeps the two equal), with the
/// defaults `defaults` gives.
pub fn markdown(limits: Limits, defaults: &GenerationArgs) -> String {
    let mut out = String::from(
        "| parameter | values | server default (flag) | meaning |\n|---|---|---|---|\n",
    );
    for p in PARAMETERS {
        let range = match p.kind {
            Kind::Uint {
                max: UintMax::Sequences,
                ..
            } => "an integer in [1, `--max-sequences-per-request`]".to_owned(),
            _ => p.range(limits),
        };
        let value = (p.default)(defaults).map_or("none".to_owned(), |v| format!("`{v}`"));
        let default = if p.default_flag.is_empty() {
            value
        } else {
            format!("{value} (`{}`)", p.default_flag)
        };
        out.push_str(&format!(
            "| `{}` | {range} | {default} | {} |\n",
            p.name, p.doc
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KSERVE: Dialect = Dialect {
        prefix: "parameters",
        aliases: &[],
        names: Names::All,
    };

    fn params(v: Value) -> Result<RequestParams> {
        ParamsReader::new(
            KSERVE,
            Limits {
                max_sequences: 16,
                max_prompts: 4,
            },
        )
        .read_object(v.as_object().unwrap())
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
            (
                json!({"stop_token_ids": 5}),
                "parameters.stop_token_ids",
                "an array",
            ),
            (
                json!({"stop_token_ids": [1, -2]}),
                "parameters.stop_token_ids[1]",
                "[0, 4294967295]",
            ),
            (
                json!({"stop_token_ids": vec![1; 65]}),
                "parameters.stop_token_ids",
                "at most 64",
            ),
            (
                json!({"ignore_eos": "yes"}),
                "parameters.ignore_eos",
                "boolean",
            ),
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
    fn aliases_and_restricted_names() {
        const OIP: Dialect = Dialect {
            prefix: "parameters",
            aliases: &[("max_tokens", "max_new_tokens")],
            names: Names::All,
        };
        let read = |d: Dialect, v: Value| {
            ParamsReader::new(
                d,
                Limits {
                    max_sequences: 4,
                    max_prompts: 4,
                },
            )
            .read_object(v.as_object().unwrap())
        };
        assert_eq!(
            read(OIP, json!({"max_tokens": 5})).unwrap().max_new_tokens,
            Some(5)
        );
        let e = read(OIP, json!({"max_tokens": 5, "max_new_tokens": 6})).unwrap_err();
        assert!(matches!(e, ValidationError::Conflict { .. }), "{e}");
        const TOP: Dialect = Dialect {
            prefix: "",
            aliases: &[("n", "num_return_sequences")],
            names: Names::Only(&["top_p"]),
        };
        assert!(TOP.lookup("num_return_sequences").is_none());
        assert_eq!(
            TOP.lookup("n").map(|p| p.name),
            Some("num_return_sequences")
        );
        assert_eq!(TOP.path("num_return_sequences"), "n");
        assert_eq!(TOP.path("top_p"), "top_p");
        let e = read(TOP, json!({"n": 9})).unwrap_err().to_string();
        assert!(e.contains("`n` must be an integer in [1, 4]"), "{e}");
    }

    #[test]
    fn every_parameter_is_in_the_table_once() {
        let mut names: Vec<_> = PARAMETERS.iter().map(|p| p.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), PARAMETERS.len());
    }

    /// docs/api.md carries the table as [`markdown`] prints it.
    #[test]
    fn docs_list_every_parameter() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            g: GenerationArgs,
        }
        let docs = include_str!("../../../docs/api.md");
        let table = markdown(
            Limits {
                max_sequences: 64,
                max_prompts: 32,
            },
            &T::parse_from(["t"]).g,
        );
        assert!(
            docs.contains(&table),
            "docs/api.md must contain the parameters table exactly as generated:\n{table}"
        );
    }
}
