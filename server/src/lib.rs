/*!
The `gptj` HTTP server: the seed's KServe V1 API, the Open Inference Protocol's generate
extension and OpenAI-compatible completions over one continuous-batching scheduler, with
Prometheus metrics, admission control, API keys and graceful shutdown.

The pieces, in the order a request meets them:

- [`routes`]: the app; each protocol's routes form a group with its error shape ([`Wire`])
  and, on generation routes, the API-key layer ([`auth`], over [`api_keys`]);
- [`telemetry::observe`]: request id, one log line and the request metrics per request;
- [`pipeline`]: the one generation pipeline; a protocol implements [`pipeline::Protocol`]
  (parse its body, render its answer and stream events) and gets everything else:
  admission, body limit, model check, [`generation`] (tokenize, resolve [`params`] into
  plans, submit, collect) and streaming ([`sse`]);
- [`error::ApiError`]: every failure, mapped to each protocol's status codes and bodies;
- [`state`]: lifecycle (loading, ready, draining) and in-flight accounting, which
  [`shutdown`] uses to drain.

[`serve::serve`] and [`generate_cmd::generate`] are the `gptj serve` and `gptj generate`
subcommands; their flags are in [`cli`] (the ones shared with `gptj bench` in `gptj_cli`).
*/
#![deny(missing_docs)]

pub mod api_keys;
pub mod auth;
pub mod chat_template;
pub mod cli;
pub mod config;
pub mod error;
pub mod generate_cmd;
pub mod generation;
pub mod listener;
pub mod memory;
pub mod metrics;
pub mod params;
pub mod pipeline;
pub mod routes;
pub mod serve;
pub mod shutdown;
pub mod sse;
pub mod state;
pub mod telemetry;
pub mod tokenize;

pub use cli::{GenerateArgs, ServeArgs};
pub use error::Wire;
pub use generate_cmd::generate;
pub use routes::{app, router};
pub use serve::serve;
