//! Serving benchmark in-process (engine + scheduler, no HTTP): the same workload and Poisson
//! arrivals against several scheduler settings on one model, in one run, so their ratios are
//! measured side by side. Settings: `continuous`, `static`, and either with `-nocache`
//! (prefix caching off).
//!
//! ```text
//! cargo bench -p gptj-bench --bench serving -- [--model builtin:small] [--precision q8_0]
//!     [--configs continuous,static] [--requests 64] [--rate 4 | --concurrency C] [--prompt-tokens 128]
//!     [--output-tokens 128] [--dataset FILE.jsonl] [--repeats 3] [--seed 0]
//!     [--kv-cache-memory 1GiB] [--max-num-seqs 64] [--json out.json] [--bandwidth-only]
//! ```
//! Each repeat runs every setting once, in order (a fresh engine each time), with prompts
//! from its own seed; the table shows the median over repeats.

use std::sync::Arc;
use std::time::Duration;

use gptj_bench::load::{self, workload, Arrivals, InProcess, Length, PromptMaker, Report};
use gptj_bench::stats::median;
use gptj_engine::{Engine, EngineOptions, ModelSpec, Precision};
use gptj_scheduler::{SchedulerConfig, SchedulerKind};

struct Args {
    model: ModelSpec,
    precision: Precision,
    configs: Vec<String>,
    requests: usize,
    rate: f64,
    concurrency: Option<usize>,
    prompt_tokens: Length,
    output_tokens: Length,
    dataset: Option<String>,
    repeats: usize,
    seed: u64,
    kv_cache_memory: u64,
    max_num_seqs: usize,
    json: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        model: "builtin:small".parse()?,
        precision: Precision::Q8_0,
        configs: vec!["continuous".into(), "static".into()],
        requests: 64,
        rate: 4.0,
        concurrency: None,
        prompt_tokens: Length::Fixed(128),
        output_tokens: Length::Fixed(128),
        dataset: None,
        repeats: 3,
        seed: 0,
        kv_cache_memory: 1 << 30,
        max_num_seqs: 64,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let num = |v: String| v.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--model" => a.model = value()?.parse()?,
            "--precision" => a.precision = value()?.parse()?,
            "--configs" => a.configs = value()?.split(',').map(String::from).collect(),
            "--requests" => a.requests = num(value()?)?,
            "--rate" => a.rate = value()?.parse().map_err(|e| format!("--rate: {e}"))?,
            "--concurrency" => a.concurrency = Some(num(value()?)?),
            "--prompt-tokens" => a.prompt_tokens = value()?.parse()?,
            "--output-tokens" => a.output_tokens = value()?.parse()?,
            "--dataset" => a.dataset = Some(value()?),
            "--repeats" => a.repeats = num(value()?)?,
            "--seed" => a.seed = num(value()?)? as u64,
            "--max-num-seqs" => a.max_num_seqs = num(value()?)?,
            "--kv-cache-memory" => a.kv_cache_memory = gptj_cli::parse_byte_size(&value()?)?,
            "--json" => a.json = Some(value()?),
            "--bandwidth-only" => {
                let gbps = gptj_engine::bench::cpu_memory_bandwidth();
                println!(
                    "memory read bandwidth: {gbps:.1} GB/s ({} threads)",
                    std::thread::available_parallelism().map_or(1, |n| n.get())
                );
                std::process::exit(0);
            }
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn scheduler_config(name: &str, max_num_seqs: usize) -> Result<SchedulerConfig, String> {
    let (kind, cache) = match name.strip_suffix("-nocache") {
        Some(k) => (k, false),
        None => (name, true),
    };
    Ok(SchedulerConfig {
        kind: kind.parse::<SchedulerKind>()?,
        prefix_caching: cache,
        max_num_seqs,
        max_batched_tokens: 512.max(max_num_seqs),
        ..Default::default()
    })
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let maker = PromptMaker::new().expect("tokenizer");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut reports: Vec<(String, usize, Report)> = Vec::new();
    for repeat in 0..a.repeats {
        let seed = a.seed + repeat as u64;
        let work = match &a.dataset {
            Some(path) => {
                workload::from_jsonl(&maker, path.as_ref(), a.requests, a.output_tokens, seed)
                    .expect("dataset")
            }
            None => workload::synthetic(&maker, a.requests, a.prompt_tokens, a.output_tokens, seed),
        };
        for name in &a.configs {
            let config = scheduler_config(name, a.max_num_seqs).expect("config");
            let opts = EngineOptions {
                precision: a.precision,
                kv_cache_memory: Some(a.kv_cache_memory),
                ..Default::default()
            };
            let mut engine = Engine::load(&a.model, &opts).expect("load the model");
            engine.warm_up().expect("warm up");
            let handle = gptj_scheduler::spawn(engine, config).expect("spawn");
            let target = Arc::new(InProcess::new(handle.clone()));
            let arrivals = match a.concurrency {
                Some(concurrency) => Arrivals::Closed { concurrency },
                None => Arrivals::Poisson { rate: a.rate, seed },
            };
            let run = runtime.block_on(load::drive(
                target,
                work.clone(),
                arrivals,
                Duration::from_secs(3600),
            ));
            let stats = handle.stats();
            let report = Report::new(
                &run,
                serde_json::json!({
                    "config": name, "repeat": repeat, "rate": a.rate,
                    "preemptions": stats.preemptions,
                    "prefix_cache_hit_tokens": stats.prefix_cache_hit_tokens,
                    "prefix_cache_queried_tokens": stats.prefix_cache_queried_tokens,
                }),
            );
            eprintln!(
                "repeat {repeat} {name}: {:.1} output tok/s, e2e p50 {:.0} ms p99 {:.0} ms, ttft p50 {:.0} ms, {} errors, prefix hits {}/{}",
                report.output_tokens_per_s,
                report.latency.e2e_ms.map_or(f64::NAN, |s| s.p50),
                report.latency.e2e_ms.map_or(f64::NAN, |s| s.p99),
                report.latency.ttft_ms.map_or(f64::NAN, |s| s.p50),
                report.errors.values().sum::<usize>(),
                stats.prefix_cache_hit_tokens,
                stats.prefix_cache_queried_tokens,
            );
            handle.shutdown(None);
            handle.wait_stopped(Duration::from_secs(60));
            reports.push((name.clone(), repeat, report));
        }
    }
    println!(
        "\n`{:?}` {}, {} requests, {}, {}; median of {} repeat(s)\n",
        a.model,
        a.precision,
        a.requests,
        match a.concurrency {
            Some(c) => format!("closed loop with {c} client(s)"),
            None => format!("Poisson arrivals at {} req/s", a.rate),
        },
        match &a.dataset {
            Some(d) => format!("prompts from {d}"),
            None => format!(
                "prompt {:?}, output {:?} tokens",
                a.prompt_tokens, a.output_tokens
            ),
        },
        a.repeats
    );
    println!("| scheduler | output tok/s | req/s | e2e p50 (s) | e2e p99 (s) | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | errors |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for name in &a.configs {
        let rs: Vec<&Report> = reports
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, r)| r)
            .collect();
        let m = |f: &dyn Fn(&Report) -> f64| median(&rs.iter().map(|r| f(r)).collect::<Vec<_>>());
        let lat = |f: &dyn Fn(&load::Latencies) -> Option<f64>| {
            m(&|r: &Report| f(&r.latency).unwrap_or(f64::NAN))
        };
        println!(
            "| {name} | {:.1} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {:.1} | {} |",
            m(&|r| r.output_tokens_per_s),
            m(&|r| r.requests_per_s),
            lat(&|l| l.e2e_ms.map(|s| s.p50 / 1e3)),
            lat(&|l| l.e2e_ms.map(|s| s.p99 / 1e3)),
            lat(&|l| l.ttft_ms.map(|s| s.p50)),
            lat(&|l| l.ttft_ms.map(|s| s.p99)),
            lat(&|l| l.itl_ms.map(|s| s.p50)),
            rs.iter()
                .map(|r| r.errors.values().sum::<usize>())
                .sum::<usize>(),
        );
    }
    if let Some(path) = &a.json {
        let all: Vec<&Report> = reports.iter().map(|(_, _, r)| r).collect();
        std::fs::write(path, serde_json::to_string_pretty(&all).expect("json"))
            .expect("write --json");
    }
}
