//! Every way a request can be malformed or out of range, as one error type whose messages
//! name the field (`parameters.top_p`), the allowed range and the value given, and, for
//! per-prompt checks, the prompt (`instance 2`).

/// Names prompt `i` in messages (`instance 2`, `prompt 0`): each protocol's own word.
pub type PromptName = fn(usize) -> String;

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
    /// A prompt so long in bytes that it has more tokens than the context window, refused
    /// before tokenizing.
    #[error(
        "{at}: the prompt is {bytes} bytes, more than the {max_bytes} bytes that the context \
         window's tokens can hold; shorten it"
    )]
    PromptTooManyBytes {
        /// Which prompt.
        at: String,
        /// Its length in bytes.
        bytes: usize,
        /// The most bytes a prompt that fits can have.
        max_bytes: usize,
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
    /// A sequence could never fit in the KV cache, even alone.
    #[error(
        "{at}: the request needs {needed_blocks} KV-cache blocks ({tokens} tokens: prompt plus \
         new tokens) but the whole cache has {total_blocks}: shorten the prompt, ask for fewer \
         new tokens, or give the server more KV memory (--kv-cache-memory)"
    )]
    ExceedsKvCache {
        /// Which prompt.
        at: String,
        /// Token slots the sequence needs at most.
        tokens: usize,
        /// Blocks that takes.
        needed_blocks: usize,
        /// Blocks in the pool.
        total_blocks: usize,
    },
    /// The scheduler refused the job as malformed (a check the server missed).
    #[error("{at}: {message}")]
    Refused {
        /// Which prompt.
        at: String,
        /// The scheduler's reason.
        message: String,
    },
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
