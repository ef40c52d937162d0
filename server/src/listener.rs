/*!
The connection layer: accepting TCP connections and serving HTTP/1.1 on each, with a bound on
everything a client can hold.

A client that is slow, stalls or floods costs bounded descriptors, memory and time:

- **Open connections** are capped (`--max-connections`). Past the cap a new connection gets
  a short `503` written without reading its request, and is closed; the others are served
  as before.
- **Idle keep-alive connections** are closed after `--keep-alive-timeout` without a byte of
  a new request.
- **Request heads** must arrive whole within `--header-read-timeout` of their first byte
  (slowloris), and within hyper's header-size limit.
- **Writes** that make no progress for `--write-timeout` (a client that stopped reading)
  end the connection. Dropping it drops the response, and with it the request's job
  streams: the scheduler cancels the jobs and frees their KV blocks at its next step.
- Request **bodies** are bounded in size and time by the pipeline (`--body-limit`,
  `--body-read-timeout`).

[`Limits`] carries the numbers; [`serve`] runs the accept loop until shutdown, then gives
the connections still open until a deadline and drops them.
*/

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tower::ServiceExt;

pub use crate::config::ConnectionLimits as Limits;
use crate::metrics;
use crate::routes::App;

/// What a connection's IO and its service share: whether a request is being served, and how
/// many have been handed to the service.
#[derive(Debug, Default)]
struct ConnState {
    /// A request has been handed to the service and its response has not ended.
    busy: AtomicBool,
    /// Requests handed to the service so far. The IO side compares it with the count it last
    /// saw: a request can be parsed, served and answered without the IO side ever seeing
    /// `busy` (a quick answer between two reads), and the head it was timing is then done.
    requests: AtomicU64,
}

/// Runs the accept loop on `listener` until `shutdown` resolves, then gives the open
/// connections `grace` to finish and close, and drops the rest.
pub async fn serve(
    listener: TcpListener,
    app: App,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of descriptors or similar: wait a little rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                match Arc::clone(&permits).try_acquire_owned() {
                    Ok(permit) => {
                        let (app, stop) = (app.clone(), stop_rx.clone());
                        connections.spawn(async move {
                            metrics::connection_opened();
                            serve_connection(stream, app, limits, stop).await;
                            metrics::connection_closed();
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        metrics::connection_refused();
                        connections.spawn(refuse(stream));
                    }
                }
            }
            // Reap finished connection tasks so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // The grace starts now, when the accept loop stops.
    let until = tokio::time::sleep(grace);
    tokio::pin!(until);
    loop {
        tokio::select! {
            () = &mut until => break,
            next = connections.join_next() => if next.is_none() { return },
        }
    }
    let left = connections.len();
    if left > 0 {
        tracing::warn!(
            connections = left,
            "connections still open at the shutdown deadline; closing them"
        );
    }
    connections.shutdown().await;
}

/// The answer to a connection past `--max-connections`: written without reading the
/// request, then the connection is closed.
async fn refuse(mut stream: TcpStream) {
    const BODY: &str =
        r#"{"error":"too many open connections; retry later","error_type":"overloaded"}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

async fn serve_connection(
    stream: TcpStream,
    app: App,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let state = Arc::new(ConnState::default());
    let io = TokioIo::new(Guarded::new(stream, limits, Arc::clone(&state)));
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let app = app.clone();
        let state = Arc::clone(&state);
        async move {
            state.busy.store(true, Ordering::SeqCst);
            state.requests.fetch_add(1, Ordering::SeqCst);
            let response = app.oneshot(req.map(axum::body::Body::new)).await?;
            Ok::<_, std::convert::Infallible>(idle_when_done(response, state))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => log_end(r),
        () = stopped(&mut stop) => {
            // Finish the request in progress, then close; idle connections close now.
            conn.as_mut().graceful_shutdown();
            log_end(conn.await);
        }
    }
}

/// Resolves once the accept loop has stopped.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

fn log_end(r: Result<(), hyper::Error>) {
    if let Err(e) = r {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// The response, with its body wrapped so the connection counts as idle again once the body
/// has ended (or been dropped).
fn idle_when_done(response: Response, state: Arc<ConnState>) -> Response {
    response.map(|body| axum::body::Body::new(DoneBody { inner: body, state }))
}

struct DoneBody {
    inner: axum::body::Body,
    state: Arc<ConnState>,
}

impl Drop for DoneBody {
    fn drop(&mut self) {
        self.state.busy.store(false, Ordering::SeqCst);
    }
}

impl hyper::body::Body for DoneBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = r {
            self.state.busy.store(false, Ordering::SeqCst);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A TCP stream with the read and write deadlines of [`Limits`].
struct Guarded {
    stream: TcpStream,
    limits: Limits,
    state: Arc<ConnState>,
    /// When the connection last became idle (no request in progress), for the keep-alive
    /// timeout.
    idle_since: Instant,
    /// When the first byte of the next request head arrived while idle.
    head_started: Option<Instant>,
    /// A request was seen in progress (or counted) since the connection was last idle.
    was_busy: bool,
    /// The value of [`ConnState::requests`] last seen.
    requests_seen: u64,
    read_timer: Pin<Box<Sleep>>,
    write_timer: Option<Pin<Box<Sleep>>>,
}

impl Guarded {
    fn new(stream: TcpStream, limits: Limits, state: Arc<ConnState>) -> Self {
        let now = Instant::now();
        Self {
            stream,
            limits,
            state,
            idle_since: now,
            head_started: None,
            was_busy: false,
            requests_seen: 0,
            read_timer: Box::pin(tokio::time::sleep_until(
                (now + limits.keep_alive_timeout).into(),
            )),
            write_timer: None,
        }
    }

    /// The read deadline now: none while a request is served (the pipeline bounds body
    /// reads), the header deadline once a head has started, else the keep-alive deadline.
    fn read_deadline(&mut self) -> Option<Instant> {
        let busy = self.observe();
        if busy {
            self.was_busy = true;
            self.head_started = None;
            return None;
        }
        if self.was_busy {
            self.was_busy = false;
            self.idle_since = Instant::now();
        }
        Some(match self.head_started {
            Some(t) => t + self.limits.header_read_timeout,
            None => self.idle_since + self.limits.keep_alive_timeout,
        })
    }

    /// Catches up with the service side; returns whether a request is in progress. A request
    /// handed over since the last look ends the head being timed, and the idle time restarts
    /// once its response is done.
    fn observe(&mut self) -> bool {
        let requests = self.state.requests.load(Ordering::SeqCst);
        if requests != self.requests_seen {
            self.requests_seen = requests;
            self.head_started = None;
            self.was_busy = true;
        }
        self.state.busy.load(Ordering::SeqCst)
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out"))
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before && !self.observe() && self.head_started.is_none() {
                    self.head_started = Some(Instant::now());
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let Some(deadline) = self.read_deadline() else {
                    return Poll::Pending;
                };
                self.read_timer.as_mut().reset(deadline.into());
                match self.read_timer.as_mut().poll(cx) {
                    Poll::Ready(()) if self.head_started.is_some() => {
                        Poll::Ready(Err(timed_out("reading the request head")))
                    }
                    // An idle keep-alive connection ends quietly, as at EOF.
                    Poll::Ready(()) => Poll::Ready(Ok(())),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, data);
        self.write_progress(cx, r, "writing the response")
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.stream).poll_flush(cx);
        self.write_progress(cx, r, "flushing the response")
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.stream).poll_shutdown(cx);
        self.write_progress(cx, r, "closing the connection")
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.write_progress(cx, r, "writing the response")
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Guarded {
    /// Progress clears the write deadline; no progress starts it, and past it the write
    /// fails.
    fn write_progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<T>>,
        what: &str,
    ) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.write_timer = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let timeout = self.limits.write_timeout;
                let timer = self
                    .write_timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(timed_out(what))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

/// Raises this process's open-file limit to its hard limit, so the connection cap, not the
/// descriptor limit, is what bounds connections. Returns the limit in force.
pub fn raise_nofile_limit() -> io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}
