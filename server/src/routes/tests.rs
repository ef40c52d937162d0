//! The app in-process, without a socket: validation on every protocol, routes, methods,
//! keys and lifecycle, against the scheduler's `FakeModel` (exact, instant, context 2048)
//! with GPT-J's real tokenizer. What needs the binary (the seed's bodies on the real model,
//! signals, ports, metrics) is in the root package's `tests/`.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use clap::Parser;
use gptj_scheduler::testing::{tokenizer, FakeModel};
use http_body_util::BodyExt;
use std::collections::HashMap;

use serde_json::{json, Value};
use tower::ServiceExt;

use super::*;
use crate::config::ServerConfig;
use crate::state::Backend;

const MODEL: &str = "eleutherai-gpt-j-6b";

#[derive(Parser)]
struct T {
    #[command(flatten)]
    serve: crate::cli::ServeArgs,
}

/// A state in the `Loading` phase, with `extra` flags.
fn loading(extra: &[&str]) -> AppState {
    let mut args = vec!["t", "--model", "builtin:tiny"];
    args.extend_from_slice(extra);
    let config = ServerConfig::from_args(&T::parse_from(args).serve).unwrap();
    AppState::new(config, None)
}

/// A ready state over a `FakeModel` with room for 512 blocks of 16 tokens.
fn ready(extra: &[&str]) -> AppState {
    let state = loading(extra);
    let scheduler = gptj_scheduler::spawn(
        FakeModel::new(512, 16),
        gptj_scheduler::SchedulerConfig::default(),
    )
    .unwrap();
    state.set_ready(Backend::new(scheduler, tokenizer().clone(), 2048));
    state
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
}

async fn send(state: &AppState, req: Request<Body>) -> Answer {
    let r = app(state.clone()).oneshot(req).await.unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let bytes = r.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

async fn call(state: &AppState, method: &str, path: &str, body: &str) -> Answer {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .body(Body::from(body.to_owned()))
        .unwrap();
    send(state, req).await
}

fn error_message(v: &Value) -> String {
    match &v["error"] {
        Value::String(s) => s.clone(),
        Value::Object(o) => o["message"].as_str().unwrap_or_default().to_owned(),
        other => panic!("no error message in {other}"),
    }
}

/// One bad request: where it goes, the body, the status, and words the message must hold.
struct Case {
    path: String,
    body: String,
    status: u16,
    needles: Vec<&'static str>,
}

fn case(path: &str, body: impl Into<String>, status: u16, needles: &[&'static str]) -> Case {
    Case {
        path: path.to_owned(),
        body: body.into(),
        status,
        needles: needles.to_vec(),
    }
}

/// Every validation rule, on the protocol whose shape it takes, in one table.
#[tokio::test]
async fn bad_inputs_get_clear_errors() {
    let s = ready(&["--max-instances", "4", "--body-limit", "16KiB"]);
    let p = format!("/v1/models/{MODEL}:predict");
    let g = format!("/v2/models/{MODEL}/generate");
    let gs = format!("/v2/models/{MODEL}/generate_stream");
    let o = "/openai/v1/completions";
    let long_prompt = "hello ".repeat(2100);
    let cases = vec![
        // Body.
        case(&p, "{not json", 400, &["not valid JSON"]),
        case(&p, "", 400, &["not valid JSON"]),
        case(&p, "[1,2]", 400, &["must be a JSON object"]),
        case(
            &p,
            r#"{"instance": ["x"]}"#,
            400,
            &["unknown parameter `instance`"],
        ),
        case(&p, r#"{"parameters": {}}"#, 400, &["missing `instances`"]),
        case(&p, r#"{"instances": []}"#, 400, &["`instances` is empty"]),
        case(
            &p,
            r#"{"instances": "hello"}"#,
            400,
            &["`instances` must be an array"],
        ),
        case(
            &p,
            r#"{"instances": ["ok", 42]}"#,
            400,
            &["`instances[1]`", "string"],
        ),
        case(
            &p,
            r#"{"instances": ["a","b","c","d","e"]}"#,
            400,
            &["too many instances", "5", "at most 4"],
        ),
        case(
            &p,
            r#"{"instances": ["a", ""]}"#,
            400,
            &["instance 1", "empty"],
        ),
        case(
            &p,
            r#"{"instances": ["a"], "parameters": 3}"#,
            400,
            &["`parameters` must be an object"],
        ),
        // Parameters.
        case(
            &p,
            r#"{"instances": ["a"], "parameters": {"temprature": 0.5}}"#,
            400,
            &["unknown parameter `parameters.temprature`", "temperature"],
        ),
        case(
            &p,
            r#"{"instances": ["a"], "parameters": {"temperature": -0.5}}"#,
            400,
            &["`parameters.temperature`", ">= 0", "-0.5"],
        ),
        case(
            &p,
            r#"{"instances": ["a"], "parameters": {"temperature": "hot"}}"#,
            400,
            &["`parameters.temperature`", "number"],
        ),
        case(
            &p,
            r#"{"instances": ["a"], "parameters": {"top_p": 0}}"#,
            400,
            &["`parameters.top_p`", "(0, 1]"],
        ),
        case(
            &p,
            r#"{"instances": ["a"], "parameters": {"top_p": 1.5}}"#,
            400,
            &["`parameters.top_p`", "(0, 1]", "1.5"],
        ),
        case(
            &p,
            r#"{"instances": ["a"], "parameters": {"top_k": -1}}"#,
            400,
            &["`parameters.top_k`", ">= 0"],
        ),
        case(
            &p,
            r#"{"instances": ["a"], "parameters": {"top_k": 2.5}}"#,
            400,
            &["`parameters.top_k`", "integer"],
        ),
        case(
            &p,
            r#"{"instances": ["a"], "parameters": {"repetition_penalty": 0}}"#,
            400,
            &["`parameters.repetition_penalty`", "> 0"],
        ),
        case(
            &p,
            r#"{"instances": ["a"], "parameters": {"do_sample": "yes"}}"#,
            400,
            &["`parameters.do_sample`", "boolean"],
        ),
        case(
            &p,
            r#"{"instances": ["a"], "parameters": {"seed": -1}}"#,
            400,
            &["`parameters.seed`", ">= 0"],
        ),
        case(
            &p,
            r#"{"instances": ["a"], "parameters": {"num_return_sequences": 0}}"#,
            400,
            &["`parameters.num_return_sequences`"],
        ),
        case(
            &p,
            r#"{"instances": ["a","b","c","d"], "parameters": {"num_return_sequences": 20}}"#,
            400,
            &["too many sequences", "80", "64"],
        ),
        case(
            &p,
            r#"{"instances": ["a"], "parameters": {"stop": [1]}}"#,
            400,
            &["`parameters.stop[0]`", "string"],
        ),
        case(
            &p,
            r#"{"instances": ["a"], "parameters": {"stop": ""}}"#,
            400,
            &["`parameters.stop[0]`", "non-empty"],
        ),
        case(
            &p,
            r#"{"instances": ["a"], "parameters": {"max_length": 10, "max_new_tokens": 5}}"#,
            400,
            &[
                "`parameters.max_length`",
                "`parameters.max_new_tokens`",
                "only one",
            ],
        ),
        case(
            &p,
            r#"{"instances": ["a"], "parameters": {"max_new_tokens": 0}}"#,
            400,
            &["`parameters.max_new_tokens`", "[1,"],
        ),
        case(
            &p,
            r#"{"instances": ["a", "The secret to a happy life is to"], "parameters": {"max_length": 5}}"#,
            400,
            &[
                "instance 1",
                "`parameters.max_length` is 5",
                "8 tokens",
                "greater than 8",
            ],
        ),
        case(
            &p,
            r#"{"instances": ["a"], "parameters": {"max_new_tokens": 2048}}"#,
            400,
            &["instance 0", "2049 tokens", "context window of 2048"],
        ),
        case(
            &p,
            r#"{"instances": ["a"], "parameters": {"max_length": 4000}}"#,
            400,
            &["instance 0", "context window of 2048"],
        ),
        case(
            &p,
            r#"{"instances": ["a"], "parameters": {"min_new_tokens": 30, "max_new_tokens": 20}}"#,
            400,
            &["minimum of 30", "maximum of 20"],
        ),
        case(
            &p,
            json!({"instances": [long_prompt]}).to_string(),
            400,
            &["instance 0", "tokens; the context window is 2048"],
        ),
        case(
            &p,
            json!({"instances": ["x".repeat(20000)]}).to_string(),
            413,
            &["larger than the limit", "16384"],
        ),
        // Routes and models.
        case(
            "/v1/models/other-model:predict",
            r#"{"instances": ["a"]}"#,
            404,
            &["other-model", "does not exist"],
        ),
        case(
            &format!("/v1/models/{MODEL}"),
            r#"{"instances": ["a"]}"#,
            405,
            &["POST", "not allowed", "Allow"],
        ),
        case("/v1/nothing", "{}", 404, &["no route", "/v1/nothing"]),
        // Open Inference Protocol: 422 for validation.
        case(&g, r#"{"parameters": {}}"#, 422, &["missing `text_input`"]),
        case(
            &g,
            r#"{"text_input": 5}"#,
            422,
            &["`text_input` must be a string"],
        ),
        case(
            &g,
            r#"{"text_input": "a", "parameters": {"temperature": -1}}"#,
            422,
            &["`parameters.temperature`"],
        ),
        case(
            &g,
            r#"{"text_input": "a", "parameters": {"max_tokens": 5, "max_new_tokens": 5}}"#,
            422,
            &["`parameters.max_tokens`", "only one"],
        ),
        case(
            &gs,
            r#"{"text_input": "a", "parameters": {"top_p": 2}}"#,
            422,
            &["`parameters.top_p`"],
        ),
        case(
            "/v2/models/nope/generate",
            r#"{"text_input": "a"}"#,
            404,
            &["nope"],
        ),
        // OpenAI.
        case(o, r#"{"max_tokens": 5}"#, 400, &["missing `prompt`"]),
        case(
            o,
            r#"{"prompt": [[1, "x"]]}"#,
            400,
            &["`prompt[0][1]`", "token id"],
        ),
        case(
            o,
            r#"{"prompt": [1, -2]}"#,
            400,
            &["`prompt[1]`", "token id"],
        ),
        case(o, r#"{"prompt": [[1], 2]}"#, 400, &["`prompt[1]`"]),
        case(o, r#"{"prompt": [true]}"#, 400, &["`prompt[0]`"]),
        case(o, r#"{"prompt": [[]]}"#, 400, &["prompt 0"]),
        case(
            o,
            r#"{"prompt": [7, 60000]}"#,
            400,
            &["prompt 0, token 1", "60000", "[0, 50400)"],
        ),
        case(
            o,
            r#"{"prompt": "a", "logprobs": 6}"#,
            400,
            &["`logprobs`", "[0, 5]"],
        ),
        case(
            o,
            r#"{"prompt": "a", "frequency_penalty": 2.5}"#,
            400,
            &["`frequency_penalty`", "[-2, 2]", "2.5"],
        ),
        case(
            o,
            r#"{"prompt": "a", "logit_bias": {"x": 1}}"#,
            400,
            &["`logit_bias.x`", "token id"],
        ),
        case(
            o,
            r#"{"prompt": "a", "logit_bias": {"5": 101}}"#,
            400,
            &["`logit_bias.5`", "[-100, 100]"],
        ),
        case(
            o,
            r#"{"prompt": "a", "logit_bias": {"99999": 1}}"#,
            400,
            &["logit_bias token id 99999", "vocabulary"],
        ),
        case(
            o,
            r#"{"prompt": "a", "max_tokens": -5}"#,
            400,
            &["`max_tokens`"],
        ),
        case(
            o,
            r#"{"prompt": "a", "stream": "yes"}"#,
            400,
            &["`stream` must be a boolean"],
        ),
        case(o, r#"{"prompt": "a", "best_of": 4}"#, 400, &["`best_of`"]),
        case(o, r#"{"prompt": "a", "model": "gpt-4"}"#, 404, &["gpt-4"]),
        case(
            o,
            r#"{"prompt": "a", "tempreature": 1}"#,
            400,
            &["unknown parameter `tempreature`"],
        ),
    ];
    assert!(cases.len() >= 50);
    let mut failures = Vec::new();
    for c in &cases {
        let a = call(&s, "POST", &c.path, &c.body).await;
        let v = a.json();
        let cut: String = c.body.chars().take(80).collect();
        if v.is_null() {
            failures.push(format!("{} {cut}: not JSON: {}", c.path, a.text));
            continue;
        }
        let msg = error_message(&v);
        if a.status.as_u16() != c.status {
            failures.push(format!(
                "{} {cut}: status {}, want {}: {msg}",
                c.path, a.status, c.status
            ));
        }
        for n in &c.needles {
            if !msg.contains(n) {
                failures.push(format!("{} {cut}: message lacks {n:?}: {msg}", c.path));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(s.in_flight(), 0);
    assert_eq!(
        call(&s, "GET", &format!("/v1/models/{MODEL}"), "")
            .await
            .status,
        200
    );
}

/// One rule on every protocol: admission comes before the body is read, so a draining (or
/// loading) server answers 503 even to a malformed body, and a ready one 400/422.
#[tokio::test]
async fn admission_before_parsing_on_every_protocol() {
    let routes = [
        (format!("/v1/models/{MODEL}:predict"), 400),
        (format!("/v2/models/{MODEL}/generate"), 422),
        (format!("/v2/models/{MODEL}/generate_stream"), 422),
        ("/openai/v1/completions".to_owned(), 400),
    ];
    let s = ready(&[]);
    for (path, status) in &routes {
        let a = call(&s, "POST", path, "{not json").await;
        assert_eq!(a.status.as_u16(), *status, "{path}: {}", a.text);
    }
    let loading = loading(&[]);
    s.start_draining();
    for (path, _) in &routes {
        let a = call(&s, "POST", path, "{not json").await;
        assert_eq!(
            a.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{path}: {}",
            a.text
        );
        assert_eq!(a.headers["retry-after"], "5");
        let tag = if path.starts_with("/openai") {
            a.json()["error"]["code"].clone()
        } else {
            a.json()["error_type"].clone()
        };
        assert_eq!(tag, "draining", "{path}");
        let a = call(&loading, "POST", path, "{not json").await;
        assert_eq!(
            a.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{path}: {}",
            a.text
        );
    }
    assert_eq!(s.in_flight(), 0);
}

#[tokio::test]
async fn not_ready_while_loading() {
    let s = loading(&[]);
    let a = call(&s, "GET", &format!("/v1/models/{MODEL}"), "").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        a.json()["error"],
        "Model with name eleutherai-gpt-j-6b is not ready."
    );
    assert_eq!(call(&s, "GET", "/v2/health/ready", "").await.status, 503);
    let a = call(&s, "GET", "/", "").await;
    assert_eq!(
        (a.status, a.json()["status"].as_str()),
        (StatusCode::OK, Some("alive"))
    );
    let a = call(
        &s,
        "POST",
        &format!("/v1/models/{MODEL}:predict"),
        r#"{"instances": ["a"]}"#,
    )
    .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.json()["error_type"], "not_ready");
    assert_eq!(call(&s, "GET", "/v1/models/other", "").await.status, 404);
    assert_eq!(s.in_flight(), 0);
}

#[tokio::test]
async fn keys_guard_generation_routes_only() {
    let s = ready(&["--api-key", "k"]);
    let a = call(&s, "POST", "/openai/v1/completions", "{}").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.json()["error"]["type"], "authentication_error");
    assert_eq!(a.json()["error"]["code"], "unauthorized");
    assert_eq!(a.headers["www-authenticate"], "Bearer");
    assert_eq!(a.headers["x-should-retry"], "false");
    assert_eq!(call(&s, "GET", "/openai/v1/models", "").await.status, 401);
    let a = call(&s, "POST", &format!("/v2/models/{MODEL}/generate"), "{}").await;
    assert_eq!(
        (a.status, a.json()["error_type"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    // Probes and metadata stay open.
    assert_eq!(
        call(&s, "GET", &format!("/v1/models/{MODEL}"), "")
            .await
            .status,
        200
    );
    assert_eq!(call(&s, "GET", "/v2/health/ready", "").await.status, 200);
    let req = Request::builder()
        .method("POST")
        .uri(format!("/v1/models/{MODEL}:predict"))
        .header("authorization", "Bearer k")
        .body(Body::from(
            r#"{"instances": ["a"], "parameters": {"max_new_tokens": 3}}"#,
        ))
        .unwrap();
    let a = send(&s, req).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
}

/// 404 for unknown paths (in the shape of the group whose prefix they start with), 405 for
/// known paths with the wrong method, and the custom verb's rules.
#[tokio::test]
async fn routes_methods_and_custom_verbs() {
    let s = ready(&[]);
    let a = call(&s, "GET", "/nope", "").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert!(error_message(&a.json()).contains("/nope"));
    let a = call(&s, "POST", "/openai/v1/chat/nothing", "{}").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(
        a.json()["error"]["type"],
        "not_found_error",
        "OpenAI's shape: {}",
        a.text
    );
    let a = call(&s, "DELETE", "/v1/models", "").await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(a.json()["error_type"], "method_not_allowed");
    assert_eq!(a.headers["allow"], "GET,HEAD");
    // The documented 405s.
    let a = call(&s, "GET", &format!("/v1/models/{MODEL}:predict"), "").await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED, "{}", a.text);
    assert!(error_message(&a.json()).contains(":predict"), "{}", a.text);
    let a = call(&s, "POST", &format!("/v1/models/{MODEL}"), "{}").await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED, "{}", a.text);
    let a = call(&s, "GET", &format!("/v2/models/{MODEL}/generate"), "").await;
    assert_eq!(
        (a.status, a.json()["error_type"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
    );
    // Percent-encoding is not decoded before routing: `%3A` is not the verb.
    let a = call(
        &s,
        "POST",
        &format!("/v1/models/{MODEL}%3Apredict"),
        r#"{"instances": ["a"]}"#,
    )
    .await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED, "{}", a.text);
    // The verb's route is reached only through the verb.
    let a = call(
        &s,
        "POST",
        &format!("/v1/models/{MODEL}/:predict"),
        r#"{"instances": ["a"]}"#,
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.text);
    // A query string survives the rewrite.
    let a = call(
        &s,
        "POST",
        &format!("/v1/models/{MODEL}:predict?x=1"),
        r#"{"instances": ["a"], "parameters": {"max_new_tokens": 2}}"#,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
}

/// A generation through each protocol, in-process: the shapes of the answers.
#[tokio::test]
async fn each_protocol_answers_in_its_shape() {
    let s = ready(&[]);
    let a = call(&s, "POST", &format!("/v1/models/{MODEL}:predict"), r#"{"instances": ["Hello", "World"], "parameters": {"max_new_tokens": 4, "num_return_sequences": 2}}"#).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let v = a.json();
    assert_eq!(v["predictions"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["predictions"][1].as_array().map(Vec::len), Some(2));
    assert!(v["predictions"][1][0]["generated_text"]
        .as_str()
        .unwrap()
        .starts_with("World"));
    let a = call(
        &s,
        "POST",
        &format!("/v2/models/{MODEL}/generate"),
        r#"{"text_input": "Hello", "id": "r1", "parameters": {"max_tokens": 3}}"#,
    )
    .await;
    let v = a.json();
    assert_eq!(
        (v["id"].as_str(), v["finish_reason"].as_str()),
        (Some("r1"), Some("length")),
        "{v}"
    );
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let a = call(
        &s,
        "POST",
        "/openai/v1/completions",
        r#"{"prompt": "Hello", "max_tokens": 3, "n": 2, "echo": true}"#,
    )
    .await;
    let v = a.json();
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(2), "{v}");
    assert!(v["choices"][1]["text"]
        .as_str()
        .unwrap()
        .starts_with("Hello"));
    assert_eq!(v["usage"]["completion_tokens"], 6);
    let a = call(&s, "POST", "/openai/v1/completions", r#"{"prompt": "Hello", "max_tokens": 3, "stream": true, "stream_options": {"include_usage": true}}"#).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.text.trim_end().ends_with("data: [DONE]"), "{}", a.text);
    assert!(a.text.contains(r#""completion_tokens":3"#), "{}", a.text);
    let a = call(
        &s,
        "POST",
        &format!("/v2/models/{MODEL}/generate_stream"),
        r#"{"text_input": "Hello", "parameters": {"max_tokens": 3}}"#,
    )
    .await;
    assert!(a.text.contains(r#""done":true"#), "{}", a.text);
    assert_eq!(s.in_flight(), 0);
}

/// Errors keep their fields to the wire: OpenAI's `param` names the field that overflowed.
#[tokio::test]
async fn openai_param_names_the_field() {
    let s = ready(&[]);
    let a = call(
        &s,
        "POST",
        "/openai/v1/completions",
        r#"{"prompt": "a", "max_tokens": 4000}"#,
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.json()["error"]["param"], "max_tokens", "{}", a.text);
    let a = call(
        &s,
        "POST",
        "/openai/v1/completions",
        r#"{"prompt": "a", "top_p": 3}"#,
    )
    .await;
    assert_eq!(a.json()["error"]["param"], "top_p", "{}", a.text);
}

/// An answer sent before the body was read whole says `Connection: close`; one that read
/// it does not.
#[tokio::test]
async fn early_answers_close_the_connection() {
    let s = ready(&["--api-key", "k", "--body-limit", "1KiB"]);
    let body = r#"{"instances": ["a"], "parameters": {"max_new_tokens": 2}}"#;
    let unauthorized = call(&s, "POST", &format!("/v1/models/{MODEL}:predict"), body).await;
    assert_eq!(unauthorized.status, StatusCode::UNAUTHORIZED);
    assert_eq!(unauthorized.headers["connection"], "close");
    let not_found = call(&s, "POST", "/nowhere", body).await;
    assert_eq!(not_found.headers["connection"], "close");
    // A body in two pieces whose first is already over the limit: the second stays unread.
    let pieces = [
        format!(r#"{{"instances": ["{}"#, "x".repeat(4000)),
        r#""]}"#.to_owned(),
    ];
    let stream = futures_util::stream::iter(pieces.map(Ok::<_, std::io::Error>));
    let req = Request::builder()
        .method("POST")
        .uri(format!("/v1/models/{MODEL}:predict"))
        .header("authorization", "Bearer k")
        .body(Body::from_stream(stream))
        .unwrap();
    let too_large = send(&s, req).await;
    assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(too_large.headers["connection"], "close");
    let req = Request::builder()
        .method("POST")
        .uri(format!("/v1/models/{MODEL}:predict"))
        .header("authorization", "Bearer k")
        .body(Body::from(body))
        .unwrap();
    let ok = send(&s, req).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
    assert!(ok.headers.get("connection").is_none());
    // No body at all: nothing left unread.
    assert!(call(&s, "GET", "/nowhere", "")
        .await
        .headers
        .get("connection")
        .is_none());
}

/// The tenant boundary: a key is its tenant and the header only subdivides it; without keys
/// the header counts only when the operator trusts it; the cache scope follows the tenant.
#[test]
fn tenancy_follows_keys_and_trust() {
    use crate::generation::Tenancy;
    use crate::pipeline::tenancy;
    let keyed = loading(&["--api-key", "a,b"]);
    let t = tenancy(
        keyed.config(),
        Some(crate::api_keys::KeyIndex(1)),
        Some("x".into()),
    );
    assert_eq!(
        t,
        Tenancy {
            tenant: Some("key-1".into()),
            subtenant: Some("x".into()),
            cache_scope: Some("key-1".into()),
        }
    );
    let open = loading(&[]);
    assert_eq!(
        tenancy(open.config(), None, Some("x".into())),
        Tenancy::default()
    );
    let trusted = loading(&["--trust-tenant-header", "true"]);
    let t = tenancy(trusted.config(), None, Some("team-a".into()));
    assert_eq!(
        (t.tenant.as_deref(), t.subtenant, t.cache_scope.as_deref()),
        (Some("team-a"), None, Some("team-a"))
    );
    let shared = loading(&["--api-key", "a", "--prefix-cache-scope", "shared"]);
    let t = tenancy(shared.config(), Some(crate::api_keys::KeyIndex(0)), None);
    assert_eq!((t.tenant.as_deref(), t.cache_scope), (Some("key-0"), None));
}

// Ecosystem: the routes and extensions other clients and harnesses send.

/// A ready state over `model`.
fn ready_with(model: FakeModel, extra: &[&str]) -> AppState {
    let state = loading(extra);
    let scheduler =
        gptj_scheduler::spawn(model, gptj_scheduler::SchedulerConfig::default()).unwrap();
    state.set_ready(Backend::new(scheduler, tokenizer().clone(), 2048));
    state
}

/// The JSON of every `data:` line of an SSE body but `[DONE]`, and whether `[DONE]` ended it.
fn sse_events(text: &str) -> (Vec<Value>, bool) {
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    let done = data.last() == Some(&"[DONE]");
    let events = data
        .iter()
        .filter(|d| **d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    (events, done)
}

const CHAT_TEMPLATE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/chat-template.jinja");

#[tokio::test]
async fn openai_paths_errors_and_models() {
    let s = ready(&[]);
    let body = r#"{"prompt": "Hello", "max_tokens": 3, "temperature": 0}"#;
    let a = call(&s, "POST", "/v1/completions", body).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let b = call(&s, "POST", "/openai/v1/completions", body).await;
    assert_eq!(a.json()["choices"], b.json()["choices"]);
    // Errors under OpenAI paths are OpenAI's, with its types and gptj's tag as `code`.
    let a = call(
        &s,
        "POST",
        "/v1/completions",
        r#"{"prompt": "a", "top_p": 2}"#,
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let e = &a.json()["error"];
    assert_eq!(e["type"], "invalid_request_error", "{}", a.text);
    assert_eq!(
        (e["code"].as_str(), e["param"].as_str()),
        (Some("validation"), Some("top_p"))
    );
    assert_eq!(a.headers["x-should-retry"], "false");
    let a = call(
        &s,
        "POST",
        "/v1/completions",
        r#"{"prompt": "a", "model": "gpt-4"}"#,
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.json()["error"]["type"], "not_found_error");
    let a = call(&s, "GET", "/v1/completions", "").await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(a.json()["error"]["type"], "invalid_request_error");
    // Unknown paths under OpenAI's own `/v1/chat/` and `/v1/completions/` answer OpenAI's shape.
    for path in [
        "/v1/chat/nothing",
        "/v1/chat/completions/x",
        "/v1/completions/x",
    ] {
        let a = call(&s, "POST", path, "{}").await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(
            a.json()["error"]["type"],
            "not_found_error",
            "{path}: {}",
            a.text
        );
    }
    // models.retrieve.
    let a = call(&s, "GET", &format!("/openai/v1/models/{MODEL}"), "").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.json(),
        json!({"id": MODEL, "object": "model", "created": 0, "owned_by": "gptj"})
    );
    let a = call(&s, "GET", "/openai/v1/models/gpt-4", "").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.json()["error"]["type"], "not_found_error");
    // KServe V1's model routes answer in both shapes, KServe's first.
    let v = call(&s, "GET", "/v1/models", "").await.json();
    assert_eq!(v["models"], json!([MODEL]));
    assert_eq!(
        (v["object"].as_str(), v["data"][0]["id"].as_str()),
        (Some("list"), Some(MODEL))
    );
    let v = call(&s, "GET", &format!("/v1/models/{MODEL}"), "")
        .await
        .json();
    assert_eq!(
        (v["name"].as_str(), v["ready"].as_bool()),
        (Some(MODEL), Some(true))
    );
    assert_eq!(
        (v["id"].as_str(), v["object"].as_str()),
        (Some(MODEL), Some("model"))
    );
    let a = call(&s, "GET", "/v1/models/gpt-4", "").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.json()["error_type"], "not_found");
}

#[tokio::test]
async fn ignore_eos_runs_past_end_of_text() {
    // A model that always says end-of-text.
    let s = ready_with(FakeModel::new(512, 16).with_rule(|_| 50256), &[]);
    let ask =
        |extra: &str| format!(r#"{{"prompt": "Hello", "max_tokens": 5, "temperature": 0{extra}}}"#);
    let v = call(&s, "POST", "/v1/completions", &ask("")).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 1);
    let v = call(
        &s,
        "POST",
        "/v1/completions",
        &ask(r#", "ignore_eos": true"#),
    )
    .await
    .json();
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    // In KServe's `parameters` too, since it is in the one table.
    let body = r#"{"instances": ["Hello"], "parameters": {"max_new_tokens": 4, "do_sample": false, "ignore_eos": true, "return_full_text": false}}"#;
    let a = call(&s, "POST", &format!("/v1/models/{MODEL}:predict"), body).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json()["predictions"][0]["generated_text"], "!!!!");
}

#[tokio::test]
async fn stop_token_ids_end_generation() {
    let s = ready_with(
        FakeModel::new(512, 16).with_rule(|ctx| 100 + (ctx.len() % 3) as u32),
        &[],
    );
    let prompt_len = tokenizer().encode("Hello world").unwrap().len();
    let generated: Vec<u32> = (0..8)
        .map(|i| 100 + ((prompt_len + i) % 3) as u32)
        .collect();
    let ask = |extra: &str| {
        format!(r#"{{"prompt": "Hello world", "max_tokens": 8, "temperature": 0{extra}}}"#)
    };
    let v = call(&s, "POST", "/v1/completions", &ask("")).await.json();
    assert_eq!(v["choices"][0]["text"], tokenizer().decode(&generated));
    let at = generated.iter().position(|&t| t == 102).unwrap();
    let v = call(
        &s,
        "POST",
        "/v1/completions",
        &ask(r#", "stop_token_ids": [102]"#),
    )
    .await
    .json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], at + 1);
    assert_eq!(
        v["choices"][0]["text"],
        tokenizer().decode(&generated[..at])
    );
    // The minimum holds stop tokens back as it holds back end-of-text.
    let v = call(
        &s,
        "POST",
        "/v1/completions",
        &ask(r#", "stop_token_ids": [102], "min_tokens": 4"#),
    )
    .await
    .json();
    let n = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((5..=7).contains(&n), "{v}");
    let a = call(
        &s,
        "POST",
        "/v1/completions",
        &ask(r#", "stop_token_ids": [60000]"#),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(
        error_message(&a.json()).contains("outside the vocabulary"),
        "{}",
        a.text
    );
}

#[tokio::test]
async fn tokenize_and_detokenize_in_vllms_shapes() {
    let s = ready(&[]);
    let ids = tokenizer().encode("Hello world").unwrap();
    for prefix in ["", "/openai"] {
        let a = call(
            &s,
            "POST",
            &format!("{prefix}/tokenize"),
            &json!({"model": MODEL, "prompt": "Hello world", "add_special_tokens": true})
                .to_string(),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        assert_eq!(
            a.json(),
            json!({"count": ids.len(), "max_model_len": 2048, "tokens": ids})
        );
        let a = call(
            &s,
            "POST",
            &format!("{prefix}/detokenize"),
            &json!({"tokens": ids}).to_string(),
        )
        .await;
        assert_eq!(a.json(), json!({"prompt": "Hello world"}), "{}", a.text);
    }
    let cases = [
        ("/tokenize", json!({"prompt": 3}), 400, "`prompt`"),
        ("/tokenize", json!({}), 400, "missing `prompt`"),
        (
            "/tokenize",
            json!({"prompt": "a", "messages": []}),
            400,
            "not both",
        ),
        (
            "/tokenize",
            json!({"messages": [{"role": "user", "content": "a"}]}),
            400,
            "--chat-template",
        ),
        ("/tokenize", json!({"prompt": "a", "model": "x"}), 404, "x"),
        (
            "/detokenize",
            json!({"tokens": [1, 50400]}),
            400,
            "tokens[1]",
        ),
        ("/detokenize", json!({"tokens": "a"}), 400, "`tokens`"),
    ];
    for (path, body, status, needle) in cases {
        let a = call(&s, "POST", path, &body.to_string()).await;
        assert_eq!(a.status.as_u16(), status, "{body}: {}", a.text);
        assert!(
            error_message(&a.json()).contains(needle),
            "{body}: {}",
            a.text
        );
        assert!(
            a.json()["error"]["type"].is_string(),
            "OpenAI's shape: {}",
            a.text
        );
    }
    // The chat form counts the template's prompt.
    let chat = ready(&["--chat-template", CHAT_TEMPLATE]);
    let ids = tokenizer().encode("User: Hi\nAssistant:").unwrap();
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]});
    let a = call(&chat, "POST", "/tokenize", &body.to_string()).await;
    assert_eq!(a.json()["tokens"], json!(ids), "{}", a.text);
    let keyed = ready(&["--api-key", "k"]);
    let a = call(&keyed, "POST", "/tokenize", r#"{"prompt": "a"}"#).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let a = call(&loading(&[]), "POST", "/tokenize", r#"{"prompt": "a"}"#).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn chat_completions_with_a_template() {
    let s = ready(&["--chat-template", CHAT_TEMPLATE]);
    let messages = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]);
    let body = json!({"model": MODEL, "messages": messages, "max_tokens": 6, "seed": 3, "n": 2});
    let a = call(&s, "POST", "/openai/v1/chat/completions", &body.to_string()).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let v = a.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    // The prompt is the template's rendering.
    let prompt = "Be brief.\n\nUser: Hi\nAssistant:";
    let prompt_tokens = tokenizer().encode(prompt).unwrap().len();
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
    // The same as a completion of the rendered prompt, and as the streamed answer.
    let c = json!({"prompt": prompt, "max_tokens": 6, "seed": 3, "n": 2});
    let c = call(&s, "POST", "/v1/completions", &c.to_string())
        .await
        .json();
    for i in 0..2 {
        assert_eq!(
            v["choices"][i]["message"]["content"],
            c["choices"][i]["text"]
        );
    }
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let a = call(&s, "POST", "/v1/chat/completions", &streamed.to_string()).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let (events, done) = sse_events(&a.text);
    assert!(done, "{}", a.text);
    let mut texts = [String::new(), String::new()];
    for e in &events[..2] {
        assert_eq!(e["choices"][0]["delta"]["role"], "assistant", "{e}");
    }
    let mut finished = 0;
    for e in &events {
        assert_eq!(e["object"], "chat.completion.chunk");
        let Some(ch) = e["choices"].get(0) else {
            assert_eq!(e["usage"], v["usage"]);
            continue;
        };
        let i = ch["index"].as_u64().unwrap() as usize;
        texts[i].push_str(ch["delta"]["content"].as_str().unwrap_or(""));
        if ch["finish_reason"].is_string() {
            assert_eq!(ch["delta"], json!({}));
            finished += 1;
        }
    }
    assert_eq!(finished, 2);
    for i in 0..2 {
        assert_eq!(v["choices"][i]["message"]["content"], texts[i].as_str());
    }
    // The template refuses what it does not know.
    let bad = json!({"messages": [{"role": "tool", "content": "x"}]});
    let a = call(&s, "POST", "/v1/chat/completions", &bad.to_string()).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(
        error_message(&a.json()).contains("unsupported role `tool`"),
        "{}",
        a.text
    );
}

#[tokio::test]
async fn chat_without_a_template_says_how_to_get_one() {
    let s = ready(&[]);
    let body = r#"{"messages": [{"role": "user", "content": "Hi"}]}"#;
    for path in ["/openai/v1/chat/completions", "/v1/chat/completions"] {
        let a = call(&s, "POST", path, body).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.text);
        let m = error_message(&a.json());
        assert!(
            m.contains("no chat template")
                && m.contains("--chat-template")
                && m.contains("/v1/completions"),
            "{m}"
        );
        assert_eq!(a.json()["error"]["type"], "invalid_request_error");
    }
}

#[tokio::test]
async fn v2_infer_takes_and_gives_bytes_tensors() {
    let s = ready(&[]);
    let path = format!("/v2/models/{MODEL}/infer");
    let body = json!({
        "id": "q1",
        "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [2], "data": ["Hello", "Bye"]}],
        "parameters": {"max_tokens": 4, "temperature": 0},
    });
    let a = call(&s, "POST", &path, &body.to_string()).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let v = a.json();
    assert_eq!(
        (v["model_name"].as_str(), v["id"].as_str()),
        (Some(MODEL), Some("q1"))
    );
    let out = &v["outputs"][0];
    assert_eq!(
        (out["name"].as_str(), out["datatype"].as_str()),
        (Some("text_output"), Some("BYTES"))
    );
    assert_eq!(out["shape"], json!([2]));
    // The same text as the generate extension gives each prompt.
    for (i, prompt) in ["Hello", "Bye"].iter().enumerate() {
        let g = json!({"text_input": prompt, "parameters": {"max_tokens": 4, "temperature": 0}});
        let g = call(
            &s,
            "POST",
            &format!("/v2/models/{MODEL}/generate"),
            &g.to_string(),
        )
        .await
        .json();
        assert_eq!(out["data"][i], g["text_output"]);
    }
    // OIP's errors.
    let a = call(&s, "POST", &path, r#"{"inputs": []}"#).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(a.json()["error_type"], "validation");
    let a = call(&s, "POST", "/v2/models/other/infer", &body.to_string()).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert!(a.json()["error"].is_string());
    // The binary tensor data extension, as tritonclient sends it by default.
    let head = json!({
        "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 16}}],
        "parameters": {"max_tokens": 4, "temperature": 0, "binary_data_output": true},
    })
    .to_string();
    let mut raw = head.clone().into_bytes();
    for p in ["Hello", "Bye"] {
        raw.extend_from_slice(&(p.len() as u32).to_le_bytes());
        raw.extend_from_slice(p.as_bytes());
    }
    let binary = |raw: Vec<u8>, len: usize| {
        Request::builder()
            .method("POST")
            .uri(&path)
            .header("inference-header-content-length", len.to_string())
            .body(Body::from(raw))
            .unwrap()
    };
    let a = send(&s, binary(raw.clone(), head.len())).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json()["outputs"][0]["data"], out["data"]);
    let a = send(&s, binary(raw[..raw.len() - 1].to_vec(), head.len())).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", a.text);
    assert!(
        error_message(&a.json()).contains("binary_data_size"),
        "{}",
        a.text
    );
    let a = send(&s, binary(raw.clone(), head.len() + 100)).await;
    assert!(
        error_message(&a.json()).contains("inference-header-content-length"),
        "{}",
        a.text
    );
}

/// OpenAI's logit bias and penalties reach the sampler: a +100 bias makes greedy decoding
/// pick that token every time, on completions and in KServe's `parameters` alike; a large
/// frequency penalty stops the model repeating it.
#[tokio::test]
async fn logit_bias_and_penalties_steer_the_sampler() {
    let s = ready(&[]);
    let token = 6342;
    let text = tokenizer().decode(&[token]);
    let body = format!(
        r#"{{"prompt": "Hello", "max_tokens": 5, "temperature": 0, "logit_bias": {{"{token}": 100}}}}"#
    );
    let a = call(&s, "POST", "/openai/v1/completions", &body).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json()["choices"][0]["text"], text.repeat(5), "{}", a.text);
    let body = format!(
        r#"{{"instances": ["Hello"], "parameters": {{"max_new_tokens": 5, "do_sample": false, "logit_bias": {{"{token}": 100}}}}}}"#
    );
    let a = call(&s, "POST", &format!("/v1/models/{MODEL}:predict"), &body).await;
    assert_eq!(
        a.json()["predictions"][0]["generated_text"],
        format!("Hello{}", text.repeat(5)),
        "{}",
        a.text
    );
    // The fake model's logits are 10 for its choice and -10 elsewhere: a bias of +25 with a
    // frequency penalty of 2 per repetition wins three times (15, 13, 11), then loses (9).
    let body = format!(
        r#"{{"prompt": "Hello", "max_tokens": 5, "temperature": 0, "logit_bias": {{"{token}": 25}}, "frequency_penalty": 2}}"#
    );
    let a = call(&s, "POST", "/openai/v1/completions", &body).await;
    let got = a.json()["choices"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        got.starts_with(&text.repeat(3)) && !got.starts_with(&text.repeat(4)),
        "{got:?}"
    );
}

#[tokio::test]
async fn logprobs_over_token_prompts_echo_and_streams() {
    let s = ready(&[]);
    let ids = [464u32, 3290, 318, 257, 1332];
    let ask = |extra: &str| {
        format!(
            r#"{{"prompt": [{ids:?}], "max_tokens": 4, "temperature": 0, "logprobs": 2{extra}}}"#
        )
    };
    let v = call(&s, "POST", "/v1/completions", &ask(r#", "echo": true"#))
        .await
        .json();
    let choice = &v["choices"][0];
    let lp = &choice["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), ids.len() + 4, "{v}");
    // The first prompt token has nothing before it.
    assert!(
        lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null(),
        "{v}"
    );
    let prompt_text = tokenizer().decode(&ids);
    let text = choice["text"].as_str().unwrap();
    assert!(text.starts_with(&prompt_text), "{text:?}");
    // Every listed value is the model's log-softmax; the ids come back through the token texts.
    let rule = gptj_scheduler::testing::hash_rule();
    let mut all = ids.to_vec();
    for _ in 0..4 {
        all.push(rule(&all));
    }
    for (t, &id) in all.iter().enumerate() {
        assert_eq!(tokens[t], tokenizer().token_text(id), "position {t}");
    }
    for t in 1..all.len() {
        let want = gptj_scheduler::testing::hash_rule_logprob(&all[..t], all[t]);
        let got = lp["token_logprobs"][t].as_f64().unwrap();
        assert!((got - want).abs() < 1e-5, "position {t}: {got} vs {want}");
        let top = lp["top_logprobs"][t].as_object().unwrap();
        assert!((1..=3).contains(&top.len()), "{top:?}");
        assert!(top.contains_key(tokens[t].as_str().unwrap()));
    }
    // Greedy tokens are the model's most likely: near 0.
    assert!(lp["token_logprobs"][ids.len()].as_f64().unwrap() > -1e-3);
    let offsets: Vec<usize> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(offsets[0], 0);
    assert_eq!(offsets[ids.len()], prompt_text.chars().count());
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");

    // Streamed: the chunks' listings put together are the same listing.
    let a = call(
        &s,
        "POST",
        "/v1/completions",
        &ask(r#", "echo": true, "stream": true"#),
    )
    .await;
    let (events, done) = sse_events(&a.text);
    assert!(done, "{}", a.text);
    let mut joined: HashMap<&str, Vec<Value>> = HashMap::new();
    let mut streamed_text = String::new();
    for e in &events {
        let c = &e["choices"][0];
        streamed_text.push_str(c["text"].as_str().unwrap_or_default());
        if let Some(l) = c["logprobs"].as_object() {
            for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
                joined
                    .entry(key)
                    .or_default()
                    .extend(l[key].as_array().unwrap().clone());
            }
        }
    }
    assert_eq!(streamed_text, text);
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(Value::Array(joined[key].clone()), lp[key], "{key}");
    }

    // Without the echo: the completion's tokens alone, offsets after the prompt.
    let v = call(&s, "POST", "/v1/completions", &ask("")).await.json();
    let lp2 = &v["choices"][0]["logprobs"];
    assert_eq!(lp2["tokens"].as_array().unwrap()[..], tokens[ids.len()..]);
    assert_eq!(lp2["text_offset"][0], offsets[ids.len()]);
    assert_eq!(lp2["token_logprobs"][0], lp["token_logprobs"][ids.len()]);
    // Without `logprobs`: null, as before.
    let body = format!(r#"{{"prompt": [{ids:?}], "max_tokens": 2}}"#);
    let v = call(&s, "POST", "/v1/completions", &body).await.json();
    assert!(v["choices"][0]["logprobs"].is_null(), "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
}

#[tokio::test]
async fn chat_logprobs_in_openai_s_shape_plain_and_streamed() {
    let s = ready(&["--chat-template", CHAT_TEMPLATE]);
    let ask = |extra: &str| {
        format!(
            r#"{{"messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": 4, "temperature": 0, "logprobs": true, "top_logprobs": 3{extra}}}"#
        )
    };
    let v = call(&s, "POST", "/v1/chat/completions", &ask(""))
        .await
        .json();
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        content.len(),
        v["usage"]["completion_tokens"].as_u64().unwrap() as usize,
        "{v}"
    );
    let mut text = String::new();
    for e in &content {
        let bytes: Vec<u8> = e["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(e["token"], String::from_utf8_lossy(&bytes).as_ref());
        text.push_str(e["token"].as_str().unwrap());
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely, with the same value.
        assert_eq!(top[0]["token"], e["token"]);
        assert_eq!(top[0]["logprob"], e["logprob"]);
        assert!(e["logprob"].as_f64().unwrap() <= 0.0);
    }
    assert_eq!(v["choices"][0]["message"]["content"], text, "{v}");
    // Streamed: the chunks' entries, in order, are the same.
    let a = call(
        &s,
        "POST",
        "/v1/chat/completions",
        &ask(r#", "stream": true"#),
    )
    .await;
    let (events, done) = sse_events(&a.text);
    assert!(done);
    let streamed: Vec<Value> = events
        .iter()
        .filter_map(|e| e["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(streamed, content);
    // Without `logprobs`, none.
    let body = r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}"#;
    let v = call(&s, "POST", "/v1/chat/completions", body).await.json();
    assert!(v["choices"][0]["logprobs"].is_null(), "{v}");
}
