/*!
OpenAI-compatible completions, mounted under `/openai` as KServe does.

- `GET /openai/v1/models`: `{"object": "list", "data": [{"id": "<name>", ...}]}`.
- `POST /openai/v1/completions`: `prompt` (a string or an array of strings), `max_tokens`,
  `temperature` (0 is greedy), `top_p`, `n`, `stop`, `seed`, `echo`, `stream`,
  `stream_options.include_usage`, plus the extensions `top_k`, `repetition_penalty`,
  `min_tokens`. Fields OpenAI defines that we do not implement (`logprobs`, `suffix`,
  `logit_bias`, non-zero `presence_penalty`/`frequency_penalty`, `best_of` > 1) are refused
  with a message rather than ignored.

Streaming sends one chunk per piece of text, then for each choice a chunk with empty text and
its `finish_reason` (never merged into a text chunk), then the usage chunk when
`stream_options.include_usage` is set, then `data: [DONE]`.
*/

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use gptj_scheduler::{FinishReason, Usage};
use serde_json::{json, Map, Value};

use super::{check_model, json_object, respond, tenant};
use crate::auth::KeyIndex;
use crate::error::{ApiError, Protocol};
use crate::generation::{collect_all, prepare, Submission};
use crate::params::{
    describe, read_bool, read_float, read_stop, read_string, read_uint, RequestParams,
    ValidationError, MAX_LENGTH_FIELD,
};
use crate::sse::{self, json_event, Shaper, StreamContext};
use crate::state::AppState;
use crate::telemetry::RequestRecord;

/// The OpenAI routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/openai/v1/models", get(list_models))
        .route("/openai/v1/completions", post(completions))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn list_models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.config().model_name,
            "object": "model",
            "created": 0,
            "owned_by": "gptj",
        }],
    }))
}

/// A parsed completions body.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// `model`, when given.
    pub model: Option<String>,
    /// The prompts.
    pub prompts: Vec<String>,
    /// Generation parameters.
    pub params: RequestParams,
    /// Stream the answer.
    pub stream: bool,
    /// Send a usage chunk before `[DONE]`.
    pub include_usage: bool,
}

/// OpenAI's names for our parameters, for error messages.
const WIRE_NAMES: &[(&str, &str)] = &[
    ("max_new_tokens", "max_tokens"),
    ("min_new_tokens", "min_tokens"),
    ("num_return_sequences", "n"),
    ("return_full_text", "echo"),
];

const KNOWN: &str = "model, prompt, max_tokens, temperature, top_p, n, stream, stream_options, \
                     stop, seed, echo, user, presence_penalty, frequency_penalty, logprobs, \
                     best_of, logit_bias, suffix, top_k, repetition_penalty, min_tokens";

/// Parses and checks a completions body.
pub fn parse_completion(
    body: &Map<String, Value>,
    max_prompts: usize,
    max_n: usize,
) -> Result<CompletionRequest, ValidationError> {
    let mut params = RequestParams {
        prefix: String::new(),
        wire_names: WIRE_NAMES,
        do_sample: Some(true),
        return_full_text: Some(false),
        ..Default::default()
    };
    let mut out = CompletionRequest {
        model: None,
        prompts: Vec::new(),
        params: RequestParams::default(),
        stream: false,
        include_usage: false,
    };
    let unsupported = |field: &str, message: &str| ValidationError::Unsupported {
        field: field.into(),
        message: message.into(),
    };
    let mut prompt_seen = false;
    for (key, v) in body {
        let f = key.as_str();
        if v.is_null() {
            continue;
        }
        match f {
            "model" => out.model = Some(read_string(f, v)?.to_owned()),
            "prompt" => {
                prompt_seen = true;
                out.prompts = parse_prompts(v, max_prompts)?;
            }
            "max_tokens" => {
                params.max_new_tokens = Some(read_uint(f, v, 1, MAX_LENGTH_FIELD)? as usize)
            }
            "min_tokens" => {
                params.min_new_tokens = Some(read_uint(f, v, 0, MAX_LENGTH_FIELD)? as usize)
            }
            "temperature" => {
                let t = read_float(f, v, "a number >= 0", |t| t >= 0.0)? as f32;
                params.temperature = Some(t);
            }
            "top_p" => {
                params.top_p =
                    Some(read_float(f, v, "a number in (0, 1]", |p| p > 0.0 && p <= 1.0)? as f32)
            }
            "top_k" => {
                params.top_k = Some(read_uint(f, v, 0, u64::MAX)?.min(u32::MAX as u64) as usize)
            }
            "repetition_penalty" => {
                params.repetition_penalty =
                    Some(read_float(f, v, "a number > 0", |r| r > 0.0)? as f32)
            }
            "n" => params.num_return_sequences = Some(read_uint(f, v, 1, max_n as u64)? as usize),
            "stream" => out.stream = read_bool(f, v)?,
            "stream_options" => {
                let obj = v.as_object().ok_or_else(|| ValidationError::WrongType {
                    field: f.into(),
                    expected: "an object",
                    got: describe(v),
                })?;
                for (k, iv) in obj {
                    match k.as_str() {
                        "include_usage" => {
                            out.include_usage = read_bool("stream_options.include_usage", iv)?
                        }
                        other => {
                            return Err(ValidationError::UnknownField {
                                field: format!("stream_options.{other}"),
                                known: "include_usage".into(),
                            })
                        }
                    }
                }
            }
            "stop" => params.stop = Some(read_stop(f, v)?),
            "seed" => params.seed = Some(read_uint(f, v, 0, u64::MAX)?),
            "echo" => params.return_full_text = Some(read_bool(f, v)?),
            "user" => {
                read_string(f, v)?;
            }
            "presence_penalty" | "frequency_penalty" => {
                if read_float(f, v, "a number in [-2, 2]", |p| (-2.0..=2.0).contains(&p))? != 0.0 {
                    return Err(unsupported(
                        f,
                        "only 0 is supported; use `repetition_penalty` (HuggingFace's, > 0, 1 = off)",
                    ));
                }
            }
            "logprobs" => return Err(unsupported(f, "log probabilities are not supported")),
            "suffix" => return Err(unsupported(f, "suffixes (insertion) are not supported")),
            "logit_bias" => {
                if v.as_object().is_none_or(|o| !o.is_empty()) {
                    return Err(unsupported(f, "logit bias is not supported"));
                }
            }
            "best_of" => {
                if read_uint(f, v, 1, u64::MAX)? != 1 {
                    return Err(unsupported(
                        f,
                        "only 1 is supported; use `n` for several choices",
                    ));
                }
            }
            other => {
                return Err(ValidationError::UnknownField {
                    field: other.into(),
                    known: KNOWN.into(),
                })
            }
        }
    }
    if !prompt_seen {
        return Err(ValidationError::Missing {
            field: "prompt".into(),
            what: "a string or an array of strings",
        });
    }
    if params.temperature == Some(0.0) {
        params.do_sample = Some(false);
    }
    params.check_pairs()?;
    out.params = params;
    Ok(out)
}

fn parse_prompts(v: &Value, max_prompts: usize) -> Result<Vec<String>, ValidationError> {
    let expected = "a string or an array of strings (token-id prompts are not supported)";
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(a) => {
            if a.is_empty() {
                return Err(ValidationError::OutOfRange {
                    field: "prompt".into(),
                    range: "a non-empty array".into(),
                    value: "[]".into(),
                });
            }
            if a.len() > max_prompts {
                return Err(ValidationError::TooManyInstances {
                    given: a.len(),
                    max: max_prompts,
                });
            }
            a.iter()
                .enumerate()
                .map(|(i, p)| {
                    p.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| ValidationError::WrongType {
                            field: format!("prompt[{i}]"),
                            expected,
                            got: describe(p),
                        })
                })
                .collect()
        }
        other => Err(ValidationError::WrongType {
            field: "prompt".into(),
            expected,
            got: describe(other),
        }),
    }
}

fn prompt_at(i: usize) -> String {
    format!("prompt {i}")
}

fn finish_reason(r: &FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        _ => "stop",
    }
}

async fn completions(
    State(state): State<AppState>,
    Extension(record): Extension<Arc<RequestRecord>>,
    key: Option<Extension<KeyIndex>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let tenant = tenant(&state, &headers, key.map(|Extension(k)| k));
    respond(run(state, record, tenant, body).await, Protocol::OpenAi)
}

async fn run(
    state: AppState,
    record: Arc<RequestRecord>,
    tenant: Option<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let config = state.config();
    let body = json_object(body, config.body_limit)?;
    let req = parse_completion(
        &body,
        config.max_instances,
        config.max_sequences_per_request,
    )?;
    let name = config.model_name.clone();
    if let Some(m) = &req.model {
        check_model(&state, m)?;
    }
    let (guard, backend) = state.admit()?;
    let deadline = record.start() + config.request_timeout;
    let prepared = prepare(
        config,
        &backend,
        Submission {
            prompts: &req.prompts,
            params: &req.params,
            at: prompt_at,
            tenant,
            deadline,
        },
    )
    .await?;
    let id = format!("cmpl-{}", record.id);
    let created = unix_now();
    let echo = prepared.plans.first().is_some_and(|p| p.return_full_text);
    let k = prepared.per_prompt;
    let prompt_tokens: usize = prepared.prompt_tokens.iter().sum();
    if req.stream {
        let head =
            json!({"id": id, "object": "text_completion", "created": created, "model": name});
        let first = if echo {
            (0..req.prompts.len() * k)
                .map(|i| chunk(&head, i, &req.prompts[i / k], None))
                .collect()
        } else {
            Vec::new()
        };
        let shaper = CompletionShaper {
            head,
            include_usage: req.include_usage,
            prompt_tokens,
            completion_tokens: 0,
        };
        let ctx = StreamContext {
            guard,
            record,
            deadline,
            timeout: config.request_timeout,
            protocol: Protocol::OpenAi,
        };
        return Ok(sse::response(prepared.streams, shaper, first, ctx));
    }
    let finished = collect_all(prepared.streams, &record, deadline, config.request_timeout).await?;
    let choices: Vec<Value> = finished
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let text = if echo {
                format!("{}{}", req.prompts[i / k], f.text)
            } else {
                f.text.clone()
            };
            json!({
                "index": i,
                "text": text,
                "logprobs": null,
                "finish_reason": finish_reason(&f.reason),
            })
        })
        .collect();
    let completion_tokens: usize = finished.iter().map(|f| f.usage.generated_tokens).sum();
    Ok(Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
    .into_response())
}

fn chunk(head: &Value, index: usize, text: &str, finish: Option<&str>) -> Event {
    let mut v = head.clone();
    v["choices"] = json!([{
        "index": index,
        "text": text,
        "logprobs": null,
        "finish_reason": finish,
    }]);
    json_event(&v)
}

struct CompletionShaper {
    head: Value,
    include_usage: bool,
    prompt_tokens: usize,
    completion_tokens: usize,
}

impl Shaper for CompletionShaper {
    fn token(&mut self, index: usize, text: &str) -> Vec<Event> {
        vec![chunk(&self.head, index, text, None)]
    }

    fn finished(&mut self, index: usize, reason: &FinishReason, usage: &Usage) -> Vec<Event> {
        self.completion_tokens += usage.generated_tokens;
        vec![chunk(&self.head, index, "", Some(finish_reason(reason)))]
    }

    fn end(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        if self.include_usage {
            let mut v = self.head.clone();
            v["choices"] = json!([]);
            v["usage"] = json!({
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
            });
            out.push(json_event(&v));
        }
        out.push(Event::default().data("[DONE]"));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<CompletionRequest, ValidationError> {
        parse_completion(v.as_object().unwrap(), 4, 8)
    }

    #[test]
    fn completion_body() {
        let r = parse(json!({"model": "m", "prompt": ["a", "b"], "max_tokens": 7, "temperature": 0, "n": 2, "stream": true, "stream_options": {"include_usage": true}, "presence_penalty": 0, "user": "u"})).unwrap();
        assert_eq!(r.prompts.len(), 2);
        assert_eq!(r.params.max_new_tokens, Some(7));
        assert_eq!(r.params.do_sample, Some(false));
        assert!(r.stream && r.include_usage);
    }

    #[test]
    fn completion_errors() {
        for (b, needle) in [
            (json!({}), "missing `prompt"),
            (json!({"prompt": [1, 2]}), "`prompt[0]` must be a string"),
            (json!({"prompt": "a", "logprobs": 2}), "`logprobs`"),
            (
                json!({"prompt": "a", "frequency_penalty": 1}),
                "repetition_penalty",
            ),
            (json!({"prompt": "a", "best_of": 3}), "`best_of`"),
            (
                json!({"prompt": "a", "max_tokens": 0}),
                "`max_tokens` must be an integer in [1,",
            ),
            (
                json!({"prompt": "a", "n": 9}),
                "`n` must be an integer in [1, 8]",
            ),
            (json!({"prompt": "a", "foo": 1}), "unknown parameter `foo`"),
            (
                json!({"prompt": "a", "stream": "yes"}),
                "`stream` must be a boolean",
            ),
        ] {
            let msg = parse(b.clone()).unwrap_err().to_string();
            assert!(msg.contains(needle), "{b}: {msg}");
        }
    }
}
