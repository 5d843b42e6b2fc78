//! A minimal QMP client (QEMU Machine Protocol over a Unix socket), for driving QEMU as
//! the peer: setting its balloon target and reading the balloon size back.
//!
//! Start QEMU with `-qmp unix:PATH,server=on,wait=off` and [`Qmp::connect`] to PATH.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A QMP session in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Asynchronous events received while waiting for replies.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects (retrying until `timeout`: QEMU creates the socket while starting), reads
    /// the greeting and enters command mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("connecting to QMP at {}: {e}", path.display()))
                }
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| format!("QMP socket: {e}"))?;
        let writer = stream.try_clone().map_err(|e| format!("QMP socket: {e}"))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("unexpected QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| format!("reading from QMP: {e}"))?;
        if n == 0 {
            return Err("QMP connection closed".into());
        }
        serde_json::from_str(line.trim()).map_err(|e| format!("bad QMP message {line:?}: {e}"))
    }

    /// Runs a command and returns its `return` value (an error reply is an `Err`).
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| format!("writing to QMP: {e}"))?;
        loop {
            let reply = self.read_message()?;
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                return Err(format!("QMP {command} failed: {e}"));
            }
            self.events.push(reply);
        }
    }

    /// Sets the balloon target so the guest keeps `guest_bytes` of its RAM
    /// (QMP `balloon`: the value is the guest's memory size, not the balloon's).
    pub fn set_guest_memory(&mut self, guest_bytes: u64) -> Result<(), String> {
        self.execute("balloon", json!({ "value": guest_bytes }))
            .map(|_| ())
    }

    /// The guest's memory size as the balloon leaves it (`query-balloon` `actual`, bytes).
    pub fn balloon_actual(&mut self) -> Result<u64, String> {
        let r = self.execute("query-balloon", json!({}))?;
        r.get("actual")
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("query-balloon without `actual`: {r}"))
    }
}
