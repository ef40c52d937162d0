/*!
OpenAI chat completions: `POST /openai/v1/chat/completions` (and `/v1/chat/completions`).

The messages become one prompt through the server's chat template ([`ChatTemplate`]); without
one the request gets 400 saying how to supply it. The rest is the completions protocol's:
the same parameters (plus `max_completion_tokens`, the newer name of `max_tokens`, and vLLM's
`add_generation_prompt`), the same finish reasons and usage. The answer is a
`chat.completion` whose choices hold `message: {"role": "assistant", "content"}`; streamed,
each choice first gets a `chat.completion.chunk` whose `delta` is the role, then one per piece
of text (`delta: {"content"}`), then one with an empty `delta` and its `finish_reason`, then
the usage chunk when asked, then `[DONE]`. With `logprobs: true` (and `top_logprobs` 0 to
20) each choice's `logprobs.content` lists every generated token
([`super::logprobs::chat_entry`]); streamed, each token's chunk carries its own entry.
*/

use axum::response::sse::Event;
use gptj_scheduler::{FinishReason, LogprobsRequest, TokenLogprob, Usage};
use serde_json::{json, Map, Value};

use super::logprobs::chat_entry;
use super::{answer, finish_reason, head, parse_stream_options, Completions, StreamTail};
use crate::chat_template::{ChatTemplate, Message};
use crate::config::ServerConfig;
use crate::error::{ApiError, Wire};
use crate::generation::Generation;
use crate::params::json::{read_bool, read_string, read_uint};
use crate::params::{describe, Dialect, Limits, Names, ParamsReader, ValidationError};
use crate::pipeline::{Outcome, Protocol, Start};
use crate::sse::{json_event, Shaper};
use crate::state::Backend;

/// A parsed chat body; the prompt is rendered by [`Protocol::prepare`].
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The messages.
    pub messages: Vec<Message>,
    /// End the prompt with the assistant's turn (vLLM's `add_generation_prompt`, default true).
    pub add_generation_prompt: bool,
    /// The prompt (once rendered), parameters and whether to stream.
    pub generation: Generation,
    /// Send a usage chunk before `[DONE]`.
    pub include_usage: bool,
}

/// The fields of a chat body that are not generation parameters.
const OWN_FIELDS: &[&str] = &[
    "model",
    "messages",
    "stream",
    "stream_options",
    "user",
    "add_generation_prompt",
    "logprobs",
    "top_logprobs",
];

/// The fields OpenAI defines for chat that this server does not implement.
const REFUSED: &[(&str, &str)] = &[
    ("tools", "tool calls are not supported"),
    ("tool_choice", "tool calls are not supported"),
    ("functions", "function calls are not supported"),
    ("function_call", "function calls are not supported"),
    ("response_format", "structured output is not supported"),
];

/// `POST /openai/v1/chat/completions`.
pub struct ChatCompletions;

fn refused(field: &str, message: &str) -> ValidationError {
    ValidationError::Unsupported {
        field: field.into(),
        message: message.into(),
    }
}

impl Protocol for ChatCompletions {
    const WIRE: Wire = Wire::OpenAi;
    const DIALECT: Dialect = Dialect {
        aliases: &[
            ("max_tokens", "max_new_tokens"),
            ("max_completion_tokens", "max_new_tokens"),
            ("min_tokens", "min_new_tokens"),
            ("n", "num_return_sequences"),
        ],
        names: Names::Only(super::CHAT_PARAMS),
        ..Completions::DIALECT
    };
    type Request = ChatRequest;

    fn prompt_name(_: usize) -> String {
        "messages".into()
    }

    fn parse(body: &Map<String, Value>, limits: Limits) -> Result<ChatRequest, ValidationError> {
        let mut reader = ParamsReader::new(Self::DIALECT, limits);
        let mut model = None;
        let mut messages = None;
        let mut stream = false;
        let mut include_usage = false;
        let mut add_generation_prompt = true;
        let (mut logprobs, mut top_logprobs) = (false, None);
        for (key, v) in body {
            let f = key.as_str();
            if reader.read(f, v)? || v.is_null() {
                continue;
            }
            if let Some((_, why)) = REFUSED.iter().find(|(k, _)| *k == f) {
                return Err(refused(f, why));
            }
            match f {
                "model" => model = Some(read_string(f, v)?.to_owned()),
                "messages" => messages = Some(parse_messages(v)?),
                "stream" => stream = read_bool(f, v)?,
                "stream_options" => include_usage = parse_stream_options(v)?,
                "add_generation_prompt" => add_generation_prompt = read_bool(f, v)?,
                "user" => {
                    read_string(f, v)?;
                }
                "logprobs" => logprobs = read_bool(f, v)?,
                "top_logprobs" => {
                    top_logprobs = Some(read_uint(f, v, 0, LogprobsRequest::MAX_TOP as u64)?)
                }
                other => return Err(reader.unknown(other, OWN_FIELDS)),
            }
        }
        let messages = messages.ok_or_else(|| ValidationError::Missing {
            field: "messages".into(),
            what: "an array of {\"role\", \"content\"} objects",
        })?;
        if top_logprobs.is_some() && !logprobs {
            return Err(refused(
                "top_logprobs",
                "needs `logprobs: true` (OpenAI's rule)",
            ));
        }
        let p = reader.params_mut();
        if logprobs {
            p.logprobs = Some(top_logprobs.unwrap_or(0) as usize);
        }
        p.do_sample = Some(p.temperature != Some(0.0));
        p.return_full_text = Some(false);
        let params = reader.finish()?;
        Ok(ChatRequest {
            messages,
            add_generation_prompt,
            generation: Generation {
                model,
                prompts: Vec::new().into(),
                params,
                stream,
            },
            include_usage,
        })
    }

    fn prepare(
        req: &mut ChatRequest,
        config: &ServerConfig,
        backend: &Backend,
    ) -> Result<(), ApiError> {
        let template = config
            .chat_template
            .as_ref()
            .or(backend.chat_template.as_ref())
            .ok_or_else(no_template)?;
        let prompt = render(template, req)?;
        req.generation.prompts = vec![prompt].into();
        Ok(())
    }

    fn generation(req: &ChatRequest) -> &Generation {
        &req.generation
    }

    fn render(_: &ChatRequest, out: &Outcome<'_>) -> Value {
        let choices: Vec<Value> = out
            .finished
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let logprobs = out.submitted.plan(i).logprobs.map(|_| {
                    let content: Vec<Value> = f
                        .logprobs
                        .iter()
                        .map(|lp| chat_entry(out.tokenizer, lp))
                        .collect();
                    json!({"content": content})
                });
                json!({
                    "index": i,
                    "message": {"role": "assistant", "content": out.text(i)},
                    "logprobs": logprobs,
                    "finish_reason": finish_reason(&f.reason),
                })
            })
            .collect();
        answer(head(chat_id, "chat.completion", out.meta), choices, out)
    }

    fn stream(req: &ChatRequest, start: &Start<'_>) -> Option<Box<dyn Shaper>> {
        let head = head(chat_id, "chat.completion.chunk", start.meta);
        let choices = start.prompts.len() * start.submitted.per_prompt.max(1);
        Some(Box::new(ChatShaper {
            tail: StreamTail::new(head, req.include_usage, start),
            roles: 0..choices,
            tokenizer: start.tokenizer.clone(),
        }))
    }
}

/// The 400 of a server without a chat template.
pub(super) fn no_template() -> ApiError {
    refused(
        "messages",
        "GPT-J has no chat template of its own and this server was started without one: start \
         it with `--chat-template PATH` (a Jinja template in HuggingFace's `chat_template` \
         convention, such as assets/chat-template.jinja), or send a plain prompt to \
         /v1/completions",
    )
    .into()
}

fn render(template: &ChatTemplate, req: &ChatRequest) -> Result<String, ApiError> {
    template
        .render(&req.messages, req.add_generation_prompt)
        .map_err(|e| refused("messages", &e.to_string()).into())
}

fn chat_id(request_id: &str) -> String {
    format!("chatcmpl-{request_id}")
}

/// `messages`: a non-empty array of `{"role", "content"}`; `content` is a string, an array of
/// text parts (`{"type": "text", "text"}`, joined) or, for an assistant turn, null.
pub(super) fn parse_messages(v: &Value) -> Result<Vec<Message>, ValidationError> {
    let expected = "a non-empty array of {\"role\", \"content\"} objects";
    let items = match v {
        Value::Array(a) if !a.is_empty() => a,
        other => {
            return Err(ValidationError::WrongType {
                field: "messages".into(),
                expected,
                got: describe(other),
            })
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let at = format!("messages[{i}]");
            let obj = m.as_object().ok_or_else(|| ValidationError::WrongType {
                field: at.clone(),
                expected: "an object with `role` and `content`",
                got: describe(m),
            })?;
            let mut role = None;
            let mut content = String::new();
            for (k, v) in obj {
                let f = format!("{at}.{k}");
                match k.as_str() {
                    "role" => role = Some(read_string(&f, v)?.to_owned()),
                    "content" => content = parse_content(&f, v)?,
                    "name" => {
                        read_string(&f, v)?;
                    }
                    _ => {
                        return Err(ValidationError::UnknownField {
                            field: f,
                            known: "role, content, name".into(),
                        })
                    }
                }
            }
            let role = role.ok_or_else(|| ValidationError::Missing {
                field: format!("{at}.role"),
                what: "`system`, `user` or `assistant`",
            })?;
            Ok(Message { role, content })
        })
        .collect()
}

fn parse_content(field: &str, v: &Value) -> Result<String, ValidationError> {
    match v {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (j, part) in parts.iter().enumerate() {
                let f = format!("{field}[{j}]");
                match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("text"), Some(text)) => out.push_str(text),
                    _ => {
                        return Err(ValidationError::Unsupported {
                            field: f,
                            message: "only text parts (`{\"type\": \"text\", \"text\": ...}`) \
                                      are supported"
                                .into(),
                        })
                    }
                }
            }
            Ok(out)
        }
        other => Err(ValidationError::WrongType {
            field: field.into(),
            expected: "a string or an array of text parts",
            got: describe(other),
        }),
    }
}

fn chunk(head: &Value, index: usize, delta: Value, finish: Option<&str>) -> Event {
    chunk_with(head, index, delta, Value::Null, finish)
}

fn chunk_with(
    head: &Value,
    index: usize,
    delta: Value,
    logprobs: Value,
    finish: Option<&str>,
) -> Event {
    let mut v = head.clone();
    v["choices"] = json!([{
        "index": index,
        "delta": delta,
        "logprobs": logprobs,
        "finish_reason": finish,
    }]);
    json_event(&v)
}

struct ChatShaper {
    tail: StreamTail,
    /// The choices still to announce with their `role` delta.
    roles: std::ops::Range<usize>,
    tokenizer: gptj_scheduler::Tokenizer,
}

impl Shaper for ChatShaper {
    fn prelude(&mut self) -> Option<Event> {
        let i = self.roles.next()?;
        Some(chunk(
            &self.tail.head,
            i,
            json!({"role": "assistant", "content": ""}),
            None,
        ))
    }

    fn token(&mut self, index: usize, text: &str, logprob: Option<&TokenLogprob>) -> Vec<Event> {
        let logprobs = logprob.map_or(
            Value::Null,
            |lp| json!({"content": [chat_entry(&self.tokenizer, lp)]}),
        );
        vec![chunk_with(
            &self.tail.head,
            index,
            json!({"content": text}),
            logprobs,
            None,
        )]
    }

    fn finished(&mut self, index: usize, reason: &FinishReason, usage: &Usage) -> Vec<Event> {
        self.tail.count(usage);
        vec![chunk(
            &self.tail.head,
            index,
            json!({}),
            Some(finish_reason(reason)),
        )]
    }

    fn end(&mut self) -> Vec<Event> {
        self.tail.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_sequences: 8,
        max_prompts: 4,
    };

    fn parse(v: Value) -> Result<ChatRequest, ValidationError> {
        ChatCompletions::parse(v.as_object().unwrap(), LIMITS)
    }

    #[test]
    fn chat_body() {
        let r = parse(json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null},
            ],
            "max_completion_tokens": 7, "temperature": 0, "n": 2, "stream": true,
            "logprobs": false, "add_generation_prompt": false,
        }))
        .unwrap();
        assert_eq!(r.messages[1].content, "ab");
        assert_eq!(r.messages[2].content, "");
        assert_eq!(r.generation.params.max_new_tokens, Some(7));
        assert_eq!(r.generation.params.do_sample, Some(false));
        assert_eq!(r.generation.params.return_full_text, Some(false));
        assert!(r.generation.stream && !r.add_generation_prompt);
    }

    #[test]
    fn chat_errors_name_the_field() {
        let m = json!([{"role": "user", "content": "hi"}]);
        let cases = [
            (json!({}), "missing `messages`"),
            (json!({"messages": []}), "non-empty array"),
            (json!({"messages": [{"content": "x"}]}), "messages[0].role"),
            (
                json!({"messages": [{"role": "user", "content": 3}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "messages[0].content[0]",
            ),
            (json!({"messages": m, "tools": []}), "tool calls"),
            (
                json!({"messages": m, "echo": true}),
                "unknown parameter `echo`",
            ),
            (
                json!({"messages": m, "max_tokens": 3, "max_completion_tokens": 4}),
                "two ways",
            ),
            (
                json!({"messages": m, "top_logprobs": 2}),
                "needs `logprobs: true`",
            ),
            (
                json!({"messages": m, "logprobs": true, "top_logprobs": 21}),
                "`top_logprobs`",
            ),
        ];
        for (body, needle) in cases {
            let e = parse(body.clone()).unwrap_err().to_string();
            assert!(e.contains(needle), "{body}: {e}");
        }
    }
}
