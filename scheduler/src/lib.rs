/*!
Continuous batching for gptj: the heart of the server.

Many requests share every decoding step (iteration-level batching, as in Orca and vLLM),
the KV cache is handed out in blocks as sequences grow, full blocks of shared prefixes are
reused, and nothing a client does can leak memory, stall others or change anyone's output.

The principal pieces:

- [`spawn`] starts the engine thread over a [`Model`] (the real [`gptj_engine::Engine`],
  or [`testing::FakeModel`] in tests) with a [`SchedulerConfig`], and returns a
  [`SchedulerHandle`].
- [`SchedulerHandle::submit`] takes a [`JobRequest`] (token ids, sampling parameters, limits,
  tenant, deadline) and returns a [`JobStream`] of [`JobEvent`]s: tokens with their text,
  then one `Finished` with a [`FinishReason`] and [`Usage`]. Dropping the stream cancels the
  job. A job that cannot be accepted is refused at once with a [`SubmitError`].
- [`SchedulerHandle::stats`], [`SchedulerHandle::heartbeat`] and [`SchedulerHandle::shutdown`]
  serve the server's metrics, readiness and graceful shutdown.

Inside, one module per job: `blocks` (the block allocator and prefix cache), `sequence`
(a generation's state), [`policy`] (admission and preemption order), `step` (planning one
step), `batcher` (one iteration of the loop, synchronous), `driver` (the thread and the
handle), `stop` (detokenization and stop strings) and [`metrics`] (names and descriptions).

```
use gptj_scheduler::{spawn, testing::FakeModel, JobEvent, JobRequest, SchedulerConfig};

let handle = spawn(FakeModel::new(64, 16), SchedulerConfig::default()).unwrap();
let mut stream = handle.submit(JobRequest::new(vec![464, 3290, 318], 5)).unwrap();
let mut tokens = 0;
while let Some(event) = stream.blocking_recv() {
    match event {
        JobEvent::Token { .. } => tokens += 1,
        JobEvent::Finished { usage, .. } => assert_eq!(usage.generated_tokens, 5),
        JobEvent::PromptLogprobs(_) => unreachable!("not asked for"),
    }
}
assert_eq!(tokens, 5);
```
*/

#![deny(missing_docs)]

mod batcher;
mod blocks;
mod config;
mod driver;
mod job;
pub mod metrics;
mod model;
pub mod policy;
mod sequence;
mod step;
mod stop;
pub mod testing;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod scenario_tests;

pub use config::{ConfigError, SchedulerConfig, SchedulerKind};
pub use driver::{spawn, Heartbeat, SchedulerHandle, Stats};
pub use job::{FinishReason, JobEvent, JobRequest, JobStream, LogprobsRequest, SubmitError, Usage};
pub use model::Model;
pub use policy::{Policy, PolicyKind};

/// Re-exported so callers need not depend on the engine for these.
pub use gptj_engine::{Penalties, SamplingParams, TokenLogprob, Tokenizer};
