/*!
The one generation pipeline every protocol plugs into.

A protocol ([`Protocol`]) says only what is its own: how its JSON body parses into a
[`Generation`], how a finished request renders, how its stream events look ([`Shaper`]), and
which error shape its routes use ([`Wire`]). Everything else is here, once, in this order:

1. the model named in the path is checked (404);
2. the request is admitted (503 while loading or draining) and counted in flight from then
   on, before its body is read, so the same request gets the same answer on every protocol;
3. the body is read up to `--body-limit` (413) and parsed (400, or 422 on OIP);
4. the model named in the body, if any, is checked (404);
5. prompts are tokenized, each one's plan resolved and its jobs submitted
   ([`generation::submit`]; 400 or 429);
6. the answer is streamed ([`sse`]) or collected and rendered.

[`RequestContext`] is the extractor for what every generation needs besides its body: the
state, the request's log record, its tenant and its deadline.
*/

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::Json;
use gptj_scheduler::Tokenizer;
use serde_json::{Map, Value};

use crate::api_keys::KeyIndex;
use crate::cli::CacheScope;
use crate::config::ServerConfig;
use crate::error::{ApiError, Wire};
use crate::generation::{self, collect_all, Finished, Generation, Submitted, Tenancy};
use crate::params::{parse_body, Dialect, Limits, ValidationError};
use crate::sse::{self, Shaper, StreamContext};
use crate::state::{AppState, Backend};
use crate::telemetry::RequestRecord;

/// A wire protocol's own part of serving a generation.
pub trait Protocol: Send + Sync + 'static {
    /// The error shape of the protocol's routes.
    const WIRE: Wire;
    /// How the protocol names the generation parameters.
    const DIALECT: Dialect;
    /// The parsed body.
    type Request: Send + Sync + 'static;

    /// Names prompt `i` in messages (`instance 2`).
    fn prompt_name(i: usize) -> String;

    /// Parses a JSON body (everything that does not need the tokenizer).
    fn parse(body: &Map<String, Value>, limits: Limits) -> Result<Self::Request, ValidationError>;

    /// Finishes a parsed request with what needs the server's settings or the loaded model
    /// (the chat template turning messages into the prompt); errors are answered as parse
    /// errors are.
    fn prepare(
        req: &mut Self::Request,
        config: &ServerConfig,
        backend: &Backend,
    ) -> Result<(), ApiError> {
        let _ = (req, config, backend);
        Ok(())
    }

    /// What the request asks to generate.
    fn generation(req: &Self::Request) -> &Generation;

    /// The answer of a request run to its end.
    fn render(req: &Self::Request, outcome: &Outcome<'_>) -> Value;

    /// The shaper of a streamed answer. `None` for a protocol that does not stream: its
    /// parser never asks to.
    fn stream(req: &Self::Request, start: &Start<'_>) -> Option<Box<dyn Shaper>> {
        let _ = (req, start);
        None
    }
}

/// What a protocol's renderers may name besides the sequences: the request id, the model and
/// the time the answer was created.
#[derive(Debug, Clone)]
pub struct Meta {
    /// The request id (`x-request-id`).
    pub request_id: String,
    /// The served model's name.
    pub model: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

/// A streamed request as submitted.
#[derive(Debug)]
pub struct Start<'a> {
    /// Request id, model, time.
    pub meta: &'a Meta,
    /// The prompts' texts.
    pub prompts: &'a [String],
    /// Plans and token counts.
    pub submitted: &'a Submitted,
    /// The model's tokenizer (token texts for log-probabilities).
    pub tokenizer: &'a Tokenizer,
}

/// A request run to its end.
#[derive(Debug)]
pub struct Outcome<'a> {
    /// Request id, model, time.
    pub meta: &'a Meta,
    /// The prompts' texts.
    pub prompts: &'a [String],
    /// Plans and token counts.
    pub submitted: &'a Submitted,
    /// The model's tokenizer (token texts for log-probabilities).
    pub tokenizer: &'a Tokenizer,
    /// Every sequence, prompt-major (see [`Submitted::per_prompt`]).
    pub finished: &'a [Finished],
}

impl Outcome<'_> {
    /// The text sequence `seq` returns: its prompt first when its plan says so.
    pub fn text(&self, seq: usize) -> String {
        let f = &self.finished[seq];
        if self.submitted.echo(seq) {
            let prompt = &self.prompts[seq / self.submitted.per_prompt.max(1)];
            format!("{prompt}{}", f.text)
        } else {
            f.text.clone()
        }
    }

    /// New tokens of every sequence.
    pub fn completion_tokens(&self) -> usize {
        self.finished.iter().map(|f| f.usage.generated_tokens).sum()
    }
}

/// The `usage` object of OpenAI and OIP answers.
pub fn usage_json(prompt_tokens: usize, completion_tokens: usize) -> Value {
    serde_json::json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// What every generation handler needs from a request besides its body.
pub struct RequestContext {
    /// The app.
    pub state: AppState,
    /// The request's log record.
    pub record: Arc<RequestRecord>,
    /// Whose share and cache scope the request takes.
    pub tenancy: Tenancy,
    /// When the request must be done.
    pub deadline: Instant,
}

impl FromRequestParts<AppState> for RequestContext {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        // [`crate::telemetry::observe`] puts the record on every request; a router assembled
        // without it (a test) still gets one.
        let record = parts
            .extensions
            .get::<Arc<RequestRecord>>()
            .cloned()
            .unwrap_or_else(|| {
                Arc::new(RequestRecord::new(
                    String::new(),
                    &parts.method,
                    crate::telemetry::UNMATCHED.to_owned(),
                ))
            });
        let config = state.config();
        let key = parts.extensions.get::<KeyIndex>().copied();
        let header = parts
            .headers
            .get(&config.tenant_header)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim().chars().take(128).collect::<String>())
            .filter(|s| !s.is_empty());
        let deadline = record.start() + config.request_timeout;
        Ok(Self {
            state: state.clone(),
            record,
            tenancy: tenancy(config, key, header),
            deadline,
        })
    }
}

/// Who a request is for. With API keys, the key is the tenant and the tenant header only
/// subdivides its share; without keys, the header names the tenant only when the operator
/// trusts it (a gateway sets it), else every request is the one anonymous tenant. So no
/// client multiplies its share by inventing tenant names. The prefix-cache scope is the
/// tenant, unless the operator shares the cache.
pub fn tenancy(config: &ServerConfig, key: Option<KeyIndex>, header: Option<String>) -> Tenancy {
    let (tenant, subtenant) = match key {
        Some(k) => (Some(format!("key-{}", k.0)), header),
        None if config.trust_tenant_header => (header, None),
        None => (None, None),
    };
    let cache_scope = match config.prefix_cache_scope {
        CacheScope::Tenant => tenant.clone(),
        CacheScope::Shared => None,
    };
    Tenancy {
        tenant,
        subtenant,
        cache_scope,
    }
}

/// The handler of a protocol whose path names the model (`/v2/models/{name}/generate`).
pub async fn generate_at<P: Protocol>(
    ctx: RequestContext,
    Path(model): Path<String>,
    body: Body,
) -> Response {
    respond::<P>(run::<P>(ctx, Some(model), body).await)
}

/// The handler of a protocol whose body names the model, if at all (OpenAI).
pub async fn generate<P: Protocol>(ctx: RequestContext, body: Body) -> Response {
    respond::<P>(run::<P>(ctx, None, body).await)
}

fn respond<P: Protocol>(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(|e| e.into_response(P::WIRE))
}

/// 404 unless `name` is the served model.
pub fn check_model(state: &AppState, name: &str) -> Result<(), ApiError> {
    if name == state.config().model_name {
        Ok(())
    } else {
        Err(ApiError::ModelNotFound(name.to_owned()))
    }
}

/// Reads the whole body, at most `limit` bytes within `timeout` (413, 408).
pub async fn read_body(
    body: Body,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<axum::body::Bytes, ApiError> {
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| ApiError::BodyTimeout(timeout))?;
    read.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::PayloadTooLarge {
                limit: limit as u64,
            }
        } else {
            ApiError::BadBody(e.to_string())
        }
    })
}

/// Reads the whole body ([`read_body`]) as a JSON object. The content type is not checked:
/// `curl -d` sends `application/x-www-form-urlencoded`, and the seed's commands must work as
/// they are.
pub async fn read_json(
    body: Body,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Map<String, Value>, ApiError> {
    let bytes = read_body(body, limit, timeout).await?;
    Ok(parse_body(&bytes)?)
}

async fn run<P: Protocol>(
    ctx: RequestContext,
    path_model: Option<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let RequestContext {
        state,
        record,
        tenancy,
        deadline,
    } = ctx;
    record.set_generation();
    if let Some(m) = &path_model {
        check_model(&state, m)?;
    }
    let (guard, backend) = state.admit()?;
    let config = state.config();
    let body = read_json(body, config.body_limit, config.body_read_timeout).await?;
    let mut req = P::parse(&body, config.limits())?;
    P::prepare(&mut req, config, &backend)?;
    let generation = P::generation(&req);
    if let Some(m) = &generation.model {
        check_model(&state, m)?;
    }
    let (submitted, streams) = generation::submit(
        config,
        &backend,
        generation,
        &P::DIALECT,
        P::prompt_name,
        &tenancy,
        deadline,
    )
    .await?;
    let meta = Meta {
        request_id: record.id.clone(),
        model: config.model_name.clone(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let tokenizer = backend.prompts.tokenizer();
    let start = Start {
        meta: &meta,
        prompts: &submitted.prompt_texts,
        submitted: &submitted,
        tokenizer,
    };
    let shaper = if generation.stream {
        P::stream(&req, &start)
    } else {
        None
    };
    if let Some(shaper) = shaper {
        let ctx = StreamContext {
            guard,
            record,
            deadline,
            timeout: config.request_timeout,
            wire: P::WIRE,
        };
        return Ok(sse::response(streams, shaper, ctx));
    }
    let finished = collect_all(streams, &record, deadline, config.request_timeout).await?;
    let outcome = Outcome {
        meta: &meta,
        prompts: &submitted.prompt_texts,
        submitted: &submitted,
        tokenizer,
        finished: &finished,
    };
    Ok(Json(P::render(&req, &outcome)).into_response())
}
