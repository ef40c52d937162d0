/*!
The chat template: how a list of chat messages becomes one prompt.

GPT-J is a plain language model with no chat format of its own, so the operator supplies one:
`--chat-template PATH`, a Jinja template in HuggingFace's `chat_template` convention, or, for a
model directory without that flag, the `chat_template` of its `tokenizer_config.json`. The
template sees `messages` (a list of `{"role", "content"}`), `add_generation_prompt`,
`bos_token` and `eos_token` (both `<|endoftext|>` for GPT-J), and may call
`raise_exception(message)` to refuse a conversation (the client gets a 400 with the message).
It is compiled at startup, so a broken template stops the server there.
*/

use std::path::Path;
use std::sync::Arc;

use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

/// GPT-J's only special token, its BOS and EOS.
pub const GPTJ_SPECIAL: &str = "<|endoftext|>";

/// A compiled chat template.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    /// Where it came from, for logs and messages.
    pub source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// One chat message as the template sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    /// `system`, `user`, `assistant`...
    pub role: String,
    /// The text.
    pub content: String,
}

/// Why rendering failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RenderError {
    /// The template refused the conversation (`raise_exception`).
    #[error("the chat template refused the conversation: {0}")]
    Refused(String),
    /// Any other template failure.
    #[error("the chat template failed: {0}")]
    Failed(String),
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; `origin` says where it came from.
    pub fn new(source: String, origin: String) -> Result<Self, String> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        // Python string methods (`.strip()`, `.startswith()`), which HF templates use.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(NAME, source)
            .map_err(|e| format!("{origin}: {e:#}"))?;
        Ok(Self {
            env: Arc::new(env),
            source: origin,
        })
    }

    /// Reads and compiles the template file at `path`.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let source = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::new(source, path.display().to_string())
    }

    /// The `chat_template` of the `tokenizer_config.json` in model directory `dir`, if it has
    /// one (a string; the list form, named templates, takes its `default`).
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>, String> {
        let path = dir.join("tokenizer_config.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(None);
        };
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not valid JSON: {e}", path.display()))?;
        let source = match &v["chat_template"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(list) => match list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
            {
                Some(s) => s.to_owned(),
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
        Self::new(source, format!("{} (chat_template)", path.display())).map(Some)
    }

    /// The prompt for `messages`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, RenderError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| RenderError::Failed(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => GPTJ_SPECIAL,
                eos_token => GPTJ_SPECIAL,
            })
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidOperation => {
                    RenderError::Refused(e.detail().unwrap_or_default().to_owned())
                }
                _ => RenderError::Failed(format!("{e:#}")),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn the_example_template_renders_a_conversation() {
        let src = include_str!("../../assets/chat-template.jinja").to_owned();
        let t = ChatTemplate::new(src, "example".into()).unwrap();
        let msgs = [
            msg("system", "Be brief."),
            msg("user", " Hi! "),
            msg("assistant", "Hello."),
            msg("user", "Why?"),
        ];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "Be brief.\n\nUser: Hi!\nAssistant: Hello.\nUser: Why?\nAssistant:"
        );
        assert_eq!(t.render(&msgs[1..2], false).unwrap(), "User: Hi!\n");
        let e = t.render(&[msg("tool", "x")], true).unwrap_err();
        assert!(
            matches!(&e, RenderError::Refused(m) if m.contains("tool")),
            "{e}"
        );
    }

    #[test]
    fn broken_templates_fail_at_compile_time() {
        let e = ChatTemplate::new("{% for %}".into(), "t.jinja".into()).unwrap_err();
        assert!(e.contains("t.jinja"), "{e}");
    }

    #[test]
    fn model_dirs_may_carry_one() {
        let dir = std::env::temp_dir().join(format!("gptj-chat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(ChatTemplate::from_model_dir(&dir).unwrap().is_none());
        let cfg = serde_json::json!({"chat_template": "{{ messages[0].content }}!"});
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let t = ChatTemplate::from_model_dir(&dir).unwrap().unwrap();
        assert_eq!(t.render(&[msg("user", "yo")], true).unwrap(), "yo!");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
