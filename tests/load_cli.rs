//! `gptj load` against a real `gptj serve --model builtin:tiny` on a loopback port: every
//! protocol, closed loop and Poisson arrivals; every request is counted; errors are reported
//! by status; the request and duration bounds stop it.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Server, MODEL};
use serde_json::Value;

/// Runs `gptj load` against `server` with `args` and returns its JSON report.
async fn gptj_load(server: &Server, name: &str, args: &[&str]) -> Value {
    let json = std::env::temp_dir().join(format!(
        "gptj-load-cli-{}-{}-{name}.json",
        std::process::id(),
        server.port
    ));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gptj"));
    cmd.args([
        "load",
        "--url",
        &server.base,
        "--json",
        json.to_str().unwrap(),
    ])
    .args(["--prompt-tokens", "8"])
    .args(args)
    .env_remove("GPTJ_LOAD_URL");
    if !args.contains(&"--output-tokens") {
        cmd.args(["--output-tokens", "6"]);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run gptj load"))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "gptj load {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    let failed: u64 = report["errors"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(
        report["sent"].as_u64().unwrap(),
        report["ok"].as_u64().unwrap() + failed + report["incomplete"].as_u64().unwrap(),
        "every request sent is ok, failed or incomplete: {report:#}"
    );
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protocol_counts_every_request() {
    let s = Server::start(&[]).await;
    for protocol in ["v1", "v2", "v2-stream", "openai", "openai-stream"] {
        let r = gptj_load(
            &s,
            protocol,
            &[
                "--protocol",
                protocol,
                "--requests",
                "12",
                "--concurrency",
                "4",
            ],
        )
        .await;
        assert_eq!(
            (r["sent"].as_u64(), r["ok"].as_u64()),
            (Some(12), Some(12)),
            "{protocol}: {r:#}"
        );
        assert_eq!(
            r["output_tokens"], 72,
            "{protocol}: exactly the requested tokens"
        );
        assert_eq!(r["output_tokens_exact"], protocol != "v1", "{protocol}");
        assert!(r["output_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert_eq!(r["latency"]["e2e_ms"]["count"], 12);
        let streams = protocol.ends_with("stream");
        assert_eq!(
            r["latency"]["ttft_ms"].is_object(),
            streams,
            "{protocol}: {r:#}"
        );
        assert_eq!(r["latency"]["itl_ms"].is_object(), streams, "{protocol}");
    }
    // Open loop: Poisson arrivals.
    let r = gptj_load(&s, "poisson", &["--rate", "40", "--requests", "10"]).await;
    assert_eq!(
        (r["sent"].as_u64(), r["ok"].as_u64()),
        (Some(10), Some(10)),
        "{r:#}"
    );
    assert_eq!(r["config"]["arrivals"]["poisson"]["rate"], 40.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_reported_by_status() {
    let s = Server::start(&[]).await;
    let r = gptj_load(
        &s,
        "404",
        &[
            "--model-name",
            "no-such-model",
            "--protocol",
            "v2",
            "--requests",
            "5",
            "--concurrency",
            "2",
        ],
    )
    .await;
    assert_eq!(r["sent"], 5);
    assert_eq!(r["ok"], 0);
    assert_eq!(r["errors"], serde_json::json!({"404": 5}));
    // Asking for more than the context window: the server refuses each request (400).
    let r = gptj_load(
        &s,
        "400",
        &[
            "--protocol",
            "v1",
            "--requests",
            "3",
            "--output-tokens",
            "5000",
        ],
    )
    .await;
    assert_eq!(r["errors"], serde_json::json!({"400": 3}), "{r:#}");
    assert_eq!(MODEL, "eleutherai-gpt-j-6b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_duration_bound_stops_it() {
    let s = Server::start(&[]).await;
    let start = Instant::now();
    let r = gptj_load(
        &s,
        "duration",
        &[
            "--protocol",
            "v2-stream",
            "--requests",
            "100000",
            "--concurrency",
            "4",
            "--output-tokens",
            "1500",
            "--duration",
            "2s",
        ],
    )
    .await;
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(r["hit_duration"], true, "{r:#}");
    assert!(r["sent"].as_u64().unwrap() < 100000);
    assert_eq!(
        r["incomplete"], 4,
        "the 4 clients' requests in flight at the bound: {r:#}"
    );
    // Nothing sent after the bound: the server finishes cancelling and goes idle.
    let r = gptj_load(&s, "after", &["--requests", "2"]).await;
    assert_eq!(r["ok"], 2);
}
