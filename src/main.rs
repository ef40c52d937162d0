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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => gptj_server::serve(*args),
        Command::Generate(args) => gptj_server::generate(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gptj: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
