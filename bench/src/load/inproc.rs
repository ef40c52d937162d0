//! A scheduler in this process as a load target: the same workload and arrivals as over
//! HTTP, without the network, for comparing scheduler settings on one engine.

use std::pin::Pin;
use std::time::Instant;

use futures_util::Future;
use gptj_scheduler::{FinishReason, JobEvent, JobRequest, SchedulerHandle, SubmitError};

use super::{Outcome, Planned, Status, Target};

/// Sends each request straight to a scheduler's handle.
pub struct InProcess {
    handle: SchedulerHandle,
}

impl InProcess {
    /// A target that submits to `handle`.
    pub fn new(handle: SchedulerHandle) -> Self {
        Self { handle }
    }

    /// The scheduler behind it (for its stats).
    pub fn handle(&self) -> &SchedulerHandle {
        &self.handle
    }

    async fn run(&self, req: Planned) -> Outcome {
        let start = Instant::now();
        let mut outcome = Outcome::new(req.prompt_ids.len());
        let n = req.output_tokens;
        let mut job = JobRequest::new(req.prompt_ids, n);
        job.params.min_new_tokens = n;
        let mut stream = match self.handle.submit(job) {
            Ok(s) => s,
            Err(e) => {
                let key = match e {
                    SubmitError::QueueFull { .. } => "queue_full",
                    SubmitError::ExceedsContext { .. } => "exceeds_context",
                    SubmitError::ExceedsKvCache { .. } => "exceeds_kv_cache",
                    SubmitError::ShuttingDown => "shutting_down",
                    _ => "refused",
                };
                return outcome.failed(Status::Failed(key.into()), start);
            }
        };
        let mut last: Option<Instant> = None;
        while let Some(event) = stream.recv().await {
            let now = Instant::now();
            match event {
                JobEvent::PromptLogprobs(_) => {}
                JobEvent::Token { .. } => {
                    match last {
                        None => outcome.ttft = Some(now - start),
                        Some(t) => outcome.itl.push(now - t),
                    }
                    last = Some(now);
                }
                JobEvent::Finished { reason, usage } => {
                    outcome.output_tokens = usage.generated_tokens;
                    outcome.e2e = now - start;
                    outcome.status = match reason {
                        FinishReason::Length | FinishReason::Stop => Status::Ok,
                        other => Status::Failed(other.as_str().into()),
                    };
                    return outcome;
                }
            }
        }
        outcome.failed(Status::Failed("engine_stopped".into()), start)
    }
}

impl Target for InProcess {
    fn send(&self, req: Planned) -> Pin<Box<dyn Future<Output = Outcome> + Send + '_>> {
        Box::pin(self.run(req))
    }
}
