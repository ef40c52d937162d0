/*!
The `gptj` HTTP server: the seed's KServe V1 API, the Open Inference Protocol's generate
extension and OpenAI-compatible completions over one continuous-batching scheduler, with
Prometheus metrics, admission control, API keys and graceful shutdown.

The pieces, in the order a request meets them:

- [`telemetry::observe`]: request id, one log line per request, request metrics;
- [`auth`]: API keys on the generation routes;
- [`routes`]: one module per protocol, each parsing its body into
  [`params::RequestParams`] (strict, with messages that name the field and the range);
- [`generation`]: tokenize, resolve each prompt's [`params::Plan`] against the server's
  [`params::Defaults`], submit one job per sequence, collect or stream ([`sse`]);
- [`error::ApiError`]: every failure, mapped to each protocol's status codes and bodies;
- [`state`]: lifecycle (loading, ready, draining) and in-flight accounting, which
  [`shutdown`] uses to drain.

[`serve::serve`] and [`generate_cmd::generate`] are the `gptj serve` and `gptj generate`
subcommands; their flags are in [`cli`].
*/
#![deny(missing_docs)]

pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod generate_cmd;
pub mod generation;
pub mod metrics;
pub mod params;
pub mod routes;
pub mod serve;
pub mod shutdown;
pub mod sse;
pub mod state;
pub mod telemetry;

pub use cli::{GenerateArgs, ServeArgs};
pub use generate_cmd::generate;
pub use routes::router;
pub use serve::serve;
