//! The `ebb-ctl` binary and its client without a VMM: a missing socket, a refused
//! connection, a server that never answers, and a canned HTTP server (a thread on a Unix
//! socket answering fixed responses) for output formats, exit codes and the HTTP framings
//! the client reads. The commands against the real API server are tested in
//! `vmm/tests/api.rs`.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ebb_ctl::client::{Client, ClientError};
use ebb_ctl::{EXIT_API_ERROR, EXIT_NO_ANSWER, EXIT_USAGE};
use serde_json::{json, Value};

fn scratch_dir() -> PathBuf {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ebb-ctl-test-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn ebb_ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ebb-ctl"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).unwrap()
}

/// Reads one request (head and `Content-Length` body) from `s`.
fn read_request(s: &mut UnixStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = text(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return text(&buf);
            }
        }
        let n = s.read(&mut chunk).unwrap();
        if n == 0 {
            return text(&buf);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A server on a scratch socket answering each connection's first request with the next
/// of `responses` (raw bytes) and closing it; returns the requests it saw when joined.
struct Canned {
    dir: PathBuf,
    path: PathBuf,
    thread: Option<JoinHandle<Vec<String>>>,
}

impl Canned {
    fn new(responses: Vec<Vec<u8>>) -> Self {
        let dir = scratch_dir();
        let path = dir.join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let thread = thread::spawn(move || {
            let mut seen = Vec::new();
            for response in responses {
                let (mut s, _) = listener.accept().unwrap();
                seen.push(read_request(&mut s));
                s.write_all(&response).unwrap();
            }
            seen
        });
        Self {
            dir,
            path,
            thread: Some(thread),
        }
    }

    fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// The requests the server received.
    fn requests(mut self) -> Vec<String> {
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Canned {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn json_response(status: &str, body: &Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn vm_info() -> Value {
    json!({
        "state": "running",
        "version": "0.1.0",
        "pid": 4242,
        "uptime_s": 12.5,
        "vcpus": 2,
        "memory_mib": 512,
        "kernel": "/boot/vmlinuz",
        "initramfs": null,
        "cmdline": "console=ttyS0",
        "balloon": {
            "amount_mib": 64,
            "deflate_on_oom": true,
            "stats_polling_interval_s": 0,
            "free_page_reporting": true,
            "target_mib": 64,
            "actual_mib": 32
        },
        "rss": {"guest_ram_bytes": 104857600, "vmm_bytes": 8388608, "process_bytes": 113246208}
    })
}

#[test]
fn no_socket_and_refused_connection_are_one_line_and_exit_3() {
    let dir = scratch_dir();
    let missing = dir.join("missing.sock");
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    for (path, needle) in [(&missing, "no API socket at"), (&stale, "refused")] {
        let out = ebb_ctl(&["--api-socket", path.to_str().unwrap(), "vm", "info"]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_NO_ANSWER), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("ebb-ctl: ") && err.contains(needle),
            "{err}"
        );
        assert!(out.stdout.is_empty());
    }
    // With --json the failure is also one document on stdout.
    let out = ebb_ctl(&[
        "--api-socket",
        missing.to_str().unwrap(),
        "--json",
        "balloon",
        "get",
    ]);
    assert_eq!(out.status.code(), Some(EXIT_NO_ANSWER));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&v["ok"], &v["status"]), (&json!(false), &json!(0)));
    assert!(v["fault_message"]
        .as_str()
        .unwrap()
        .contains("is ebb running with --api-socket?"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    for args in [
        &[][..],
        &["balloon"],
        &["--api-socket", "/s", "balloon", "interval", "70000"],
        &["--api-socket", "/s", "vm", "reboot"],
    ] {
        let out = ebb_ctl(args);
        assert_eq!(out.status.code(), Some(EXIT_USAGE), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    let out = ebb_ctl(&["vm", "info"]);
    assert_eq!(out.status.code(), Some(EXIT_USAGE));
    assert_eq!(
        text(&out.stderr),
        "ebb-ctl: --api-socket PATH is required\n"
    );
    let out = ebb_ctl(&["--api-socket", "/s", "--timeout", "0", "vm", "info"]);
    assert_eq!(out.status.code(), Some(EXIT_USAGE));
    assert!(text(&out.stderr).contains("--timeout must be a positive number"));
    let out = ebb_ctl(&["--api-socket", "/s", "balloon", "set", "lots"]);
    assert_eq!(out.status.code(), Some(EXIT_USAGE));
    assert!(text(&out.stderr).contains("invalid size 'lots'"));
    for args in [["--help"], ["--version"]] {
        let out = ebb_ctl(&args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(!out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn vm_info_as_text_and_as_the_servers_json() {
    let body = vm_info();
    let server = Canned::new(vec![
        json_response("200 OK", &body),
        json_response("200 OK", &body),
    ]);
    let out = ebb_ctl(&["--api-socket", server.path(), "vm", "info"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let t = text(&out.stdout);
    for line in [
        "state:          running\n",
        "ebb:            0.1.0 (pid 4242)\n",
        "balloon:        target 64 MiB, actual 32 MiB, deflate on OOM on, free page reporting on, statistics off\n",
        "guest RAM RSS:  100 MiB\n",
        "VMM RSS:        8 MiB\n",
    ] {
        assert!(t.contains(line), "{t}");
    }
    let out = ebb_ctl(&["--api-socket", server.path(), "--json", "vm", "info"]);
    assert_eq!(out.status.code(), Some(0));
    // The server's body as it came, on one line.
    assert_eq!(text(&out.stdout), format!("{body}\n"));
    let requests = server.requests();
    assert!(
        requests[0].starts_with("GET /vm HTTP/1.1\r\n"),
        "{requests:?}"
    );
    assert!(requests[0].contains("Connection: close\r\n"));
}

#[test]
fn balloon_set_sends_whole_mib_and_api_errors_exit_1() {
    let server = Canned::new(vec![
        b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
        json_response(
            "409 Conflict",
            &json!({"fault_message": "the VM has no balloon device (start ebb with --balloon)"}),
        ),
        json_response(
            "400 Bad Request",
            &json!({"fault_message": "amount_mib 4096 is larger than guest memory (512 MiB)"}),
        ),
    ]);
    let out = ebb_ctl(&["--api-socket", server.path(), "balloon", "set", "1.5M"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "balloon target set to 2 MiB\n");
    assert!(text(&out.stderr).starts_with("ebb-ctl: note: 1.5M (1.5 MiB) is not a whole"));
    let out = ebb_ctl(&["--api-socket", server.path(), "balloon", "get"]);
    assert_eq!(out.status.code(), Some(EXIT_API_ERROR));
    assert!(out.stdout.is_empty());
    assert_eq!(
        text(&out.stderr),
        "ebb-ctl: the VM has no balloon device (start ebb with --balloon)\n"
    );
    let out = ebb_ctl(&[
        "--api-socket",
        server.path(),
        "--json",
        "balloon",
        "set",
        "4G",
    ]);
    assert_eq!(out.status.code(), Some(EXIT_API_ERROR));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v,
        json!({"ok": false, "status": 400,
               "fault_message": "amount_mib 4096 is larger than guest memory (512 MiB)"})
    );
    let requests = server.requests();
    assert!(requests[0].starts_with("PATCH /balloon HTTP/1.1\r\n"));
    assert!(
        requests[0].ends_with("\r\n\r\n{\"amount_mib\":2}"),
        "{requests:?}"
    );
}

#[test]
fn client_reads_every_framing() {
    let server = Canned::new(vec![
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
          5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            .to_vec(),
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close".to_vec(),
        b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n".to_vec(),
        b"SSH-2.0-OpenSSH\r\n\r\n".to_vec(),
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort".to_vec(),
    ]);
    let client = Client::new(&server.path, Duration::from_secs(5));
    let r = client.get("/a").unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "hello world"));
    assert_eq!(r.header("TRANSFER-ENCODING"), Some("chunked"));
    let r = client.get("/b").unwrap();
    assert_eq!(r.text(), "until close");
    let r = client.get("/c").unwrap();
    assert!(!r.is_success());
    assert_eq!(r.fault_message(), "HTTP status 500");
    let e = client.get("/d").unwrap_err();
    assert!(e.to_string().contains("not an HTTP/1 status line"), "{e}");
    let e = client.get("/e").unwrap_err();
    assert!(
        e.to_string()
            .contains("the connection closed inside the body"),
        "{e}"
    );
    assert_eq!(server.requests().len(), 5);
}

#[test]
fn a_silent_server_times_out() {
    let dir = scratch_dir();
    let path = dir.join("silent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let holder = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        thread::sleep(Duration::from_secs(2));
        drop(s);
    });
    let start = Instant::now();
    let e = Client::new(&path, Duration::from_millis(300))
        .get("/vm")
        .unwrap_err();
    assert!(matches!(e, ClientError::Timeout(_)), "{e}");
    assert_eq!(
        e.to_string(),
        format!("no answer from {} in time", path.display())
    );
    assert!(start.elapsed() < Duration::from_millis(1500));
    holder.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ebb_ctl_timeout_flag_exits_3() {
    let dir = scratch_dir();
    let path = dir.join("silent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let holder = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        thread::sleep(Duration::from_secs(2));
        drop(s);
    });
    let out = ebb_ctl(&[
        "--api-socket",
        path.to_str().unwrap(),
        "--timeout",
        "0.3",
        "balloon",
        "stats",
    ]);
    assert_eq!(out.status.code(), Some(EXIT_NO_ANSWER));
    assert!(
        text(&out.stderr).ends_with("in time\n"),
        "{}",
        text(&out.stderr)
    );
    holder.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
