//! Loading errors: each says which file or tensor is wrong, and nothing panics.

mod common;

use std::path::{Path, PathBuf};

use common::fixture_dir;
use gptj_engine::{Engine, EngineOptions, ModelSpec};

/// A scratch copy of a fixture directory that the test may break.
fn scratch_copy(name: &str, tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("gptj-loading-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(fixture_dir(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    dst
}

fn load_err(dir: &Path) -> String {
    let opts = EngineOptions {
        kv_cache_memory: Some(1 << 20),
        ..Default::default()
    };
    match Engine::load_dir(dir, &opts) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = scratch_copy("rot_partial", "truncated");
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn wrong_model_type_is_refused() {
    let dir = scratch_copy("rot_partial", "llama");
    let cfg = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"gptj\"", "\"llama\"");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("llama") && err.contains("config.json"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn shape_mismatch_names_the_tensor() {
    let dir = scratch_copy("rot_partial", "shape");
    let cfg = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"n_inner\": null", "\"n_inner\": 128");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("transformer.h.0.mlp.fc_in.weight") && err.contains("[256, 64]"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn missing_weights_and_config_are_named() {
    let dir = scratch_copy("rot_partial", "noweights");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("weights") && err.contains("pytorch_model.bin"),
        "{err}"
    );
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("config.json not found"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn missing_shard_is_named() {
    let dir = scratch_copy("odd_heads_sharded", "shard");
    std::fs::remove_file(dir.join("model-00002-of-00003.safetensors")).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("model-00002-of-00003.safetensors"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn missing_tokenizer_falls_back_to_gptj_tokenizer() {
    // The fixtures ship no tokenizer files: GPT-J's own is used.
    let opts = EngineOptions {
        kv_cache_memory: Some(1 << 20),
        ..Default::default()
    };
    let engine = Engine::load_dir(&fixture_dir("rot_partial"), &opts).unwrap();
    assert_eq!(
        engine.tokenizer().encode("Hello world").unwrap(),
        vec![15496, 995]
    );
}

#[test]
fn model_specs_parse() {
    assert!(matches!(
        "builtin:tiny".parse::<ModelSpec>(),
        Ok(ModelSpec::Builtin(_))
    ));
    assert_eq!(
        "EleutherAI/gpt-j-6b@float16".parse::<ModelSpec>().unwrap(),
        ModelSpec::Hub {
            id: "EleutherAI/gpt-j-6b".into(),
            revision: Some("float16".into())
        }
    );
    let err = "builtin:huge".parse::<ModelSpec>().unwrap_err();
    assert!(err.contains("builtin:tiny"), "{err}");
    let err = "no such thing".parse::<ModelSpec>().unwrap_err();
    assert!(err.contains("neither"), "{err}");
}

#[test]
fn uncached_hub_model_offline_names_id_and_directory() {
    let cache = std::env::temp_dir().join(format!("gptj-empty-cache-{}", std::process::id()));
    let spec: ModelSpec = "EleutherAI/gpt-j-6b".parse().unwrap();
    let opts = EngineOptions {
        cache_dir: cache.clone(),
        ..Default::default()
    };
    let err = Engine::load(&spec, &opts).unwrap_err().to_string();
    assert!(
        err.contains("EleutherAI/gpt-j-6b") && err.contains(&cache.display().to_string()),
        "{err}"
    );
}

#[test]
fn builtin_tiny_loads_and_runs() {
    let opts = EngineOptions {
        kv_cache_memory: Some(4 << 20),
        ..Default::default()
    };
    let mut engine = Engine::load(&"builtin:tiny".parse().unwrap(), &opts).unwrap();
    engine.warm_up().unwrap();
    let ids = engine.tokenizer().encode("In a shocking finding").unwrap();
    let blocks: Vec<_> = (1..3).map(gptj_engine::BlockId).collect();
    let logits = engine
        .forward(&[gptj_engine::SeqChunk {
            tokens: &ids,
            start_pos: 0,
            block_table: &blocks,
            logits: gptj_engine::LogitRows::Last,
        }])
        .unwrap();
    assert_eq!(logits.len(), 1);
    assert_eq!(logits.vocab(), 50400);
    assert!(logits.row(0).iter().all(|x| x.is_finite()));
}

/// A minimal hub on 127.0.0.1 serving a fixture directory, to test download and reuse.
mod fake_hub {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    pub struct FakeHub {
        pub endpoint: String,
        pub downloads: Arc<AtomicUsize>,
    }

    pub fn start(dir: PathBuf, id: &'static str) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let downloads = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&downloads);
        std::thread::spawn(move || {
            for stream in listener.incoming().take(64) {
                let Ok(mut stream) = stream else { continue };
                let mut line = String::new();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).map(|n| n == 0).unwrap_or(true) || h == "\r\n" {
                        break;
                    }
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let listing = format!("/api/models/{id}/revision/main");
                let prefix = format!("/{id}/resolve/main/");
                let body: Option<Vec<u8>> = if path == listing {
                    let files: Vec<String> = std::fs::read_dir(&dir)
                        .unwrap()
                        .map(|e| {
                            format!(
                                "{{\"rfilename\":\"{}\"}}",
                                e.unwrap().file_name().to_string_lossy()
                            )
                        })
                        .collect();
                    Some(format!("{{\"siblings\":[{}]}}", files.join(",")).into_bytes())
                } else if let Some(file) = path.strip_prefix(&prefix) {
                    counter.fetch_add(1, Ordering::SeqCst);
                    std::fs::read(dir.join(file)).ok()
                } else {
                    None
                };
                let _ = match body {
                    Some(b) => {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            b.len()
                        );
                        stream
                            .write_all(head.as_bytes())
                            .and_then(|_| stream.write_all(&b))
                    }
                    None => stream.write_all(
                        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    ),
                };
            }
        });
        FakeHub {
            endpoint,
            downloads,
        }
    }
}

#[test]
fn hub_models_download_once_then_load_from_the_cache() {
    use std::sync::atomic::Ordering;
    let hub = fake_hub::start(fixture_dir("odd_heads"), "test-org/odd-heads");
    let cache = std::env::temp_dir().join(format!("gptj-hub-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let dir = gptj_engine::hub::fetch_from(&hub.endpoint, None, "test-org/odd-heads", None, &cache)
        .unwrap();
    assert_eq!(
        hub.downloads.load(Ordering::SeqCst),
        2,
        "config.json and model.safetensors"
    );
    let opts = EngineOptions {
        kv_cache_memory: Some(1 << 20),
        ..Default::default()
    };
    Engine::load_dir(&dir, &opts).unwrap();
    // Second time: nothing is downloaded.
    let again =
        gptj_engine::hub::fetch_from(&hub.endpoint, None, "test-org/odd-heads", None, &cache)
            .unwrap();
    assert_eq!(again, dir);
    assert_eq!(hub.downloads.load(Ordering::SeqCst), 2);
    // An id the hub does not have: the error names it and the cache directory.
    let err = gptj_engine::hub::fetch_from(&hub.endpoint, None, "test-org/missing", None, &cache)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("test-org/missing")
            && err.contains("not found")
            && err.contains(&cache.display().to_string()),
        "{err}"
    );
    std::fs::remove_dir_all(&cache).ok();
}
