/*!
The flag groups that every `gptj` subcommand running the model shares, as parsed: which
model to load and how ([`ModelArgs`]), the batching scheduler's limits ([`SchedulerArgs`]),
and the parsers for sizes (`4GiB`) and durations (`30s`).

`gptj serve` (the server crate), `gptj bench` and `gptj load` (the bench crate) flatten these
into their own flags, so neither depends on the other for them. Every flag has an
environment variable (`GPTJ_<FLAG>`), so a container can be configured without a command
line.
*/
#![deny(missing_docs)]

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use gptj_engine::{DeviceKind, ModelSpec, Precision};
use gptj_scheduler::{PolicyKind, SchedulerConfig, SchedulerKind};

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
    /// The KV cache's element type: auto (the activations' dtype; f16 under q8_0), f32, f16,
    /// bf16, or int8 (half f16's bytes, each head's row of a token scaled on its own; CPU only,
    /// an error of its own, see docs/engine.md).
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

/// Limits of the batching scheduler.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Scheduler")]
pub struct SchedulerArgs {
    /// Batching: continuous (sequences join and leave the batch at every step) or static
    /// (a batch runs until all of its sequences finish; only for comparison).
    #[arg(long, env = "GPTJ_SCHEDULER", default_value = "continuous")]
    pub scheduler: SchedulerKind,
    /// Admission and preemption order: fair-share (between tenants, the default), fcfs, or
    /// priority.
    #[arg(long, env = "GPTJ_POLICY", default_value = "fair-share")]
    pub policy: PolicyKind,
    /// Reuse the KV blocks of prompt prefixes that earlier requests computed (true or false).
    #[arg(long, env = "GPTJ_PREFIX_CACHING", default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_caching: bool,
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

impl SchedulerArgs {
    /// The scheduler configuration these flags describe.
    pub fn config(&self) -> SchedulerConfig {
        SchedulerConfig {
            max_num_seqs: self.max_num_seqs as usize,
            max_batched_tokens: self.max_batched_tokens as usize,
            max_waiting_requests: self.max_queued_seqs as usize,
            max_waiting_tokens: self.max_queued_tokens as usize,
            policy: self.policy,
            kind: self.scheduler,
            prefix_caching: self.prefix_caching,
        }
    }
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
    fn scheduler_flags_reach_the_config() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            s: SchedulerArgs,
        }
        let config = |args: &[&str]| T::try_parse_from(args).map(|t| t.s.config());
        assert_eq!(config(&["t"]).unwrap(), SchedulerConfig::default());
        let c = config(&[
            "t",
            "--policy",
            "fcfs",
            "--prefix-caching",
            "false",
            "--scheduler",
            "static",
        ])
        .unwrap();
        assert_eq!(c.policy, PolicyKind::Fcfs);
        assert!(!c.prefix_caching);
        assert_eq!(c.kind, SchedulerKind::Static);
        let err = config(&["t", "--policy", "lottery"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("lottery") && err.contains("fcfs"), "{err}");
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
        assert_eq!(
            opts(&with("int8")).unwrap().kv_cache_dtype,
            gptj_engine::KvCacheDtype::Int8
        );
        let err = opts(&with("int4")).err().unwrap().to_string();
        assert!(err.contains("int4"), "{err}");
    }
}
