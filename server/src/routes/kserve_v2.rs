/*!
Open Inference Protocol (KServe V2): health, metadata, and the generate extension.

- `GET /v2`: server metadata; `GET /v2/health/live`, `GET /v2/health/ready`:
  `{"live": true}` / `{"ready": true}`, 503 when false.
- `GET /v2/models/{name}`: model metadata; `GET /v2/models/{name}/ready`.
- `POST /v2/models/{name}/generate` with `{"text_input": "...", "parameters": {...}}`:
  `{"model_name", "text_output", "finish_reason", "usage"}`.
- `POST /v2/models/{name}/generate_stream`: SSE; each event is
  `{"model_name", "text_output": "<piece>", "done": false}`, the last one has
  `"done": true`, `finish_reason` and `usage`. No `[DONE]` sentinel.

Status codes follow the extension: 422 for validation, 424 when generation fails, 429 when
overloaded, 503 while loading or draining.
*/

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
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
use crate::params::{describe, RequestParams, ValidationError};
use crate::sse::{self, json_event, Shaper, StreamContext};
use crate::state::AppState;
use crate::telemetry::RequestRecord;

/// OIP's name for the new-token limit, accepted as an alias of `max_new_tokens`.
const ALIASES: &[(&str, &str)] = &[("max_tokens", "max_new_tokens")];

/// The V2 routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/generate", post(generate))
        .route("/v2/models/{name}/generate_stream", post(generate_stream))
}

fn health(ok: bool, key: &str) -> Response {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({ key: ok }))).into_response()
}

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "gptj",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["generate"],
    }))
}

async fn live(State(state): State<AppState>) -> Response {
    health(state.is_live(), "live")
}

async fn ready(State(state): State<AppState>) -> Response {
    health(state.is_ready(), "ready")
}

async fn model_metadata(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let result = check_model(&state, &name).map(|()| {
        Json(json!({
            "name": name,
            "versions": [],
            "platform": "gptj",
            "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1]}],
            "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1]}],
        }))
        .into_response()
    });
    respond(result, Protocol::KserveV2)
}

async fn model_ready(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let result = check_model(&state, &name).map(|()| {
        let ok = state.is_ready();
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (status, Json(json!({"name": name, "ready": ok}))).into_response()
    });
    respond(result, Protocol::KserveV2)
}

/// A parsed generate body.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The prompt.
    pub text_input: String,
    /// The parameters (`return_full_text` defaults to false here).
    pub params: RequestParams,
    /// The request's `id`, echoed in the response.
    pub id: Option<Value>,
}

/// Parses and checks a generate body.
pub fn parse_generate(body: &Map<String, Value>) -> Result<GenerateRequest, ValidationError> {
    for key in body.keys() {
        if !matches!(key.as_str(), "text_input" | "parameters" | "id") {
            return Err(ValidationError::UnknownField {
                field: key.clone(),
                known: "text_input, parameters, id".into(),
            });
        }
    }
    let text = body
        .get("text_input")
        .ok_or_else(|| ValidationError::Missing {
            field: "text_input".into(),
            what: "the prompt string",
        })?;
    let text_input = text
        .as_str()
        .ok_or_else(|| ValidationError::WrongType {
            field: "text_input".into(),
            expected: "a string (the prompt)",
            got: describe(text),
        })?
        .to_owned();
    let mut params = match body.get("parameters") {
        None | Some(Value::Null) => RequestParams {
            prefix: "parameters".into(),
            ..Default::default()
        },
        Some(Value::Object(obj)) => RequestParams::from_object(obj, "parameters", ALIASES, 1)?,
        Some(other) => {
            return Err(ValidationError::WrongType {
                field: "parameters".into(),
                expected: "an object",
                got: describe(other),
            })
        }
    };
    params.return_full_text.get_or_insert(false);
    params.num_return_sequences = Some(1);
    let id = match body.get("id") {
        None | Some(Value::Null) => None,
        Some(v @ Value::String(_)) => Some(v.clone()),
        Some(other) => {
            return Err(ValidationError::WrongType {
                field: "id".into(),
                expected: "a string",
                got: describe(other),
            })
        }
    };
    Ok(GenerateRequest {
        text_input,
        params,
        id,
    })
}

fn prompt_at(_: usize) -> String {
    "text_input".into()
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.generated_tokens,
        "total_tokens": u.prompt_tokens + u.generated_tokens,
    })
}

async fn generate(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Extension(record): Extension<Arc<RequestRecord>>,
    key: Option<Extension<KeyIndex>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let tenant = tenant(&state, &headers, key.map(|Extension(k)| k));
    respond(
        run(state, name, record, tenant, body, false).await,
        Protocol::KserveV2,
    )
}

async fn generate_stream(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Extension(record): Extension<Arc<RequestRecord>>,
    key: Option<Extension<KeyIndex>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let tenant = tenant(&state, &headers, key.map(|Extension(k)| k));
    respond(
        run(state, name, record, tenant, body, true).await,
        Protocol::KserveV2,
    )
}

async fn run(
    state: AppState,
    name: String,
    record: Arc<RequestRecord>,
    tenant: Option<String>,
    body: Result<Bytes, BytesRejection>,
    stream: bool,
) -> Result<Response, ApiError> {
    check_model(&state, &name)?;
    let (guard, backend) = state.admit()?;
    let config = state.config();
    let req = parse_generate(&json_object(body, config.body_limit)?)?;
    let deadline = record.start() + config.request_timeout;
    let request_id = req.id;
    let prompts = [req.text_input];
    let prepared = prepare(
        config,
        &backend,
        Submission {
            prompts: &prompts,
            params: &req.params,
            at: prompt_at,
            tenant,
            deadline,
        },
    )
    .await?;
    let [prompt] = prompts;
    let full = prepared.plans[0].return_full_text;
    if stream {
        let first = if full {
            vec![json_event(&json!({
                "model_name": name, "text_output": prompt, "done": false,
            }))]
        } else {
            Vec::new()
        };
        let shaper = StreamShaper { model_name: name };
        let ctx = StreamContext {
            guard,
            record,
            deadline,
            timeout: config.request_timeout,
            protocol: Protocol::KserveV2,
        };
        return Ok(sse::response(prepared.streams, shaper, first, ctx));
    }
    let finished = collect_all(prepared.streams, &record, deadline, config.request_timeout).await?;
    let f = &finished[0];
    let text = if full {
        format!("{prompt}{}", f.text)
    } else {
        f.text.clone()
    };
    let mut out = json!({
        "model_name": name,
        "text_output": text,
        "finish_reason": f.reason.as_str(),
        "usage": usage_json(&f.usage),
    });
    if let Some(id) = request_id {
        out["id"] = id;
    }
    Ok(Json(out).into_response())
}

struct StreamShaper {
    model_name: String,
}

impl Shaper for StreamShaper {
    fn token(&mut self, _: usize, text: &str) -> Vec<Event> {
        vec![json_event(&json!({
            "model_name": self.model_name, "text_output": text, "done": false,
        }))]
    }

    fn finished(&mut self, _: usize, reason: &FinishReason, usage: &Usage) -> Vec<Event> {
        vec![json_event(&json!({
            "model_name": self.model_name,
            "text_output": "",
            "done": true,
            "finish_reason": reason.as_str(),
            "usage": usage_json(usage),
        }))]
    }

    fn end(&mut self) -> Vec<Event> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_body() {
        let b = json!({"text_input": "hi", "parameters": {"max_tokens": 5, "temperature": 0.5}});
        let r = parse_generate(b.as_object().unwrap()).unwrap();
        assert_eq!(r.params.max_new_tokens, Some(5));
        assert_eq!(r.params.return_full_text, Some(false));
        for (b, needle) in [
            (json!({}), "missing `text_input"),
            (
                json!({"text_input": ["a"]}),
                "`text_input` must be a string",
            ),
            (
                json!({"text_input": "a", "parameters": {"num_return_sequences": 2}}),
                "[1, 1]",
            ),
            (
                json!({"text_input": "a", "prompt": "b"}),
                "unknown parameter `prompt`",
            ),
        ] {
            let msg = parse_generate(b.as_object().unwrap())
                .unwrap_err()
                .to_string();
            assert!(msg.contains(needle), "{b}: {msg}");
        }
    }
}
