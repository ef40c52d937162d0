/*!
The command-line flags of `gptj serve` and `gptj generate`, as parsed: the groups only the
server has (HTTP, generation defaults), around the shared ones of [`gptj_cli`] (model,
scheduler).

Every flag has an environment variable (`GPTJ_<FLAG>`), so a container can be configured
without a command line; [`crate::config`] turns them into validated settings.
*/

use std::time::Duration;

use clap::{Args, ValueEnum};
use gptj_cli::{parse_byte_size, parse_duration, ModelArgs, SchedulerArgs};

/// The defaults of every generation parameter; a request's parameters override them.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Generation defaults (a request's parameters override them)")]
pub struct GenerationArgs {
    /// Default new tokens to generate at most (used when a request sets neither
    /// `max_new_tokens` nor `max_length`).
    #[arg(
        long,
        env = "GPTJ_MAX_NEW_TOKENS",
        default_value_t = 50,
        conflicts_with = "max_length"
    )]
    pub max_new_tokens: u32,
    /// Default total length (prompt plus generation, HuggingFace's `max_length`) instead of
    /// `--max-new-tokens`.
    #[arg(long, env = "GPTJ_MAX_LENGTH")]
    pub max_length: Option<u32>,
    /// Default minimum of new tokens before end-of-text may be produced.
    #[arg(
        long,
        env = "GPTJ_MIN_NEW_TOKENS",
        default_value_t = 0,
        conflicts_with = "min_length"
    )]
    pub min_new_tokens: u32,
    /// Default minimum total length (prompt plus generation) instead of `--min-new-tokens`.
    #[arg(long, env = "GPTJ_MIN_LENGTH")]
    pub min_length: Option<u32>,
    /// Sample (true) or decode greedily (false).
    #[arg(long, env = "GPTJ_DO_SAMPLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub do_sample: bool,
    /// Sampling temperature (>= 0; 0 means greedy).
    #[arg(long, env = "GPTJ_TEMPERATURE", default_value_t = 1.0)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0 turns it off).
    #[arg(long, env = "GPTJ_TOP_K", default_value_t = 50)]
    pub top_k: u32,
    /// Nucleus sampling mass, in (0, 1] (1 turns it off).
    #[arg(long, env = "GPTJ_TOP_P", default_value_t = 1.0)]
    pub top_p: f32,
    /// Penalty for tokens already in the context (> 0; 1 turns it off).
    #[arg(long, env = "GPTJ_REPETITION_PENALTY", default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Default seed; without one every sequence gets a fresh random seed.
    #[arg(long, env = "GPTJ_SEED")]
    pub seed: Option<u64>,
    /// Default number of sequences to return for each instance.
    #[arg(long, env = "GPTJ_NUM_RETURN_SEQUENCES", default_value_t = 1)]
    pub num_return_sequences: u32,
    /// Whether KServe V1 `generated_text` starts with the prompt (as HuggingFace pipelines do).
    #[arg(long, env = "GPTJ_RETURN_FULL_TEXT", default_value_t = true, action = clap::ArgAction::Set)]
    pub return_full_text: bool,
}

/// Whose requests share prefix-cache entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CacheScope {
    /// Each tenant its own (the same as `shared` when there is one tenant).
    Tenant,
    /// Every request's with every other's.
    Shared,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything `gptj serve` takes.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Which model and how to load it.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Batching limits.
    #[command(flatten)]
    pub scheduler: SchedulerArgs,
    /// Generation defaults.
    #[command(flatten)]
    pub generation: GenerationArgs,
    /// The HTTP side.
    #[command(flatten)]
    pub http: HttpArgs,
}

/// The HTTP side of `gptj serve`.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "HTTP")]
pub struct HttpArgs {
    /// Address to listen on.
    #[arg(long, env = "GPTJ_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on. Without the flag or GPTJ_PORT, the `PORT` environment variable
    /// (set by KServe and Knative) is used, then 8080.
    #[arg(long, env = "GPTJ_PORT")]
    pub port: Option<u16>,
    /// The model's name in URLs (`/v1/models/{name}:predict`) and responses.
    #[arg(long, env = "GPTJ_MODEL_NAME", default_value = "eleutherai-gpt-j-6b")]
    pub model_name: String,
    /// An API key clients must send as `Authorization: Bearer <key>` on generation routes.
    /// Repeat the flag for several keys; GPTJ_API_KEY takes a comma-separated list.
    #[arg(
        long = "api-key",
        env = "GPTJ_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// Most instances (prompts) in one request.
    #[arg(long, env = "GPTJ_MAX_INSTANCES", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_instances: u32,
    /// Most sequences one request may ask for (instances x num_return_sequences).
    #[arg(long, env = "GPTJ_MAX_SEQUENCES_PER_REQUEST", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sequences_per_request: u32,
    /// Largest request body, e.g. `2MB`, `1MiB`; larger bodies get 413.
    #[arg(long, env = "GPTJ_BODY_LIMIT", default_value = "2MB", value_parser = parse_byte_size)]
    pub body_limit: u64,
    /// How long one request may take, e.g. `300s`, `5m`; past it the request's jobs are
    /// cancelled and it gets 504 (streams end with an error event).
    #[arg(long, env = "GPTJ_REQUEST_TIMEOUT", default_value = "300s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// On SIGTERM or SIGINT, how long in-flight requests may take to finish before they are
    /// cancelled and the process exits.
    #[arg(long, env = "GPTJ_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Log line format.
    #[arg(long, env = "GPTJ_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Most TCP connections open at once; past it a new connection gets a short 503 and is
    /// closed, and the others are served as before.
    #[arg(long, env = "GPTJ_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// How long a request head may take to arrive, from its first byte (slowloris bound).
    #[arg(long, env = "GPTJ_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// How long an idle keep-alive connection may wait for its next request. Above the
    /// idle timeouts of common load balancers (60 s), so they close first.
    #[arg(long, env = "GPTJ_KEEP_ALIVE_TIMEOUT", default_value = "75s", value_parser = parse_duration)]
    pub keep_alive_timeout: Duration,
    /// How long reading a request body may take; past it the request gets 408.
    #[arg(long, env = "GPTJ_BODY_READ_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub body_read_timeout: Duration,
    /// How long writing a response may make no progress (a client that stopped reading);
    /// past it the connection is closed and the request's jobs are cancelled.
    #[arg(long, env = "GPTJ_WRITE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub write_timeout: Duration,
    /// Request header whose value names the tenant (for fair scheduling between tenants).
    /// With API keys the key is the tenant and this header only subdivides its share;
    /// without keys it is used only with --trust-tenant-header.
    #[arg(long, env = "GPTJ_TENANT_HEADER", default_value = "x-tenant-id")]
    pub tenant_header: String,
    /// Without API keys, take the tenant from --tenant-header: say so only when a gateway in
    /// front sets that header (and strips clients' own), or any client could invent tenants.
    #[arg(long, env = "GPTJ_TRUST_TENANT_HEADER", default_value_t = false, action = clap::ArgAction::Set)]
    pub trust_tenant_header: bool,
    /// Whose requests reuse each other's cached prompt prefixes: `tenant` (a tenant only its
    /// own, so no tenant can time another's prompts) or `shared` (everyone's; for
    /// single-tenant deployments).
    #[arg(long, env = "GPTJ_PREFIX_CACHE_SCOPE", value_enum, default_value_t = CacheScope::Tenant)]
    pub prefix_cache_scope: CacheScope,
    /// A Jinja chat template (HuggingFace's `chat_template` convention) for the chat
    /// completions routes, e.g. assets/chat-template.jinja. Default: the `chat_template` of a
    /// model directory's or hub model's tokenizer_config.json; without either, chat requests
    /// get 400.
    #[arg(long, env = "GPTJ_CHAT_TEMPLATE")]
    pub chat_template: Option<std::path::PathBuf>,
}

/// Everything `gptj generate` takes.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// The prompt.
    pub prompt: String,
    /// Which model and how to load it.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Generation defaults.
    #[command(flatten)]
    pub generation: GenerationArgs,
    /// Do not print the prompt before the completion.
    #[arg(long, env = "GPTJ_NO_ECHO")]
    pub no_echo: bool,
    /// Stop at this string (repeatable).
    #[arg(long = "stop", env = "GPTJ_STOP")]
    pub stop: Vec<String>,
    /// Print timings and token counts to stderr when done.
    #[arg(long, env = "GPTJ_VERBOSE")]
    pub verbose: bool,
}
