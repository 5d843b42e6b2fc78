//! A small blocking HTTP/1.1 client over a Unix socket, for `ebb-ctl`, benchmarks and
//! tests. It speaks just enough HTTP for Ebb's API: one request at a time, bodies
//! delimited by `Content-Length`, chunked encoding or connection close.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest response body accepted.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// Why a request failed before an HTTP answer arrived.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket at the path.
    #[error("no API socket at {0} (is ebb running with --api-socket?)")]
    NoSocket(PathBuf),
    /// The socket exists but nobody listens.
    #[error("connection to {0} refused (ebb is not running or not serving the API)")]
    Refused(PathBuf),
    /// Permission denied on the socket.
    #[error("permission denied connecting to {0}")]
    Permission(PathBuf),
    /// Other connection failure.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The server did not answer in time.
    #[error("no answer from {0} in time")]
    Timeout(PathBuf),
    /// I/O failure during the exchange.
    #[error("talking to {path}: {source}")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The answer was not HTTP as expected.
    #[error("bad response from {path}: {what}")]
    BadResponse {
        /// Socket path.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
}

/// One HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header names (lower case) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// True for 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    /// The error message of an error response: its `fault_message`, else the raw body,
    /// else the status.
    pub fn fault_message(&self) -> String {
        if let Ok(v) = self.json() {
            if let Some(m) = v.get("fault_message").and_then(|m| m.as_str()) {
                return m.to_string();
            }
        }
        let text = self.text();
        if text.trim().is_empty() {
            format!("HTTP status {}", self.status)
        } else {
            text.trim().to_string()
        }
    }
}

/// A client for the API socket at a path.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client for `path` whose reads and writes time out after `timeout`.
    pub fn new(path: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            path: path.into(),
            timeout,
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens a connection for several requests (keep-alive).
    pub fn connect(&self) -> Result<Connection, ClientError> {
        let stream = UnixStream::connect(&self.path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ClientError::NoSocket(self.path.clone()),
            io::ErrorKind::ConnectionRefused => ClientError::Refused(self.path.clone()),
            io::ErrorKind::PermissionDenied => ClientError::Permission(self.path.clone()),
            _ => ClientError::Connect {
                path: self.path.clone(),
                source: e,
            },
        })?;
        let io_err = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        stream
            .set_read_timeout(Some(self.timeout))
            .map_err(io_err)?;
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(io_err)?;
        Ok(Connection {
            stream,
            path: self.path.clone(),
            buf: Vec::new(),
        })
    }

    /// Sends one request on a fresh connection (closed afterwards).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        self.connect()?.send(method, path, body, false)
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<Response, ClientError> {
        self.request("GET", path, None)
    }

    /// A request with a JSON body.
    pub fn send_json(
        &self,
        method: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<Response, ClientError> {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        self.request(method, path, Some(&bytes))
    }
}

/// An open connection.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    path: PathBuf,
    /// Bytes read past the previous response.
    buf: Vec<u8>,
}

impl Connection {
    fn io(&self, source: io::Error) -> ClientError {
        if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            ClientError::Timeout(self.path.clone())
        } else {
            ClientError::Io {
                path: self.path.clone(),
                source,
            }
        }
    }

    fn bad(&self, what: impl Into<String>) -> ClientError {
        ClientError::BadResponse {
            path: self.path.clone(),
            what: what.into(),
        }
    }

    /// Sends a request and reads its response; `keep_alive` asks the server to keep
    /// the connection open for another request.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        keep_alive: bool,
    ) -> Result<Response, ClientError> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
        if !keep_alive {
            req.push_str("Connection: close\r\n");
        }
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        if let Some(b) = body {
            bytes.extend_from_slice(b);
        }
        self.stream.write_all(&bytes).map_err(|e| self.io(e))?;
        self.read_response(method == "HEAD")
    }

    fn fill(&mut self) -> Result<usize, ClientError> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).map_err(|e| self.io(e))?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn read_response(&mut self, head_only: bool) -> Result<Response, ClientError> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(self.bad("response head too large"));
            }
            if self.fill()? == 0 {
                return Err(self.bad(if self.buf.is_empty() {
                    "the server closed the connection without answering".to_string()
                } else {
                    "the connection closed inside the response head".to_string()
                }));
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        if !version.starts_with("HTTP/1.") {
            return Err(self.bad(format!("not an HTTP/1 status line: '{status_line}'")));
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.bad(format!("bad status line: '{status_line}'")))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut response = Response {
            status,
            headers,
            body: Vec::new(),
        };
        if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
            return Ok(response);
        }
        let chunked = response
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            response.body = self.read_chunked()?;
        } else if let Some(len) = response.header("content-length") {
            let len: usize = len
                .parse()
                .map_err(|_| self.bad(format!("bad Content-Length '{len}'")))?;
            if len > MAX_BODY {
                return Err(self.bad(format!("response body too large ({len} bytes)")));
            }
            while self.buf.len() < len {
                if self.fill()? == 0 {
                    return Err(self.bad("the connection closed inside the body"));
                }
            }
            response.body = self.buf.drain(..len).collect();
        } else {
            while self.fill()? > 0 {
                if self.buf.len() > MAX_BODY {
                    return Err(self.bad("response body too large"));
                }
            }
            response.body = std::mem::take(&mut self.buf);
        }
        Ok(response)
    }

    fn read_chunked(&mut self) -> Result<Vec<u8>, ClientError> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                if self.buf.len() > MAX_HEAD || self.fill()? == 0 {
                    return Err(self.bad("bad chunk header"));
                }
            };
            let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size_text = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| self.bad(format!("bad chunk size '{size_text}'")))?;
            self.buf.drain(..line_end + 2);
            if body.len() + size > MAX_BODY {
                return Err(self.bad("response body too large"));
            }
            // Chunk data and its CRLF (for the last chunk: the empty trailer line).
            while self.buf.len() < size + 2 {
                if self.fill()? == 0 {
                    return Err(self.bad("the connection closed inside a chunk"));
                }
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
            if size == 0 {
                return Ok(body);
            }
        }
    }

    /// The raw stream (tests send malformed requests through it).
    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one HTTP response from `stream` (for tests that write raw bytes).
pub fn read_response(stream: UnixStream, path: &Path) -> Result<Response, ClientError> {
    Connection {
        stream,
        path: path.to_path_buf(),
        buf: Vec::new(),
    }
    .read_response(false)
}
