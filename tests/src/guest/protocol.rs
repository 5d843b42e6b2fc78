//! The console protocol (resources/GUEST-PROTOCOL.md): the reader threads that keep the
//! console transcript and the VMM's stderr, and the `EBB-READY`, `EBB-RESULT <json>` and
//! `EBB-EVENT <json>` marker lines they parse.

use std::io::Read;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `EBB-READY` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// From spawning the VMM to the line arriving.
    pub elapsed: Duration,
    pub line: String,
    pub kernel: String,
    pub cpus: u32,
    pub memtotal_kib: u64,
    pub balloon: bool,
}

impl Ready {
    fn parse(line: &str, elapsed: Duration) -> Ready {
        let mut r = Ready {
            elapsed,
            line: line.to_string(),
            kernel: String::new(),
            cpus: 0,
            memtotal_kib: 0,
            balloon: false,
        };
        for word in line.split_whitespace() {
            match word.split_once('=') {
                Some(("kernel", v)) => r.kernel = v.to_string(),
                Some(("cpus", v)) => r.cpus = v.parse().unwrap_or(0),
                Some(("memtotal_kib", v)) => r.memtotal_kib = v.parse().unwrap_or(0),
                Some(("balloon", v)) => r.balloon = v == "yes",
                _ => {}
            }
        }
        r
    }
}

/// A marker line received from the guest, with its arrival time.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub value: Value,
}

#[derive(Default)]
pub(super) struct ConsoleState {
    pub(super) transcript: String,
    pub(super) partial: Vec<u8>,
    pub(super) ready: Option<Ready>,
    pub(super) results: Vec<Received>,
    pub(super) events: Vec<Received>,
    pub(super) malformed: Vec<String>,
    pub(super) stdout_eof: bool,
    pub(super) stderr: Vec<u8>,
    pub(super) stderr_eof: bool,
}

pub(super) type Shared = Arc<(Mutex<ConsoleState>, Condvar)>;

pub(super) fn lock(shared: &Shared) -> MutexGuard<'_, ConsoleState> {
    shared.0.lock().unwrap_or_else(|e| e.into_inner())
}

fn handle_line(st: &mut ConsoleState, line: &str, spawned: Instant) {
    let now = Instant::now();
    if st.ready.is_none() {
        if let Some(i) = line.find("EBB-READY") {
            st.ready = Some(Ready::parse(&line[i..], now.duration_since(spawned)));
            return;
        }
    }
    for (marker, is_result) in [("EBB-RESULT ", true), ("EBB-EVENT ", false)] {
        if let Some(i) = line.find(marker) {
            let json = line[i + marker.len()..].trim();
            match serde_json::from_str::<Value>(json) {
                Ok(value) => {
                    let r = Received { at: now, value };
                    if is_result {
                        st.results.push(r);
                    } else {
                        st.events.push(r);
                    }
                }
                Err(_) => st.malformed.push(line.to_string()),
            }
            return;
        }
    }
}

pub(super) fn console_reader(mut src: impl Read, shared: Shared, spawned: Instant, echo: bool) {
    let mut buf = [0u8; 4096];
    loop {
        let n = src.read(&mut buf).unwrap_or(0);
        let mut st = lock(&shared);
        if n == 0 {
            if !st.partial.is_empty() {
                // A line without its newline was cut off (the guest or the VMM died while
                // printing it): keep it in the transcript, but it is no marker. A cut
                // `EBB-READY` line would otherwise read as a guest without a balloon and
                // hide the crash.
                let rest = String::from_utf8_lossy(&std::mem::take(&mut st.partial)).into_owned();
                st.transcript.push_str(&rest);
            }
            st.stdout_eof = true;
            shared.1.notify_all();
            return;
        }
        st.partial.extend_from_slice(&buf[..n]);
        while let Some(pos) = st.partial.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = st.partial.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&raw);
            let line = text.trim_end_matches(['\n', '\r']).to_string();
            st.transcript.push_str(&line);
            st.transcript.push('\n');
            if echo {
                eprintln!("[guest] {line}");
            }
            handle_line(&mut st, &line, spawned);
        }
        shared.1.notify_all();
    }
}

pub(super) fn stderr_reader(mut src: impl Read, shared: Shared) {
    let mut buf = [0u8; 4096];
    loop {
        let n = src.read(&mut buf).unwrap_or(0);
        let mut st = lock(&shared);
        if n == 0 {
            st.stderr_eof = true;
            shared.1.notify_all();
            return;
        }
        st.stderr.extend_from_slice(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_markers() {
        let mut st = ConsoleState::default();
        let t = Instant::now();
        handle_line(
            &mut st,
            "EBB-READY kernel=6.1.0-48-amd64 cpus=2 memtotal_kib=480000 balloon=yes",
            t,
        );
        handle_line(
            &mut st,
            r#"EBB-RESULT {"cmd":"meminfo","ok":true,"mem_total_kib":1}"#,
            t,
        );
        handle_line(
            &mut st,
            r#"[  1.0] noise EBB-EVENT {"event":"shutdown"}"#,
            t,
        );
        handle_line(&mut st, "EBB-RESULT {broken", t);
        let r = st.ready.unwrap();
        assert_eq!(r.kernel, "6.1.0-48-amd64");
        assert_eq!((r.cpus, r.memtotal_kib, r.balloon), (2, 480000, true));
        assert_eq!(st.results[0].value["cmd"], "meminfo");
        assert_eq!(st.events[0].value["event"], "shutdown");
        assert_eq!(st.malformed.len(), 1);
    }

    #[test]
    fn a_line_cut_off_by_the_end_of_output_is_no_marker() {
        let shared: Shared = Arc::default();
        let out = b"[ 1.2] boot\nEBB-RESULT {\"cmd\":\"x\"}\nEBB-READY kernel=6.1.0-48-a";
        console_reader(&out[..], shared.clone(), Instant::now(), false);
        let st = lock(&shared);
        assert!(st.ready.is_none(), "{:?}", st.ready);
        assert_eq!(st.results.len(), 1);
        assert!(st.stdout_eof);
        assert!(st.transcript.ends_with("EBB-READY kernel=6.1.0-48-a"));
    }
}
