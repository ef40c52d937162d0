//! End-to-end tests of the HTTP API on the real binary (`builtin:tiny`): the seed's curl
//! bodies, the three protocols agreeing with each other, API keys, metrics, timeouts. The
//! validation table runs in-process against the router (`server/src/routes/tests.rs`).

mod common;

use common::{Server, MODEL};
use serde_json::{json, Value};

/// The JSON bodies of the seed's curl commands, verbatim, with their prompts.
fn seed_bodies() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        (
            r#"{"parameters": {"min_length":150,"max_length":200}, "instances": ["In a shocking finding, scientist discovered a herd of unicorns living in a remote, previously unexplored valley"]}"#,
            vec!["In a shocking finding, scientist discovered a herd of unicorns living in a remote, previously unexplored valley"],
        ),
        (
            r#"{"parameters": {"min_length":50,"max_length":100}, "instances": ["Everytime I look to the sky, I always think", "Right now is the perfect time to", "The one thing I will never regret is", "The secret to a happy life is to"]}"#,
            vec![
                "Everytime I look to the sky, I always think",
                "Right now is the perfect time to",
                "The one thing I will never regret is",
                "The secret to a happy life is to",
            ],
        ),
        (
            r#"{"parameters": {"min_length":50,"max_length":100}, "instances": ["Message: The last show was terrible. Sentiment: Negative, Message: I feel great this morning.Sentiment: Positive, Message: GPT-J has 6 billion parameters.Sentiment: Neutral, Message: It was my all-time favorite movie.Sentiment:"]}"#,
            vec!["Message: The last show was terrible. Sentiment: Negative, Message: I feel great this morning.Sentiment: Positive, Message: GPT-J has 6 billion parameters.Sentiment: Neutral, Message: It was my all-time favorite movie.Sentiment:"],
        ),
        (
            r#"{"parameters": {"min_length":50,"max_length":250}, "instances": ["Question: Select teams that have less than 3 developers in it.Answer: SELECT TEAM, COUNT(DEVELOPER) FROM team GROUP BY TEAM HAVING COUNT(DEVELOPER) < 3;Question: Show all teams along with the number of developers in each team, Answer: SELECT TEAM, COUNT(TEAM) FROM team GROUP BY TEAM;Question: Show the recent hired developer, Answer: SELECT * FROM team ORDER BY ID DESC LIMIT 1;Question: Fetch the first three developers from team table;Answer:"]}"#,
            vec!["Question: Select teams that have less than 3 developers in it.Answer: SELECT TEAM, COUNT(DEVELOPER) FROM team GROUP BY TEAM HAVING COUNT(DEVELOPER) < 3;Question: Show all teams along with the number of developers in each team, Answer: SELECT TEAM, COUNT(TEAM) FROM team GROUP BY TEAM;Question: Show the recent hired developer, Answer: SELECT * FROM team ORDER BY ID DESC LIMIT 1;Question: Fetch the first three developers from team table;Answer:"],
        ),
    ]
}

fn generated_text(v: &Value) -> &str {
    v["generated_text"]
        .as_str()
        .unwrap_or_else(|| panic!("no generated_text in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_curl_bodies_verbatim() {
    let s = Server::start(&[]).await;
    let (status, body) = s.get("/").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"alive"}"#));
    let (status, body) = s.get("/v1/models").await;
    assert_eq!(status, 200);
    // KServe's `models`, plus OpenAI's list fields for clients whose base URL is `/v1`.
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["models"], json!([MODEL]), "{v}");
    assert_eq!(
        (v["object"].as_str(), v["data"][0]["id"].as_str()),
        (Some("list"), Some(MODEL))
    );
    let reqs = seed_bodies().into_iter().map(|(body, prompts)| {
        let s = &s;
        async move {
            let (status, headers, text) = s
                .post_raw(&format!("/v1/models/{MODEL}:predict"), body)
                .await;
            assert_eq!(status, 200, "{text}");
            assert!(headers.contains_key("x-request-id"));
            let v: Value = serde_json::from_str(&text).unwrap();
            let preds = v["predictions"].as_array().expect("predictions array");
            assert_eq!(v.as_object().unwrap().len(), 1, "only `predictions`: {v}");
            if prompts.len() == 1 {
                // One instance: {"predictions": [{"generated_text": ...}]}
                assert_eq!(preds.len(), 1, "{v}");
                let t = generated_text(&preds[0]);
                assert!(
                    t.starts_with(prompts[0]) && t.len() > prompts[0].len(),
                    "{t}"
                );
            } else {
                // Several: {"predictions": [[{...}], [{...}], ...]}
                assert_eq!(preds.len(), prompts.len(), "{v}");
                for (p, prompt) in preds.iter().zip(&prompts) {
                    let list = p.as_array().expect("one list per instance");
                    assert_eq!(list.len(), 1);
                    let t = generated_text(&list[0]);
                    assert!(t.starts_with(prompt) && t.len() > prompt.len(), "{t}");
                }
            }
        }
    });
    futures_util::future::join_all(reqs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lengths_count_the_prompt_and_sequences_multiply() {
    let s = Server::start(&[]).await;
    // max_length counts the prompt: prompt + completion == max_length (no EOS before
    // min_length, which equals it).
    let (status, v) = s
        .post_json(
            &format!("/v2/models/{MODEL}/generate"),
            &json!({"text_input": "The secret to a happy life is to", "parameters": {"max_length": 30, "min_length": 30}}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 5);
    assert_eq!(
        v["usage"]["completion_tokens"].as_u64().unwrap(),
        30 - prompt
    );
    assert_eq!(v["finish_reason"], "length");
    // num_return_sequences gives k objects per instance; with a seed they are reproducible
    // and (sampling) differ from each other.
    let body = json!({"instances": ["Hello", "World"], "parameters": {"num_return_sequences": 3, "seed": 5, "max_new_tokens": 8, "return_full_text": false}});
    let (status, v1) = s
        .post_json(&format!("/v1/models/{MODEL}:predict"), &body)
        .await;
    assert_eq!(status, 200, "{v1}");
    let preds = v1["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 2);
    for p in preds {
        let texts: Vec<&str> = p.as_array().unwrap().iter().map(generated_text).collect();
        assert_eq!(texts.len(), 3);
        assert!(texts[0] != texts[1] || texts[1] != texts[2], "{texts:?}");
        assert!(!texts[0].starts_with("Hello"));
    }
    let (_, again) = s
        .post_json(&format!("/v1/models/{MODEL}:predict"), &body)
        .await;
    assert_eq!(v1, again, "same seed, same texts");
    // Stop strings: the text ends just before the first occurrence, which is not returned.
    let greedy = json!({"text_input": "Right now is the perfect time to", "parameters": {"do_sample": false, "max_new_tokens": 16}});
    let (_, full) = s
        .post_json(&format!("/v2/models/{MODEL}/generate"), &greedy)
        .await;
    let full = full["text_output"].as_str().unwrap().to_owned();
    let chars: Vec<char> = full.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let cut = &full[..full.find(&stop).unwrap()];
    let mut with_stop = greedy.clone();
    with_stop["parameters"]["stop"] = json!([stop]);
    let (st, v) = s
        .post_json(&format!("/v2/models/{MODEL}/generate"), &with_stop)
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["text_output"], cut, "stop {stop:?} in {full:?}");
    assert_eq!(v["finish_reason"], "stop_sequence");
    let (_, events) = s
        .post_sse(&format!("/v2/models/{MODEL}/generate_stream"), &with_stop)
        .await;
    let streamed: String = events
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["text_output"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(streamed, cut);
    // Sequence j with seed s is sequence 0 with seed s + j.
    let shifted = json!({"instances": ["Hello", "World"], "parameters": {"num_return_sequences": 3, "seed": 7, "max_new_tokens": 8, "return_full_text": false}});
    let (_, v2) = s
        .post_json(&format!("/v1/models/{MODEL}:predict"), &shifted)
        .await;
    assert_eq!(v2["predictions"][0][0], v1["predictions"][0][2]);
    assert_eq!(v2["predictions"][1][0], v1["predictions"][1][2]);
    // The same seed alone gives the same text as inside a batch of six: the engine's numerics
    // do not depend on what shares a step.
    let alone = json!({"instances": ["Hello"], "parameters": {"seed": 7, "max_new_tokens": 8, "return_full_text": false}});
    let (_, v3) = s
        .post_json(&format!("/v1/models/{MODEL}:predict"), &alone)
        .await;
    assert_eq!(v3["predictions"][0], v1["predictions"][0][2]);
}

fn openai_text(v: &Value, i: usize) -> String {
    v["choices"][i]["text"].as_str().unwrap().to_owned()
}

/// Concatenates the text of an OpenAI stream per choice index; checks the protocol on the way.
fn openai_stream_texts(events: &[String], n: usize) -> (Vec<String>, Value) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let mut texts = vec![String::new(); n];
    let mut finished = vec![false; n];
    let mut usage = Value::Null;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert_eq!(v["object"], "text_completion");
        if let Some(u) = v.get("usage") {
            usage = u.clone();
            assert_eq!(v["choices"], json!([]));
            continue;
        }
        let c = &v["choices"][0];
        let i = c["index"].as_u64().unwrap() as usize;
        assert!(!finished[i], "chunk after the finish chunk: {e}");
        let text = c["text"].as_str().unwrap();
        if c["finish_reason"].is_null() {
            assert!(!text.is_empty(), "empty text chunk");
        } else {
            // finish_reason comes in its own chunk, with no text.
            assert_eq!(text, "", "{e}");
            finished[i] = true;
        }
        texts[i].push_str(text);
    }
    assert!(finished.iter().all(|f| *f), "every choice finishes");
    (texts, usage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_and_not_streamed_agree_on_all_protocols() {
    let s = Server::start(&[]).await;
    let prompt = "The one thing I will never regret is";
    let params =
        json!({"seed": 1234, "temperature": 0.9, "top_k": 40, "top_p": 0.95, "max_new_tokens": 24});
    // KServe V1 (no streaming of its own: the reference for the others).
    let mut p = params.clone();
    p["return_full_text"] = json!(false);
    let (st, v1) = s
        .post_json(
            &format!("/v1/models/{MODEL}:predict"),
            &json!({"instances": [prompt], "parameters": p}),
        )
        .await;
    assert_eq!(st, 200, "{v1}");
    let reference = generated_text(&v1["predictions"][0]).to_owned();
    assert!(!reference.is_empty());
    // OIP generate and generate_stream.
    let body = json!({"text_input": prompt, "parameters": params, "id": "req-1"});
    let (st, v2) = s
        .post_json(&format!("/v2/models/{MODEL}/generate"), &body)
        .await;
    assert_eq!(st, 200, "{v2}");
    assert_eq!(v2["text_output"], reference.as_str());
    assert_eq!(v2["model_name"], MODEL);
    assert_eq!(v2["id"], "req-1");
    let (st, events) = s
        .post_sse(&format!("/v2/models/{MODEL}/generate_stream"), &body)
        .await;
    assert_eq!(st, 200);
    let mut streamed = String::new();
    for (i, e) in events.iter().enumerate() {
        let v: Value = serde_json::from_str(e).unwrap();
        assert_eq!(v["done"], json!(i == events.len() - 1), "{e}");
        streamed.push_str(v["text_output"].as_str().unwrap());
        if v["done"] == json!(true) {
            assert_eq!(v["finish_reason"], "length");
            assert_eq!(v["usage"]["completion_tokens"], 24);
        }
    }
    assert_eq!(streamed, reference);
    // OpenAI, with n = 2: choice j uses seed + j in both modes.
    let oa = json!({"prompt": prompt, "seed": 1234, "temperature": 0.9, "top_k": 40, "top_p": 0.95, "max_tokens": 24, "n": 2});
    let (st, v3) = s.post_json("/openai/v1/completions", &oa).await;
    assert_eq!(st, 200, "{v3}");
    assert_eq!(openai_text(&v3, 0), reference);
    assert_eq!(v3["choices"][0]["finish_reason"], "length");
    assert_eq!(v3["usage"]["completion_tokens"], 48);
    let mut oas = oa.clone();
    oas["stream"] = json!(true);
    oas["stream_options"] = json!({"include_usage": true});
    let (st, events) = s.post_sse("/openai/v1/completions", &oas).await;
    assert_eq!(st, 200);
    let (texts, usage) = openai_stream_texts(&events, 2);
    assert_eq!(texts[0], reference);
    assert_eq!(texts[1], openai_text(&v3, 1));
    assert_eq!(usage, v3["usage"]);
    // echo / return_full_text put the prompt first, streamed or not.
    let mut echo = oa.clone();
    echo["echo"] = json!(true);
    echo["n"] = json!(1);
    let (_, v4) = s.post_json("/openai/v1/completions", &echo).await;
    assert_eq!(openai_text(&v4, 0), format!("{prompt}{reference}"));
    echo["stream"] = json!(true);
    let (_, events) = s.post_sse("/openai/v1/completions", &echo).await;
    assert_eq!(
        openai_stream_texts(&events, 1).0[0],
        format!("{prompt}{reference}")
    );
    // Greedy decoding: the one-shot CLI gives the same text as the server.
    let (_, greedy) = s
        .post_json(
            &format!("/v2/models/{MODEL}/generate"),
            &json!({"text_input": prompt, "parameters": {"do_sample": false, "max_new_tokens": 12}}),
        )
        .await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gptj"))
        .args([
            "generate",
            "--model",
            "builtin:tiny",
            "--do-sample",
            "false",
            "--max-new-tokens",
            "12",
            prompt,
        ])
        .output()
        .expect("run gptj generate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        printed,
        format!("{prompt}{}\n", greedy["text_output"].as_str().unwrap())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_generation_only() {
    // Keys from the environment (comma-separated), and the port from KServe's PORT.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let port_s = port.to_string();
    let s = Server::start_with_env(
        &["--api-key", "key-one"],
        &[("GPTJ_API_KEY", "key-two,key-three"), ("PORT", &port_s)],
    )
    .await;
    assert_eq!(s.port, port);
    // A flag replaces the environment variable (clap), so only key-one is valid here.
    let body = json!({"instances": ["Hi"], "parameters": {"max_new_tokens": 2}}).to_string();
    let send = |auth: Option<&'static str>, path: String, body: String| {
        let c = s.client.clone();
        async move {
            let mut r = c.post(path).body(body);
            if let Some(a) = auth {
                r = r.header("authorization", a);
            }
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            let www = r.headers().get("www-authenticate").is_some();
            (status, www, r.text().await.unwrap())
        }
    };
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer key-on"),
        Some("key-one"),
        Some("Basic key-one"),
    ] {
        let (st, www, text) = send(auth, s.predict_url(), body.clone()).await;
        assert_eq!(st, 401, "{auth:?}: {text}");
        assert!(www);
        assert!(text.contains("API key"), "{text}");
    }
    let (st, _, text) = send(Some("Bearer key-one"), s.predict_url(), body.clone()).await;
    assert_eq!(st, 200, "{text}");
    let (st, _, _) = send(Some("bearer key-one"), s.predict_url(), body.clone()).await;
    assert_eq!(st, 200);
    // Every generation route is guarded; OpenAI errors use OpenAI's shape.
    let (st, _, text) = send(
        None,
        s.url("/openai/v1/completions"),
        json!({"prompt": "a"}).to_string(),
    )
    .await;
    assert_eq!(st, 401);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    assert_eq!(s.get("/openai/v1/models").await.0, 401);
    let (st, _, _) = send(
        None,
        s.url(&format!("/v2/models/{MODEL}/generate")),
        json!({"text_input": "a"}).to_string(),
    )
    .await;
    assert_eq!(st, 401);
    let (st, _, _) = send(
        None,
        s.url(&format!("/v2/models/{MODEL}/generate_stream")),
        json!({"text_input": "a"}).to_string(),
    )
    .await;
    assert_eq!(st, 401);
    // Health, readiness, metadata and metrics stay open.
    for path in [
        "/".to_owned(),
        "/v1/models".to_owned(),
        format!("/v1/models/{MODEL}"),
        "/v2/health/live".to_owned(),
        "/v2/health/ready".to_owned(),
        format!("/v2/models/{MODEL}/ready"),
        "/metrics".to_owned(),
    ] {
        assert_eq!(s.get(&path).await.0, 200, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_served() {
    let s = Server::start(&[]).await;
    let before = s.metrics().await;
    assert_eq!(before.sum("gptj_server_ready", &[]), 1.0);
    let (mut prompt_tokens, mut generated) = (0.0, 0.0);
    // OpenAI and V2 report usage; V1 with min = max new tokens generates exactly that many.
    for i in 0..3 {
        let (st, v) = s
            .post_json(
                "/openai/v1/completions",
                &json!({"prompt": format!("Request number {i} says"), "max_tokens": 5 + i}),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        prompt_tokens += v["usage"]["prompt_tokens"].as_f64().unwrap();
        generated += v["usage"]["completion_tokens"].as_f64().unwrap();
    }
    let (_, events) = s
        .post_sse("/openai/v1/completions", &json!({"prompt": "Streaming too", "max_tokens": 7, "stream": true, "stream_options": {"include_usage": true}}))
        .await;
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    prompt_tokens += usage["usage"]["prompt_tokens"].as_f64().unwrap();
    generated += usage["usage"]["completion_tokens"].as_f64().unwrap();
    let (st, v) = s
        .post_json(&format!("/v2/models/{MODEL}/generate"), &json!({"text_input": "Right now is the perfect time to", "parameters": {"max_new_tokens": 6, "min_new_tokens": 6}}))
        .await;
    assert_eq!(st, 200);
    prompt_tokens += v["usage"]["prompt_tokens"].as_f64().unwrap();
    generated += 6.0;
    let (st, _) = s
        .post_json(&format!("/v1/models/{MODEL}:predict"), &json!({"instances": ["Right now is the perfect time to", "Right now is the perfect time to"], "parameters": {"max_new_tokens": 4, "min_new_tokens": 4}}))
        .await;
    assert_eq!(st, 200);
    prompt_tokens += 2.0 * v["usage"]["prompt_tokens"].as_f64().unwrap();
    generated += 8.0;
    // One rejection.
    let (st, _) = s
        .post_json(
            &format!("/v1/models/{MODEL}:predict"),
            &json!({"instances": []}),
        )
        .await;
    assert_eq!(st, 400);

    let m = s.metrics().await;
    assert_eq!(m.sum("gptj_generation_tokens_total", &[]), generated);
    assert_eq!(m.sum("gptj_prompt_tokens_total", &[]), prompt_tokens);
    assert_eq!(
        m.sum("gptj_request_success_total", &[]),
        7.0,
        "one per sequence"
    );
    assert_eq!(
        m.sum(
            "gptj_request_success_total",
            &[("finished_reason", "length")]
        ),
        7.0
    );
    let route =
        |r: &str, st: &str| m.sum("gptj_http_requests_total", &[("route", r), ("status", st)]);
    assert_eq!(route("/openai/v1/completions", "200"), 4.0);
    assert_eq!(route("/v2/models/{name}/generate", "200"), 1.0);
    assert_eq!(route("/v1/models/{name}:predict", "200"), 1.0);
    assert_eq!(route("/v1/models/{name}:predict", "400"), 1.0);
    assert_eq!(
        m.sum("gptj_request_rejected_total", &[("reason", "validation")]),
        1.0
    );
    // Histograms cover streaming and non-streaming requests alike: one TTFT sample per sequence.
    assert_eq!(m.sum("gptj_time_to_first_token_seconds_count", &[]), 7.0);
    assert_eq!(m.sum("gptj_e2e_request_latency_seconds_count", &[]), 7.0);
    assert_eq!(m.sum("gptj_request_generation_tokens_sum", &[]), generated);
    assert_eq!(
        m.sum(
            "gptj_http_request_duration_seconds_count",
            &[("route", "/openai/v1/completions")]
        ),
        4.0
    );
    assert_eq!(m.sum("gptj_http_requests_in_flight", &[]), 0.0);
    assert!(m.0.contains("# HELP gptj_time_to_first_token_seconds"));
    // The engine loop updates its gauges at the end of a step, just after the last tokens
    // went out: give it a moment.
    let start = std::time::Instant::now();
    while s.metrics().await.sum("gptj_kv_cache_blocks_used", &[]) != 0.0 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "KV blocks still held"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(m.sum("gptj_kv_cache_blocks", &[]) > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_and_request_id() {
    let s = Server::start(&["--request-timeout", "1s"]).await;
    // The client's request id comes back; without one the server makes one.
    let r = s
        .client
        .post(s.predict_url())
        .header("x-request-id", "my-id-123")
        .body(json!({"instances": ["a"], "parameters": {"max_new_tokens": 2}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "my-id-123");
    let start = std::time::Instant::now();
    let (st, v) = s
        .post_json(
            &format!("/v1/models/{MODEL}:predict"),
            &json!({"instances": ["a"], "parameters": {"max_new_tokens": 2000, "min_new_tokens": 2000}}),
        )
        .await;
    assert_eq!(st, 504, "{v}");
    assert_eq!(v["error_type"], "timeout");
    assert!(start.elapsed() < std::time::Duration::from_secs(8));
    // A stream that times out ends with an error event, then `[DONE]`.
    let (st, events) = s
        .post_sse(
            "/openai/v1/completions",
            &json!({"prompt": "a", "max_tokens": 2000, "min_tokens": 2000, "stream": true}),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let err: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(err["error"]["code"], "timeout", "{err}");
    let m = s.metrics().await;
    assert_eq!(
        m.sum("gptj_request_failed_total", &[("reason", "timeout")]),
        2.0
    );
    assert_eq!(
        m.sum(
            "gptj_request_success_total",
            &[("finished_reason", "timeout")]
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_of_one_query_run_concurrently() {
    let s = Server::start(&[]).await;
    let body = json!({"instances": ["One", "Two", "Three", "Four"], "parameters": {"max_new_tokens": 400, "min_new_tokens": 400}});
    let c = s.client.clone();
    let url = s.predict_url();
    let request =
        tokio::spawn(async move { c.post(url).json(&body).send().await.unwrap().status() });
    // All four sequences are in the running batch together, not one after another.
    let start = std::time::Instant::now();
    let mut most = 0.0f64;
    while !request.is_finished() && most < 4.0 {
        most = most.max(s.metrics().await.sum("gptj_num_requests_running", &[]));
        assert!(start.elapsed() < std::time::Duration::from_secs(30));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(most, 4.0);
    // Going away cancels all four.
    request.abort();
    let start = std::time::Instant::now();
    while s.metrics().await.sum(
        "gptj_request_success_total",
        &[("finished_reason", "cancelled")],
    ) < 4.0
    {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "not cancelled"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_before_ready_while_loading() {
    // The port opens before the model is loaded: liveness answers at once, readiness and
    // generation answer 503 until the warm-up has run. (builtin:small takes about a second
    // to build, which leaves time to look.)
    let mut s = Server::spawn(&["--model", "builtin:small"], &[]);
    let start = std::time::Instant::now();
    let mut seen_loading = false;
    loop {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "{}",
            s.log_text()
        );
        let live = s.client.get(s.url("/")).send().await;
        let Ok(live) = live else {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            continue;
        };
        assert_eq!(live.status(), 200);
        let (ready, body) = s.get(&format!("/v1/models/{MODEL}")).await;
        if ready == 200 {
            break;
        }
        assert_eq!(ready, 503, "{body}");
        assert!(body.contains("is not ready"), "{body}");
        if !seen_loading {
            seen_loading = true;
            let (st, v) = s
                .post_json(
                    &format!("/v1/models/{MODEL}:predict"),
                    &json!({"instances": ["early"]}),
                )
                .await;
            // The load may finish between the two requests.
            assert!(
                st == 503 && v["error_type"] == "not_ready" || st == 200,
                "{st} {v}"
            );
            let m = s.metrics().await;
            assert!(m.sum("gptj_server_ready", &[]) <= 1.0);
        }
    }
    assert!(
        seen_loading,
        "readiness was never 503 before the model was loaded"
    );
    s.wait_ready().await;
}

/// A hub model's chat template is read from its `tokenizer_config.json` once the model is in
/// the cache (here put there beforehand, so nothing is downloaded: no network).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_model_brings_its_chat_template() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/engine/tests/fixtures/golden/odd_heads"
    );
    let cache = std::env::temp_dir().join(format!("gptj-hub-chat-{}", std::process::id()));
    let snapshot = cache.join("test-org--chatty").join("main");
    std::fs::create_dir_all(&snapshot).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(format!("{fixture}/{f}"), snapshot.join(f)).unwrap();
    }
    // The fixture's vocabulary is 384 ids: the rendered prompt must stay inside it.
    let template = "{% for m in messages %}{{ m.role[0] }}:{{ m.content }};{% endfor %}a:";
    std::fs::write(
        snapshot.join("tokenizer_config.json"),
        json!({"chat_template": template}).to_string(),
    )
    .unwrap();
    std::fs::write(
        snapshot.join(".gptj-complete"),
        "config.json\nmodel.safetensors\ntokenizer_config.json",
    )
    .unwrap();
    let cache_arg = cache.display().to_string();
    let s = Server::start(&["--model", "test-org/chatty", "--cache-dir", &cache_arg]).await;
    let body =
        json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "temperature": 0});
    let (status, v) = s.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    // The prompt is the template's.
    let prompt = gptj_engine::Tokenizer::gptj()
        .unwrap()
        .encode("u:x;a:")
        .unwrap();
    assert!(prompt.iter().all(|&id| id < 384), "{prompt:?}");
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len(), "{v}");
    // A prompt with ids the 384-row model does not have is the client's error, not the server's.
    let body = json!({"prompt": "Hello world", "max_tokens": 2});
    let (status, v) = s.post_json("/v1/completions", &body).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("outside the vocabulary"),
        "{v}"
    );
    // Given as ids, the position is named against the same bound.
    let body = json!({"prompt": [1, 2, 400], "max_tokens": 2});
    let (status, v) = s.post_json("/v1/completions", &body).await;
    assert_eq!(status, 400, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("token 2") && message.contains("[0, 384)"),
        "{v}"
    );
    let _ = std::fs::remove_dir_all(&cache);
}
