//! The `gptj` binary: parses the command line and hands over to the library that implements
//! each subcommand.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A continuous-batching GPT-J inference server.
#[derive(Debug, Parser)]
#[command(name = "gptj", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the model over HTTP (KServe V1/V2, OpenAI-compatible completions, /metrics).
    Serve(Box<gptj_server::ServeArgs>),
    /// Generate a completion for one prompt and print it to stdout as it is produced.
    Generate(Box<gptj_server::GenerateArgs>),
    /// The seed's benchmark job: seconds per response by length and batch size (table, CSV,
    /// JSON and plot), in-process.
    Bench(Box<gptj_bench::BenchArgs>),
    /// Load-test a running server: closed-loop or Poisson arrivals; throughput, TTFT, ITL,
    /// latency percentiles and errors by status.
    Load(Box<gptj_bench::LoadArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => gptj_server::serve(*args),
        Command::Generate(args) => gptj_server::generate(*args),
        Command::Bench(args) => gptj_bench::bench(*args),
        Command::Load(args) => gptj_bench::load(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gptj: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
