/*!
`gptj load`: a load generator against a running server.

A workload ([`workload`]) is a list of planned requests (prompt and output length). The
driver ([`drive`]) sends them to a [`Target`] either closed-loop (`--concurrency C`: C
clients, each sending its next request when the previous one is answered) or open-loop
(`--rate R`: arrivals of a Poisson process at R requests/s, whatever the server's state). It
stops after `--requests` requests or at `--duration`, whichever comes first: at the
duration, requests still in flight are abandoned and counted as incomplete. Every request
sent ends up in exactly one of ok, failed (by status) and incomplete.

Targets: [`http::Http`] (the server's protocols) and [`InProcess`] (a scheduler in this
process, for `benches/serving.rs`).
*/

pub mod http;
mod inproc;
pub mod workload;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures_util::Future;
use serde::Serialize;
use tokio::task::JoinSet;

pub use http::{Http, Protocol};
pub use inproc::InProcess;
pub use workload::{Length, Planned, PromptMaker};

use crate::stats::Summary;

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Answered in full.
    Ok,
    /// The server answered with this non-2xx status.
    Http(u16),
    /// No complete answer: `connect`, `timeout`, `stream_error`, `stream_cut`, a refusal, ...
    Failed(String),
}

impl Status {
    /// The key errors are counted under (`404`, `timeout`, ...).
    pub fn key(&self) -> String {
        match self {
            Status::Ok => "ok".into(),
            Status::Http(code) => code.to_string(),
            Status::Failed(k) => k.clone(),
        }
    }
}

/// What one request measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// How it ended.
    pub status: Status,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated (from the server's usage when it reports one).
    pub output_tokens: usize,
    /// False when the server reported no usage and the count is the requested one.
    pub output_tokens_exact: bool,
    /// Time to the first token (streaming protocols only).
    pub ttft: Option<Duration>,
    /// Gaps between consecutive tokens (streaming protocols only).
    pub itl: Vec<Duration>,
    /// From sending the request to its last byte.
    pub e2e: Duration,
}

impl Outcome {
    /// A blank outcome for a request of `prompt_tokens` tokens.
    pub fn new(prompt_tokens: usize) -> Self {
        Self {
            status: Status::Failed("unknown".into()),
            prompt_tokens,
            output_tokens: 0,
            output_tokens_exact: true,
            ttft: None,
            itl: Vec::new(),
            e2e: Duration::ZERO,
        }
    }

    /// This outcome as a failure with `status`, timed from `start`.
    pub fn failed(mut self, status: Status, start: Instant) -> Self {
        self.status = status;
        self.e2e = start.elapsed();
        self
    }
}

/// Something requests can be sent to.
pub trait Target: Send + Sync + 'static {
    /// Sends `req` and waits for its whole answer.
    fn send(&self, req: Planned) -> Pin<Box<dyn Future<Output = Outcome> + Send + '_>>;
}

/// When requests are sent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Arrivals {
    /// This many clients, each sending its next request when the last one is answered.
    Closed {
        /// Clients.
        concurrency: usize,
    },
    /// A Poisson process: exponential gaps averaging `1 / rate` seconds.
    Poisson {
        /// Requests per second.
        rate: f64,
        /// Seed of the gaps.
        seed: u64,
    },
}

/// One request's record.
#[derive(Debug, Clone)]
pub struct Record {
    /// Position in the workload.
    pub index: usize,
    /// When it was sent, from the start of the run.
    pub sent_at: Duration,
    /// What it measured.
    pub outcome: Outcome,
}

/// Everything a run measured.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Requests sent.
    pub sent: usize,
    /// Finished requests (ok or failed), in completion order.
    pub records: Vec<Record>,
    /// From the first send to the last completion (or to the duration bound).
    pub elapsed: Duration,
    /// Whether the duration bound stopped the run.
    pub hit_duration: bool,
}

/// Sends `work` to `target` with `arrivals`, stopping at the end of `work` or after `duration`.
pub async fn drive(
    target: Arc<dyn Target>,
    work: Vec<Planned>,
    arrivals: Arrivals,
    duration: Duration,
) -> RunResult {
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + duration);
    let sent = Arc::new(AtomicUsize::new(0));
    let records = Arc::new(Mutex::new(Vec::<Record>::with_capacity(work.len())));
    let last_done = Arc::new(Mutex::new(Duration::ZERO));
    let mut set = JoinSet::new();
    let send_one = {
        let (target, sent, records, last_done) = (
            target.clone(),
            sent.clone(),
            records.clone(),
            last_done.clone(),
        );
        move |req: Planned| {
            let (target, records, last_done) = (target.clone(), records.clone(), last_done.clone());
            sent.fetch_add(1, Ordering::SeqCst);
            async move {
                let sent_at = start.elapsed();
                let index = req.index;
                let outcome = target.send(req).await;
                let done = start.elapsed();
                if let Ok(mut l) = last_done.lock() {
                    *l = (*l).max(done);
                }
                if let Ok(mut r) = records.lock() {
                    r.push(Record {
                        index,
                        sent_at,
                        outcome,
                    });
                }
            }
        }
    };
    let run = async {
        match arrivals {
            Arrivals::Poisson { rate, seed } => {
                let at = workload::poisson_arrivals(work.len(), rate, seed);
                for (req, t) in work.into_iter().zip(at) {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(
                        start + Duration::from_secs_f64(t),
                    ))
                    .await;
                    set.spawn(send_one(req));
                }
            }
            Arrivals::Closed { concurrency } => {
                let queue = Arc::new(Mutex::new(work.into_iter()));
                for _ in 0..concurrency.max(1) {
                    let (queue, send_one) = (queue.clone(), send_one.clone());
                    set.spawn(async move {
                        loop {
                            let next = queue.lock().ok().and_then(|mut q| q.next());
                            let Some(req) = next else { break };
                            send_one(req).await;
                        }
                    });
                }
            }
        }
        while set.join_next().await.is_some() {}
    };
    let hit_duration = tokio::time::timeout_at(deadline, run).await.is_err();
    // Anything still running is abandoned (its connection closes, so the server cancels it).
    drop(set);
    let elapsed = if hit_duration {
        duration
    } else {
        last_done.lock().map(|l| *l).unwrap_or_default()
    };
    let records = records.lock().map(|r| r.clone()).unwrap_or_default();
    RunResult {
        sent: sent.load(Ordering::SeqCst),
        records,
        elapsed,
        hit_duration,
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latencies {
    /// Time to first token (streaming protocols).
    pub ttft_ms: Option<Summary>,
    /// Inter-token latency over every gap of every request (streaming protocols).
    pub itl_ms: Option<Summary>,
    /// Time per output token after the first, per request (streaming protocols).
    pub tpot_ms: Option<Summary>,
    /// End-to-end latency.
    pub e2e_ms: Option<Summary>,
}

/// The report of a run: what `gptj load` prints and writes with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What was run (target, protocol, arrivals, lengths).
    pub config: serde_json::Value,
    /// Requests sent.
    pub sent: usize,
    /// Requests answered in full.
    pub ok: usize,
    /// Requests that failed, by status (`404`, `429`, `timeout`, ...).
    pub errors: BTreeMap<String, usize>,
    /// Requests still in flight at the duration bound (abandoned).
    pub incomplete: usize,
    /// Seconds from the first send to the last answer (or to the duration bound).
    pub elapsed_s: f64,
    /// Whether `--duration` ended the run before all requests were answered.
    pub hit_duration: bool,
    /// Answered requests per second.
    pub requests_per_s: f64,
    /// Generated tokens of answered requests per second.
    pub output_tokens_per_s: f64,
    /// Prompt tokens of answered requests per second.
    pub input_tokens_per_s: f64,
    /// Generated tokens of answered requests.
    pub output_tokens: usize,
    /// False when some counts are the requested lengths (the protocol reports no usage).
    pub output_tokens_exact: bool,
    /// Latencies of answered requests.
    pub latency: Latencies,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Report {
    /// Summarises `run`; `config` is copied into the report as given.
    pub fn new(run: &RunResult, config: serde_json::Value) -> Self {
        let ok: Vec<&Outcome> = run
            .records
            .iter()
            .map(|r| &r.outcome)
            .filter(|o| o.status == Status::Ok)
            .collect();
        let mut errors = BTreeMap::new();
        for r in &run.records {
            if r.outcome.status != Status::Ok {
                *errors.entry(r.outcome.status.key()).or_insert(0) += 1;
            }
        }
        let secs = run.elapsed.as_secs_f64().max(1e-9);
        let output_tokens: usize = ok.iter().map(|o| o.output_tokens).sum();
        let input_tokens: usize = ok.iter().map(|o| o.prompt_tokens).sum();
        let ttft: Vec<f64> = ok.iter().filter_map(|o| o.ttft.map(ms)).collect();
        let itl: Vec<f64> = ok
            .iter()
            .flat_map(|o| o.itl.iter().map(|d| ms(*d)))
            .collect();
        let tpot: Vec<f64> = ok
            .iter()
            .filter(|o| o.output_tokens > 1)
            .filter_map(|o| {
                o.ttft
                    .map(|t| ms(o.e2e.saturating_sub(t)) / (o.output_tokens - 1) as f64)
            })
            .collect();
        let e2e: Vec<f64> = ok.iter().map(|o| ms(o.e2e)).collect();
        Report {
            config,
            sent: run.sent,
            ok: ok.len(),
            errors,
            incomplete: run.sent - run.records.len(),
            elapsed_s: secs,
            hit_duration: run.hit_duration,
            requests_per_s: ok.len() as f64 / secs,
            output_tokens_per_s: output_tokens as f64 / secs,
            input_tokens_per_s: input_tokens as f64 / secs,
            output_tokens,
            output_tokens_exact: ok.iter().all(|o| o.output_tokens_exact),
            latency: Latencies {
                ttft_ms: Summary::of(&ttft),
                itl_ms: Summary::of(&itl),
                tpot_ms: Summary::of(&tpot),
                e2e_ms: Summary::of(&e2e),
            },
        }
    }

    /// A human-readable summary with a markdown latency table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let failed: usize = self.errors.values().sum();
        let _ = writeln!(
            out,
            "requests: {} sent, {} ok, {failed} failed, {} incomplete in {:.2} s{}",
            self.sent,
            self.ok,
            self.incomplete,
            self.elapsed_s,
            if self.hit_duration {
                " (stopped by --duration)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "throughput: {:.2} req/s, {:.1} output tok/s{}, {:.1} input tok/s",
            self.requests_per_s,
            self.output_tokens_per_s,
            if self.output_tokens_exact {
                ""
            } else {
                " (requested counts: no usage in the responses)"
            },
            self.input_tokens_per_s
        );
        if !self.errors.is_empty() {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect();
            let _ = writeln!(out, "errors: {}", list.join(", "));
        }
        out.push_str("\n| latency (ms) | mean | p50 | p90 | p99 | max |\n| --- | ---: | ---: | ---: | ---: | ---: |\n");
        for (name, s) in [
            ("TTFT", &self.latency.ttft_ms),
            ("ITL", &self.latency.itl_ms),
            ("TPOT", &self.latency.tpot_ms),
            ("e2e", &self.latency.e2e_ms),
        ] {
            match s {
                Some(s) => {
                    let _ = writeln!(
                        out,
                        "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                        s.mean, s.p50, s.p90, s.p99, s.max
                    );
                }
                None => {
                    let _ = writeln!(out, "| {name} | - | - | - | - | - |");
                }
            }
        }
        out
    }
}

/// Everything `gptj load` takes.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// The server's base URL (only this server is contacted).
    #[arg(long, env = "GPTJ_LOAD_URL")]
    pub url: String,
    /// Which API to call.
    #[arg(long, value_enum, default_value_t = Protocol::V2Stream)]
    pub protocol: Protocol,
    /// The model's name in URLs and bodies.
    #[arg(long, default_value = "eleutherai-gpt-j-6b")]
    pub model_name: String,
    /// Closed loop: this many clients, each sending its next request when the last one is
    /// answered. The default when --rate is not given.
    #[arg(long, conflicts_with = "rate")]
    pub concurrency: Option<usize>,
    /// Open loop: Poisson arrivals at this many requests per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Requests to send.
    #[arg(long, default_value_t = 100)]
    pub requests: usize,
    /// Stop after this long even if requests remain (in-flight ones are abandoned), e.g. 60s, 5m.
    #[arg(long, default_value = "10m", value_parser = gptj_cli::parse_duration)]
    pub duration: Duration,
    /// Prompt length in tokens: `N` or a uniform range `A..B` (random words).
    #[arg(long, default_value = "128")]
    pub prompt_tokens: Length,
    /// Tokens to generate per request (minimum = maximum): `N` or a uniform range `A..B`.
    #[arg(long, default_value = "128")]
    pub output_tokens: Length,
    /// Prompts (and optionally lengths) from a JSONL file of
    /// `{"prompt": "...", "output_tokens": N}` lines, cycled; replaces --prompt-tokens.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Seed of the prompts, lengths and arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sample (do_sample = true, temperature 1) instead of greedy decoding.
    #[arg(long)]
    pub do_sample: bool,
    /// Give up on one request after this long.
    #[arg(long, default_value = "600s", value_parser = gptj_cli::parse_duration)]
    pub timeout: Duration,
    /// Sent as `Authorization: Bearer <key>`.
    #[arg(long, env = "GPTJ_LOAD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Builds the workload `args` describe.
pub fn plan(args: &LoadArgs) -> anyhow::Result<Vec<Planned>> {
    let maker = PromptMaker::new()?;
    match &args.dataset {
        Some(path) => {
            workload::from_jsonl(&maker, path, args.requests, args.output_tokens, args.seed)
        }
        None => Ok(workload::synthetic(
            &maker,
            args.requests,
            args.prompt_tokens,
            args.output_tokens,
            args.seed,
        )),
    }
}

/// Runs `gptj load`: prints the report, writes it as JSON with `--json`.
pub fn load(args: LoadArgs) -> anyhow::Result<()> {
    if let Some(r) = args.rate {
        if !(r.is_finite() && r > 0.0) {
            anyhow::bail!("--rate must be a number > 0, got {r}");
        }
    }
    if args.concurrency == Some(0) {
        anyhow::bail!("--concurrency must be >= 1");
    }
    let work = plan(&args)?;
    let target = Http::new(
        &args.url,
        args.protocol,
        &args.model_name,
        args.api_key.clone(),
        args.do_sample,
        args.timeout,
    )?;
    let arrivals = match args.rate {
        Some(rate) => Arrivals::Poisson {
            rate,
            seed: args.seed,
        },
        None => Arrivals::Closed {
            concurrency: args.concurrency.unwrap_or(1),
        },
    };
    let config = serde_json::json!({
        "url": target.url(),
        "protocol": args.protocol,
        "arrivals": arrivals,
        "requests": args.requests,
        "duration_s": args.duration.as_secs_f64(),
        "prompt_tokens": format!("{:?}", args.prompt_tokens),
        "output_tokens": format!("{:?}", args.output_tokens),
        "dataset": args.dataset,
        "seed": args.seed,
        "do_sample": args.do_sample,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(drive(Arc::new(target), work, arrivals, args.duration));
    let report = Report::new(&result, config);
    print!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers after `delay`; request indices divisible by 3 fail with 404.
    struct Fake {
        delay: Duration,
    }

    impl Target for Fake {
        fn send(&self, req: Planned) -> Pin<Box<dyn Future<Output = Outcome> + Send + '_>> {
            Box::pin(async move {
                let start = Instant::now();
                tokio::time::sleep(self.delay).await;
                let mut o = Outcome::new(req.prompt_ids.len());
                if req.index.is_multiple_of(3) {
                    return o.failed(Status::Http(404), start);
                }
                o.status = Status::Ok;
                o.output_tokens = req.output_tokens;
                o.ttft = Some(self.delay / 2);
                o.itl = vec![self.delay / 4; 2];
                o.e2e = start.elapsed();
                o
            })
        }
    }

    fn work(n: usize) -> Vec<Planned> {
        (0..n)
            .map(|index| Planned {
                index,
                prompt: "x".into(),
                prompt_ids: vec![1, 2],
                output_tokens: 3,
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_request_is_counted_once() {
        let t = Arc::new(Fake {
            delay: Duration::from_millis(5),
        });
        for arrivals in [
            Arrivals::Closed { concurrency: 4 },
            Arrivals::Poisson {
                rate: 2000.0,
                seed: 1,
            },
        ] {
            let run = drive(t.clone(), work(30), arrivals, Duration::from_secs(30)).await;
            let r = Report::new(&run, serde_json::Value::Null);
            assert_eq!((r.sent, r.ok, r.incomplete), (30, 20, 0), "{arrivals:?}");
            assert_eq!(r.errors.get("404"), Some(&10));
            assert_eq!(r.output_tokens, 60);
            assert!(r.latency.ttft_ms.is_some() && r.latency.itl_ms.unwrap().count == 40);
            assert!(!r.hit_duration);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_duration_bound_stops_the_run() {
        let t = Arc::new(Fake {
            delay: Duration::from_millis(200),
        });
        let start = Instant::now();
        let run = drive(
            t,
            work(1000),
            Arrivals::Closed { concurrency: 2 },
            Duration::from_millis(500),
        )
        .await;
        assert!(start.elapsed() < Duration::from_secs(2));
        let r = Report::new(&run, serde_json::Value::Null);
        assert!(r.hit_duration);
        assert_eq!(
            r.sent,
            r.ok + r.errors.values().sum::<usize>() + r.incomplete
        );
        assert_eq!(r.incomplete, 2);
        assert!(r.sent < 1000);
    }
}
