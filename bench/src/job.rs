/*!
`gptj bench`: the seed service's benchmark job, in-process on the engine and the scheduler.

For each batch size `n` from 1 to `--batch-size`, and each sequence length `L` from
`--min-length` to `--max-length` in steps of `--length-step`, it submits `n` requests at once
and waits until all are done. A sequence length counts the prompt too, as the seed's
`max_length` does: each request generates exactly `L - prompt` new tokens (its minimum and
maximum new tokens are equal, so an end-of-text token cannot cut it short). The time from
submitting the batch until its last response is complete is the seed table's "seconds per
response" for that length and batch size; output tokens/s is `n x new tokens / that time`.

Every request has its own prompt (a request number before `--prompt`), so that the prefix
cache never shares work between the requests being measured.
*/

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use gptj_cli::{ModelArgs, SchedulerArgs};
use gptj_engine::{Engine, ModelSpec};
use gptj_scheduler::{FinishReason, JobEvent, JobRequest, JobStream, SchedulerHandle};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::plot::{line_chart, Chart, Series};
use crate::stats::median;

/// The seed's unicorn prompt: short, so nearly every token of a sequence is generated.
pub const DEFAULT_PROMPT: &str = "In a shocking finding, scientist discovered a herd of unicorns living in a remote, previously unexplored valley";

/// Everything `gptj bench` takes.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Which model and how to load it.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Batching limits (batches larger than --max-num-seqs queue, as they would in the server).
    #[command(flatten)]
    pub scheduler: SchedulerArgs,
    /// Largest batch: batches of 1, 2, ... up to this many concurrent requests are measured.
    /// 0 runs nothing (as in the seed's chart).
    #[arg(long, env = "GPTJ_BENCH_BATCH_SIZE", default_value_t = 1)]
    pub batch_size: u32,
    /// Unmeasured rounds first (each one batch of --batch-size at --min-length).
    #[arg(long, env = "GPTJ_BENCH_WARMUP_ROUNDS", default_value_t = 1)]
    pub warmup_rounds: u32,
    /// Shortest sequence length (prompt plus generated tokens).
    #[arg(long, env = "GPTJ_BENCH_MIN_LENGTH", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub min_length: u32,
    /// Longest sequence length (prompt plus generated tokens).
    #[arg(long, env = "GPTJ_BENCH_MAX_LENGTH", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_length: u32,
    /// Step between sequence lengths.
    #[arg(long, env = "GPTJ_BENCH_LENGTH_STEP", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub length_step: u32,
    /// Measured rounds per (length, batch); the median is reported.
    #[arg(long, env = "GPTJ_BENCH_ROUNDS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// The prompt (each request puts its own number before it).
    #[arg(long, env = "GPTJ_BENCH_PROMPT", default_value = DEFAULT_PROMPT)]
    pub prompt: String,
    /// Where bench.md, bench.csv, bench.json and bench.svg are written.
    #[arg(long, env = "GPTJ_BENCH_OUT_DIR", default_value = "bench-results")]
    pub out_dir: PathBuf,
}

/// One measured (length, batch) point.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Sequence length (prompt plus generated).
    pub length: usize,
    /// Concurrent requests.
    pub batch: usize,
    /// New tokens each request generated (median over the batch).
    pub new_tokens: usize,
    /// Median over rounds of the time until the batch's last response was complete.
    pub seconds: f64,
    /// Output tokens per second across the batch (median round).
    pub tokens_per_s: f64,
    /// Median over rounds of the batch's mean time to first token.
    pub ttft_s: f64,
    /// Every round's time, in order.
    pub rounds_s: Vec<f64>,
    /// Preemptions during the measured rounds (the KV cache was too small for the batch).
    pub preemptions: u64,
}

/// Everything one `gptj bench` run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The model, as the engine describes it.
    pub model: String,
    /// Weight precision.
    pub precision: String,
    /// Device.
    pub device: String,
    /// Batching policy.
    pub scheduler: String,
    /// Threads the CPU kernels use.
    pub threads: usize,
    /// Batch sizes measured.
    pub batches: Vec<usize>,
    /// Sequence lengths measured.
    pub lengths: Vec<usize>,
    /// Warm-up rounds run before measuring.
    pub warmup_rounds: usize,
    /// Measured rounds per point.
    pub rounds: usize,
    /// Seconds from the start of the run until the model was loaded and warm.
    pub load_s: f64,
    /// Every point, batch-major.
    pub points: Vec<Point>,
}

impl Report {
    fn point(&self, length: usize, batch: usize) -> Option<&Point> {
        self.points
            .iter()
            .find(|p| p.length == length && p.batch == batch)
    }

    /// The seed's table: one row per length, one column per batch size, seconds per
    /// response; then the same layout in output tokens/s.
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "`{}`, {} on {} ({} threads), {} scheduler; median of {} round(s) after {} warm-up round(s)\n\n",
            self.model, self.precision, self.device, self.threads, self.scheduler, self.rounds, self.warmup_rounds
        );
        for (title, value) in [
            (
                "Seconds per response",
                (|p: &Point| format!("{:.2}", p.seconds)) as fn(&Point) -> String,
            ),
            ("Output tokens/s", |p: &Point| {
                format!("{:.1}", p.tokens_per_s)
            }),
        ] {
            let _ = writeln!(out, "{title}:\n");
            out.push_str("| Sequence length |");
            for b in &self.batches {
                let _ = write!(out, " batch {b} |");
            }
            out.push_str("\n| --- |");
            out.push_str(&" ---: |".repeat(self.batches.len()));
            out.push('\n');
            for &l in &self.lengths {
                let _ = write!(out, "| {l} |");
                for &b in &self.batches {
                    match self.point(l, b) {
                        Some(p) => {
                            let _ = write!(out, " {} |", value(p));
                        }
                        None => out.push_str(" - |"),
                    }
                }
                out.push('\n');
            }
            out.push('\n');
        }
        let preempted: u64 = self.points.iter().map(|p| p.preemptions).sum();
        if preempted > 0 {
            let _ = writeln!(
                out,
                "{preempted} preemption(s): the KV cache could not hold every batch; raise --kv-cache-memory for clean numbers.\n"
            );
        }
        out
    }

    /// `length,batch_1,batch_2,...` with seconds per response: one row per length.
    pub fn csv(&self) -> String {
        let mut out = String::from("length");
        for b in &self.batches {
            let _ = write!(out, ",batch_{b}");
        }
        out.push('\n');
        for &l in &self.lengths {
            let _ = write!(out, "{l}");
            for &b in &self.batches {
                match self.point(l, b) {
                    Some(p) => {
                        let _ = write!(out, ",{:.4}", p.seconds);
                    }
                    None => out.push(','),
                }
            }
            out.push('\n');
        }
        out
    }

    /// Seconds per response against sequence length, one line per batch size.
    pub fn svg(&self) -> String {
        let series: Vec<Series> = self
            .batches
            .iter()
            .map(|&b| Series {
                label: format!("batch {b}"),
                points: self
                    .lengths
                    .iter()
                    .filter_map(|&l| self.point(l, b).map(|p| (l as f64, p.seconds)))
                    .collect(),
            })
            .collect();
        line_chart(
            &Chart {
                title: format!("{} ({}, {})", self.model, self.precision, self.device),
                x_label: "sequence length (tokens)".into(),
                y_label: "seconds per response".into(),
            },
            &series,
        )
    }

    /// Writes `bench.md`, `bench.csv`, `bench.json` and `bench.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let json = serde_json::to_string_pretty(self)?;
        for (name, text) in [
            ("bench.md", self.markdown()),
            ("bench.csv", self.csv()),
            ("bench.json", json),
            ("bench.svg", self.svg()),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(())
    }
}

/// The lengths from `min` to `max` in steps of `step` (always including `min`).
pub fn lengths(min: usize, max: usize, step: usize) -> Vec<usize> {
    (min..=max).step_by(step.max(1)).collect()
}

/// Runs `gptj bench` and writes its files; prints the table to stdout.
pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        eprintln!("gptj bench: --batch-size is 0, nothing to do");
        return Ok(());
    }
    if args.min_length > args.max_length {
        bail!(
            "--min-length ({}) must be <= --max-length ({})",
            args.min_length,
            args.max_length
        );
    }
    let report = run(&args)?;
    report.write(&args.out_dir)?;
    println!("{}", report.markdown());
    eprintln!(
        "gptj bench: wrote bench.md, bench.csv, bench.json and bench.svg to {}",
        args.out_dir.display()
    );
    Ok(())
}

/// Loads the model and measures every point.
pub fn run(args: &BenchArgs) -> anyhow::Result<Report> {
    let started = Instant::now();
    let spec: &ModelSpec = &args.model.model;
    let mut engine = Engine::load(spec, &args.model.engine_options())
        .with_context(|| format!("cannot load {spec:?}"))?;
    engine.warm_up().context("warm-up forward pass failed")?;
    let model = engine.description().to_owned();
    let max_context = engine.max_context();
    let batches: Vec<usize> = (1..=args.batch_size as usize).collect();
    let lengths = lengths(
        args.min_length as usize,
        args.max_length as usize,
        args.length_step as usize,
    );
    let max_batch = args.batch_size as usize;
    // Every job's prompt, made before the engine moves into the scheduler's thread.
    let jobs_total = args.warmup_rounds as usize * max_batch
        + batches.iter().sum::<usize>() * lengths.len() * args.rounds as usize;
    let mut prompts = Vec::with_capacity(jobs_total);
    for k in 0..jobs_total {
        let ids = engine
            .tokenizer()
            .encode(&format!("{k}. {}", args.prompt))
            .context("cannot tokenize --prompt")?;
        if ids.len() >= args.min_length as usize {
            bail!(
                "the prompt is {} tokens, not shorter than --min-length {}: use a shorter --prompt",
                ids.len(),
                args.min_length
            );
        }
        prompts.push(ids);
    }
    if *lengths.last().unwrap_or(&0) > max_context {
        bail!(
            "--max-length {} is longer than the model's context window ({max_context})",
            args.max_length
        );
    }
    let config = args.scheduler.config();
    let scheduler = format!("{:?}", config.kind).to_lowercase();
    let handle = gptj_scheduler::spawn(engine, config)?;
    let load_s = started.elapsed().as_secs_f64();

    let total_tokens: u64 = (args.warmup_rounds as usize * max_batch * lengths[0]
        + batches.iter().sum::<usize>() * lengths.iter().sum::<usize>() * args.rounds as usize)
        as u64;
    let bar = ProgressBar::new(total_tokens);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} tokens (eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut prompts = prompts.into_iter();
    for w in 0..args.warmup_rounds {
        bar.set_message(format!("warm-up {}/{}", w + 1, args.warmup_rounds));
        run_batch(&handle, &mut prompts, max_batch, lengths[0], &bar)?;
    }
    let mut points = Vec::new();
    for &batch in &batches {
        for &length in &lengths {
            bar.set_message(format!("batch {batch}, length {length}"));
            let before = handle.stats().preemptions;
            let mut rounds = Vec::new();
            for _ in 0..args.rounds {
                rounds.push(run_batch(&handle, &mut prompts, batch, length, &bar)?);
            }
            let preemptions = handle.stats().preemptions - before;
            let secs: Vec<f64> = rounds.iter().map(|r| r.wall.as_secs_f64()).collect();
            let seconds = median(&secs);
            let new_tokens = rounds[0].new_tokens;
            let ttfts: Vec<f64> = rounds.iter().map(|r| r.mean_ttft_s).collect();
            points.push(Point {
                length,
                batch,
                new_tokens,
                seconds,
                tokens_per_s: (batch * new_tokens) as f64 / seconds,
                ttft_s: median(&ttfts),
                rounds_s: secs,
                preemptions,
            });
        }
    }
    bar.finish_and_clear();
    handle.shutdown(None);
    handle.wait_stopped(Duration::from_secs(30));
    Ok(Report {
        model,
        precision: args.model.precision.to_string(),
        device: format!("{:?}", args.model.device).to_lowercase(),
        scheduler,
        threads: rayon_threads(),
        batches,
        lengths,
        warmup_rounds: args.warmup_rounds as usize,
        rounds: args.rounds as usize,
        load_s,
        points,
    })
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// What one batch took.
struct BatchResult {
    wall: Duration,
    new_tokens: usize,
    mean_ttft_s: f64,
}

/// Submits `batch` jobs of `length` total tokens at once and waits for all of them.
fn run_batch(
    handle: &SchedulerHandle,
    prompts: &mut impl Iterator<Item = Vec<u32>>,
    batch: usize,
    length: usize,
    bar: &ProgressBar,
) -> anyhow::Result<BatchResult> {
    let start = Instant::now();
    let mut streams: Vec<(Duration, usize, JobStream)> = Vec::with_capacity(batch);
    for _ in 0..batch {
        let prompt_ids = prompts.next().context("ran out of prompts")?;
        let new = length - prompt_ids.len();
        let mut job = JobRequest::new(prompt_ids, new);
        job.params.min_new_tokens = new;
        let stream = handle
            .submit(job)
            .map_err(|e| anyhow::anyhow!("the scheduler refused a benchmark request: {e}"))?;
        streams.push((start.elapsed(), new, stream));
    }
    let mut wall = Duration::ZERO;
    let mut ttft_sum = 0.0;
    let mut new_tokens = Vec::with_capacity(batch);
    let mut done = vec![false; batch];
    // Poll every stream so the bar moves with the tokens; timings come from the scheduler's
    // own `Usage`, so the polling interval does not affect them.
    while done.iter().any(|d| !d) {
        let mut progressed = false;
        for (i, (offset, want, stream)) in streams.iter_mut().enumerate() {
            while !done[i] {
                let Some(event) = stream.try_recv() else {
                    break;
                };
                progressed = true;
                match event {
                    JobEvent::Token { .. } => bar.inc(1),
                    JobEvent::PromptLogprobs(_) => {}
                    JobEvent::Finished { reason, usage } => {
                        done[i] = true;
                        if reason != FinishReason::Length || usage.generated_tokens != *want {
                            bail!(
                                "a benchmark request ended early ({}, {} of {want} tokens)",
                                reason.as_str(),
                                usage.generated_tokens
                            );
                        }
                        wall = wall.max(*offset + usage.total_time);
                        ttft_sum += usage
                            .time_to_first_token
                            .unwrap_or(usage.total_time)
                            .as_secs_f64();
                        new_tokens.push(usage.generated_tokens);
                    }
                }
            }
        }
        if !progressed {
            if !handle.is_alive() {
                bail!("the engine thread stopped during the benchmark");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    new_tokens.sort_unstable();
    Ok(BatchResult {
        wall,
        new_tokens: new_tokens[new_tokens.len() / 2],
        mean_ttft_s: ttft_sum / batch as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let mut points = Vec::new();
        for batch in [1, 2] {
            for length in [16, 32] {
                points.push(Point {
                    length,
                    batch,
                    new_tokens: length - 4,
                    seconds: length as f64 / 100.0 * batch as f64,
                    tokens_per_s: 1.0,
                    ttft_s: 0.01,
                    rounds_s: vec![0.1],
                    preemptions: 0,
                });
            }
        }
        Report {
            model: "m".into(),
            precision: "f32".into(),
            device: "cpu".into(),
            scheduler: "continuous".into(),
            threads: 2,
            batches: vec![1, 2],
            lengths: vec![16, 32],
            warmup_rounds: 0,
            rounds: 1,
            load_s: 0.0,
            points,
        }
    }

    #[test]
    fn lengths_step_from_min_to_max() {
        assert_eq!(lengths(128, 512, 128), vec![128, 256, 384, 512]);
        assert_eq!(lengths(128, 500, 128), vec![128, 256, 384]);
        assert_eq!(lengths(64, 64, 128), vec![64]);
    }

    #[test]
    fn tables_have_a_row_per_length_and_a_column_per_batch() {
        let r = report();
        assert_eq!(
            r.csv(),
            "length,batch_1,batch_2\n16,0.1600,0.3200\n32,0.3200,0.6400\n"
        );
        let md = r.markdown();
        assert!(md.contains("| Sequence length | batch 1 | batch 2 |"));
        assert!(md.contains("| 32 | 0.32 | 0.64 |"));
        assert_eq!(r.svg().matches("<polyline").count(), 2);
    }
}
