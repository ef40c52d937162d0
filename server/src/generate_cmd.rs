/*!
`gptj generate`: one prompt from the command line, the completion streamed to stdout.

It runs the same path as the server (defaults, validation, scheduler, incremental
detokenization), without HTTP. Logs go to stderr (warnings only unless `RUST_LOG` says
otherwise), so stdout holds just the text.
*/

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use gptj_scheduler::{JobEvent, SchedulerConfig};

use crate::cli::{GenerateArgs, LogFormat};
use crate::generation::{job, Tenancy};
use crate::params::{Defaults, Dialect, Names, RequestParams};
use crate::serve::load;
use crate::telemetry;

/// Parameters here come from flags, named as the table names them.
const FLAGS: Dialect = Dialect {
    prefix: "",
    aliases: &[],
    names: Names::All,
};

/// Stdout was closed (`gptj generate ... | head`): not a failure, just the end.
#[derive(Debug, thiserror::Error)]
#[error("stdout is closed")]
struct StdoutClosed;

/// Runs `gptj generate`.
pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    match run(args) {
        Err(e) if e.is::<StdoutClosed>() => Ok(()),
        other => other,
    }
}

fn run(args: GenerateArgs) -> anyhow::Result<()> {
    telemetry::init_logging(LogFormat::Text, "warn");
    let defaults = Defaults::from_args(&args.generation)?;
    let started = Instant::now();
    let backend = load(&args.model, SchedulerConfig::default())?;
    let loaded = started.elapsed();
    let ids = backend
        .prompts
        .tokenizer()
        .encode(&args.prompt)
        .context("cannot tokenize the prompt")?;
    let params = RequestParams {
        stop: (!args.stop.is_empty()).then(|| args.stop.clone()),
        ..Default::default()
    };
    let plan = defaults.resolve(
        &params,
        &FLAGS,
        ids.len(),
        backend.max_context,
        "the prompt",
    )?;
    let deadline = Instant::now() + Duration::from_secs(24 * 3600);
    let mut streams = (0..plan.seeds.len())
        .map(|j| {
            backend
                .scheduler
                .submit(job(&ids, &plan, j, &Tenancy::default(), deadline))
                .map_err(anyhow::Error::from)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut out = std::io::stdout().lock();
    let mut generated = 0;
    for (j, stream) in streams.iter_mut().enumerate() {
        if j > 0 {
            write_or_quit(&mut out, "\n---\n")?;
        }
        if !args.no_echo {
            write_or_quit(&mut out, &args.prompt)?;
        }
        while let Some(event) = stream.blocking_recv() {
            match event {
                JobEvent::Token { text, .. } => write_or_quit(&mut out, &text)?,
                JobEvent::PromptLogprobs(_) => {}
                JobEvent::Finished { reason, usage } => {
                    generated += usage.generated_tokens;
                    if let gptj_scheduler::FinishReason::Error(e) = &reason {
                        anyhow::bail!("generation failed: {e}");
                    }
                    if args.verbose {
                        eprintln!(
                            "\n[sequence {j}: {} prompt tokens, {} generated, finish: {}, first token after {:.3}s, total {:.3}s]",
                            usage.prompt_tokens,
                            usage.generated_tokens,
                            reason.as_str(),
                            usage.time_to_first_token.unwrap_or_default().as_secs_f64(),
                            usage.total_time.as_secs_f64(),
                        );
                    }
                }
            }
        }
    }
    write_or_quit(&mut out, "\n")?;
    if args.verbose {
        let total = started.elapsed();
        eprintln!(
            "[load {:.2}s, generation {:.2}s, {generated} tokens, {:.1} tokens/s]",
            loaded.as_secs_f64(),
            (total - loaded).as_secs_f64(),
            generated as f64 / (total - loaded).as_secs_f64().max(1e-9),
        );
    }
    backend.scheduler.shutdown(None);
    backend.scheduler.wait_stopped(Duration::from_secs(5));
    Ok(())
}

/// Writes and flushes; a closed stdout (`| head`) is [`StdoutClosed`], which ends the
/// program quietly.
fn write_or_quit(out: &mut impl Write, text: &str) -> anyhow::Result<()> {
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        r => r.context("cannot write to stdout"),
    }
}
