/*!
gptj's benchmarks: the seed's benchmark job and a load generator.

- [`job::bench`] is `gptj bench`, the seed service's benchmark job run in-process on the
  engine and the scheduler (no HTTP): for each batch size from 1 to `--batch-size`, a batch
  of that many concurrent requests for every sequence length from `--min-length` to
  `--max-length` in steps of `--length-step`, after `--warmup-rounds` unmeasured rounds. It
  writes the seed's table (seconds per response by length and batch size) and output
  tokens/s as markdown, CSV and JSON, and an SVG plot ([`plot`]).
- [`load::load`] is `gptj load`, a load generator against a running server on any of its
  protocols (KServe V1 predict, V2 generate and generate_stream, OpenAI completions with or
  without streaming), closed-loop (`--concurrency`) or open-loop Poisson (`--rate`). It
  reports throughput, time to first token, inter-token latency and end-to-end latency
  percentiles, and errors by status. The same driver runs against an in-process scheduler
  ([`load::InProcess`]) for the serving benchmark in `benches/serving.rs`.

Results and the commands that produced them are in `docs/benchmarks.md`.
*/
#![deny(missing_docs)]

pub mod job;
pub mod load;
pub mod plot;
pub mod stats;

pub use job::{bench, BenchArgs};
pub use load::{load, LoadArgs};
