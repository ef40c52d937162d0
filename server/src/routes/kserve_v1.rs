/*!
KServe V1, the seed's API.

- `GET /`: liveness, `{"status": "alive"}`.
- `GET /v1/models`: `{"models": ["<name>"]}`.
- `GET /v1/models/{name}`: `{"name", "ready": true}` once the model is loaded and warm; 503
  `{"error": "Model with name <name> is not ready."}` before that and while draining; 404
  for another name.

These two paths are also OpenAI's `models.list` and `models.retrieve` for a client whose base
URL is `/v1`, so their answers carry OpenAI's fields too (`object`, `data`; `id`, `created`,
`owned_by`): extra fields a KServe client ignores. Their errors stay KServe's, and they need
no key.
- `POST /v1/models/{name}:predict` with `{"instances": [...], "parameters": {...}}`: one
  instance answers `{"predictions": [{"generated_text": ...}]}`, several answer
  `{"predictions": [[{...}], [{...}]]}` (one list per instance, `num_return_sequences`
  objects in each).
*/

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use crate::error::{ApiError, Wire};
use crate::generation::Generation;
use crate::params::json::read_strings;
use crate::params::{describe, Dialect, Limits, Names, ParamsReader, ValidationError};
use crate::pipeline::{check_model, generate_at, Outcome, Protocol};
use crate::state::AppState;

/// The V1 routes: `open` ones need no key, `generation` ones do.
pub fn routes() -> (Router<AppState>, Router<AppState>) {
    let open = super::group()
        .route("/", get(live))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{name}", get(model_ready));
    let generation =
        super::group().route("/v1/models/{name}/:predict", post(generate_at::<KserveV1>));
    (open, generation)
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
    let name = &state.config().model_name;
    Json(json!({
        "models": [name],
        "object": "list",
        "data": [super::openai::model_object(name)],
    }))
}

async fn model_ready(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let result = check_model(&state, &name).and_then(|()| {
        if state.is_ready() {
            let mut v = super::openai::model_object(&name);
            v["name"] = json!(name);
            v["ready"] = json!(true);
            Ok(Json(v).into_response())
        } else {
            Err(ApiError::NotReady(name.clone()))
        }
    });
    result.unwrap_or_else(|e| e.into_response(Wire::KserveV1))
}

/// KServe V1 `:predict`.
pub struct KserveV1;

impl Protocol for KserveV1 {
    const WIRE: Wire = Wire::KserveV1;
    const DIALECT: Dialect = Dialect {
        prefix: "parameters",
        aliases: &[],
        names: Names::All,
    };
    type Request = Generation;

    fn prompt_name(i: usize) -> String {
        format!("instance {i}")
    }

    fn parse(body: &Map<String, Value>, limits: Limits) -> Result<Generation, ValidationError> {
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
        if list.len() > limits.max_prompts {
            return Err(ValidationError::TooManyInstances {
                given: list.len(),
                max: limits.max_prompts,
            });
        }
        let prompts = read_strings(field, list, "a string (the prompt)")?;
        let params = parameters(body, Self::DIALECT, limits)?;
        Ok(Generation {
            model: None,
            prompts: prompts.into(),
            params,
            stream: false,
        })
    }

    fn generation(req: &Generation) -> &Generation {
        req
    }

    fn render(_: &Generation, out: &Outcome<'_>) -> Value {
        let k = out.submitted.per_prompt.max(1);
        let mut predictions: Vec<Value> = (0..out.prompts.len())
            .map(|i| {
                (i * k..(i + 1) * k)
                    .map(|seq| json!({"generated_text": out.text(seq)}))
                    .collect()
            })
            .collect();
        // The seed's shapes: one instance gives its list of objects directly.
        let predictions = if predictions.len() == 1 {
            predictions.swap_remove(0)
        } else {
            Value::Array(predictions)
        };
        json!({ "predictions": predictions })
    }
}

/// The `parameters` object of a KServe body (V1 and OIP): absent or null is no parameters.
pub fn parameters(
    body: &Map<String, Value>,
    dialect: Dialect,
    limits: Limits,
) -> Result<crate::params::RequestParams, ValidationError> {
    match body.get("parameters") {
        None | Some(Value::Null) => Ok(Default::default()),
        Some(Value::Object(obj)) => ParamsReader::new(dialect, limits).read_object(obj),
        Some(other) => Err(ValidationError::WrongType {
            field: "parameters".into(),
            expected: "an object",
            got: describe(other),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::Prompts;

    fn parse(v: Value) -> Result<Generation, ValidationError> {
        KserveV1::parse(
            v.as_object().unwrap(),
            Limits {
                max_sequences: 8,
                max_prompts: 4,
            },
        )
    }

    #[test]
    fn seed_body() {
        let r = parse(json!({"parameters": {"min_length":150,"max_length":200}, "instances": ["In a shocking finding"]})).unwrap();
        assert_eq!(
            r.prompts,
            Prompts::Text(vec!["In a shocking finding".into()])
        );
        assert_eq!(r.params.max_length, Some(200));
        assert!(!r.stream);
    }
}
