/*!
Validated server settings, built once from the flags ([`crate::cli::ServeArgs`]).

Handlers read only [`ServerConfig`]: names are checked, keys hashed, defaults validated, and
the listening port resolved (flag, then `GPTJ_PORT`, then `PORT`, then 8080).
*/

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::HeaderName;

use crate::api_keys::{ApiKeys, BadApiKey};
use crate::chat_template::ChatTemplate;
use crate::cli::{CacheScope, ServeArgs};
use crate::params::{Defaults, DefaultsError, Limits};

/// A flag whose value the server cannot run with; the message names the flag.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `--model-name` would not fit in a URL path segment.
    #[error("--model-name `{0}` must be non-empty and contain no `/`, `:`, `?`, `#` or spaces")]
    ModelName(String),
    /// `--tenant-header` is not a header name.
    #[error("--tenant-header `{0}` is not a valid HTTP header name")]
    TenantHeader(String),
    /// An API key is unusable.
    #[error(transparent)]
    ApiKey(#[from] BadApiKey),
    /// A generation default is out of range.
    #[error(transparent)]
    Defaults(#[from] DefaultsError),
    /// A size or duration flag is out of range.
    #[error("{flag} must be {what}")]
    Range {
        /// The flag.
        flag: &'static str,
        /// What it must be.
        what: &'static str,
    },
    /// `--host` is not an IP address.
    #[error("--host `{0}` is not an IP address (e.g. 0.0.0.0, 127.0.0.1, ::)")]
    Host(String),
    /// The chat template cannot be read or compiled.
    #[error("--chat-template: {0}")]
    ChatTemplate(String),
    /// `PORT` is not a port number.
    #[error("the PORT environment variable `{0}` is not a port number")]
    Port(String),
}

/// The port when neither `--port`/`GPTJ_PORT` nor `PORT` is set.
pub const DEFAULT_PORT: u16 = 8080;

/// Everything the HTTP layer needs to know, checked.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The model's name in URLs and responses.
    pub model_name: String,
    /// A description of the loaded model, for logs and metadata.
    pub model_description: String,
    /// Generation defaults.
    pub defaults: Defaults,
    /// API keys (empty: no authentication).
    pub api_keys: ApiKeys,
    /// Most prompts per request.
    pub max_instances: usize,
    /// Most sequences per request (prompts x sequences per prompt).
    pub max_sequences_per_request: usize,
    /// Largest body in bytes.
    pub body_limit: usize,
    /// Per-request time limit.
    pub request_timeout: Duration,
    /// Drain time on SIGTERM.
    pub shutdown_timeout: Duration,
    /// Header naming the tenant.
    pub tenant_header: HeaderName,
    /// How chat messages become a prompt, if the server has a template.
    pub chat_template: Option<ChatTemplate>,
    /// Whether the header names the tenant when no API key does.
    pub trust_tenant_header: bool,
    /// Whose requests share prefix-cache entries.
    pub prefix_cache_scope: CacheScope,
    /// How long reading a request body may take.
    pub body_read_timeout: Duration,
    /// The connection layer's bounds.
    pub connections: ConnectionLimits,
}

/// The bounds of the connection layer ([`crate::listener`]), from the HTTP flags.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// How long a request head may take from its first byte.
    pub header_read_timeout: Duration,
    /// How long an idle keep-alive connection waits for a new request.
    pub keep_alive_timeout: Duration,
    /// How long a write may make no progress.
    pub write_timeout: Duration,
}

impl ServerConfig {
    /// The limits request parsing checks against.
    pub fn limits(&self) -> Limits {
        Limits {
            max_sequences: self.max_sequences_per_request,
            max_prompts: self.max_instances,
        }
    }
}

impl ServerConfig {
    /// Checks the HTTP and generation flags.
    pub fn from_args(args: &ServeArgs) -> Result<Self, ConfigError> {
        let h = &args.http;
        if h.model_name.is_empty() || h.model_name.contains(['/', ':', '?', '#', ' ', '%']) {
            return Err(ConfigError::ModelName(h.model_name.clone()));
        }
        let tenant_header = HeaderName::try_from(h.tenant_header.as_str())
            .map_err(|_| ConfigError::TenantHeader(h.tenant_header.clone()))?;
        let api_keys = ApiKeys::new(&h.api_keys)?;
        let body_limit = usize::try_from(h.body_limit)
            .ok()
            .filter(|&n| n > 0)
            .ok_or(ConfigError::Range {
                flag: "--body-limit",
                what: "> 0 and addressable",
            })?;
        if h.request_timeout.is_zero() {
            return Err(ConfigError::Range {
                flag: "--request-timeout",
                what: "> 0",
            });
        }
        let chat_template = match (&h.chat_template, &args.model.model) {
            (Some(path), _) => Some(ChatTemplate::from_file(path)),
            (None, gptj_engine::ModelSpec::Dir(dir)) => {
                ChatTemplate::from_model_dir(dir).transpose()
            }
            (None, _) => None,
        }
        .transpose()
        .map_err(ConfigError::ChatTemplate)?;
        Ok(Self {
            model_name: h.model_name.clone(),
            model_description: args.model.model.to_string_lossy(),
            defaults: Defaults::from_args(&args.generation)?,
            api_keys,
            max_instances: h.max_instances as usize,
            max_sequences_per_request: h.max_sequences_per_request as usize,
            body_limit,
            request_timeout: h.request_timeout,
            shutdown_timeout: h.shutdown_timeout,
            tenant_header,
            trust_tenant_header: h.trust_tenant_header,
            prefix_cache_scope: h.prefix_cache_scope,
            body_read_timeout: nonzero("--body-read-timeout", h.body_read_timeout)?,
            connections: ConnectionLimits {
                max_connections: h.max_connections as usize,
                header_read_timeout: nonzero("--header-read-timeout", h.header_read_timeout)?,
                keep_alive_timeout: nonzero("--keep-alive-timeout", h.keep_alive_timeout)?,
                write_timeout: nonzero("--write-timeout", h.write_timeout)?,
            },
            chat_template,
        })
    }
}

fn nonzero(flag: &'static str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        Err(ConfigError::Range { flag, what: "> 0" })
    } else {
        Ok(d)
    }
}

/// A printable form of a model spec.
trait SpecName {
    fn to_string_lossy(&self) -> String;
}

impl SpecName for gptj_engine::ModelSpec {
    fn to_string_lossy(&self) -> String {
        match self {
            gptj_engine::ModelSpec::Builtin(b) => format!("builtin:{b:?}").to_lowercase(),
            gptj_engine::ModelSpec::Dir(d) => d.display().to_string(),
            gptj_engine::ModelSpec::Hub { id, revision } => match revision {
                Some(r) => format!("{id}@{r}"),
                None => id.clone(),
            },
        }
    }
}

/// The address to listen on: `--host` and the first of `--port`/`GPTJ_PORT`, `PORT`, 8080.
pub fn listen_addr(host: &str, port_flag: Option<u16>) -> Result<SocketAddr, ConfigError> {
    let port = match port_flag {
        Some(p) => p,
        None => match std::env::var("PORT") {
            Ok(p) if !p.trim().is_empty() => {
                p.trim().parse().map_err(|_| ConfigError::Port(p.clone()))?
            }
            _ => DEFAULT_PORT,
        },
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: std::net::IpAddr = host
        .parse()
        .map_err(|_| ConfigError::Host(host.to_owned()))?;
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_address() {
        assert_eq!(
            listen_addr("127.0.0.1", Some(9000)).unwrap().to_string(),
            "127.0.0.1:9000"
        );
        assert_eq!(listen_addr("::", Some(1)).unwrap().to_string(), "[::]:1");
        assert!(listen_addr("localhost", Some(1))
            .unwrap_err()
            .to_string()
            .contains("--host"));
    }
}
