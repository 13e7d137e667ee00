//! Accepting connections: a header-read and idle timeout, a cap on open connections, accept
//! errors logged, and a graceful stop that lets in-flight requests finish.
//!
//! `axum::serve` sets none of these, so a client that opened connections and sent nothing
//! (or half a header) held them for ever, and enough of them used up the process's file
//! descriptors: the server then answered no one.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The default of [`crate::state::Limits::header_read_timeout_ms`]: how long a connection
/// may take to send a request's headers, and how long an idle keep-alive connection stays
/// open (HTTP clients drop theirs sooner: ureq after 15 s).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The default of [`crate::state::Limits::max_connections`]: most connections open at
/// once; more wait in the listen backlog until one closes.
pub const MAX_CONNECTIONS: usize = 4096;

/// How long a connection may stay silent before keepalive probes start, and how many
/// probes (every [`PROBE_EVERY`]) go unanswered before it is closed; also how long sent
/// data may stay unacknowledged ([`PEER_GONE`]). A client whose machine vanished (power
/// off, a dropped VPN: no FIN, no RST) would otherwise hold its connection, and an upload's
/// temp file or part buffer, or a download's part, until the server stopped.
const PROBE_AFTER: Duration = Duration::from_secs(60);
/// See [`PROBE_AFTER`].
const PROBE_EVERY: Duration = Duration::from_secs(10);
/// See [`PROBE_AFTER`].
const PROBES: u32 = 6;
/// See [`PROBE_AFTER`]: about two minutes, like the keepalives (Linux only).
#[cfg(any(target_os = "linux", target_os = "android"))]
const PEER_GONE: Duration = Duration::from_secs(120);

/// Sets the keepalives and user timeout of [`PROBE_AFTER`] on an accepted connection.
fn keep_alive(stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(stream);
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(PROBE_AFTER)
            .with_interval(PROBE_EVERY)
            .with_retries(PROBES),
    )?;
    // Other systems have no TCP_USER_TIMEOUT (socket2 offers it on Linux-like ones only);
    // the keepalives still close a connection whose peer went silent.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    sock.set_tcp_user_timeout(Some(PEER_GONE))?;
    Ok(())
}

/// How long a stopping server waits for requests in flight before it closes their
/// connections: a slow download must not keep the store's lock from a standby (nor a
/// deploy waiting) for minutes. Long polls and event streams end at once on their own.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(15);

/// Connections being served: wait for them to finish with [`Draining::finish`].
pub struct Draining {
    graceful: GracefulShutdown,
    force: tokio::sync::watch::Sender<bool>,
}

impl Draining {
    /// Waits for the open connections' requests to finish, for at most `limit`; then
    /// closes those still open.
    pub async fn finish(self, limit: Duration) {
        if tokio::time::timeout(limit, self.graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                waited_s = limit.as_secs(),
                "requests still in flight after the drain limit: closing their connections"
            );
            let _ = self.force.send(true);
        }
    }
}

/// Raises the soft open-files limit toward the hard one, and returns the connection cap
/// that leaves room under it for the store, blobs and logs.
pub fn connection_cap() -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    let want = hard.min(2 * MAX_CONNECTIONS as u64 + 256);
    let soft = if want > soft && setrlimit(Resource::RLIMIT_NOFILE, want, hard).is_ok() {
        want
    } else {
        soft
    };
    (soft.saturating_sub(256) as usize / 2).clamp(16, MAX_CONNECTIONS)
}

/// Serves `router` on `listener` until `shutdown` completes, then stops accepting and waits
/// for the open connections' requests to finish, for at most `drain`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    cap: usize,
    header_timeout: Duration,
    drain: Duration,
    shutdown: impl Future<Output = ()> + Send,
) {
    let draining = accept(&listener, router, cap, header_timeout, shutdown).await;
    // Closed before the wait, so new clients are refused rather than left in the backlog.
    drop(listener);
    draining.finish(drain).await;
}

/// Accepts connections on `listener` for `router` until `shutdown` completes; the caller
/// keeps the listener (a standby hands it on to the server it becomes) and waits on the
/// returned handle for the open connections to finish.
pub async fn accept(
    listener: &TcpListener,
    router: Router,
    cap: usize,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send,
) -> Draining {
    let (force, forced) = tokio::sync::watch::channel(false);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(cap.max(1)));
    // At most one warning a minute while clients keep the server at its cap.
    let mut warned: Option<tokio::time::Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    tracing::warn!(
                        connections = cap,
                        "connection limit reached: new connections wait until one closes"
                    );
                    warned = Some(tokio::time::Instant::now());
                }
                tokio::select! {
                    p = Arc::clone(&permits).acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: say so, and give the process a moment to close
                    // something rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // Best effort: without it the connection still works, only a vanished peer is
        // noticed later.
        let _ = keep_alive(&stream);
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let conn = graceful.watch(conn);
        let mut forced = forced.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = conn => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                // Dropping the connection closes it.
                _ = forced.wait_for(|f| *f) => {}
            }
            drop(permit);
        });
    }
    Draining { graceful, force }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_probe_a_silent_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let before = socket2::SockRef::from(&stream);
        assert!(!before.keepalive().unwrap());
        keep_alive(&stream).unwrap();
        let sock = socket2::SockRef::from(&stream);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), PROBE_AFTER);
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), PROBE_EVERY);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), PROBES);
        #[cfg(any(target_os = "linux", target_os = "android"))]
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(PEER_GONE));
    }
}
