/*!
vLLM's tokenizer routes, which benchmark harnesses and gateways call to count tokens:

- `POST /tokenize` with `{"prompt": "...", "model"?, "add_special_tokens"?}` answers
  `{"count", "max_model_len", "tokens": [...]}`; vLLM's chat form, `{"messages": [...],
  "add_generation_prompt"?}` instead of `prompt`, tokenizes what the chat template makes of
  the messages (400 without a template, as on chat completions);
- `POST /detokenize` with `{"tokens": [...], "model"?}` answers `{"prompt": "..."}`.

Both are also under `/openai`, need a key when keys are set (they are in the OpenAI group),
and answer errors in OpenAI's shape. GPT-J's tokenizer adds no special tokens, so
`add_special_tokens` changes nothing.
*/

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use crate::error::{ApiError, Wire};
use crate::params::json::{read_bool, read_string, read_uint};
use crate::params::{describe, ValidationError};
use crate::pipeline::{check_model, read_json};
use crate::state::{AppState, Backend, Phase};

/// The routes, at the root (vLLM's paths) and under `/openai`.
pub fn routes() -> Router<AppState> {
    let mut r = super::super::group();
    for prefix in ["", "/openai"] {
        r = r
            .route(&format!("{prefix}/tokenize"), post(tokenize))
            .route(&format!("{prefix}/detokenize"), post(detokenize));
    }
    r
}

/// The tokenizer, once the model is loaded (503 before and while draining).
fn backend(state: &AppState) -> Result<Backend, ApiError> {
    match (state.phase(), state.backend()) {
        (Phase::Ready, Some(b)) => Ok(b.clone()),
        (Phase::Draining, _) => Err(ApiError::Draining),
        _ => Err(ApiError::NotReady(state.config().model_name.clone())),
    }
}

/// Reads the body and checks its fields against `known` and its `model`.
async fn body(
    state: &AppState,
    body: Body,
    known: &'static str,
) -> Result<(Backend, Map<String, Value>), ApiError> {
    let backend = backend(state)?;
    let config = state.config();
    let body = read_json(body, config.body_limit, config.body_read_timeout).await?;
    for (k, v) in &body {
        if !known.split(", ").any(|f| f == k) {
            return Err(ValidationError::UnknownField {
                field: k.clone(),
                known: known.into(),
            }
            .into());
        }
        if k == "model" && !v.is_null() {
            check_model(state, read_string(k, v)?)?;
        }
    }
    Ok((backend, body))
}

async fn tokenize(State(state): State<AppState>, b: Body) -> Response {
    let run = async {
        let known = "model, prompt, messages, add_generation_prompt, add_special_tokens";
        let (backend, body) = body(&state, b, known).await?;
        let flag = |f: &str| match body.get(f).filter(|v| !v.is_null()) {
            Some(v) => read_bool(f, v).map(Some),
            None => Ok(None),
        };
        flag("add_special_tokens")?;
        let add_generation_prompt = flag("add_generation_prompt")?;
        let prompt = match (body.get("prompt"), body.get("messages")) {
            (Some(v), None) if add_generation_prompt.is_none() => {
                read_string("prompt", v)?.to_owned()
            }
            (None, Some(m)) => {
                let messages = super::chat::parse_messages(m)?;
                let template = state.config().chat_template.as_ref();
                template
                    .ok_or_else(super::chat::no_template)?
                    .render(&messages, add_generation_prompt.unwrap_or(true))
                    .map_err(|e| ValidationError::Unsupported {
                        field: "messages".into(),
                        message: e.to_string(),
                    })?
            }
            (None, None) => {
                return Err(ApiError::from(ValidationError::Missing {
                    field: "prompt".into(),
                    what: "the text to tokenize; or `messages` for a chat",
                }))
            }
            _ => {
                return Err(ApiError::from(ValidationError::Unsupported {
                    field: "prompt".into(),
                    message: "give either `prompt` or `messages` (with `add_generation_prompt`), \
                              not both"
                        .into(),
                }))
            }
        };
        let mut ids = backend
            .prompts
            .encode(vec![prompt], |_| "prompt".into())
            .await?;
        let tokens = ids.pop().unwrap_or_default();
        Ok(Json(json!({
            "count": tokens.len(),
            "max_model_len": backend.max_context,
            "tokens": tokens,
        })))
    };
    match run.await {
        Ok(j) => j.into_response(),
        Err(e) => e.into_response(Wire::OpenAi),
    }
}

async fn detokenize(State(state): State<AppState>, b: Body) -> Response {
    let run = async {
        let (backend, body) = body(&state, b, "model, tokens").await?;
        let items = match body.get("tokens") {
            Some(Value::Array(a)) => a,
            Some(other) => {
                return Err(ApiError::from(ValidationError::WrongType {
                    field: "tokens".into(),
                    expected: "an array of token ids",
                    got: describe(other),
                }))
            }
            None => {
                return Err(ValidationError::Missing {
                    field: "tokens".into(),
                    what: "an array of token ids",
                }
                .into())
            }
        };
        let vocab = backend.prompts.tokenizer().vocab_size() as u64;
        let ids = items
            .iter()
            .enumerate()
            .map(|(i, v)| read_uint(&format!("tokens[{i}]"), v, 0, vocab - 1).map(|n| n as u32))
            .collect::<Result<Vec<u32>, _>>()?;
        Ok(Json(
            json!({"prompt": backend.prompts.tokenizer().decode(&ids)}),
        ))
    };
    match run.await {
        Ok(j) => j.into_response(),
        Err(e) => e.into_response(Wire::OpenAi),
    }
}
