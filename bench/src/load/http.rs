//! The HTTP side of `gptj load`: one request body and response reader per protocol.

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures_util::{Future, StreamExt};
use serde_json::{json, Value};

use super::{Outcome, Planned, Status, Target};

/// Which API to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// KServe V1 `POST /v1/models/{name}:predict` (no streaming: no TTFT or ITL).
    V1,
    /// Open Inference Protocol `POST /v2/models/{name}/generate`.
    V2,
    /// Open Inference Protocol `POST /v2/models/{name}/generate_stream` (server-sent events).
    V2Stream,
    /// OpenAI `POST /openai/v1/completions`.
    Openai,
    /// OpenAI completions with `"stream": true`.
    OpenaiStream,
}

impl Protocol {
    /// Whether responses arrive token by token (so TTFT and ITL can be measured).
    pub fn streams(self) -> bool {
        matches!(self, Protocol::V2Stream | Protocol::OpenaiStream)
    }
}

/// Sends requests to a server over HTTP.
pub struct Http {
    client: reqwest::Client,
    url: String,
    protocol: Protocol,
    model_name: String,
    api_key: Option<String>,
    do_sample: bool,
}

impl Http {
    /// A client for `base` (e.g. `http://127.0.0.1:8080`) speaking `protocol` to the model
    /// `model_name`, giving up on a request after `timeout`.
    pub fn new(
        base: &str,
        protocol: Protocol,
        model_name: &str,
        api_key: Option<String>,
        do_sample: bool,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let base = base.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            anyhow::bail!("--url `{base}` must start with http://");
        }
        let url = match protocol {
            Protocol::V1 => format!("{base}/v1/models/{model_name}:predict"),
            Protocol::V2 => format!("{base}/v2/models/{model_name}/generate"),
            Protocol::V2Stream => format!("{base}/v2/models/{model_name}/generate_stream"),
            Protocol::Openai | Protocol::OpenaiStream => format!("{base}/openai/v1/completions"),
        };
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(timeout)
            .pool_max_idle_per_host(1024)
            .build()?;
        Ok(Self {
            client,
            url,
            protocol,
            model_name: model_name.to_owned(),
            api_key,
            do_sample,
        })
    }

    /// The endpoint requests go to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The JSON body for `req`: exactly `req.output_tokens` new tokens (minimum = maximum).
    pub fn body(&self, req: &Planned) -> Value {
        let n = req.output_tokens;
        let params = json!({
            "max_new_tokens": n, "min_new_tokens": n, "do_sample": self.do_sample,
        });
        match self.protocol {
            Protocol::V1 => json!({"instances": [req.prompt], "parameters": params}),
            Protocol::V2 | Protocol::V2Stream => {
                json!({"text_input": req.prompt, "parameters": params})
            }
            Protocol::Openai | Protocol::OpenaiStream => {
                let mut b = json!({
                    "model": self.model_name, "prompt": req.prompt, "max_tokens": n,
                    "min_tokens": n, "temperature": if self.do_sample { 1.0 } else { 0.0 },
                });
                if self.protocol == Protocol::OpenaiStream {
                    b["stream"] = json!(true);
                    b["stream_options"] = json!({"include_usage": true});
                }
                b
            }
        }
    }

    async fn run(&self, req: Planned) -> Outcome {
        let start = Instant::now();
        let mut outcome = Outcome::new(req.prompt_ids.len());
        let mut rb = self.client.post(&self.url).json(&self.body(&req));
        if let Some(key) = &self.api_key {
            rb = rb.bearer_auth(key);
        }
        let resp = match rb.send().await {
            Ok(r) => r,
            Err(e) => return outcome.failed(transport_status(&e), start),
        };
        let status = resp.status();
        if !status.is_success() {
            // Read the body so the connection can be reused; its text is not needed.
            let _ = resp.bytes().await;
            return outcome.failed(Status::Http(status.as_u16()), start);
        }
        if self.protocol.streams() {
            return self.read_stream(resp, outcome, start).await;
        }
        let body: Value = match resp.json().await {
            Ok(v) => v,
            Err(e) => return outcome.failed(transport_status(&e), start),
        };
        outcome.e2e = start.elapsed();
        outcome.output_tokens = match body.pointer("/usage/completion_tokens") {
            Some(n) => n.as_u64().unwrap_or(0) as usize,
            None => {
                // KServe V1 reports no usage; the request asked for exactly this many.
                outcome.output_tokens_exact = false;
                req.output_tokens
            }
        };
        outcome.status = Status::Ok;
        outcome
    }

    async fn read_stream(
        &self,
        resp: reqwest::Response,
        mut outcome: Outcome,
        start: Instant,
    ) -> Outcome {
        let mut body = resp.bytes_stream();
        let mut buf = Vec::<u8>::new();
        let mut last_token: Option<Instant> = None;
        let mut tokens = 0usize;
        let mut usage: Option<usize> = None;
        let mut finished = false;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => return outcome.failed(transport_status(&e), start),
            };
            buf.extend_from_slice(&chunk);
            while let Some((event, rest)) = split_event(&buf) {
                let data = sse_data(event);
                buf = rest.to_vec();
                let Some(data) = data else { continue };
                let now = Instant::now();
                if data.trim() == "[DONE]" {
                    finished = true;
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(&data) else {
                    return outcome.failed(Status::Failed("bad_event".into()), start);
                };
                if v.get("error").is_some() {
                    return outcome.failed(Status::Failed("stream_error".into()), start);
                }
                if let Some(n) = v
                    .pointer("/usage/completion_tokens")
                    .and_then(Value::as_u64)
                {
                    usage = Some(n as usize);
                }
                let is_token = match self.protocol {
                    Protocol::V2Stream => {
                        if v.get("done").and_then(Value::as_bool) == Some(true) {
                            finished = true;
                            false
                        } else {
                            true
                        }
                    }
                    _ => v
                        .pointer("/choices/0")
                        .is_some_and(|c| c.get("finish_reason").is_none_or(Value::is_null)),
                };
                if is_token {
                    tokens += 1;
                    match last_token {
                        None => outcome.ttft = Some(now - start),
                        Some(t) => outcome.itl.push(now - t),
                    }
                    last_token = Some(now);
                }
            }
        }
        outcome.e2e = start.elapsed();
        if !finished {
            return outcome.failed(Status::Failed("stream_cut".into()), start);
        }
        // A token's text can be empty (half a character) and the server may fold such
        // tokens into the next event, so the usage count is preferred over the event count.
        outcome.output_tokens = usage.unwrap_or_else(|| {
            outcome.output_tokens_exact = false;
            tokens
        });
        outcome.status = Status::Ok;
        outcome
    }
}

impl Target for Http {
    fn send(&self, req: Planned) -> Pin<Box<dyn Future<Output = Outcome> + Send + '_>> {
        Box::pin(self.run(req))
    }
}

fn transport_status(e: &reqwest::Error) -> Status {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_decode() {
        "bad_body"
    } else if e.is_body() {
        "body"
    } else {
        "transport"
    };
    Status::Failed(kind.into())
}

/// The first complete server-sent event in `buf` and what follows it.
fn split_event(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    let (i, n) = match (lf, crlf) {
        (Some(a), Some(b)) => {
            if a.0 <= b.0 {
                a
            } else {
                b
            }
        }
        (a, b) => a.or(b)?,
    };
    Some((&buf[..i], &buf[i + n..]))
}

/// The joined `data:` lines of one event; `None` for an event without data (a comment).
fn sse_data(event: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(event);
    let mut data: Option<String> = None;
    for line in text.lines() {
        if let Some(d) = line.strip_prefix("data:") {
            let d = d.strip_prefix(' ').unwrap_or(d);
            match &mut data {
                Some(s) => {
                    s.push('\n');
                    s.push_str(d);
                }
                None => data = Some(d.to_owned()),
            }
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_on_blank_lines() {
        let buf = b"data: {\"a\":1}\n\n: keep-alive\n\ndata: [DONE]\r\n\r\ndata: par";
        let (e1, rest) = split_event(buf).unwrap();
        assert_eq!(sse_data(e1).as_deref(), Some("{\"a\":1}"));
        let (e2, rest) = split_event(rest).unwrap();
        assert_eq!(sse_data(e2), None);
        let (e3, rest) = split_event(rest).unwrap();
        assert_eq!(sse_data(e3).as_deref(), Some("[DONE]"));
        assert!(split_event(rest).is_none());
    }

    #[test]
    fn bodies_ask_for_exactly_the_planned_tokens() {
        let req = Planned {
            index: 0,
            prompt: "hi".into(),
            prompt_ids: vec![1],
            output_tokens: 9,
        };
        let t = Duration::from_secs(1);
        let h = |p| Http::new("http://x:1/", p, "m", None, false, t).unwrap();
        assert_eq!(h(Protocol::V1).url(), "http://x:1/v1/models/m:predict");
        assert_eq!(
            h(Protocol::V1).body(&req),
            json!({"instances": ["hi"], "parameters": {"max_new_tokens": 9, "min_new_tokens": 9, "do_sample": false}})
        );
        assert_eq!(
            h(Protocol::V2Stream).url(),
            "http://x:1/v2/models/m/generate_stream"
        );
        let b = h(Protocol::OpenaiStream).body(&req);
        assert_eq!(
            (b["max_tokens"].clone(), b["min_tokens"].clone()),
            (json!(9), json!(9))
        );
        assert_eq!(b["stream"], json!(true));
        assert!(Http::new("localhost:1", Protocol::V1, "m", None, false, t).is_err());
    }
}
