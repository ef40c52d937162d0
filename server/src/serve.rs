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
use tokio::sync::{oneshot, Notify};

use gptj_cli::ModelArgs;

use crate::cli::ServeArgs;
use crate::config::{listen_addr, ServerConfig};
use crate::state::{AppState, Backend};
use crate::{metrics, routes, shutdown, telemetry};

/// Runs `gptj serve` to completion (it returns after a signal, or on a startup error).
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    telemetry::init_logging(args.http.log_format, "info");
    let config = ServerConfig::from_args(&args)?;
    let addr = listen_addr(&args.http.host, args.http.port)?;
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

    let drained = Arc::new(Notify::new());
    let failure: Arc<std::sync::Mutex<Option<anyhow::Error>>> = Arc::default();
    let (forced_tx, forced_rx) = oneshot::channel::<(&'static str, usize)>();
    let on_signal = {
        let (state, drained, failure) = (state.clone(), drained.clone(), failure.clone());
        async move {
            tokio::select! {
                sig = shutdown::signal() => {
                    tracing::info!(signal = sig, "shutting down");
                    tokio::select! {
                        () = shutdown::drain(&state, shutdown_timeout) => {}
                        sig = shutdown::signal() => {
                            // An operator who asks twice does not want to wait.
                            let _ = forced_tx.send((sig, state.in_flight()));
                            std::future::pending::<()>().await;
                        }
                    }
                }
                Ok(e) = failed_rx => {
                    if let Ok(mut f) = failure.lock() {
                        *f = Some(e);
                    }
                }
            }
            drained.notify_one();
        }
    };
    let app =
        axum::ServiceExt::<axum::extract::Request>::into_make_service(routes::app(state.clone()));
    let server = axum::serve(listener, app).with_graceful_shutdown(on_signal);
    // After draining, connections left open (a client that keeps a stream open past its
    // request's end) get a short grace, then the process exits regardless.
    let hard_stop = async {
        drained.notified().await;
        tokio::time::sleep(shutdown::CANCEL_GRACE).await;
    };
    tokio::select! {
        r = server => r.context("server error")?,
        () = hard_stop => tracing::warn!("connections still open after draining; closing them"),
        Ok((sig, in_flight)) = forced_rx => {
            anyhow::bail!("second {sig}: exited without waiting for the {in_flight} request(s) in flight");
        }
    }
    if let Some(e) = failure.lock().ok().and_then(|mut f| f.take()) {
        return Err(e.context("cannot load the model"));
    }
    if let Some(b) = state.backend() {
        b.scheduler.shutdown(Some(std::time::Instant::now()));
        let _ = tokio::time::timeout(Duration::from_secs(5), b.scheduler.stopped()).await;
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
    let tokenizer = engine.tokenizer().clone();
    let max_context = engine.max_context();
    let scheduler = gptj_scheduler::spawn(engine, scheduler)?;
    Ok(Backend {
        scheduler,
        tokenizer,
        max_context,
    })
}
