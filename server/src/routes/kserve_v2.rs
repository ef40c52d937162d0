/*!
Open Inference Protocol (KServe V2): health, metadata, and the generate extension.

- `GET /v2`: server metadata; `GET /v2/health/live`, `GET /v2/health/ready`:
  `{"live": true}` / `{"ready": true}`, 503 when false.
- `GET /v2/models/{name}`: model metadata; `GET /v2/models/{name}/ready`.
- `POST /v2/models/{name}/generate` with `{"text_input": "...", "parameters": {...}}`:
  `{"model_name", "text_output", "finish_reason", "usage"}`.
- `POST /v2/models/{name}/infer`: OIP's own inference route, BYTES tensors `text_input` in and
  `text_output` out ([`infer`]).
- `POST /v2/models/{name}/generate_stream`: SSE; each event is
  `{"model_name", "text_output": "<piece>", "done": false}`, the last one has
  `"done": true`, `finish_reason` and `usage`. No `[DONE]` sentinel.

Status codes follow the extension: 422 for validation, 424 when generation fails, 429 when
overloaded, 503 while loading or draining.
*/

pub mod infer;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gptj_scheduler::{FinishReason, TokenLogprob, Usage};
use serde_json::{json, Map, Value};

use super::kserve_v1::parameters;
use crate::error::Wire;
use crate::generation::Generation;
use crate::params::{describe, Dialect, Limits, Names, ValidationError};
use crate::pipeline::{check_model, generate_at, usage_json, Outcome, Protocol, Start};
use crate::sse::{json_event, Shaper};
use crate::state::AppState;

/// The V2 routes: `open` ones need no key, `generation` ones do.
pub fn routes() -> (Router<AppState>, Router<AppState>) {
    let open = super::group()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready));
    let generation = super::group()
        .route(
            "/v2/models/{name}/generate",
            post(generate_at::<OipGenerate<false>>),
        )
        .route(
            "/v2/models/{name}/generate_stream",
            post(generate_at::<OipGenerate<true>>),
        )
        .route("/v2/models/{name}/infer", post(infer::infer));
    (open, generation)
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
    result.unwrap_or_else(|e| e.into_response(Wire::Oip))
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
    result.unwrap_or_else(|e| e.into_response(Wire::Oip))
}

/// A parsed generate body.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The prompt and parameters (`return_full_text` defaults to false here).
    pub generation: Generation,
    /// The request's `id`, echoed in the response.
    pub id: Option<Value>,
}

/// The generate extension: `generate` (`STREAM = false`) and `generate_stream`.
pub struct OipGenerate<const STREAM: bool>;

impl<const STREAM: bool> Protocol for OipGenerate<STREAM> {
    const WIRE: Wire = Wire::Oip;
    /// OIP's name for the new-token limit is accepted as an alias of `max_new_tokens`.
    const DIALECT: Dialect = Dialect {
        prefix: "parameters",
        aliases: &[("max_tokens", "max_new_tokens")],
        names: Names::All,
    };
    type Request = GenerateRequest;

    fn prompt_name(_: usize) -> String {
        "text_input".into()
    }

    fn parse(
        body: &Map<String, Value>,
        limits: Limits,
    ) -> Result<GenerateRequest, ValidationError> {
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
        // One sequence per request: the answer has one `text_output`.
        let one = Limits {
            max_sequences: 1,
            ..limits
        };
        let mut params = parameters(body, Self::DIALECT, one)?;
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
            generation: Generation {
                model: None,
                prompts: vec![text_input].into(),
                params,
                stream: STREAM,
            },
            id,
        })
    }

    fn generation(req: &GenerateRequest) -> &Generation {
        &req.generation
    }

    fn render(req: &GenerateRequest, out: &Outcome<'_>) -> Value {
        let f = &out.finished[0];
        let mut v = json!({
            "model_name": out.meta.model,
            "text_output": out.text(0),
            "finish_reason": f.reason.as_str(),
            "usage": usage_json(f.usage.prompt_tokens, f.usage.generated_tokens),
        });
        if let Some(id) = &req.id {
            v["id"] = id.clone();
        }
        v
    }

    fn stream(_: &GenerateRequest, start: &Start<'_>) -> Option<Box<dyn Shaper>> {
        let echo = start.submitted.echo(0).then(|| start.prompts[0].clone());
        Some(Box::new(StreamShaper {
            model_name: start.meta.model.clone(),
            echo,
        }))
    }
}

struct StreamShaper {
    model_name: String,
    /// The prompt, until it has been sent (`return_full_text`).
    echo: Option<String>,
}

impl Shaper for StreamShaper {
    fn prelude(&mut self) -> Option<Event> {
        let prompt = self.echo.take()?;
        Some(json_event(&json!({
            "model_name": self.model_name, "text_output": prompt, "done": false,
        })))
    }

    fn token(&mut self, _: usize, text: &str, _: Option<&TokenLogprob>) -> Vec<Event> {
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
            "usage": usage_json(usage.prompt_tokens, usage.generated_tokens),
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
        let limits = Limits {
            max_sequences: 8,
            max_prompts: 8,
        };
        let r = OipGenerate::<false>::parse(b.as_object().unwrap(), limits).unwrap();
        assert_eq!(r.generation.params.max_new_tokens, Some(5));
        assert_eq!(r.generation.params.return_full_text, Some(false));
        assert!(!r.generation.stream);
        let r = OipGenerate::<true>::parse(b.as_object().unwrap(), limits).unwrap();
        assert!(r.generation.stream);
    }
}
