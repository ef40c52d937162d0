/*!
The server's shared state: configuration, lifecycle phase, the scheduler once the model is
loaded, and the count of requests in flight.

The lifecycle is `Loading -> Ready -> Draining`. Readiness probes answer 200 only when the
phase is `Ready` *and* the engine loop's heartbeat is healthy; liveness fails only when the
engine thread has died. Every generation request holds an [`InFlight`] guard for as long as
its response is being produced (the whole stream, for SSE), which is what draining waits for.
*/

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use gptj_engine::Tokenizer;
use gptj_scheduler::SchedulerHandle;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Notify;

use crate::chat_template::ChatTemplate;
use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::tokenize::PromptTokenizer;

/// Longest step the engine may take before readiness reports it as stuck.
pub const MAX_STEP_FOR_READY: Duration = Duration::from_secs(120);

/// Where the server is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Loading the model and warming up: not ready.
    Loading = 0,
    /// Serving.
    Ready = 1,
    /// Shutting down: in-flight work finishes, new work is refused.
    Draining = 2,
}

/// The loaded model's side: what handlers need to run generations.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Where jobs go.
    pub scheduler: SchedulerHandle,
    /// Prompts go through this, which bounds tokenizing's cost; it also holds the model's
    /// tokenizer (`prompts.tokenizer()`).
    pub prompts: PromptTokenizer,
    /// Prompt plus generation, at most.
    pub max_context: usize,
    /// The chat template a hub model brought (its `tokenizer_config.json`, known once it is
    /// downloaded); `--chat-template` and a model directory's are in the config.
    pub chat_template: Option<ChatTemplate>,
}

impl Backend {
    /// The backend over a started scheduler.
    pub fn new(scheduler: SchedulerHandle, tokenizer: Tokenizer, max_context: usize) -> Self {
        Self {
            scheduler,
            prompts: PromptTokenizer::new(tokenizer, max_context),
            max_context,
            chat_template: None,
        }
    }

    /// With the chat template the model brought.
    pub fn with_chat_template(self, chat_template: Option<ChatTemplate>) -> Self {
        Self {
            chat_template,
            ..self
        }
    }
}

/// Shared state, cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    config: ServerConfig,
    phase: AtomicU8,
    backend: OnceLock<Backend>,
    metrics: Option<PrometheusHandle>,
    in_flight: AtomicUsize,
    idle: Notify,
}

impl AppState {
    /// A state in the `Loading` phase.
    pub fn new(config: ServerConfig, metrics: Option<PrometheusHandle>) -> Self {
        Self(Arc::new(Inner {
            config,
            phase: AtomicU8::new(Phase::Loading as u8),
            backend: OnceLock::new(),
            metrics,
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
        }))
    }

    /// The settings.
    pub fn config(&self) -> &ServerConfig {
        &self.0.config
    }

    /// The Prometheus handle, when a recorder is installed.
    pub fn metrics(&self) -> Option<&PrometheusHandle> {
        self.0.metrics.as_ref()
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.0.phase.load(Ordering::SeqCst) {
            0 => Phase::Loading,
            1 => Phase::Ready,
            _ => Phase::Draining,
        }
    }

    /// The model is loaded and warm: start serving. Ignored once draining.
    pub fn set_ready(&self, backend: Backend) {
        let _ = self.0.backend.set(backend);
        // A server already draining stays draining.
        let _ = self.0.phase.compare_exchange(
            Phase::Loading as u8,
            Phase::Ready as u8,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// Stop taking new work (readiness turns 503).
    pub fn start_draining(&self) {
        self.0.phase.store(Phase::Draining as u8, Ordering::SeqCst);
    }

    /// The backend, once loaded.
    pub fn backend(&self) -> Option<&Backend> {
        self.0.backend.get()
    }

    /// Ready for traffic: phase `Ready` and the engine loop healthy.
    pub fn is_ready(&self) -> bool {
        self.phase() == Phase::Ready
            && self.backend().is_some_and(|b| {
                b.scheduler.is_accepting() && b.scheduler.heartbeat().is_healthy(MAX_STEP_FOR_READY)
            })
    }

    /// Alive: false only once the engine thread has died (a restart is the cure).
    pub fn is_live(&self) -> bool {
        match (self.phase(), self.backend()) {
            (Phase::Ready, Some(b)) => b.scheduler.is_alive(),
            _ => true,
        }
    }

    /// Admits a generation request: an error while loading or draining, else a guard that
    /// counts it in flight until dropped.
    pub fn admit(&self) -> Result<(InFlight, Backend), ApiError> {
        self.0.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(self.clone());
        metrics::gauge!(crate::metrics::REQUESTS_IN_FLIGHT).increment(1.0);
        match (self.phase(), self.backend()) {
            (Phase::Ready, Some(b)) => Ok((guard, b.clone())),
            (Phase::Draining, _) => Err(ApiError::Draining),
            _ => Err(ApiError::NotReady(self.config().model_name.clone())),
        }
    }

    /// Sets the gauges that describe the state rather than an event (readiness, the engine
    /// thread's liveness); called before each scrape.
    pub fn record_gauges(&self) {
        let ready = if self.is_ready() { 1.0 } else { 0.0 };
        metrics::gauge!(crate::metrics::SERVER_READY).set(ready);
        let alive = self.backend().is_some_and(|b| b.scheduler.is_alive());
        metrics::gauge!(crate::metrics::ENGINE_ALIVE).set(if alive { 1.0 } else { 0.0 });
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.0.in_flight.load(Ordering::SeqCst)
    }

    /// Resolves when no request is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.0.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// A generation request in flight; dropping it ends the count.
#[must_use]
pub struct InFlight(AppState);

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::REQUESTS_IN_FLIGHT).decrement(1.0);
        if self.0 .0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0 .0.idle.notify_waiters();
        }
    }
}
