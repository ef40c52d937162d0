//! HuggingFace hub models: found in (or downloaded into) the model cache directory.

use std::path::{Path, PathBuf};

use crate::error::{EngineError, Result};

/// The directory a hub model lives in inside `cache_dir`: `<cache_dir>/<org>--<name>/<revision>`.
pub fn snapshot_dir(cache_dir: &Path, id: &str, revision: Option<&str>) -> PathBuf {
    cache_dir
        .join(id.replace('/', "--"))
        .join(revision.unwrap_or("main"))
}

/// Returns the local directory of hub model `id`, downloading it first when it is not cached.
pub fn fetch(id: &str, revision: Option<&str>, cache_dir: &Path) -> Result<PathBuf> {
    let dir = snapshot_dir(cache_dir, id, revision);
    if dir.join("config.json").is_file() {
        return Ok(dir);
    }
    Err(EngineError::Download {
        id: id.to_string(),
        cache_dir: cache_dir.to_path_buf(),
        reason: format!(
            "it is not in the cache (expected config.json and weights in {}) and this build cannot download it; \
             copy the files there or pass --model with a local directory",
            dir.display()
        ),
    })
}
