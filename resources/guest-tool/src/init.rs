//! `ebb-guest init`: the supervisor that runs as PID 1 after /init has mounted the file
//! systems and loaded the modules. It never exits: it runs the command server (and
//! restarts it if it dies), reaps orphans, and powers off on Ctrl-Alt-Del (SIGINT to PID 1)
//! or on KEY_POWER from any input device.

use crate::json::Obj;
use crate::sys::{self, Exit};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const EV_KEY: u16 = 0x01;
const KEY_POWER: u16 = 116;
/// sizeof(struct input_event) on 64-bit: struct timeval (16) + type, code (2 + 2) + value (4).
const INPUT_EVENT_SIZE: usize = 24;
/// How often /dev/input is rescanned for new devices.
const RESCAN: Duration = Duration::from_secs(2);
/// A server that dies sooner than this after its start is restarted only after a pause.
const MIN_RUN: Duration = Duration::from_secs(2);
const RESTART_PAUSE: Duration = Duration::from_secs(1);

fn event(o: Obj) {
    sys::emit(&format!("EBB-EVENT {}", o.finish()));
}

/// True if a buffer of input_event structs holds a KEY_POWER press.
pub fn has_power_press(buf: &[u8]) -> bool {
    buf.chunks_exact(INPUT_EVENT_SIZE).any(|ev| {
        let ty = u16::from_ne_bytes([ev[16], ev[17]]);
        let code = u16::from_ne_bytes([ev[18], ev[19]]);
        let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
        ty == EV_KEY && code == KEY_POWER && value == 1
    })
}

struct Supervisor {
    sigfd: OwnedFd,
    inputs: BTreeMap<PathBuf, File>,
    server: Option<(libc::pid_t, Instant)>,
    restart_at: Option<Instant>,
    first: bool,
    last_scan: Option<Instant>,
    exe: PathBuf,
}

impl Supervisor {
    fn spawn_server(&mut self) {
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.arg("serve");
        if !self.first {
            cmd.arg("--restarted");
        }
        match cmd.spawn() {
            Ok(child) => {
                let pid = child.id() as libc::pid_t;
                if !self.first {
                    event(
                        Obj::new()
                            .str("event", "tool-restarted")
                            .int("pid", pid.into()),
                    );
                }
                self.first = false;
                self.server = Some((pid, Instant::now()));
                self.restart_at = None;
            }
            Err(e) => {
                event(
                    Obj::new()
                        .str("event", "tool-spawn-failed")
                        .str("error", &e.to_string()),
                );
                self.restart_at = Some(Instant::now() + RESTART_PAUSE);
            }
        }
    }

    fn rescan_inputs(&mut self) {
        self.last_scan = Some(Instant::now());
        let Ok(rd) = fs::read_dir("/dev/input") else {
            return;
        };
        for e in rd.flatten() {
            let path = e.path();
            let is_event = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("event"));
            if !is_event || self.inputs.contains_key(&path) {
                continue;
            }
            if let Ok(f) = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(&path)
            {
                self.inputs.insert(path, f);
            }
        }
    }

    fn shutdown(&mut self, why: &str) {
        event(Obj::new().str("event", "shutdown").str("why", why));
        let e = sys::power_off(false);
        event(
            Obj::new()
                .str("event", "error")
                .str("error", &format!("power off failed: {e}")),
        );
    }

    fn reap(&mut self) {
        while let Some((pid, exit)) = sys::reap_any() {
            let Some((spid, started)) = self.server else {
                continue;
            };
            if pid != spid {
                continue; // an orphan (e.g. a background job of `sh`)
            }
            self.server = None;
            let o = Obj::new()
                .str("event", "tool-exited")
                .int("pid", pid.into());
            event(match exit {
                Exit::Code(c) => o.int("status", c.into()).null("signal"),
                Exit::Signal(s) => o.null("status").int("signal", s.into()),
            });
            let pause = if started.elapsed() < MIN_RUN {
                RESTART_PAUSE
            } else {
                Duration::ZERO
            };
            self.restart_at = Some(Instant::now() + pause);
        }
    }

    /// One round of the main loop.
    fn step(&mut self) {
        let now = Instant::now();
        if self.server.is_none() && self.restart_at.is_none_or(|t| t <= now) {
            self.spawn_server();
        }
        if self
            .last_scan
            .is_none_or(|t| now.duration_since(t) >= RESCAN)
        {
            self.rescan_inputs();
        }
        let mut timeout = RESCAN;
        if let Some(t) = self.restart_at {
            timeout = timeout.min(t.saturating_duration_since(now));
        }
        let paths: Vec<PathBuf> = self.inputs.keys().cloned().collect();
        let mut fds = vec![sys::pollfd(self.sigfd.as_raw_fd())];
        fds.extend(
            paths
                .iter()
                .map(|p| sys::pollfd(self.inputs[p].as_raw_fd())),
        );
        if sys::poll(&mut fds, Some(timeout)).is_err() {
            std::thread::sleep(Duration::from_millis(100));
            return;
        }
        if fds[0].revents != 0 {
            for sig in sys::read_signals(self.sigfd.as_raw_fd()) {
                match sig as i32 {
                    libc::SIGCHLD => self.reap(),
                    libc::SIGINT => self.shutdown("ctrl-alt-del"),
                    _ => {}
                }
            }
        }
        for (i, path) in paths.iter().enumerate() {
            if fds[i + 1].revents == 0 {
                continue;
            }
            let mut buf = [0u8; INPUT_EVENT_SIZE * 32];
            match sys::read_fd(self.inputs[path].as_raw_fd(), &mut buf) {
                Ok(n) if has_power_press(&buf[..n]) => self.shutdown("power-button"),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.inputs.remove(path); // device gone
                }
            }
        }
    }
}

/// Entry point of `ebb-guest init`. Never returns.
pub fn run() -> ! {
    if std::process::id() != 1 {
        let _ = sys::set_child_subreaper();
    }
    let _ = sys::set_oom_score_adj(-1000);
    if let Err(e) = sys::disable_cad() {
        event(
            Obj::new()
                .str("event", "error")
                .str("error", &format!("cannot disable ctrl-alt-del reboot: {e}")),
        );
    }
    let sigfd = loop {
        match sys::block_signals_fd(&[libc::SIGINT, libc::SIGCHLD, libc::SIGTERM, libc::SIGHUP]) {
            Ok(fd) => break fd,
            Err(e) => {
                event(
                    Obj::new()
                        .str("event", "error")
                        .str("error", &format!("signalfd: {e}")),
                );
                std::thread::sleep(Duration::from_secs(5));
            }
        }
    };
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/bin/ebb-guest"));
    let mut sup = Supervisor {
        sigfd,
        inputs: BTreeMap::new(),
        server: None,
        restart_at: None,
        first: true,
        last_scan: None,
        exe,
    };
    // A panic must not end PID 1 (that would panic the kernel): report it and go on.
    loop {
        let r = panic::catch_unwind(AssertUnwindSafe(|| loop {
            sup.step();
        }));
        if let Err(p) = r {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            event(
                Obj::new()
                    .str("event", "error")
                    .str("error", &format!("supervisor panic: {msg}")),
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ty: u16, code: u16, value: i32) -> Vec<u8> {
        let mut v = vec![0u8; 16];
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&code.to_ne_bytes());
        v.extend_from_slice(&value.to_ne_bytes());
        v
    }

    #[test]
    fn detects_power_press() {
        let mut buf = ev(EV_KEY, KEY_POWER, 1);
        buf.extend(ev(0, 0, 0)); // EV_SYN
        assert!(has_power_press(&buf));
        assert!(!has_power_press(&ev(EV_KEY, KEY_POWER, 0))); // release
        assert!(!has_power_press(&ev(EV_KEY, 30, 1))); // KEY_A
        assert!(!has_power_press(&ev(EV_KEY, KEY_POWER, 1)[..20])); // partial
        assert!(!has_power_press(&[]));
    }
}
