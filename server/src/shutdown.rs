/*!
Graceful shutdown.

On SIGTERM or SIGINT the server drains: readiness turns 503 at once (so load balancers stop
sending), new generation requests get 503, and requests in flight keep running until they
finish or `--shutdown-timeout` passes. Jobs still running then end as cancelled (clients get
503, or an error event on a stream). Then the listener closes and the process exits 0.
*/

use std::time::{Duration, Instant};

use crate::state::AppState;

/// Extra time after the shutdown timeout for cancelled requests to send their answers.
pub const CANCEL_GRACE: Duration = Duration::from_secs(3);
/// Then, time for connections still open to close before they are dropped, and for the
/// engine thread to stop.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// The most a shutdown takes past `--shutdown-timeout`: [`CANCEL_GRACE`], then
/// [`CLOSE_GRACE`] for connections and again for the engine thread.
pub const GRACE: Duration = Duration::from_secs(CANCEL_GRACE.as_secs() + 2 * CLOSE_GRACE.as_secs());

/// Resolves on SIGTERM or SIGINT (Ctrl-C) and names the signal.
pub async fn signal() -> &'static str {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => "SIGINT",
        () = term => "SIGTERM",
    }
}

/// Drains `state`: refuse new work, let in-flight requests finish within `timeout`, then
/// cancel what is left and give it [`CANCEL_GRACE`] to answer.
pub async fn drain(state: &AppState, timeout: Duration) {
    state.start_draining();
    let deadline = Instant::now() + timeout;
    if let Some(b) = state.backend() {
        // The scheduler finishes what it has and cancels the rest at the deadline.
        b.scheduler.shutdown(Some(deadline));
    }
    let in_flight = state.in_flight();
    tracing::info!(in_flight, timeout_s = timeout.as_secs_f64(), "draining");
    let until = deadline + CANCEL_GRACE;
    if tokio::time::timeout_at(until.into(), state.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = state.in_flight(),
            "requests still in flight after the shutdown timeout; exiting anyway"
        );
    } else {
        tracing::info!("drained");
    }
}
