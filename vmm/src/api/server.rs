//! The API server: a Unix socket (mode 0600), a current-thread tokio runtime in its own
//! thread, hyper's HTTP/1.1 connection handling and the axum router.
//!
//! Defences against slow or hostile clients, none of which touch the VMM's event loop:
//! a bounded number of connections (extra ones get 503 and are closed), a deadline for
//! request headers (hyper; it also closes idle keep-alive connections), a deadline and a
//! size limit for bodies (the router), and a write deadline so a client that never reads
//! its responses cannot hold a connection forever.

use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Sleep;

use super::dispatch::Dispatcher;
use super::routes::{self, BodyLimits};
use crate::seccomp::{self, SeccompMode, ThreadKind};

/// Tunables of the server. The defaults suit a local control socket.
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Time allowed for a request's headers (also the keep-alive idle limit).
    pub header_timeout: Duration,
    /// Time allowed for a request's body.
    pub body_timeout: Duration,
    /// Time a write may wait for the client to read.
    pub write_timeout: Duration,
    /// Time the VMM's event loop has to answer a request.
    pub reply_timeout: Duration,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Time in-flight requests get to finish when the server stops.
    pub shutdown_grace: Duration,
    /// System call filter for the server thread (off by default here; `ebb` turns it
    /// on unless told not to).
    pub seccomp: SeccompMode,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_connections: 32,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(10),
            max_body_bytes: 16 * 1024,
            shutdown_grace: Duration::from_secs(1),
            seccomp: SeccompMode::Off,
        }
    }
}

/// Largest request head (request line and headers) hyper buffers.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another process serves on the socket.
    #[error("cannot serve the API on {0}: another process is listening on it")]
    InUse(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("cannot serve the API on {0}: the path exists and is not a socket")]
    NotASocket(PathBuf),
    /// A system call failed.
    #[error("cannot serve the API on {path}: {what}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The operation.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
}

fn io_error<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> ServerError + 'a {
    move |source| ServerError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Removes a stale socket at `path` (one nobody listens on); refuses a live one or a
/// non-socket.
fn clear_stale_socket(path: &Path) -> Result<(), ServerError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(path, "inspecting the path")(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket(path.to_path_buf()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ServerError::InUse(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!("API: replacing stale socket {}", path.display());
            fs::remove_file(path).map_err(io_error(path, "removing the stale socket"))
        }
        Err(e) => Err(io_error(path, "checking whether the socket is in use")(e)),
    }
}

/// Binds `path` with mode 0600, replacing a stale socket.
fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, ServerError> {
    clear_stale_socket(path)?;
    // SAFETY: umask only changes the process's file creation mask; it is restored right
    // after the bind so the socket is never created with wider permissions.
    let old = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            ServerError::InUse(path.to_path_buf())
        } else {
            io_error(path, "binding the socket")(e)
        }
    })?;
    // No chmod here: the umask already made it 0600, and chmod by path would follow a
    // symlink someone put in its place since the bind.
    listener
        .set_nonblocking(true)
        .map_err(io_error(path, "making the socket non-blocking"))?;
    Ok(listener)
}

/// Whether the peer of `stream` may use the API: the user Ebb runs as (`own_uid`), or
/// root. The
/// socket's mode already keeps others out; this holds even if it is ever loosened (or
/// the socket is reached through a descriptor passed on).
fn may_connect(stream: &UnixStream, own_uid: u32) -> bool {
    match stream.peer_cred() {
        Ok(cred) => peer_allowed(cred.uid(), own_uid),
        Err(_) => false,
    }
}

/// The rule of [`may_connect`].
fn peer_allowed(peer_uid: u32, own_uid: u32) -> bool {
    peer_uid == own_uid || peer_uid == 0
}

/// A running API server. Dropping it stops the server, gives in-flight requests
/// [`ServerOptions::shutdown_grace`] to finish, and removes the socket file.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    /// Device and inode of the socket we created, so we only ever remove our own.
    ident: (u64, u64),
    shutdown: watch::Sender<bool>,
    done: std::sync::Mutex<std_mpsc::Receiver<()>>,
    thread: Option<JoinHandle<()>>,
    grace: Duration,
}

impl ApiServer {
    /// Binds `path` and starts serving requests through `dispatcher`.
    pub fn start(
        path: &Path,
        dispatcher: Dispatcher,
        options: ServerOptions,
    ) -> Result<Self, ServerError> {
        let listener = bind(path)?;
        let ident = fs::metadata(path)
            .map(|m| (m.dev(), m.ino()))
            .map_err(io_error(path, "inspecting the socket"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(io_error(path, "starting the API runtime"))?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        // SAFETY: geteuid has no preconditions and cannot fail. (Asked here: the server
        // thread's system call filter does not allow it.)
        let own_uid = unsafe { libc::geteuid() };
        let (done_tx, done) = std_mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("ebb-api".into())
            .spawn(move || {
                if let Err(e) = seccomp::install(ThreadKind::Api, options.seccomp) {
                    // Serving unfiltered is not an option: refuse every request instead.
                    tracing::error!("API server not started: {e}");
                    let _ = done_tx.send(());
                    return;
                }
                runtime.block_on(serve(listener, dispatcher, options, own_uid, shutdown_rx));
                let _ = done_tx.send(());
            })
            .map_err(io_error(path, "starting the API thread"))?;
        Ok(Self {
            path: path.to_path_buf(),
            ident,
            shutdown,
            done: std::sync::Mutex::new(done),
            thread: Some(thread),
            grace: options.shutdown_grace,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops the server (see the type's documentation). Idempotent.
    pub fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let _ = self.shutdown.send(true);
        // The thread stops accepting at once and waits up to `grace` for connections.
        let done = self
            .done
            .lock()
            .map(|rx| {
                rx.recv_timeout(self.grace + Duration::from_millis(500))
                    .is_ok()
            })
            .unwrap_or(false);
        if done {
            let _ = thread.join();
        } else {
            tracing::warn!("API: the server thread did not stop in time");
        }
        let ours = fs::symlink_metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.ident)
            .unwrap_or(false);
        if ours {
            if let Err(e) = fs::remove_file(&self.path) {
                tracing::warn!("API: cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

const BUSY_BODY: &str = "{\"fault_message\":\"too many API connections; try again later\"}\n";

async fn serve(
    listener: std::os::unix::net::UnixListener,
    dispatcher: Dispatcher,
    options: ServerOptions,
    own_uid: u32,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("API: cannot use the socket: {e}");
            return;
        }
    };
    let router = routes::router(
        dispatcher,
        BodyLimits {
            max_bytes: options.max_body_bytes,
            timeout: options.body_timeout,
        },
    );
    let permits = Arc::new(Semaphore::new(options.max_connections));
    let mut connections = JoinSet::new();
    let mut refused_logged = false;
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) if !may_connect(&stream, own_uid) => {
                    if !refused_logged {
                        refused_logged = true;
                        tracing::warn!(
                            "API: refused a client of another user (only this user and root \
                             are served; further refusals are not logged)"
                        );
                    }
                }
                Ok((stream, _)) => match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let router = router.clone();
                        let shutdown = shutdown.clone();
                        connections.spawn(async move {
                            serve_connection(stream, router, options, shutdown).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        let busy = format!(
                            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
                             content-length: {}\r\nconnection: close\r\n\r\n{BUSY_BODY}",
                            BUSY_BODY.len()
                        );
                        // Best effort: a fresh socket's buffer takes this without blocking.
                        let _ = stream.try_write(busy.as_bytes());
                    }
                },
                Err(e) => {
                    // Out of descriptors or memory: back off instead of spinning.
                    tracing::warn!("API: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(options.shutdown_grace, drain)
        .await
        .is_err()
    {
        connections.abort_all();
    }
}

async fn serve_connection(
    stream: UnixStream,
    router: axum::Router,
    options: ServerOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let io = TokioIo::new(WriteDeadline::new(stream, options.write_timeout));
    let service = TowerToHyperService::new(router);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!("API connection: {e}");
    }
}

/// A stream whose writes fail with `TimedOut` when the peer has not made room for
/// `timeout` (a client that never reads its responses).
struct WriteDeadline {
    inner: UnixStream,
    timeout: Duration,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl WriteDeadline {
    fn new(inner: UnixStream, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            deadline: None,
        }
    }

    /// Called when a write could not proceed: arms the deadline and reports whether it
    /// has passed.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let timeout = self.timeout;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        deadline.as_mut().poll(cx).is_ready()
    }

    fn check<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client is not reading its responses",
            ))),
            Poll::Pending => Poll::Pending,
            ready => {
                self.deadline = None;
                ready
            }
        }
    }
}

impl AsyncRead for WriteDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_the_same_user_or_root_may_connect() {
        assert!(peer_allowed(1000, 1000));
        assert!(peer_allowed(0, 1000));
        assert!(!peer_allowed(1001, 1000));
        assert!(peer_allowed(0, 0));
        assert!(!peer_allowed(65534, 0));
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ebb-api-{}-{name}.sock", std::process::id()))
    }

    #[test]
    fn stale_sockets_are_replaced_live_ones_and_files_refused() {
        let path = temp_path("stale");
        let _ = fs::remove_file(&path);
        // A socket nobody listens on: bind then drop the listener.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let l = bind(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Now it is live.
        match bind(&path) {
            Err(ServerError::InUse(p)) => assert_eq!(p, path),
            other => panic!("{other:?}"),
        }
        drop(l);
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(bind(&path), Err(ServerError::NotASocket(_))));
        let e = bind(&path).unwrap_err().to_string();
        assert!(!e.contains('\n') && e.contains("not a socket"), "{e}");
        fs::remove_file(&path).unwrap();
    }
}
