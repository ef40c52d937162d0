/*!
The command-line flags of `gptj serve` and `gptj generate`, as parsed.

Every flag has an environment variable (`GPTJ_<FLAG>`), so a container can be configured
without a command line. The flag groups are separate `clap::Args` structs so that other
subcommands (`gptj bench`, `gptj load`) can reuse the ones they need; [`crate::config`]
turns them into validated settings.
*/

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use gptj_engine::{DeviceKind, ModelSpec, Precision};

/// Which model to load and how: shared by every subcommand that runs the model.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Model")]
pub struct ModelArgs {
    /// The model: a HuggingFace hub id (`EleutherAI/gpt-j-6b[@revision]`), a directory in
    /// HuggingFace layout, or `builtin:tiny|small|6b` (random weights: for tests and demos).
    #[arg(long, env = "GPTJ_MODEL")]
    pub model: ModelSpec,
    /// Weight precision: native, f32, f16 (fp16), bf16 (bfloat16) or q8_0.
    #[arg(long, env = "GPTJ_PRECISION", default_value = "native")]
    pub precision: Precision,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, env = "GPTJ_DEVICE", default_value = "cpu")]
    pub device: DeviceKind,
    /// Memory for the paged KV cache, e.g. `4GiB`, `512MiB`, `2000000000` (bytes).
    /// Default: the engine's (2 GiB on CPU, at most 64 full contexts).
    #[arg(long, env = "GPTJ_KV_CACHE_MEMORY", value_parser = parse_byte_size)]
    pub kv_cache_memory: Option<u64>,
    /// The KV cache's element type: auto (the activations' dtype; f16 under q8_0), f32, f16
    /// or bf16.
    #[arg(long, env = "GPTJ_KV_CACHE_DTYPE", default_value = "auto")]
    pub kv_cache_dtype: gptj_engine::KvCacheDtype,
    /// Token slots per KV-cache block.
    #[arg(long, env = "GPTJ_BLOCK_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub block_size: u16,
    /// Where hub models are downloaded to and looked up in.
    #[arg(long, env = "GPTJ_CACHE_DIR", default_value = "model-cache")]
    pub cache_dir: PathBuf,
}

impl ModelArgs {
    /// The engine options these flags describe.
    pub fn engine_options(&self) -> gptj_engine::EngineOptions {
        gptj_engine::EngineOptions {
            precision: self.precision,
            device: self.device,
            block_size: usize::from(self.block_size),
            kv_cache_memory: self.kv_cache_memory,
            kv_cache_dtype: self.kv_cache_dtype,
            cache_dir: self.cache_dir.clone(),
        }
    }
}

/// Batching policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SchedulerKind {
    /// Iteration-level batching: sequences join and leave the batch at every step.
    Continuous,
    /// Request-level batching: a batch runs until all of its sequences finish (for comparison).
    Static,
}

/// Limits of the batching scheduler.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Scheduler")]
pub struct SchedulerArgs {
    /// Batching policy.
    #[arg(long, env = "GPTJ_SCHEDULER", value_enum, default_value_t = SchedulerKind::Continuous)]
    pub scheduler: SchedulerKind,
    /// Most sequences in one step's batch.
    #[arg(long, env = "GPTJ_MAX_NUM_SEQS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_num_seqs: u32,
    /// Most tokens (prefill and decode together) in one step; long prompts are prefilled in
    /// chunks of this size. Must be >= --max-num-seqs.
    #[arg(long, env = "GPTJ_MAX_BATCHED_TOKENS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_batched_tokens: u32,
    /// Most sequences waiting to start; past it new requests get 429 with Retry-After.
    #[arg(long, env = "GPTJ_MAX_QUEUED_SEQS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_queued_seqs: u32,
    /// Most tokens (prompt plus max new tokens) waiting to start; past it new requests get
    /// 429 with Retry-After. A request alone in the queue is always accepted.
    #[arg(long, env = "GPTJ_MAX_QUEUED_TOKENS", default_value_t = 1_048_576, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_queued_tokens: u32,
}

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
    /// Request header whose value names the tenant (for fair scheduling between tenants).
    #[arg(long, env = "GPTJ_TENANT_HEADER", default_value = "x-tenant-id")]
    pub tenant_header: String,
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

/// Parses a byte size: a number with an optional unit (B, KB, MB, GB, TB in powers of 1000;
/// KiB, MiB, GiB, TiB in powers of 1024), case-insensitive, fractions allowed (`1.5GiB`).
pub fn parse_byte_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let mult: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{unit}` (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as 4GiB, 512MiB or 2000000"))?;
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(bytes.round() as u64)
}

/// Parses a duration: a number with an optional unit (ms, s, m, h; seconds without one).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let secs_per_unit = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 0.001,
        "m" | "min" | "mins" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("`{s}`: unknown unit `{other}` (use ms, s, m or h)")),
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 30s, 500ms or 5m"))?;
    Duration::try_from_secs_f64(value * secs_per_unit).map_err(|_| format!("`{s}` is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_byte_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_byte_size("2MB"), Ok(2_000_000));
        assert_eq!(parse_byte_size("2000000"), Ok(2_000_000));
        assert_eq!(parse_byte_size("1.5 gib"), Ok(3 << 29));
        assert!(parse_byte_size("4XB").unwrap_err().contains("unknown unit"));
        assert!(parse_byte_size("GiB").is_err());
        assert!(parse_byte_size("").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5 fortnights").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn kv_cache_dtype_flag_reaches_the_engine_options() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            m: ModelArgs,
        }
        let opts = |args: &[&str]| T::try_parse_from(args).map(|t| t.m.engine_options());
        let base = ["t", "--model", "builtin:tiny"];
        assert_eq!(
            opts(&base).unwrap().kv_cache_dtype,
            gptj_engine::KvCacheDtype::Auto
        );
        let with = |v: &'static str| [&base[..], &["--kv-cache-dtype", v]].concat();
        assert_eq!(
            opts(&with("fp16")).unwrap().kv_cache_dtype,
            gptj_engine::KvCacheDtype::F16
        );
        let err = opts(&with("int4")).err().unwrap().to_string();
        assert!(err.contains("int4"), "{err}");
    }
}
