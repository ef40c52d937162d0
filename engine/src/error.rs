//! The engine's error type: every failure says which file, tensor or input it concerns.

use std::path::PathBuf;

/// Everything that can go wrong while loading a model or running it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file the model needs is not where we looked.
    #[error("{what} not found: looked for {}", path.display())]
    MissingFile { what: &'static str, path: PathBuf },
    /// A file exists but cannot be read or parsed.
    #[error("cannot read {}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    /// `config.json` is not a GPT-J configuration we can run.
    #[error("unsupported model config {}: {reason}", path.display())]
    BadConfig { path: PathBuf, reason: String },
    /// A tensor is missing or has the wrong shape or dtype.
    #[error("bad weight `{tensor}` in {}: {reason}", path.display())]
    BadWeight {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    /// The tokenizer could not be loaded or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A hub model could not be fetched.
    #[error("cannot fetch model `{id}`: {reason} (cache directory: {})", cache_dir.display())]
    Download {
        id: String,
        cache_dir: PathBuf,
        reason: String,
    },
    /// The caller passed a batch or option the engine cannot run (a bug in the caller).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// An error from the tensor library while running the model.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result alias for the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
