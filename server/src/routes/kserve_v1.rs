/*!
KServe V1, the seed's API.

- `GET /`: liveness, `{"status": "alive"}`.
- `GET /v1/models`: `{"models": ["<name>"]}`.
- `GET /v1/models/{name}`: `{"name", "ready": true}` once the model is loaded and warm; 503
  `{"error": "Model with name <name> is not ready."}` before that and while draining; 404
  for another name.
- `POST /v1/models/{name}:predict` with `{"instances": [...], "parameters": {...}}`: one
  instance answers `{"predictions": [{"generated_text": ...}]}`, several answer
  `{"predictions": [[{...}], [{...}]]}` (one list per instance, `num_return_sequences`
  objects in each).
*/

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde_json::{json, Map, Value};

use super::{check_model, json_object, respond, tenant};
use crate::auth::KeyIndex;
use crate::error::{ApiError, Protocol};
use crate::generation::{collect_all, prepare, Submission};
use crate::params::{describe, RequestParams, ValidationError};
use crate::state::AppState;
use crate::telemetry::RequestRecord;

/// The V1 routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(live))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{name}", get(model_ready).post(predict))
}

async fn live(State(state): State<AppState>) -> Response {
    if state.is_live() {
        Json(json!({"status": "alive"})).into_response()
    } else {
        let body = json!({"status": "dead", "error": "the engine thread has stopped"});
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

async fn list_models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"models": [state.config().model_name]}))
}

async fn model_ready(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let result = check_model(&state, &name).and_then(|()| {
        if state.is_ready() {
            Ok(Json(json!({"name": name, "ready": true})).into_response())
        } else {
            Err(ApiError::NotReady(name.clone()))
        }
    });
    respond(result, Protocol::KserveV1)
}

/// A parsed `:predict` body.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictRequest {
    /// The prompts.
    pub instances: Vec<String>,
    /// The `parameters` object.
    pub params: RequestParams,
}

/// Parses and checks a `:predict` body (everything that does not need the tokenizer).
pub fn parse_predict(
    body: &Map<String, Value>,
    max_instances: usize,
    max_return_sequences: usize,
) -> Result<PredictRequest, ValidationError> {
    for key in body.keys() {
        if !matches!(key.as_str(), "instances" | "inputs" | "parameters") {
            return Err(ValidationError::UnknownField {
                field: key.clone(),
                known: "instances (or inputs), parameters".into(),
            });
        }
    }
    let (field, instances) = match (body.get("instances"), body.get("inputs")) {
        (Some(_), Some(_)) => {
            return Err(ValidationError::Conflict {
                a: "instances".into(),
                b: "inputs".into(),
            })
        }
        (Some(v), None) => ("instances", v),
        (None, Some(v)) => ("inputs", v),
        (None, None) => {
            return Err(ValidationError::Missing {
                field: "instances".into(),
                what: "an array of prompt strings",
            })
        }
    };
    let list = instances
        .as_array()
        .ok_or_else(|| ValidationError::WrongType {
            field: field.into(),
            expected: "an array of prompt strings",
            got: describe(instances),
        })?;
    if list.is_empty() {
        return Err(ValidationError::EmptyInstances);
    }
    if list.len() > max_instances {
        return Err(ValidationError::TooManyInstances {
            given: list.len(),
            max: max_instances,
        });
    }
    let instances = list
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| ValidationError::WrongType {
                    field: format!("{field}[{i}]"),
                    expected: "a string (the prompt)",
                    got: describe(v),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let params = match body.get("parameters") {
        None | Some(Value::Null) => RequestParams {
            prefix: "parameters".into(),
            ..Default::default()
        },
        Some(Value::Object(obj)) => {
            RequestParams::from_object(obj, "parameters", &[], max_return_sequences)?
        }
        Some(other) => {
            return Err(ValidationError::WrongType {
                field: "parameters".into(),
                expected: "an object",
                got: describe(other),
            })
        }
    };
    Ok(PredictRequest { instances, params })
}

fn instance_at(i: usize) -> String {
    format!("instance {i}")
}

async fn predict(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Extension(record): Extension<Arc<RequestRecord>>,
    key: Option<Extension<KeyIndex>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let tenant = tenant(&state, &headers, key.map(|Extension(k)| k));
    respond(
        predict_inner(state, name, record, tenant, body).await,
        Protocol::KserveV1,
    )
}

async fn predict_inner(
    state: AppState,
    name: String,
    record: Arc<RequestRecord>,
    tenant: Option<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Some(model) = name.strip_suffix(":predict") else {
        return Err(ApiError::RouteNotFound {
            method: "POST".into(),
            path: format!("/v1/models/{name} (use /v1/models/<name>:predict)"),
        });
    };
    check_model(&state, model)?;
    let (_guard, backend) = state.admit()?;
    let config = state.config();
    let body = json_object(body, config.body_limit)?;
    let req = parse_predict(
        &body,
        config.max_instances,
        config.max_sequences_per_request,
    )?;
    let deadline = record.start() + config.request_timeout;
    let prepared = prepare(
        config,
        &backend,
        Submission {
            prompts: &req.instances,
            params: &req.params,
            at: instance_at,
            tenant,
            deadline,
        },
    )
    .await?;
    let k = prepared.per_prompt;
    let finished = collect_all(prepared.streams, &record, deadline, config.request_timeout).await?;
    let mut predictions: Vec<Value> = req
        .instances
        .iter()
        .zip(&prepared.plans)
        .zip(finished.chunks(k))
        .map(|((prompt, plan), seqs)| {
            let objs = seqs
                .iter()
                .map(|f| {
                    let text = if plan.return_full_text {
                        format!("{prompt}{}", f.text)
                    } else {
                        f.text.clone()
                    };
                    json!({"generated_text": text})
                })
                .collect();
            Value::Array(objs)
        })
        .collect();
    // The seed's shapes: one instance gives its list of objects directly.
    let predictions = if predictions.len() == 1 {
        predictions.swap_remove(0)
    } else {
        Value::Array(predictions)
    };
    Ok(Json(json!({ "predictions": predictions })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<PredictRequest, ValidationError> {
        parse_predict(v.as_object().unwrap(), 4, 8)
    }

    #[test]
    fn seed_body() {
        let r = parse(json!({"parameters": {"min_length":150,"max_length":200}, "instances": ["In a shocking finding"]})).unwrap();
        assert_eq!(r.instances, vec!["In a shocking finding"]);
        assert_eq!(r.params.max_length, Some(200));
    }

    #[test]
    fn instance_errors() {
        let cases = [
            (json!({}), "missing `instances"),
            (json!({"instances": "hi"}), "`instances` must be an array"),
            (json!({"instances": []}), "`instances` is empty"),
            (
                json!({"instances": ["a", 3]}),
                "`instances[1]` must be a string",
            ),
            (json!({"instances": ["a","b","c","d","e"]}), "at most 4"),
            (
                json!({"instances": ["a"], "parameters": [1]}),
                "`parameters` must be an object",
            ),
            (
                json!({"instances": ["a"], "params": {}}),
                "unknown parameter `params`",
            ),
            (json!({"instances": ["a"], "inputs": ["b"]}), "only one"),
        ];
        for (body, needle) in cases {
            let msg = parse(body.clone()).unwrap_err().to_string();
            assert!(msg.contains(needle), "{body}: {msg}");
        }
    }
}
