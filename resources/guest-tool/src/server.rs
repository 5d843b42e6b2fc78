//! The command server: prints EBB-READY, runs `ebb.run=` commands, then serves the console.

use crate::command::{self, Command, ParseError};
use crate::json::Obj;
use crate::procfs;
use crate::sys::{self, Exit};
use crate::worker::{self, Worker, WorkerError};
use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Longest console line accepted; longer ones are answered with an error.
const MAX_LINE: usize = 64 * 1024;
/// Most `sh` output kept in a result.
const MAX_OUTPUT: usize = 256 * 1024;

const VIRTIO_ID_BALLOON: u32 = 5;
const BALLOON_F_REPORTING: usize = 5;

fn result(cmd: &str, ok: bool) -> Obj {
    Obj::new().str("cmd", cmd).bool("ok", ok)
}

fn emit_result(o: Obj) {
    sys::emit(&format!("EBB-RESULT {}", o.finish()));
}

fn emit_event(o: Obj) {
    sys::emit(&format!("EBB-EVENT {}", o.finish()));
}

fn millis(d: Duration) -> u64 {
    (d.as_micros() as u64 + 500) / 1000
}

fn read(path: impl AsRef<Path>) -> Option<String> {
    fs::read_to_string(path).ok()
}

/// State of the balloon device as seen from the guest.
struct BalloonState {
    dev: Option<PathBuf>,
}

fn find_balloon() -> BalloonState {
    let dev = fs::read_dir("/sys/bus/virtio/devices").ok().and_then(|rd| {
        let mut devs: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        devs.sort();
        devs.into_iter().find(|d| {
            read(d.join("device")).and_then(|s| procfs::parse_hex_id(&s)) == Some(VIRTIO_ID_BALLOON)
        })
    });
    BalloonState { dev }
}

fn cpus_online() -> Option<u32> {
    read("/sys/devices/system/cpu/online").and_then(|s| procfs::cpulist_count(&s))
}

fn ready_line() -> String {
    let kernel = read("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = procfs::parse_meminfo(&read("/proc/meminfo").unwrap_or_default());
    format!(
        "EBB-READY kernel={} cpus={} memtotal_kib={} balloon={}",
        kernel.trim(),
        cpus_online().unwrap_or(0),
        mem.total_kib.unwrap_or(0),
        if find_balloon().dev.is_some() {
            "yes"
        } else {
            "no"
        }
    )
}

#[derive(Default)]
pub struct Server {
    worker: Option<Worker>,
}

impl Server {
    /// Parses and runs one line, printing exactly one EBB-RESULT (none for a blank line).
    pub fn handle_line(&mut self, line: &str) {
        match command::parse_line(line) {
            None => {}
            Some(Err(ParseError { cmd, error })) => {
                emit_result(result(&cmd, false).str("error", &error))
            }
            Some(Ok(cmd)) => self.run(cmd),
        }
    }

    fn run(&mut self, cmd: Command) {
        let name = cmd.name();
        let out = match cmd {
            Command::Echo(text) => result(name, true).str("text", &text),
            Command::Touch(mib) => self.touch(mib),
            Command::Free => self.free(),
            Command::Alloc(mib) => match worker::alloc_once(mib) {
                Ok(d) => result(name, true)
                    .uint("mib", mib)
                    .uint("ms", millis(d))
                    .uint("us", d.as_micros() as u64),
                Err(e) => worker_error(name, &e).uint("mib", mib),
            },
            Command::Meminfo => meminfo(),
            Command::Balloon => balloon(),
            Command::Cpus => {
                let possible = read("/sys/devices/system/cpu/possible")
                    .and_then(|s| procfs::cpulist_count(&s));
                match (cpus_online(), possible) {
                    (Some(on), Some(pos)) => result(name, true)
                        .uint("online", on.into())
                        .uint("possible", pos.into()),
                    _ => result(name, false).str("error", "cannot read /sys/devices/system/cpu"),
                }
            }
            Command::Cpustat => cpustat(),
            Command::Sh(script) => sh(&script),
            Command::Hostile(mode, d) => match crate::hostile::run(mode, d.as_secs_f64()) {
                Ok(o) => result(name, true)
                    .str("mode", &o.mode)
                    .float("secs", o.secs)
                    .uint("completed", o.completed)
                    .uint("kicks", o.kicks)
                    .uint("final_status", o.final_status.into())
                    .bool("bystander_intact", o.bystander_intact)
                    .bool("pages_moved", o.pages_moved),
                Err(e) => result(name, false).str("error", &e),
            },
            Command::Churn(mib, d) => match crate::churn::run(mib, d) {
                Ok(r) => {
                    let o = result(name, r.pages_corrupted == 0)
                        .uint("mib", mib)
                        .float("secs", d.as_secs_f64())
                        .uint("cycles", r.cycles)
                        .uint("pages_checked", r.pages_checked)
                        .uint("pages_corrupted", r.pages_corrupted)
                        .uint("allocated_mib", r.allocated_mib)
                        .uint_list("bad_pages", &r.bad.iter().map(|b| b.0).collect::<Vec<_>>())
                        .uint_list(
                            "bad_generations",
                            &r.bad.iter().map(|b| b.1).collect::<Vec<_>>(),
                        )
                        .uint_list(
                            "bad_first_words",
                            &r.bad.iter().map(|b| b.2).collect::<Vec<_>>(),
                        );
                    if r.pages_corrupted > 0 {
                        o.str("error", &format!("{} corrupted pages", r.pages_corrupted))
                    } else {
                        o
                    }
                }
                Err(e) => worker_error(name, &e).uint("mib", mib),
            },
            Command::Sleep(d) => {
                std::thread::sleep(d);
                result(name, true).float("secs", d.as_secs_f64())
            }
            Command::Poweroff | Command::Reboot => {
                let restart = matches!(cmd, Command::Reboot);
                emit_result(result(name, true));
                let e = sys::power_off(restart);
                emit_event(
                    Obj::new()
                        .str("event", "error")
                        .str("cmd", name)
                        .str("error", &format!("reboot(2) failed: {e}")),
                );
                return;
            }
        };
        emit_result(out);
    }

    fn touch(&mut self, mib: u64) -> Obj {
        let mut w = match self.worker.take() {
            Some(w) => w,
            None => match Worker::spawn() {
                Ok(w) => w,
                Err(e) => {
                    return result("touch", false)
                        .str("error", &format!("fork: {e}"))
                        .uint("mib", mib)
                        .uint("held_mib", 0)
                }
            },
        };
        match w.touch(mib) {
            Ok(d) => {
                let held = w.held_mib();
                self.worker = Some(w);
                result("touch", true)
                    .uint("mib", mib)
                    .uint("ms", millis(d))
                    .uint("us", d.as_micros() as u64)
                    .uint("held_mib", held)
            }
            Err(e @ WorkerError::Died(_)) => worker_error("touch", &e)
                .uint("mib", mib)
                .uint("held_mib", 0),
            Err(e) => {
                let held = w.held_mib();
                self.worker = Some(w);
                worker_error("touch", &e)
                    .uint("mib", mib)
                    .uint("held_mib", held)
            }
        }
    }

    fn free(&mut self) -> Obj {
        let (freed, d) = match self.worker.take() {
            Some(w) => w.kill(),
            None => (0, Duration::ZERO),
        };
        result("free", true)
            .uint("freed_mib", freed)
            .uint("ms", millis(d))
            .uint("us", d.as_micros() as u64)
    }

    /// The worker's pipe became readable while idle: it died on its own.
    fn worker_died(&mut self) {
        if let Some(w) = self.worker.take() {
            let held = w.held_mib();
            let e = w.collect_death();
            let mut o = Obj::new().str("event", "worker-killed");
            o = match e {
                WorkerError::Died(Exit::Signal(s)) => o.int("signal", s.into()),
                WorkerError::Died(Exit::Code(c)) => o.null("signal").int("status", c.into()),
                _ => o.null("signal"),
            };
            emit_event(o.uint("lost_mib", held).str("error", &e.message()));
        }
    }

    /// Serves the console (stdin) until it closes.
    pub fn serve_console(&mut self) {
        let stdin = libc::STDIN_FILENO;
        let mut line: Vec<u8> = Vec::new();
        let mut overlong = false;
        let mut buf = [0u8; 4096];
        loop {
            let mut fds = vec![sys::pollfd(stdin)];
            if let Some(w) = &self.worker {
                fds.push(sys::pollfd(w.death_fd()));
            }
            if sys::poll(&mut fds, None).is_err() {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            if fds.len() > 1 && fds[1].revents != 0 {
                self.worker_died();
            }
            if fds[0].revents == 0 {
                continue;
            }
            let n = match sys::read_fd(stdin, &mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return,
            };
            for &b in &buf[..n] {
                match b {
                    b'\n' | b'\r' => {
                        if overlong {
                            emit_result(
                                result("", false)
                                    .str("error", &format!("line longer than {MAX_LINE} bytes")),
                            );
                        } else {
                            let text = String::from_utf8_lossy(&line).into_owned();
                            self.handle_line(&text);
                        }
                        line.clear();
                        overlong = false;
                    }
                    0 => {}
                    b if line.len() < MAX_LINE => line.push(b),
                    _ => overlong = true,
                }
            }
        }
    }
}

fn worker_error(cmd: &str, e: &WorkerError) -> Obj {
    let o = result(cmd, false).str("error", &e.message());
    match e.signal() {
        Some(s) => o.int("signal", s.into()),
        None => o,
    }
}

fn meminfo() -> Obj {
    match read("/proc/meminfo") {
        Some(text) => {
            let m = procfs::parse_meminfo(&text);
            result("meminfo", true)
                .opt_uint("mem_total_kib", m.total_kib)
                .opt_uint("mem_free_kib", m.free_kib)
                .opt_uint("mem_available_kib", m.available_kib)
        }
        None => result("meminfo", false).str("error", "cannot read /proc/meminfo"),
    }
}

fn cpustat() -> Obj {
    match read("/proc/stat").as_deref().and_then(procfs::cpu_ticks) {
        Some(t) => {
            // SAFETY: sysconf has no memory-safety preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
            let names = [
                "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
            ];
            names
                .iter()
                .zip(t)
                .fold(result("cpustat", true), |o, (k, v)| o.uint(k, v))
                .int("user_hz", hz as i64)
        }
        None => result("cpustat", false).str("error", "cannot parse /proc/stat"),
    }
}

fn balloon() -> Obj {
    let b = find_balloon();
    let features = b
        .dev
        .as_ref()
        .and_then(|d| read(d.join("features")))
        .map(|s| s.trim().to_string());
    let driver = b
        .dev
        .as_ref()
        .and_then(|d| fs::read_link(d.join("driver")).ok())
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let device = b
        .dev
        .as_ref()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
    let inflated = read("/proc/vmstat").and_then(|s| procfs::balloon_pages(&s));
    let order = read("/sys/module/page_reporting/parameters/page_reporting_order")
        .and_then(|s| s.trim().parse::<i64>().ok());
    result("balloon", true)
        .bool("present", b.dev.is_some())
        .opt_str("features", features.as_deref())
        .opt_int("inflated_pages", inflated)
        .opt_int("reporting_order", order)
        .opt_str("device", device.as_deref())
        .opt_str("driver", driver.as_deref())
        .bool(
            "free_page_reporting",
            features
                .as_deref()
                .is_some_and(|f| procfs::feature_bit(f, BALLOON_F_REPORTING)),
        )
}

/// pre_exec hook: children of the server get a normal OOM score again (the server's -1000
/// is inherited through fork). Only async-signal-safe calls.
fn reset_oom_score_adj() -> std::io::Result<()> {
    let path = c"/proc/self/oom_score_adj";
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd >= 0 {
        let _ = sys::write_all_fd(fd, b"0\n");
        // SAFETY: `fd` was just opened here and is not used afterwards.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// Runs `/bin/sh -c script` with stdout and stderr captured together (stdin /dev/null).
/// Stops collecting once the shell has exited, even if background children hold the pipe.
struct ShOutcome {
    code: Option<i32>,
    signal: Option<i32>,
    output: Vec<u8>,
    truncated: bool,
}

fn run_sh(script: &str) -> std::io::Result<ShOutcome> {
    let (r, w) = sys::pipe()?;
    let w2 = w.try_clone()?;
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::from(w))
        .stderr(Stdio::from(w2));
    // SAFETY: the hook runs in the forked child before exec and only makes
    // async-signal-safe system calls (open/write/close on a static path).
    unsafe { cmd.pre_exec(reset_oom_score_adj) };
    let mut child = cmd.spawn()?;
    drop(cmd); // closes our copies of the write end, so EOF can come

    let mut out = Vec::new();
    let mut truncated = false;
    let mut file = std::fs::File::from(r);
    let mut buf = [0u8; 8192];
    let mut exited = None;
    loop {
        let mut fds = [sys::pollfd(file.as_raw_fd())];
        sys::poll(&mut fds, Some(Duration::from_millis(50)))?;
        if fds[0].revents != 0 {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            let room = MAX_OUTPUT.saturating_sub(out.len());
            out.extend_from_slice(&buf[..n.min(room)]);
            truncated |= n > room;
            continue;
        }
        if exited.is_some() {
            break; // exited and nothing more buffered: background children hold the pipe
        }
        if let Some(st) = child.try_wait()? {
            exited = Some(st);
        }
    }
    let st = match exited {
        Some(st) => st,
        None => child.wait()?,
    };
    use std::os::unix::process::ExitStatusExt;
    Ok(ShOutcome {
        code: st.code(),
        signal: st.signal(),
        output: out,
        truncated,
    })
}

fn sh(script: &str) -> Obj {
    let started = Instant::now();
    match run_sh(script) {
        Ok(ShOutcome {
            code,
            signal,
            output: out,
            truncated,
        }) => {
            let mut o = result("sh", code == Some(0))
                .opt_int("status", code.map(i64::from))
                .str("output", &String::from_utf8_lossy(&out));
            if let Some(s) = signal {
                o = o.int("signal", s.into());
            }
            if code != Some(0) {
                o = o.str(
                    "error",
                    &match (code, signal) {
                        (Some(c), _) => format!("exit status {c}"),
                        (None, Some(s)) => format!("killed by signal {s}"),
                        _ => "unknown status".to_string(),
                    },
                );
            }
            if truncated {
                o = o.bool("truncated", true);
            }
            o.uint("ms", millis(started.elapsed()))
        }
        Err(e) => result("sh", false).str("error", &format!("cannot run /bin/sh: {e}")),
    }
}

/// Entry point of `ebb-guest serve`. With `first`, prints EBB-READY and runs `ebb.run=`.
pub fn run(first: bool) -> i32 {
    // The server must survive memory pressure; its children reset this.
    let _ = sys::set_oom_score_adj(-1000);
    // Not a terminal when run by hand with a pipe: fine.
    let _ = sys::console_raw(libc::STDIN_FILENO);
    let mut srv = Server::default();
    if first {
        sys::emit(&ready_line());
        let cmdline = read("/proc/cmdline").unwrap_or_default();
        for line in command::ebb_run_lines(&cmdline) {
            srv.handle_line(&line);
        }
    }
    srv.serve_console();
    0
}
