//! Shared helpers for the end-to-end tests: start the real `gptj serve` binary on a free
//! loopback port, wait until it is ready, talk to it, read its metrics, stop it.

#![allow(dead_code)]

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The served model's name (the default of `--model-name`).
pub const MODEL: &str = "eleutherai-gpt-j-6b";

/// How long a server may take to load `builtin:tiny` and become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `gptj serve`; killed on drop if still running.
pub struct Server {
    child: Child,
    pub port: u16,
    pub base: String,
    log: PathBuf,
    pub client: reqwest::Client,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

impl Server {
    /// Starts `gptj serve --model builtin:tiny` (unless `args` name another `--model`) with
    /// `args` and waits until it is ready.
    pub async fn start(args: &[&str]) -> Server {
        Self::start_with_env(args, &[]).await
    }

    /// Like [`Server::start`], with extra environment variables. If `env` sets `PORT`, no
    /// `--port` flag is passed.
    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut server = Self::spawn(args, env);
        server.wait_ready().await;
        server
    }

    /// Starts `gptj serve --model builtin:tiny` with `args` and `env` without waiting for it.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Server {
        let port = env
            .iter()
            .find(|(k, _)| *k == "PORT")
            .map(|(_, v)| v.parse().expect("PORT"))
            .unwrap_or_else(free_port);
        let log = std::env::temp_dir().join(format!(
            "gptj-e2e-{}-{port}-{}.log",
            std::process::id(),
            rand_suffix()
        ));
        let out = File::create(&log).expect("create the server log file");
        let err = out.try_clone().expect("clone the log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gptj"));
        cmd.args(["serve", "--host", "127.0.0.1"]);
        if !args.contains(&"--model") {
            cmd.args(["--model", "builtin:tiny"]);
        }
        if !env.iter().any(|(k, _)| *k == "PORT") {
            cmd.args(["--port", &port.to_string()]);
        }
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env_remove("PORT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd.spawn().expect("start gptj serve");
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(120))
            .build()
            .expect("http client");
        Server {
            child,
            port,
            base: format!("http://127.0.0.1:{port}"),
            log,
            client,
        }
    }

    /// Waits until the readiness probe answers 200; panics if the process exits first.
    pub async fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("gptj serve exited early ({status}):\n{}", self.log_text());
            }
            let url = self.url(&format!("/v1/models/{MODEL}"));
            if let Ok(r) = self.client.get(&url).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            if start.elapsed() > READY_TIMEOUT {
                panic!(
                    "gptj serve not ready after {READY_TIMEOUT:?}:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The full URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The predict URL of the served model.
    pub fn predict_url(&self) -> String {
        self.url(&format!("/v1/models/{MODEL}:predict"))
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// POSTs `body` (a raw string, sent like `curl -d`) and returns status, headers and body.
    pub async fn post_raw(
        &self,
        path: &str,
        body: &str,
    ) -> (u16, reqwest::header::HeaderMap, String) {
        let r = self
            .client
            .post(self.url(path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_owned())
            .send()
            .await
            .expect("send");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.text().await.expect("body"))
    }

    /// POSTs JSON and parses the JSON answer.
    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, _, text) = self.post_raw(path, &body.to_string()).await;
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"));
        (status, v)
    }

    /// POSTs JSON to a streaming route and returns the `data:` payloads.
    pub async fn post_sse(&self, path: &str, body: &Value) -> (u16, Vec<String>) {
        let (status, headers, text) = self.post_raw(path, &body.to_string()).await;
        if status == 200 {
            let ct = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
        }
        (status, sse_data(&text))
    }

    /// GETs `path`: status and body text.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = self.client.get(self.url(path)).send().await.expect("send");
        (r.status().as_u16(), r.text().await.expect("body"))
    }

    /// The current `/metrics` text.
    pub async fn metrics(&self) -> Metrics {
        let (status, text) = self.get("/metrics").await;
        assert_eq!(status, 200, "{text}");
        Metrics(text)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's resident memory, in MiB (from /proc).
    pub fn rss_mib(&self) -> f64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    }

    /// The server's open file descriptors (from /proc).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, |d| d.count())
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(ok.success());
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            if start.elapsed() > timeout {
                panic!(
                    "gptj serve still running after {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!("server log kept at {}", self.log.display());
        }
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() % 1_000_000
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .flat_map(|event| {
            event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d).to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A `/metrics` text exposition.
pub struct Metrics(pub String);

impl Metrics {
    /// The sum of every series of `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (n, lbls) = match series.split_once('{') {
                    Some((n, rest)) => (n, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                if n != name {
                    return None;
                }
                let all = labels
                    .iter()
                    .all(|(k, v)| lbls.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
                all.then(|| value.parse::<f64>().ok()).flatten()
            })
            .sum()
    }
}
