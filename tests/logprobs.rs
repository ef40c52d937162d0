//! Log-probabilities end to end: the real binary serves a golden fixture checkpoint (seeded
//! weights, HuggingFace's own numbers in `engine/tests/fixtures/golden`), and
//! `/v1/completions` with token-id prompts, `echo` and `logprobs` (lm-evaluation-harness's
//! loglikelihood request) must report HF's `log_softmax` within 1e-4 in f32, the same bits
//! whether a request runs alone or beside others.

mod common;

use common::Server;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
struct Expected {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    logprobs: Logprobs,
}

#[derive(Deserialize)]
struct Logprobs {
    token_logprobs: Vec<f64>,
    top_ids: Vec<Vec<u32>>,
    top_logprobs: Vec<Vec<f64>>,
}

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/engine/tests/fixtures/golden/rot_partial"
);

/// lm-eval's loglikelihood request over `ids`.
fn request(ids: &[u32]) -> Value {
    json!({"model": common::MODEL, "prompt": ids, "echo": true, "logprobs": 5, "max_tokens": 1, "temperature": 0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn echo_logprobs_equal_hf_alone_and_in_a_batch() {
    let expected: Expected =
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURE}/expected.json")).unwrap())
            .unwrap();
    let s = Server::start(&["--model", FIXTURE, "--precision", "f32"]).await;
    // The GPT-J tokenizer the server falls back to names the fixture's ids (all < 512).
    let tokenizer = gptj_engine::Tokenizer::gptj().unwrap();
    let mut alone = Vec::new();
    for (i, case) in expected.cases.iter().enumerate() {
        // Prompt plus the greedy continuation, as a scoring harness sends context + answer.
        let ids: Vec<u32> = case
            .prompt_ids
            .iter()
            .chain(&case.greedy_ids)
            .copied()
            .collect();
        let (status, v) = s.post_json("/v1/completions", &request(&ids)).await;
        assert_eq!(status, 200, "{v}");
        let lp = &v["choices"][0]["logprobs"];
        let listed = lp["token_logprobs"].as_array().unwrap();
        // Every token of the prompt, then the one generated.
        assert_eq!(listed.len(), ids.len() + 1, "case {i}");
        assert!(listed[0].is_null() && lp["top_logprobs"][0].is_null());
        let mut worst = 0.0f64;
        for t in 1..ids.len() {
            let want = &case.logprobs;
            worst = worst.max((listed[t].as_f64().unwrap() - want.token_logprobs[t - 1]).abs());
            let top = lp["top_logprobs"][t].as_object().unwrap();
            let mut seen = std::collections::HashSet::new();
            for (k, &id) in want.top_ids[t - 1].iter().enumerate() {
                // Keys are token texts; where two ids share one, the likelier is listed.
                let text = tokenizer.token_text(id);
                if !seen.insert(text.clone()) {
                    continue;
                }
                let got = top[&text].as_f64().unwrap_or_else(|| {
                    panic!("case {i} position {t}: {text:?} missing in {top:?}")
                });
                worst = worst.max((got - want.top_logprobs[t - 1][k]).abs());
            }
        }
        assert!(
            worst <= 1e-4,
            "case {i}: logprobs differ from HF's by {worst}"
        );
        eprintln!(
            "logprobs: case {i} ({} tokens): largest difference from HF {worst:.2e}",
            ids.len()
        );
        alone.push((ids, lp.clone()));
    }
    // All four in one request, as lm-eval batches them: its jobs are submitted together and
    // share steps (fewer steps than prompts), and each listing is the same, bit for bit.
    const STEPS: &str = "gptj_iteration_tokens_count";
    let steps_before = s.metrics().await.sum(STEPS, &[]);
    let ids: Vec<&Vec<u32>> = alone.iter().map(|(ids, _)| ids).collect();
    let body = json!({"model": common::MODEL, "prompt": ids, "echo": true, "logprobs": 5, "max_tokens": 1, "temperature": 0});
    let (status, v) = s.post_json("/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    let steps = s.metrics().await.sum(STEPS, &[]) - steps_before;
    eprintln!(
        "logprobs: {} prompts in one request ran in {steps} steps",
        alone.len()
    );
    assert!(
        steps < alone.len() as f64,
        "{steps} steps for {} prompts: not batched",
        alone.len()
    );
    for (i, (_, want)) in alone.iter().enumerate() {
        assert_eq!(&v["choices"][i]["logprobs"], want, "prompt {i}");
    }
}

/// `--kv-cache-dtype int8` through the server: the same loglikelihood requests over the int8
/// cache (f32 weights) stay closer to HF's f32 log-probabilities than q8_0 weights over their
/// f16 cache do (int8's error is its own, so it is an explicit choice), and the server says
/// which cache it runs in its start-up log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_int8_kv_cache_serves_logprobs_closer_to_hf_than_q8_0() {
    let int8 = worst_logprob_error(&["--precision", "f32", "--kv-cache-dtype", "int8"]).await;
    let q8_0 = worst_logprob_error(&["--precision", "q8_0"]).await;
    eprintln!(
        "logprobs within {int8:.2e} of HF f32 over an int8 KV cache, {q8_0:.2e} with q8_0 weights"
    );
    assert!(
        int8 <= q8_0 && int8 <= 0.3,
        "int8 KV cache: logprobs differ from HF's by {int8} (q8_0 weights: {q8_0})"
    );
}

/// The largest difference from HF's f32 log-probabilities over every position of every
/// fixture case (prompt and greedy continuation) of a server started with `args`; checks that
/// its start-up log names the KV cache it resolved.
async fn worst_logprob_error(args: &[&str]) -> f64 {
    let expected: Expected =
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURE}/expected.json")).unwrap())
            .unwrap();
    let s = Server::start(&[&["--model", FIXTURE][..], args].concat()).await;
    let cache = if args.contains(&"int8") {
        "int8"
    } else {
        "f16"
    };
    assert!(
        s.log_text().contains(&format!("kv_cache={cache}")),
        "start-up log: {}",
        s.log_text()
    );
    let mut worst = 0.0f64;
    for case in &expected.cases {
        let ids: Vec<u32> = case
            .prompt_ids
            .iter()
            .chain(&case.greedy_ids)
            .copied()
            .collect();
        let (status, v) = s.post_json("/v1/completions", &request(&ids)).await;
        assert_eq!(status, 200, "{v}");
        let listed = v["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap();
        // Position 0 has no log-probability; position t's is HF's entry t - 1.
        for (got, want) in listed[1..ids.len()]
            .iter()
            .zip(&case.logprobs.token_logprobs)
        {
            worst = worst.max((got.as_f64().unwrap() - want).abs());
        }
    }
    worst
}
