/*!
OpenAI-compatible completions, mounted under `/openai` as KServe does, and at OpenAI's own
`/v1/completions`.

- `GET /openai/v1/models`: `{"object": "list", "data": [{"id": "<name>", ...}]}`;
  `GET /openai/v1/models/{id}`: that model object, 404 for another id.
- `POST /openai/v1/completions` (and `/v1/completions`): `prompt` (a string, an array of
  strings, an array of token ids or an array of such arrays), `max_tokens`, `temperature`
  (0 is greedy), `top_p`, `n`, `stop`, `seed`, `echo`, `logprobs` (0 to 5; with `echo`, over
  the prompt too: see [`logprobs`]), `stream`, `stream_options.include_usage`,
  `presence_penalty`, `frequency_penalty`, `logit_bias`, plus the extensions `top_k`,
  `repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`, `cache_salt`. Fields
  OpenAI defines that we do not implement (`suffix`, `best_of` > 1) are refused with a
  message rather than ignored.

Streaming sends one chunk per piece of text (with `logprobs`, one per token, its text possibly
empty, and an echoed prompt comes in one chunk with its tokens' log-probabilities), then for each choice a chunk with empty text and
its `finish_reason` (never merged into a text chunk), then the usage chunk when
`stream_options.include_usage` is set, then `data: [DONE]`.
*/

pub mod chat;
pub mod logprobs;
pub mod tokenize;

use axum::extract::{Path, State};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gptj_scheduler::{FinishReason, TokenLogprob, Usage};
use serde_json::{json, Map, Value};

use crate::error::Wire;
use crate::generation::{Generation, Prompts};
use crate::params::json::{read_bool, read_string, read_strings, read_uint};
use crate::params::{describe, Dialect, Limits, Names, ParamsReader, ValidationError};
use crate::pipeline::{check_model, generate, usage_json, Meta, Outcome, Protocol, Start};
use crate::sse::{json_event, Shaper};
use crate::state::AppState;
use logprobs::Listing;

/// The OpenAI routes; all of them need a key, as OpenAI's own do. Generation routes are also
/// at `/v1/...` (OpenAI's own paths, where clients configured with a bare host look); the
/// model routes are not, since `/v1/models...` is KServe V1's, which answers in both shapes
/// ([`super::kserve_v1`]).
pub fn routes() -> Router<AppState> {
    super::group()
        .route("/openai/v1/models", get(list_models))
        .route("/openai/v1/models/{id}", get(retrieve_model))
        .route("/openai/v1/completions", post(generate::<Completions>))
        .route("/v1/completions", post(generate::<Completions>))
        .route(
            "/openai/v1/chat/completions",
            post(generate::<chat::ChatCompletions>),
        )
        .route(
            "/v1/chat/completions",
            post(generate::<chat::ChatCompletions>),
        )
        .merge(tokenize::routes())
}

/// The served model as OpenAI's `model` object.
pub fn model_object(name: &str) -> Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": "gptj"})
}

async fn list_models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [model_object(&state.config().model_name)],
    }))
}

async fn retrieve_model(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match check_model(&state, &id) {
        Ok(()) => Json(model_object(&id)).into_response(),
        Err(e) => e.into_response(Wire::OpenAi),
    }
}

/// A parsed completions body.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// The prompts, parameters and whether to stream.
    pub generation: Generation,
    /// Send a usage chunk before `[DONE]`.
    pub include_usage: bool,
}

/// The fields of a completions body that are not generation parameters.
const OWN_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "stream",
    "stream_options",
    "user",
    "best_of",
    "suffix",
];

/// The table's parameters completions take (OpenAI's, and vLLM's extensions); chat takes the
/// same but `logprobs`, which means something else there.
const COMPLETION_PARAMS: &[&str] = &[
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "stop",
    "cache_salt",
    "ignore_eos",
    "stop_token_ids",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
];

/// [`COMPLETION_PARAMS`] without `logprobs`.
const CHAT_PARAMS: &[&str] = COMPLETION_PARAMS.split_at(COMPLETION_PARAMS.len() - 1).0;

/// `POST /openai/v1/completions`.
pub struct Completions;

impl Protocol for Completions {
    const WIRE: Wire = Wire::OpenAi;
    const DIALECT: Dialect = Dialect {
        prefix: "",
        aliases: &[
            ("max_tokens", "max_new_tokens"),
            ("min_tokens", "min_new_tokens"),
            ("n", "num_return_sequences"),
            ("echo", "return_full_text"),
        ],
        names: Names::Only(COMPLETION_PARAMS),
    };
    type Request = CompletionRequest;

    fn prompt_name(i: usize) -> String {
        format!("prompt {i}")
    }

    fn parse(
        body: &Map<String, Value>,
        limits: Limits,
    ) -> Result<CompletionRequest, ValidationError> {
        let mut reader = ParamsReader::new(Self::DIALECT, limits);
        let mut model = None;
        let mut prompts = None;
        let mut stream = false;
        let mut include_usage = false;
        let unsupported = |field: &str, message: &str| ValidationError::Unsupported {
            field: field.into(),
            message: message.into(),
        };
        for (key, v) in body {
            let f = key.as_str();
            if reader.read(f, v)? || v.is_null() {
                continue;
            }
            match f {
                "model" => model = Some(read_string(f, v)?.to_owned()),
                "prompt" => prompts = Some(parse_prompts(v, limits.max_prompts)?),
                "stream" => stream = read_bool(f, v)?,
                "stream_options" => include_usage = parse_stream_options(v)?,
                "user" => {
                    read_string(f, v)?;
                }
                "suffix" => return Err(unsupported(f, "suffixes (insertion) are not supported")),
                "best_of" => {
                    if read_uint(f, v, 1, u64::MAX)? != 1 {
                        return Err(unsupported(
                            f,
                            "only 1 is supported; use `n` for several choices",
                        ));
                    }
                }
                other => return Err(reader.unknown(other, OWN_FIELDS)),
            }
        }
        let prompts = prompts.ok_or_else(|| ValidationError::Missing {
            field: "prompt".into(),
            what: PROMPT_SHAPES,
        })?;
        // OpenAI samples unless the temperature is 0, and returns the completion alone.
        let p = reader.params_mut();
        p.do_sample = Some(p.temperature != Some(0.0));
        p.return_full_text.get_or_insert(false);
        let params = reader.finish()?;
        Ok(CompletionRequest {
            generation: Generation {
                model,
                prompts,
                params,
                stream,
            },
            include_usage,
        })
    }

    fn generation(req: &CompletionRequest) -> &Generation {
        &req.generation
    }

    fn render(_: &CompletionRequest, out: &Outcome<'_>) -> Value {
        let choices: Vec<Value> = out
            .finished
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let logprobs = out.submitted.plan(i).logprobs.map(|_| {
                    let (text, ids) = out.submitted.prompt(i);
                    let mut l = match &f.prompt_logprobs {
                        Some(prompt) => Listing::prompt(out.tokenizer, ids, prompt)
                            .resume_at(text.chars().count()),
                        None => Listing::at(text.chars().count()),
                    };
                    for lp in &f.logprobs {
                        l.push(out.tokenizer, lp);
                    }
                    l.to_json()
                });
                json!({
                    "index": i,
                    "text": out.text(i),
                    "logprobs": logprobs,
                    "finish_reason": finish_reason(&f.reason),
                })
            })
            .collect();
        answer(
            head(completion_id, "text_completion", out.meta),
            choices,
            out,
        )
    }

    fn stream(req: &CompletionRequest, start: &Start<'_>) -> Option<Box<dyn Shaper>> {
        let head = head(completion_id, "text_completion", start.meta);
        let k = start.submitted.per_prompt.max(1);
        let seqs = start.prompts.len() * k;
        let with_logprobs = |seq: usize| start.submitted.plan(seq).logprobs.is_some();
        // An echo with log-probabilities is sent with them, when they come.
        let echo: Vec<usize> = (0..seqs)
            .filter(|&seq| start.submitted.echo(seq) && !with_logprobs(seq))
            .collect();
        let offsets = (0..seqs)
            .map(|seq| with_logprobs(seq).then(|| start.submitted.prompt(seq).0.chars().count()))
            .collect();
        Some(Box::new(CompletionShaper {
            tail: StreamTail::new(head, req.include_usage, start),
            prompts: start.prompts.to_vec(),
            prompt_ids: start.submitted.prompt_ids.clone(),
            per_prompt: k,
            echo: echo.into_iter(),
            tokenizer: start.tokenizer.clone(),
            offsets,
        }))
    }
}

fn completion_id(request_id: &str) -> String {
    format!("cmpl-{request_id}")
}

/// What OpenAI's answers and chunks open with: `id` (from the request id), `object`,
/// `created`, `model`.
pub(super) fn head(id: fn(&str) -> String, object: &str, meta: &Meta) -> Value {
    json!({
        "id": id(&meta.request_id),
        "object": object,
        "created": meta.created,
        "model": meta.model,
    })
}

/// An answer run to its end: `head` with its `choices` and the request's `usage`.
pub(super) fn answer(mut head: Value, choices: Vec<Value>, out: &Outcome<'_>) -> Value {
    head["choices"] = Value::Array(choices);
    head["usage"] = usage_json(out.submitted.total_prompt_tokens(), out.completion_tokens());
    head
}

fn parse_stream_options(v: &Value) -> Result<bool, ValidationError> {
    let obj = v.as_object().ok_or_else(|| ValidationError::WrongType {
        field: "stream_options".into(),
        expected: "an object",
        got: describe(v),
    })?;
    let mut include_usage = false;
    for (k, iv) in obj {
        match k.as_str() {
            "include_usage" => include_usage = read_bool("stream_options.include_usage", iv)?,
            other => {
                return Err(ValidationError::UnknownField {
                    field: format!("stream_options.{other}"),
                    known: "include_usage".into(),
                })
            }
        }
    }
    Ok(include_usage)
}

/// What `prompt` may be.
const PROMPT_SHAPES: &str =
    "a string, an array of strings, an array of token ids, or an array of arrays of token ids";

/// `prompt`: a string, strings, token ids (integers), or arrays of token ids. The first
/// element of an array says which.
fn parse_prompts(v: &Value, max_prompts: usize) -> Result<Prompts, ValidationError> {
    let wrong = |field: String, v: &Value| ValidationError::WrongType {
        field,
        expected: PROMPT_SHAPES,
        got: describe(v),
    };
    let a = match v {
        Value::String(s) => return Ok(Prompts::Text(vec![s.clone()])),
        Value::Array(a) => a,
        other => return Err(wrong("prompt".into(), other)),
    };
    if a.is_empty() {
        return Err(ValidationError::OutOfRange {
            field: "prompt".into(),
            range: "a non-empty array".into(),
            value: "[]".into(),
        });
    }
    match &a[0] {
        Value::String(_) | Value::Array(_) if a.len() > max_prompts => {
            Err(ValidationError::TooManyInstances {
                given: a.len(),
                max: max_prompts,
            })
        }
        Value::String(_) => Ok(Prompts::Text(read_strings("prompt", a, PROMPT_SHAPES)?)),
        Value::Number(_) => Ok(Prompts::Tokens(vec![read_token_ids("prompt", a)?])),
        Value::Array(_) => a
            .iter()
            .enumerate()
            .map(|(i, p)| match p {
                Value::Array(ids) => read_token_ids(&format!("prompt[{i}]"), ids),
                other => Err(wrong(format!("prompt[{i}]"), other)),
            })
            .collect::<Result<_, _>>()
            .map(Prompts::Tokens),
        other => Err(wrong("prompt[0]".into(), other)),
    }
}

/// An array of token ids (integers >= 0; the vocabulary is checked at submission).
fn read_token_ids(field: &str, items: &[Value]) -> Result<Vec<u32>, ValidationError> {
    items
        .iter()
        .enumerate()
        .map(|(k, v)| {
            v.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| ValidationError::WrongType {
                    field: format!("{field}[{k}]"),
                    expected: "a token id (an integer >= 0)",
                    got: describe(v),
                })
        })
        .collect()
}

fn finish_reason(r: &FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        _ => "stop",
    }
}

fn chunk(
    head: &Value,
    index: usize,
    text: &str,
    logprobs: Option<Value>,
    finish: Option<&str>,
) -> Event {
    let mut v = head.clone();
    v["choices"] = json!([{
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish,
    }]);
    json_event(&v)
}

struct CompletionShaper {
    tail: StreamTail,
    /// The prompts, for the echo; each choice's echo chunk is made when it is sent.
    prompts: Vec<String>,
    prompt_ids: Vec<Vec<u32>>,
    per_prompt: usize,
    /// The choices whose prompt is still to be echoed (ahead of any token).
    echo: std::vec::IntoIter<usize>,
    tokenizer: gptj_scheduler::Tokenizer,
    /// Per choice that asked for log-probabilities: where its next token's text starts.
    offsets: Vec<Option<usize>>,
}

impl Shaper for CompletionShaper {
    fn prelude(&mut self) -> Option<Event> {
        let seq = self.echo.next()?;
        Some(chunk(
            &self.tail.head,
            seq,
            &self.prompts[seq / self.per_prompt],
            None,
            None,
        ))
    }

    fn prompt_logprobs(&mut self, index: usize, logprobs: &[TokenLogprob]) -> Vec<Event> {
        let i = index / self.per_prompt.max(1);
        let prompt = Listing::prompt(&self.tokenizer, &self.prompt_ids[i], logprobs);
        let event = chunk(
            &self.tail.head,
            index,
            &self.prompts[i],
            Some(prompt.to_json()),
            None,
        );
        vec![event]
    }

    fn token(&mut self, index: usize, text: &str, logprob: Option<&TokenLogprob>) -> Vec<Event> {
        let logprobs = match (logprob, self.offsets.get_mut(index)) {
            (Some(lp), Some(Some(offset))) => {
                // One token per chunk: a listing of it at this choice's running offset.
                let mut one = Listing::at(*offset);
                one.push(&self.tokenizer, lp);
                *offset = one.offset();
                Some(one.to_json())
            }
            _ => None,
        };
        vec![chunk(&self.tail.head, index, text, logprobs, None)]
    }

    fn finished(&mut self, index: usize, reason: &FinishReason, usage: &Usage) -> Vec<Event> {
        self.tail.count(usage);
        vec![chunk(
            &self.tail.head,
            index,
            "",
            None,
            Some(finish_reason(reason)),
        )]
    }

    fn end(&mut self) -> Vec<Event> {
        self.tail.end()
    }
}

/// What every OpenAI stream (completions and chat) shares: the chunks' head, and the usage
/// it counts as sequences finish, sent before `[DONE]` when asked for.
pub(super) struct StreamTail {
    /// `id`, `object`, `created`, `model` of every chunk.
    pub head: Value,
    include_usage: bool,
    prompt_tokens: usize,
    completion_tokens: usize,
}

impl StreamTail {
    /// The tail of a stream that starts as `start`.
    pub fn new(head: Value, include_usage: bool, start: &Start<'_>) -> Self {
        Self {
            head,
            include_usage,
            prompt_tokens: start.submitted.total_prompt_tokens(),
            completion_tokens: 0,
        }
    }

    /// Counts a finished sequence's tokens.
    pub fn count(&mut self, usage: &Usage) {
        self.completion_tokens += usage.generated_tokens;
    }

    /// The usage chunk when asked for, then `[DONE]`.
    pub fn end(&self) -> Vec<Event> {
        let mut out = Vec::new();
        if self.include_usage {
            let mut v = self.head.clone();
            v["choices"] = json!([]);
            v["usage"] = usage_json(self.prompt_tokens, self.completion_tokens);
            out.push(json_event(&v));
        }
        out.push(Event::default().data("[DONE]"));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_body() {
        let limits = Limits {
            max_sequences: 8,
            max_prompts: 4,
        };
        let b = json!({"model": "m", "prompt": ["a", "b"], "max_tokens": 7, "temperature": 0, "n": 2, "stream": true, "stream_options": {"include_usage": true}, "presence_penalty": 0, "user": "u"});
        let r = Completions::parse(b.as_object().unwrap(), limits).unwrap();
        assert_eq!(r.generation.prompts.len(), 2);
        assert_eq!(r.generation.params.max_new_tokens, Some(7));
        assert_eq!(r.generation.params.do_sample, Some(false));
        assert!(r.generation.stream && r.include_usage);
    }
}
