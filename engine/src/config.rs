//! The HuggingFace `config.json` of a GPT-J checkpoint.

use std::path::Path;

use serde::Deserialize;

use crate::error::{EngineError, Result};

/// The fields of a GPT-J `config.json` that shape the network.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GptjConfig {
    /// Embedding rows (50400 for GPT-J-6B: 50257 tokens plus unused padding rows).
    pub vocab_size: usize,
    /// Longest context the model was trained for (2048).
    pub n_positions: usize,
    /// Hidden size (4096).
    pub n_embd: usize,
    /// Number of transformer blocks (28).
    pub n_layer: usize,
    /// Attention heads per block (16, so head_dim = 256).
    pub n_head: usize,
    /// How many leading dims of each head get rotary position embedding (64).
    pub rotary_dim: usize,
    /// MLP width; `None` means `4 * n_embd`.
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// Must be `gelu_new` (the tanh approximation).
    #[serde(default = "default_activation")]
    pub activation_function: String,
    /// LayerNorm epsilon (1e-5).
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// Weight dtype as recorded by transformers (`float32`, `float16`, `bfloat16`), if any.
    #[serde(default)]
    pub torch_dtype: Option<String>,
    /// Must be `gptj` when present.
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_activation() -> String {
    "gelu_new".to_string()
}

fn default_eps() -> f64 {
    1e-5
}

impl GptjConfig {
    /// GPT-J-6B's shape (EleutherAI/gpt-j-6b).
    pub fn gptj_6b() -> Self {
        Self {
            vocab_size: 50400,
            n_positions: 2048,
            n_embd: 4096,
            n_layer: 28,
            n_head: 16,
            rotary_dim: 64,
            n_inner: None,
            activation_function: default_activation(),
            layer_norm_epsilon: 1e-5,
            torch_dtype: Some("float16".into()),
            model_type: Some("gptj".into()),
        }
    }

    /// Reads and checks a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => EngineError::MissingFile {
                what: "config.json",
                path: path.to_path_buf(),
            },
            _ => EngineError::BadFile {
                path: path.to_path_buf(),
                reason: e.to_string(),
            },
        })?;
        Self::from_json(&text).map_err(|reason| EngineError::BadConfig {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Parses and checks the text of a `config.json`.
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        if let Some(kind) = value.get("model_type").and_then(|v| v.as_str()) {
            if kind != "gptj" {
                return Err(format!(
                    "model_type is `{kind}`, but this server runs only GPT-J checkpoints (model_type `gptj`)"
                ));
            }
        }
        let cfg: Self = serde_json::from_value(value).map_err(|e| format!("{e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the invariants the forward pass relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!(
                "n_embd ({}) must be a multiple of n_head ({})",
                self.n_embd, self.n_head
            ));
        }
        let head_dim = self.head_dim();
        if self.rotary_dim == 0 || self.rotary_dim > head_dim || !self.rotary_dim.is_multiple_of(2)
        {
            return Err(format!(
                "rotary_dim ({}) must be even and in 2..={head_dim} (the head dimension)",
                self.rotary_dim
            ));
        }
        if self.activation_function != "gelu_new" {
            return Err(format!(
                "activation_function `{}` is not supported; GPT-J uses `gelu_new`",
                self.activation_function
            ));
        }
        Ok(())
    }

    /// Dimension of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Width of the MLP's hidden layer.
    pub fn inner_dim(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// Number of parameters (for logs and memory estimates).
    pub fn num_params(&self) -> usize {
        let e = self.n_embd;
        let per_layer = 2 * e + 4 * e * e + 2 * e * self.inner_dim() + self.inner_dim() + e;
        self.vocab_size * e * 2 + self.vocab_size + self.n_layer * per_layer + 2 * e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_gptj_6b_config() {
        let text = r#"{"model_type":"gptj","vocab_size":50400,"n_positions":2048,"n_embd":4096,
            "n_layer":28,"n_head":16,"rotary_dim":64,"n_inner":null,"activation_function":"gelu_new",
            "layer_norm_epsilon":1e-05,"torch_dtype":"float32","rotary":true}"#;
        let cfg = GptjConfig::from_json(text).unwrap();
        assert_eq!(cfg.head_dim(), 256);
        assert_eq!(cfg.inner_dim(), 16384);
        assert_eq!(cfg.num_params(), 6_050_882_784);
    }

    #[test]
    fn refuses_other_model_types() {
        let err = GptjConfig::from_json(r#"{"model_type":"llama","vocab_size":1}"#).unwrap_err();
        assert!(err.contains("llama") && err.contains("gptj"), "{err}");
    }

    #[test]
    fn refuses_bad_shapes() {
        let mut cfg = GptjConfig::gptj_6b();
        cfg.rotary_dim = 300;
        assert!(cfg.validate().unwrap_err().contains("rotary_dim"));
        cfg = GptjConfig::gptj_6b();
        cfg.n_head = 3;
        assert!(cfg.validate().unwrap_err().contains("multiple of n_head"));
    }
}
