//! End-to-end tests under load on the real binary (`builtin:tiny`): clients that disconnect,
//! a queue flood, and SIGTERM with requests in flight.

mod common;

use std::time::{Duration, Instant};

use common::{sse_data, Server, MODEL};
use futures_util::StreamExt;
use serde_json::{json, Value};

/// Polls `/metrics` until `pred` holds, or panics after `timeout` with the last text.
async fn wait_metrics(s: &Server, timeout: Duration, pred: impl Fn(&common::Metrics) -> bool) {
    let start = Instant::now();
    loop {
        let m = s.metrics().await;
        if pred(&m) {
            return;
        }
        if start.elapsed() > timeout {
            panic!("metrics condition not met after {timeout:?}:\n{}", m.0);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnecting_clients_cancel_their_jobs() {
    let s = Server::start(&[]).await;
    let predict = s.predict_url();
    let completions = s.url("/openai/v1/completions");
    let mut tasks = Vec::new();
    for i in 0..100 {
        let c = s.client.clone();
        let (predict, completions) = (predict.clone(), completions.clone());
        tasks.push(tokio::spawn(async move {
            match i % 5 {
                // 20 clients go away midway: 10 streaming after the first chunk, 10
                // non-streaming after a client-side timeout. Their jobs ask for far more
                // tokens than could be generated before the end of the test.
                0 if i % 10 == 0 => {
                    let body = json!({"prompt": format!("stream {i}"), "max_tokens": 1500, "stream": true});
                    let r = c.post(&completions).json(&body).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    let mut chunks = r.bytes_stream();
                    let first = chunks.next().await.unwrap().unwrap();
                    assert!(first.starts_with(b"data: "));
                    "dropped"
                }
                0 => {
                    let body = json!({"instances": [format!("wait {i}")], "parameters": {"max_new_tokens": 1500, "min_new_tokens": 1500}});
                    let r = c.post(&predict).json(&body).timeout(Duration::from_millis(400)).send().await;
                    assert!(r.unwrap_err().is_timeout());
                    "dropped"
                }
                1 | 2 => {
                    // `ignore_eos`: sampled text may reach the end-of-text token before 16
                    // tokens (a CI run on 2026-12-03 did), and every one must end by length.
                    let body = json!({"instances": [format!("Hello {i}")], "parameters": {"max_new_tokens": 16, "ignore_eos": true}});
                    let r = c.post(&predict).json(&body).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    let v: Value = r.json().await.unwrap();
                    assert!(v["predictions"][0]["generated_text"].as_str().unwrap().starts_with("Hello"));
                    "ok"
                }
                _ => {
                    let body = json!({"prompt": format!("Hi {i}"), "max_tokens": 16, "stream": true, "ignore_eos": true});
                    let r = c.post(&completions).json(&body).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    let events = sse_data(&r.text().await.unwrap());
                    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
                    let finish: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
                    assert_eq!(finish["choices"][0]["finish_reason"], "length");
                    "ok"
                }
            }
        }));
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.expect("client task") == "ok" {
            ok += 1;
        }
    }
    assert_eq!(ok, 80);
    // Every job has ended: the 20 abandoned ones as cancelled, and their KV blocks are free.
    wait_metrics(&s, Duration::from_secs(15), |m| {
        m.sum(
            "gptj_request_success_total",
            &[("finished_reason", "cancelled")],
        ) == 20.0
            && m.sum("gptj_kv_cache_blocks_used", &[]) == 0.0
            && m.sum("gptj_kv_cache_usage_perc", &[]) == 0.0
            && m.sum("gptj_num_requests_running", &[]) == 0.0
            && m.sum("gptj_num_requests_waiting", &[]) == 0.0
    })
    .await;
    let m = s.metrics().await;
    assert_eq!(
        m.sum(
            "gptj_request_success_total",
            &[("finished_reason", "length")]
        ),
        80.0
    );
    assert_eq!(m.sum("gptj_http_requests_in_flight", &[]), 0.0);
    // Still serving.
    let (st, _) = s
        .post_json(
            &format!("/v1/models/{MODEL}:predict"),
            &json!({"instances": ["again"]}),
        )
        .await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_flood_gets_429_with_retry_after() {
    let s = Server::start(&[
        "--max-num-seqs",
        "2",
        "--max-batched-tokens",
        "64",
        "--max-queued-seqs",
        "4",
    ])
    .await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let c = s.client.clone();
        let url = s.predict_url();
        tasks.push(tokio::spawn(async move {
            // One request in ten has three instances: it runs whole or not at all.
            let instances: Vec<String> = (0..if i % 10 == 0 { 3 } else { 1 })
                .map(|j| format!("flood {i} {j}"))
                .collect();
            let body = json!({"instances": instances, "parameters": {"max_new_tokens": 120}});
            let r = c.post(url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let v: Value = r.json().await.unwrap();
            (status, retry, v, instances.len())
        }));
    }
    let (mut accepted, mut refused) = (0, 0);
    for t in tasks {
        let (status, retry, v, n) = t.await.unwrap();
        match status {
            200 => {
                accepted += 1;
                let preds = v["predictions"].as_array().unwrap();
                assert_eq!(preds.len(), if n == 1 { 1 } else { n }, "{v}");
            }
            429 => {
                refused += 1;
                let secs: u64 = retry.expect("Retry-After on 429").parse().unwrap();
                assert!(secs >= 1);
                assert_eq!(v["error_type"], "overloaded", "{v}");
                assert!(v["error"].as_str().unwrap().contains("overloaded"));
            }
            other => panic!("unexpected status {other}: {v}"),
        }
    }
    // The queue has four places; a three-instance request that finds fewer places free has
    // its accepted jobs cancelled, which hold their places until the engine thread notices,
    // so fewer than four requests may get in. Every request gets an answer either way.
    assert!(accepted >= 1, "accepted {accepted}");
    assert_eq!(accepted + refused, 40);
    assert!(refused >= 10, "refused {refused}");
    wait_metrics(&s, Duration::from_secs(10), |m| {
        m.sum("gptj_kv_cache_blocks_used", &[]) == 0.0
            && m.sum("gptj_num_requests_waiting", &[]) == 0.0
    })
    .await;
    let m = s.metrics().await;
    assert_eq!(
        m.sum("gptj_request_rejected_total", &[("reason", "overloaded")]),
        refused as f64
    );
    assert_eq!(
        m.sum("gptj_http_requests_total", &[("status", "429")]),
        refused as f64
    );
    assert_eq!(m.sum("gptj_http_requests_total", &[("status", "500")]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_and_exits_zero() {
    let mut s = Server::start(&["--shutdown-timeout", "60s", "--log-format", "json"]).await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let c = s.client.clone();
        let (predict, completions) = (s.predict_url(), s.url("/openai/v1/completions"));
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let body = json!({"instances": [format!("drain {i}")], "parameters": {"max_new_tokens": 250, "min_new_tokens": 250}});
                let r = c.post(predict).json(&body).send().await.unwrap();
                assert_eq!(r.status(), 200);
                let v: Value = r.json().await.unwrap();
                assert!(v["predictions"][0]["generated_text"].as_str().unwrap().len() > 250);
            } else {
                let body = json!({"prompt": format!("drain {i}"), "max_tokens": 250, "min_tokens": 250, "stream": true, "stream_options": {"include_usage": true}});
                let r = c.post(completions).json(&body).send().await.unwrap();
                assert_eq!(r.status(), 200);
                let events = sse_data(&r.text().await.unwrap());
                assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
                let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
                assert_eq!(usage["usage"]["completion_tokens"], 250);
            }
        }));
    }
    wait_metrics(&s, Duration::from_secs(10), |m| {
        m.sum("gptj_num_requests_running", &[]) >= 6.0
    })
    .await;
    s.terminate();
    // Draining: not ready, new work refused with 503, liveness fine.
    let start = Instant::now();
    loop {
        if s.get(&format!("/v1/models/{MODEL}")).await.0 == 503 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "readiness never turned 503"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (st, v) = s
        .post_json(
            &format!("/v1/models/{MODEL}:predict"),
            &json!({"instances": ["late"]}),
        )
        .await;
    assert_eq!(st, 503, "{v}");
    assert_eq!(v["error_type"], "draining");
    let (st, _) = s
        .post_json(
            &format!("/v2/models/{MODEL}/generate"),
            &json!({"text_input": "late"}),
        )
        .await;
    assert_eq!(st, 503);
    assert_eq!(s.get("/v2/health/ready").await.0, 503);
    assert_eq!(s.get("/").await.0, 200);
    // The requests in flight complete in full.
    for t in tasks {
        t.await.expect("in-flight request completes");
    }
    let status = s.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{}", s.log_text());
    // JSON logs: one object per line, one "request" line per request with its id and counts.
    let log = s.log_text();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.iter().any(|l| l["message"] == "drained"));
    let done: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"] == "request" && l["status"] == 200 && l["generated_tokens"] == 250)
        .collect();
    assert_eq!(done.len(), 6, "{log}");
    assert!(done
        .iter()
        .all(|l| l["request_id"].as_str().is_some_and(|id| id.len() == 32)));
}
