/*!
Server-sent events: one response stream for the jobs of a request.

The job streams are merged (tokens of different sequences interleave as they come) and each
event goes through a [`Shaper`], which is the protocol: OpenAI chunks and `[DONE]`, or OIP
`generate_stream` objects. The token text comes from the scheduler's incremental decoder,
which never splits a UTF-8 character and holds back text that may begin a stop string, so
every chunk is valid UTF-8 and no chunk shows part of a stop string. Empty pieces (half a
character, EOS) are not sent.

The response stream owns the job streams, the request's in-flight guard and its log record:
when the client disconnects, hyper drops the stream, which cancels the jobs, ends the
in-flight count and writes the log line.
*/

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, SelectAll, StreamExt};
use gptj_scheduler::{FinishReason, JobEvent, JobStream, TokenLogprob, Usage};

use crate::error::{ApiError, Wire};
use crate::generation::{events, finish_error, record_finish, DEADLINE_GRACE};
use crate::state::InFlight;
use crate::telemetry::RequestRecord;

/// A protocol's view of a request's events.
pub trait Shaper: Send + 'static {
    /// The next event to send before any token (the echoed prompt), or `None` when there
    /// are no more. Asked for one at a time, as the client reads, so a large echo is never
    /// held whole in memory.
    fn prelude(&mut self) -> Option<Event> {
        None
    }
    /// Sequence `index` produced a token: `text` to append, and the token's log-probability
    /// when the request asked for them. Called for every token with a log-probability, and
    /// otherwise only when `text` is not empty.
    fn token(&mut self, index: usize, text: &str, logprob: Option<&TokenLogprob>) -> Vec<Event>;
    /// Sequence `index`'s prompt log-probabilities (asked for with the echo), before its first
    /// token.
    fn prompt_logprobs(&mut self, _index: usize, _logprobs: &[TokenLogprob]) -> Vec<Event> {
        Vec::new()
    }
    /// Sequence `index` ended.
    fn finished(&mut self, index: usize, reason: &FinishReason, usage: &Usage) -> Vec<Event>;
    /// Every sequence ended (normally, or after an error event).
    fn end(&mut self) -> Vec<Event>;
}

/// An SSE data event holding `value` as JSON.
pub fn json_event(value: &serde_json::Value) -> Event {
    Event::default().data(value.to_string())
}

/// The `data:` payload of an error event: `{"error": ...}` in the route's protocol.
pub fn error_event(err: &ApiError, wire: Wire) -> Event {
    json_event(&err.body(wire))
}

struct State {
    merged: SelectAll<stream::BoxStream<'static, (usize, JobEvent)>>,
    shaper: Box<dyn Shaper>,
    pending: VecDeque<Event>,
    prelude_done: bool,
    done: bool,
    deadline: Instant,
    timeout: Duration,
    wire: Wire,
    record: Arc<RequestRecord>,
    _guard: InFlight,
}

/// What a response stream keeps alive and needs to know besides its jobs.
pub struct StreamContext {
    /// The request's in-flight guard.
    pub guard: InFlight,
    /// The request's log record.
    pub record: Arc<RequestRecord>,
    /// The request's deadline.
    pub deadline: Instant,
    /// The configured timeout (for messages).
    pub timeout: Duration,
    /// The route's protocol (for error events).
    pub wire: Wire,
}

/// The SSE response for `streams`, shaped by `shaper`.
pub fn response(streams: Vec<JobStream>, shaper: Box<dyn Shaper>, ctx: StreamContext) -> Response {
    let StreamContext {
        guard,
        record,
        deadline,
        timeout,
        wire,
    } = ctx;
    record.set_stream();
    let merged = stream::select_all(
        streams
            .into_iter()
            .enumerate()
            .map(|(i, s)| events(s).map(move |e| (i, e)).boxed()),
    );
    let state = State {
        merged,
        shaper,
        pending: VecDeque::new(),
        prelude_done: false,
        done: false,
        deadline,
        timeout,
        wire,
        record,
        _guard: guard,
    };
    let body = stream::unfold(state, |mut st| async move {
        let ev = st.next_event().await?;
        Some((Ok::<_, Infallible>(ev), st))
    });
    Sse::new(body).keep_alive(keep_alive()).into_response()
}

/// How often an idle stream sends something, so that proxies and load balancers with idle
/// timeouts (often 60 s) do not cut a request waiting in the queue or in a long prefill.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// The idle stream's keep-alive: a bare newline, not the usual `:` comment. To an SSE parser
/// an extra blank line between events is nothing (no event is dispatched), and it keeps the
/// connection's bytes flowing just the same. A comment broke `vllm bench serve`: its client
/// strips every network read before parsing, so a comment read alone loses its terminating
/// blank line and glues itself to the front of every later event, and all the stream's
/// tokens were lost ("Never received a valid chunk").
fn keep_alive() -> KeepAlive {
    KeepAlive::new()
        .interval(KEEP_ALIVE_INTERVAL)
        .event(Event::default())
}

impl State {
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if !self.prelude_done {
                match self.shaper.prelude() {
                    Some(e) => return Some(e),
                    None => self.prelude_done = true,
                }
            }
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if self.done {
                return None;
            }
            // The deadline covers the whole response: a client that reads slowly does not
            // extend it.
            if Instant::now() > self.deadline + DEADLINE_GRACE {
                self.fail(&ApiError::Timeout(self.timeout));
                continue;
            }
            let limit = self.deadline + DEADLINE_GRACE;
            match tokio::time::timeout_at(limit.into(), self.merged.next()).await {
                Ok(Some((i, JobEvent::PromptLogprobs(lp)))) => {
                    let evs = self.shaper.prompt_logprobs(i, &lp);
                    self.pending.extend(evs);
                }
                Ok(Some((i, JobEvent::Token { text, logprob, .. }))) => {
                    self.record.first_token();
                    if !text.is_empty() || logprob.is_some() {
                        let evs = self.shaper.token(i, &text, logprob.as_ref());
                        self.pending.extend(evs);
                    }
                }
                Ok(Some((i, JobEvent::Finished { reason, usage }))) => {
                    record_finish(&self.record, &reason, &usage);
                    if let Some(err) = finish_error(&reason, self.timeout) {
                        self.fail(&err);
                    } else {
                        let evs = self.shaper.finished(i, &reason, &usage);
                        self.pending.extend(evs);
                    }
                }
                Ok(None) => {
                    let evs = self.shaper.end();
                    self.pending.extend(evs);
                    self.done = true;
                }
                Err(_) => self.fail(&ApiError::Timeout(self.timeout)),
            }
        }
    }

    /// Ends the stream with an error event: records the failure, cancels the other
    /// sequences and closes the stream properly.
    fn fail(&mut self, err: &ApiError) {
        self.record.set_error(err.tag());
        self.pending.push_back(error_event(err, self.wire));
        self.merged = SelectAll::new();
        let evs = self.shaper.end();
        self.pending.extend(evs);
        self.done = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Bytes;
    use http_body_util::BodyExt;

    /// The messages `vllm bench serve`'s streaming client (vLLM 0.32,
    /// `benchmarks/lib/endpoint_request_func.py`) gets out of these network reads: it strips
    /// each read, splits the buffer on blank lines, takes a buffer that is a whole `data:`
    /// JSON object as a message, and skips messages starting with `:`.
    fn vllm_bench_messages(reads: &[Bytes]) -> Vec<String> {
        let mut buffer = String::new();
        let mut messages = Vec::new();
        for read in reads {
            let read = String::from_utf8_lossy(read).trim().to_string();
            if read.is_empty() {
                continue;
            }
            buffer.push_str(&read);
            while let Some(i) = buffer.find("\n\n") {
                let message = buffer[..i].trim().to_string();
                buffer.drain(..i + 2);
                if !message.is_empty() {
                    messages.push(message);
                }
            }
            if let Some(rest) = buffer.strip_prefix("data: ") {
                if serde_json::from_str::<serde_json::Value>(rest.trim()).is_ok() {
                    messages.push(std::mem::take(&mut buffer).trim().to_string());
                }
            }
        }
        messages.retain(|m| !m.starts_with(':'));
        messages
    }

    /// The network reads of a stream that is idle for 20 s and then sends one event.
    async fn reads_of_a_late_event(keep_alive: KeepAlive) -> Vec<Bytes> {
        let body = stream::once(async {
            tokio::time::sleep(Duration::from_secs(20)).await;
            Ok::<_, Infallible>(Event::default().data(r#"{"choices":[{"text":"hi"}]}"#))
        });
        let mut body = Sse::new(body)
            .keep_alive(keep_alive)
            .into_response()
            .into_body();
        let mut reads = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("a body frame").into_data() {
                reads.push(data);
            }
        }
        reads
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_stream_keeps_alive_with_a_bare_newline_that_clients_skip() {
        let reads = reads_of_a_late_event(keep_alive()).await;
        assert_eq!(reads[0], "\n", "the keep-alive: {reads:?}");
        assert_eq!(
            vllm_bench_messages(&reads),
            [r#"data: {"choices":[{"text":"hi"}]}"#]
        );
        // The usual comment keep-alive loses the event in that client (what happened).
        let with_comment = reads_of_a_late_event(KeepAlive::new().interval(KEEP_ALIVE_INTERVAL));
        assert!(vllm_bench_messages(&with_comment.await).is_empty());
    }
}
