/*!
`gptj serve`: bind, load the model in the background, serve until a signal, drain, exit.

The listener is bound first so that liveness answers during a long model load; readiness
answers 503 until the weights are loaded and a warm-up forward pass has run. A model that
fails to load stops the process with the loader's error (exit code 1), so an orchestrator
sees the failure instead of a pod that never gets ready.
*/

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use gptj_cli::ModelArgs;

use crate::chat_template::ChatTemplate;
use crate::cli::ServeArgs;
use crate::config::{listen_addr, ServerConfig};
use crate::state::{AppState, Backend};
use crate::{listener, metrics, routes, shutdown, telemetry};

/// Runs `gptj serve` to completion (it returns after a signal, or on a startup error).
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    crate::memory::limit_arenas();
    telemetry::init_logging(args.http.log_format, "info");
    let config = ServerConfig::from_args(&args)?;
    let addr = listen_addr(&args.http.host, args.http.port)?;
    match listener::raise_nofile_limit() {
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(args, config, addr))
}

async fn run(
    args: ServeArgs,
    config: ServerConfig,
    addr: std::net::SocketAddr,
) -> anyhow::Result<()> {
    let handle = metrics::install().context("cannot install the metrics recorder")?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
            crate::memory::release_free_memory();
        }
    });
    let shutdown_timeout = config.shutdown_timeout;
    let state = AppState::new(config, Some(handle));
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(%addr, model = %state.config().model_description, "listening; loading the model");

    let (failed_tx, failed_rx) = oneshot::channel::<anyhow::Error>();
    let loader = state.clone();
    tokio::task::spawn_blocking(move || match load(&args.model, args.scheduler.config()) {
        Ok(backend) => {
            loader.set_ready(backend);
            tracing::info!("ready");
        }
        Err(e) => {
            let _ = failed_tx.send(e);
        }
    });

    /// How the serving ended, when not by a plain signal.
    enum End {
        Failed(anyhow::Error),
        Forced(&'static str, usize),
    }
    let end: Arc<std::sync::Mutex<Option<End>>> = Arc::default();
    let on_signal = {
        let (state, end) = (state.clone(), Arc::clone(&end));
        async move {
            let outcome = tokio::select! {
                sig = shutdown::signal() => {
                    tracing::info!(signal = sig, "shutting down");
                    tokio::select! {
                        () = shutdown::drain(&state, shutdown_timeout) => None,
                        // An operator who asks twice does not want to wait.
                        sig = shutdown::signal() => Some(End::Forced(sig, state.in_flight())),
                    }
                }
                Ok(e) = failed_rx => Some(End::Failed(e)),
            };
            if let (Some(o), Ok(mut slot)) = (outcome, end.lock()) {
                *slot = Some(o);
            }
        }
    };
    // After draining, connections still open (a client holding a finished stream) get
    // `CLOSE_GRACE`, then they are dropped, so the process exits within the shutdown
    // timeout plus `shutdown::GRACE` whatever clients do.
    let limits = state.config().connections;
    listener::serve(
        listener,
        routes::app(state.clone()),
        limits,
        on_signal,
        shutdown::CLOSE_GRACE,
    )
    .await;
    if let Some(b) = state.backend() {
        b.scheduler.shutdown(Some(std::time::Instant::now()));
        let _ = tokio::time::timeout(shutdown::CLOSE_GRACE, b.scheduler.stopped()).await;
    }
    match end.lock().ok().and_then(|mut e| e.take()) {
        Some(End::Failed(e)) => return Err(e.context("cannot load the model")),
        Some(End::Forced(sig, in_flight)) => {
            anyhow::bail!(
                "second {sig}: exited without waiting for the {in_flight} request(s) in flight"
            )
        }
        None => {}
    }
    tracing::info!("bye");
    Ok(())
}

/// Loads the model, warms it up and starts the scheduler (blocking: run it off the runtime).
pub fn load(
    model: &ModelArgs,
    scheduler: gptj_scheduler::SchedulerConfig,
) -> anyhow::Result<Backend> {
    let started = std::time::Instant::now();
    let mut engine = gptj_engine::Engine::load(&model.model, &model.engine_options())?;
    engine.warm_up().context("warm-up forward pass failed")?;
    tracing::info!(
        model = engine.description(),
        kv_blocks = engine.num_kv_blocks(),
        block_size = engine.block_size(),
        load_s = started.elapsed().as_secs_f64(),
        "model loaded and warm"
    );
    metrics::cache_config(engine.block_size(), engine.num_kv_blocks());
    let tokenizer = engine.tokenizer().clone();
    let max_context = engine.max_context();
    // A hub model's files are known only now; a directory's template was read at startup.
    let chat_template = match (&model.model, engine.model_dir()) {
        (gptj_engine::ModelSpec::Hub { .. }, Some(dir)) => {
            ChatTemplate::from_model_dir(dir).map_err(anyhow::Error::msg)?
        }
        _ => None,
    };
    let scheduler = gptj_scheduler::spawn(engine, scheduler)?;
    Ok(Backend::new(scheduler, tokenizer, max_context).with_chat_template(chat_template))
}
