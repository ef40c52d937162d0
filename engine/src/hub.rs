//! HuggingFace hub models: looked up in the model cache directory, downloaded into it when
//! missing (with a progress bar), and reused on every later start.
//!
//! Layout: `<cache_dir>/<org>--<name>/<revision>/` holds the repository's files as the hub
//! names them. A file is written to `<name>.part` and renamed when complete, so a directory
//! never holds a truncated file under its real name. `HF_ENDPOINT` overrides the hub's address
//! and `HF_TOKEN` is sent for gated models.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{EngineError, Result};

/// The public hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The directory a hub model lives in inside `cache_dir`.
pub fn snapshot_dir(cache_dir: &Path, id: &str, revision: Option<&str>) -> PathBuf {
    cache_dir
        .join(id.replace('/', "--"))
        .join(revision.unwrap_or("main"))
}

/// Returns the local directory of hub model `id`, downloading what is missing from the hub at
/// `HF_ENDPOINT` (default huggingface.co).
pub fn fetch(id: &str, revision: Option<&str>, cache_dir: &Path) -> Result<PathBuf> {
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| DEFAULT_ENDPOINT.to_string());
    let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
    fetch_from(&endpoint, token.as_deref(), id, revision, cache_dir)
}

/// [`fetch`] against an explicit hub address.
pub fn fetch_from(
    endpoint: &str,
    token: Option<&str>,
    id: &str,
    revision: Option<&str>,
    cache_dir: &Path,
) -> Result<PathBuf> {
    let dir = snapshot_dir(cache_dir, id, revision);
    if is_complete(&dir) {
        tracing::info!(model = id, dir = %dir.display(), "using cached model");
        return Ok(dir);
    }
    let fail = |reason: String| EngineError::Download {
        id: id.to_string(),
        cache_dir: cache_dir.to_path_buf(),
        reason,
    };
    let hub = Hub {
        endpoint: endpoint.trim_end_matches('/'),
        token,
        id,
        revision: revision.unwrap_or("main"),
    };
    let files = hub.list_files().map_err(|e| {
        fail(format!("{e}; the model is not in the cache either (looked in {}); copy its files there, or check the network", dir.display()))
    })?;
    let wanted = files_to_fetch(&files).map_err(fail)?;
    std::fs::create_dir_all(&dir)
        .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
    for file in &wanted {
        let dst = dir.join(file);
        if dst.is_file() {
            continue;
        }
        hub.download(file, &dst)
            .map_err(|e| fail(format!("downloading {file}: {e}")))?;
    }
    // Marks the snapshot complete: a crash mid-download leaves no marker and resumes next time.
    std::fs::write(dir.join(COMPLETE_MARKER), wanted.join("\n"))
        .map_err(|e| fail(e.to_string()))?;
    Ok(dir)
}

const COMPLETE_MARKER: &str = ".gptj-complete";

fn is_complete(dir: &Path) -> bool {
    let Ok(list) = std::fs::read_to_string(dir.join(COMPLETE_MARKER)) else {
        return false;
    };
    list.lines().all(|f| dir.join(f).is_file())
}

/// The files a GPT-J server needs from a repository listing: config, tokenizer files if any,
/// and one set of weights (safetensors, sharded safetensors, or pytorch_model.bin).
fn files_to_fetch(files: &[String]) -> std::result::Result<Vec<String>, String> {
    let has = |f: &str| files.iter().any(|x| x == f);
    if !has("config.json") {
        return Err("the repository has no config.json".into());
    }
    let mut wanted = vec!["config.json".to_string()];
    for f in [
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "special_tokens_map.json",
        "tokenizer_config.json",
    ] {
        if has(f) {
            wanted.push(f.to_string());
        }
    }
    if has("model.safetensors") {
        wanted.push("model.safetensors".into());
    } else if has("model.safetensors.index.json") {
        wanted.push("model.safetensors.index.json".into());
        wanted.extend(
            files
                .iter()
                .filter(|f| f.starts_with("model-") && f.ends_with(".safetensors"))
                .cloned(),
        );
    } else if has("pytorch_model.bin") {
        wanted.push("pytorch_model.bin".into());
    } else {
        return Err(
            "the repository has no model.safetensors, sharded safetensors or pytorch_model.bin"
                .into(),
        );
    }
    Ok(wanted)
}

struct Hub<'a> {
    endpoint: &'a str,
    token: Option<&'a str>,
    id: &'a str,
    revision: &'a str,
}

impl Hub<'_> {
    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .build()
            .into()
    }

    fn get(&self, url: &str) -> std::result::Result<ureq::http::Response<ureq::Body>, String> {
        let mut req = Self::agent().get(url);
        if let Some(token) = self.token {
            req = req.header("Authorization", &format!("Bearer {token}"));
        }
        req.call().map_err(|e| match e {
            ureq::Error::StatusCode(404) => {
                format!("{url}: not found (is the id and revision right?)")
            }
            ureq::Error::StatusCode(401 | 403) => {
                format!("{url}: access denied (gated model? set HF_TOKEN)")
            }
            other => format!("{url}: {other}"),
        })
    }

    fn list_files(&self) -> std::result::Result<Vec<String>, String> {
        let url = format!(
            "{}/api/models/{}/revision/{}",
            self.endpoint, self.id, self.revision
        );
        let text = self
            .get(&url)?
            .into_body()
            .read_to_string()
            .map_err(|e| format!("{url}: {e}"))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{url}: not JSON: {e}"))?;
        let siblings = json
            .get("siblings")
            .and_then(|s| s.as_array())
            .ok_or_else(|| format!("{url}: no file list"))?;
        Ok(siblings
            .iter()
            .filter_map(|s| s.get("rfilename")?.as_str().map(str::to_string))
            .collect())
    }

    fn download(&self, file: &str, dst: &Path) -> std::result::Result<(), String> {
        let url = format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint, self.id, self.revision, file
        );
        let resp = self.get(&url)?;
        let total = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let bar = match total {
            Some(n) => indicatif::ProgressBar::new(n),
            None => indicatif::ProgressBar::no_length(),
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(file.to_string());
        let part = dst.with_file_name(format!("{file}.part"));
        let mut out =
            std::fs::File::create(&part).map_err(|e| format!("{}: {e}", part.display()))?;
        let mut reader = resp.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 20];
        let mut written = 0u64;
        loop {
            let n = reader.read(&mut buf).map_err(|e| format!("{url}: {e}"))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])
                .map_err(|e| format!("{}: {e}", part.display()))?;
            written += n as u64;
            bar.set_position(written);
        }
        bar.finish_and_clear();
        if let Some(n) = total {
            if n != written {
                return Err(format!("{url}: got {written} of {n} bytes"));
            }
        }
        out.sync_all()
            .map_err(|e| format!("{}: {e}", part.display()))?;
        std::fs::rename(&part, dst).map_err(|e| format!("{}: {e}", dst.display()))?;
        tracing::info!(file, bytes = written, "downloaded");
        Ok(())
    }
}
