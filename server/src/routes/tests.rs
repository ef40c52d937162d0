//! The app in-process, without a socket: validation on every protocol, routes, methods,
//! keys and lifecycle, against the scheduler's `FakeModel` (exact, instant, context 2048)
//! with GPT-J's real tokenizer. What needs the binary (the seed's bodies on the real model,
//! signals, ports, metrics) is in the root package's `tests/`.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use clap::Parser;
use gptj_scheduler::testing::{tokenizer, FakeModel};
use http_body_util::BodyExt;
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
            r#"{"prompt": [[1, 2, 3]]}"#,
            400,
            &["`prompt[0]`", "token-id prompts are not supported"],
        ),
        case(o, r#"{"prompt": "a", "logprobs": 3}"#, 400, &["`logprobs`"]),
        case(
            o,
            r#"{"prompt": "a", "frequency_penalty": 0.5}"#,
            400,
            &["`frequency_penalty`", "repetition_penalty"],
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
            a.json()["error"]["type"].clone()
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
    assert_eq!(a.json()["error"]["type"], "unauthorized");
    assert_eq!(a.headers["www-authenticate"], "Bearer");
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
    assert_eq!(a.json()["error"]["code"], 404, "OpenAI's shape: {}", a.text);
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
