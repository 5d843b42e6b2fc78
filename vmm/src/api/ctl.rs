//! `ebb-ctl`: the command-line client of the API.
//!
//! Output is text for people by default. With `--json`, stdout carries exactly one JSON
//! document per run: the server's answer, `{"ok":true,...}` for actions without one, or
//! `{"ok":false,"status":N,"fault_message":"..."}` on failure (status 0 when no HTTP
//! answer arrived). Errors also go to stderr as one line.
//!
//! Exit status: 0 success, 1 the API refused the request, 2 usage error, 3 no answer
//! (no socket, connection refused, timeout, broken response).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serde::de::DeserializeOwned;
use serde_json::json;

use super::client::{Client, ClientError, Connection, Response};
use ebb_api_model::units::{format_size, parse_size, MIB};
use ebb_api_model::{BalloonInfo, BalloonStatistics, VmInfo};

/// Exit status: the API answered with an error.
pub const EXIT_API_ERROR: i32 = 1;
/// Exit status: bad command line.
pub const EXIT_USAGE: i32 = 2;
/// Exit status: no usable answer from the socket.
pub const EXIT_NO_ANSWER: i32 = 3;

/// Control a running Ebb VM through its API socket.
#[derive(Debug, Parser)]
#[command(name = "ebb-ctl", version, about, long_about = None)]
pub struct Ctl {
    /// The VM's API socket (the PATH given to `ebb --api-socket`).
    #[arg(long, value_name = "PATH", global = true)]
    pub api_socket: Option<PathBuf>,

    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// Seconds to wait for each answer.
    #[arg(long, value_name = "SECS", default_value_t = 15.0, global = true)]
    pub timeout: f64,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The balloon device.
    Balloon {
        /// What to do with it.
        #[command(subcommand)]
        action: BalloonAction,
    },
    /// The VM.
    Vm {
        /// What to do with it.
        #[command(subcommand)]
        action: VmAction,
    },
    /// Print the Prometheus metrics (text, also with --json).
    Metrics,
    /// Measure API latency and the VMM's CPU use (a benchmark, not a test).
    Bench(BenchArgs),
}

/// Balloon commands.
#[derive(Debug, Subcommand)]
pub enum BalloonAction {
    /// Set the balloon target: SIZE like 512M, 1G, 1.5G (a bare number is bytes);
    /// rounded to whole MiB.
    Set {
        /// Target size.
        size: String,
    },
    /// Show the balloon configuration and sizes.
    Get,
    /// Show the guest's memory statistics and Ebb's balloon counters.
    Stats,
    /// Set the statistics interval in seconds (statistics must be enabled at boot).
    Interval {
        /// Seconds between statistics updates (at least 1).
        secs: u16,
    },
}

/// VM commands.
#[derive(Debug, Subcommand)]
pub enum VmAction {
    /// Show state, configuration and host memory use.
    Info,
    /// Press the ACPI power button: the guest shuts down cleanly.
    Shutdown,
    /// Stop the VM immediately.
    Stop,
}

/// `ebb-ctl bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Requests per measurement.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub requests: usize,
    /// Seconds to measure the VMM's CPU use while idle with an API connection open
    /// (0 skips it).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub idle_seconds: u64,
}

/// Something that went wrong, with what to print and the exit status.
#[derive(Debug)]
pub struct Failure {
    /// HTTP status, 0 when there was no HTTP answer.
    pub status: u16,
    /// One-line message.
    pub message: String,
    /// Exit status.
    pub exit: i32,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Self {
            status: 0,
            message: e.to_string(),
            exit: EXIT_NO_ANSWER,
        }
    }
}

fn api_failure(r: &Response) -> Failure {
    Failure {
        status: r.status,
        message: r.fault_message(),
        exit: EXIT_API_ERROR,
    }
}

fn broken(what: impl Into<String>) -> Failure {
    Failure {
        status: 0,
        message: what.into(),
        exit: EXIT_NO_ANSWER,
    }
}

/// Parses the command line; on error prints clap's message and returns the status.
pub fn parse_args<I, T>(args: I) -> Result<Ctl, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    Ctl::try_parse_from(args)
}

/// Converts a SIZE argument to whole MiB: the amount and, when rounding changed it, a
/// note saying so.
pub fn size_to_mib(text: &str) -> Result<(u32, Option<String>), String> {
    let bytes = parse_size(text).map_err(|e| e.to_string())?;
    let mib = bytes / MIB + u64::from(bytes % MIB >= MIB / 2);
    let mib = u32::try_from(mib).map_err(|_| format!("size '{text}' is too large"))?;
    let note = (bytes % MIB != 0).then(|| {
        format!(
            "{text} ({}) is not a whole number of MiB; using {mib} MiB",
            format_size(bytes)
        )
    });
    Ok((mib, note))
}

/// Runs the parsed command, writing results to `out` and messages to `err`. Returns the
/// exit status.
pub fn run(ctl: &Ctl, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let Some(socket) = ctl.api_socket.clone() else {
        let _ = writeln!(err, "ebb-ctl: --api-socket PATH is required");
        return EXIT_USAGE;
    };
    if !(ctl.timeout.is_finite() && ctl.timeout > 0.0) {
        let _ = writeln!(
            err,
            "ebb-ctl: --timeout must be a positive number of seconds"
        );
        return EXIT_USAGE;
    }
    let client = Client::new(socket, Duration::from_secs_f64(ctl.timeout));
    let result = execute(ctl, &client, err);
    match result {
        Ok(text) => {
            let _ = out.write_all(text.as_bytes());
            if !text.ends_with('\n') {
                let _ = writeln!(out);
            }
            0
        }
        Err(f) => {
            if ctl.json {
                let doc = json!({"ok": false, "status": f.status, "fault_message": f.message});
                let _ = writeln!(out, "{doc}");
            }
            let _ = writeln!(err, "ebb-ctl: {}", f.message);
            f.exit
        }
    }
}

fn expect_ok(r: Response) -> Result<Response, Failure> {
    if r.is_success() {
        Ok(r)
    } else {
        Err(api_failure(&r))
    }
}

fn decode<T: DeserializeOwned>(r: &Response) -> Result<T, Failure> {
    serde_json::from_slice(&r.body)
        .map_err(|e| broken(format!("unexpected answer from the API: {e}")))
}

/// The server's JSON body as it came (one line, fields in the server's order), after
/// checking that it is JSON.
fn compact(r: &Response) -> Result<String, Failure> {
    let _: serde_json::Value = decode(r)?;
    Ok(r.text().trim().to_string())
}

fn execute(ctl: &Ctl, client: &Client, err: &mut dyn Write) -> Result<String, Failure> {
    match &ctl.command {
        Command::Balloon { action } => match action {
            BalloonAction::Get => {
                let r = expect_ok(client.get("/balloon")?)?;
                if ctl.json {
                    compact(&r)
                } else {
                    Ok(render_balloon(&decode(&r)?))
                }
            }
            BalloonAction::Set { size } => {
                let (mib, note) = size_to_mib(size).map_err(|m| Failure {
                    status: 0,
                    message: m,
                    exit: EXIT_USAGE,
                })?;
                if let Some(note) = note {
                    let _ = writeln!(err, "ebb-ctl: note: {note}");
                }
                expect_ok(client.send_json("PATCH", "/balloon", &json!({"amount_mib": mib}))?)?;
                Ok(if ctl.json {
                    json!({"ok": true, "amount_mib": mib}).to_string()
                } else {
                    format!("balloon target set to {mib} MiB")
                })
            }
            BalloonAction::Stats => {
                let r = expect_ok(client.get("/balloon/statistics")?)?;
                if ctl.json {
                    compact(&r)
                } else {
                    Ok(render_stats(&decode(&r)?))
                }
            }
            BalloonAction::Interval { secs } => {
                expect_ok(client.send_json(
                    "PATCH",
                    "/balloon/statistics",
                    &json!({"stats_polling_interval_s": secs}),
                )?)?;
                Ok(if ctl.json {
                    json!({"ok": true, "stats_polling_interval_s": secs}).to_string()
                } else {
                    format!("statistics every {secs} s")
                })
            }
        },
        Command::Vm { action } => match action {
            VmAction::Info => {
                let r = expect_ok(client.get("/vm")?)?;
                if ctl.json {
                    compact(&r)
                } else {
                    Ok(render_vm(&decode(&r)?))
                }
            }
            VmAction::Shutdown => {
                expect_ok(client.request("PUT", "/vm/shutdown", None)?)?;
                Ok(if ctl.json {
                    json!({"ok": true}).to_string()
                } else {
                    "pressed the power button; the guest is shutting down".to_string()
                })
            }
            VmAction::Stop => {
                expect_ok(client.request("PUT", "/vm/stop", None)?)?;
                Ok(if ctl.json {
                    json!({"ok": true}).to_string()
                } else {
                    "VM stopped".to_string()
                })
            }
        },
        Command::Metrics => Ok(expect_ok(client.get("/metrics")?)?.text()),
        Command::Bench(args) => bench(client, args, ctl.json, err),
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// `off`, or `every N s`.
fn stats_interval(secs: u32) -> String {
    if secs == 0 {
        "off".to_string()
    } else {
        format!("every {secs} s")
    }
}

fn bytes(v: Option<u64>) -> String {
    v.map(format_size).unwrap_or_else(|| "-".to_string())
}

/// Text for `balloon get`.
pub fn render_balloon(b: &BalloonInfo) -> String {
    let stats = stats_interval(b.config.stats_interval_s);
    format!(
        "target:              {} MiB\n\
         actual:              {} MiB\n\
         deflate on OOM:      {}\n\
         free page reporting: {}\n\
         statistics:          {stats}\n",
        b.target_mib(),
        b.actual_mib(),
        on_off(b.config.deflate_on_oom),
        on_off(b.config.free_page_reporting),
    )
}

/// Text for `balloon stats`.
pub fn render_stats(s: &BalloonStatistics) -> String {
    let e = &s.ebb;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "balloon:        target {} MiB ({} pages), actual {} MiB ({} pages)",
        s.target_mib, s.target_pages, s.actual_mib, s.actual_pages
    );
    let age = e
        .stats_age_ms
        .map(|ms| format!("{:.1} s ago", ms as f64 / 1000.0))
        .unwrap_or_else(|| "none yet".to_string());
    let _ = writeln!(t, "guest report:   {age} ({} so far)", e.stats_updates);
    let _ = writeln!(
        t,
        "guest memory:   total {}, free {}, available {}, caches {}",
        bytes(s.total_memory),
        bytes(s.free_memory),
        bytes(s.available_memory),
        bytes(s.disk_caches)
    );
    let n = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    let _ = writeln!(
        t,
        "guest paging:   swap in {}, swap out {}, major faults {}, minor faults {}",
        bytes(s.swap_in),
        bytes(s.swap_out),
        n(s.major_faults),
        n(s.minor_faults)
    );
    let _ = writeln!(
        t,
        "inflate:        {} pages in, {} pages out, {} discarded",
        e.inflated_pages,
        e.deflated_pages,
        format_size(e.inflate_discarded_bytes)
    );
    let _ = writeln!(
        t,
        "free reporting: {} reports, {} ranges, {} reported, {} discarded, {} kept",
        e.reports,
        e.reported_ranges,
        format_size(e.reported_bytes),
        format_size(e.reported_discarded_bytes),
        format_size(e.reported_skipped_bytes)
    );
    let us = |v: Option<u64>| v.map(|v| format!("{v} us")).unwrap_or_else(|| "-".into());
    let _ = writeln!(
        t,
        "report latency: p50 <= {}, p99 <= {} ({} samples)",
        us(e.report_latency.p50_us),
        us(e.report_latency.p99_us),
        e.report_latency.count
    );
    let _ = writeln!(
        t,
        "given back:     {} total ({} madvise calls, {} failed)",
        format_size(e.discarded_bytes),
        e.madvise_calls,
        e.madvise_failures
    );
    let r = &e.rejects;
    let _ = writeln!(
        t,
        "rejected:       {} pfns, {} descriptors, {} config writes, {} report ranges",
        r.pfns, r.descriptors, r.config_writes, r.report_ranges
    );
    t
}

/// Text for `vm info`.
pub fn render_vm(v: &VmInfo) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "state:          {}", v.state);
    let _ = writeln!(t, "ebb:            {} (pid {})", v.version, v.pid);
    let _ = writeln!(t, "uptime:         {:.1} s", v.uptime_s);
    let _ = writeln!(t, "vcpus:          {}", v.vcpus);
    let _ = writeln!(t, "memory:         {} MiB", v.memory_mib);
    let _ = writeln!(t, "kernel:         {}", v.kernel);
    if let Some(i) = &v.initramfs {
        let _ = writeln!(t, "initramfs:      {i}");
    }
    let _ = writeln!(t, "cmdline:        {}", v.cmdline);
    match &v.balloon {
        Some(b) => {
            let _ = writeln!(
                t,
                "balloon:        target {} MiB, actual {} MiB, deflate on OOM {}, \
                 free page reporting {}, statistics {}",
                b.target_mib(),
                b.actual_mib(),
                on_off(b.config.deflate_on_oom),
                on_off(b.config.free_page_reporting),
                stats_interval(b.config.stats_interval_s)
            );
        }
        None => {
            let _ = writeln!(t, "balloon:        none");
        }
    }
    let _ = writeln!(t, "guest RAM RSS:  {}", bytes(v.rss.guest_ram_bytes));
    let _ = writeln!(t, "VMM RSS:        {}", bytes(v.rss.vmm_bytes));
    let _ = writeln!(t, "process RSS:    {}", bytes(v.rss.process_bytes));
    t
}

// ---------------------------------------------------------------------------------------
// bench

/// Latency figures of one measurement, microseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LatencyFigures {
    /// Requests measured.
    pub requests: usize,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Mean.
    pub mean_us: f64,
    /// Slowest.
    pub max_us: f64,
}

/// Latency figures of `samples` (nearest-rank percentiles).
pub fn latency_figures(samples: &mut [Duration]) -> LatencyFigures {
    samples.sort();
    let n = samples.len();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let rank = |q: f64| {
        if n == 0 {
            0.0
        } else {
            us(samples[((q * n as f64).ceil() as usize).clamp(1, n) - 1])
        }
    };
    LatencyFigures {
        requests: n,
        p50_us: rank(0.5),
        p99_us: rank(0.99),
        mean_us: if n == 0 {
            0.0
        } else {
            samples.iter().map(|d| us(*d)).sum::<f64>() / n as f64
        },
        max_us: samples.last().map(|d| us(*d)).unwrap_or(0.0),
    }
}

/// CPU time of a process's threads, split into vCPU threads (named `vcpuN`) and the
/// rest (event loop, API server).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTimes {
    /// Seconds used by vCPU threads.
    pub vcpu_s: f64,
    /// Seconds used by the other threads.
    pub vmm_s: f64,
}

/// Reads the CPU times of `pid`'s threads from procfs.
pub fn cpu_times(pid: u32) -> std::io::Result<CpuTimes> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut t = CpuTimes::default();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = entry?.path();
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue; // the thread ended
        };
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        // Fields after "(comm) ": state is field 3; utime and stime are 14 and 15.
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let used = f
            .get(11)
            .zip(f.get(12))
            .and_then(|(u, s)| Some(u.parse::<u64>().ok()? + s.parse::<u64>().ok()?))
            .unwrap_or(0) as f64
            / ticks;
        if comm.trim().starts_with("vcpu") {
            t.vcpu_s += used;
        } else {
            t.vmm_s += used;
        }
    }
    Ok(t)
}

fn timed(
    conn: &mut Option<Connection>,
    client: &Client,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<Duration, Failure> {
    // Reconnect when the server closed an idle connection.
    for attempt in 0..2 {
        if conn.is_none() {
            *conn = Some(client.connect()?);
        }
        let c = conn.as_mut().expect("connected above");
        let start = Instant::now();
        match c.send(method, path, body, true) {
            Ok(r) => {
                let elapsed = start.elapsed();
                expect_ok(r)?;
                return Ok(elapsed);
            }
            Err(e) if attempt == 0 => {
                tracing::debug!("bench: reconnecting after {e}");
                *conn = None;
            }
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("the loop returns on its second attempt")
}

fn bench(
    client: &Client,
    args: &BenchArgs,
    json_out: bool,
    err: &mut dyn Write,
) -> Result<String, Failure> {
    let n = args.requests.max(1);
    let info: VmInfo = decode(&expect_ok(client.get("/vm")?)?)?;
    let pid = info.pid;
    let cpu = |what: &str| {
        cpu_times(pid).map_err(|e| broken(format!("cannot read the CPU use of {what}: {e}")))
    };
    let mut results: BTreeMap<&str, LatencyFigures> = BTreeMap::new();
    let before = cpu("the VMM")?;
    let started = Instant::now();
    let mut total_requests = 0usize;

    let mut conn = None;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        samples.push(timed(&mut conn, client, "GET", "/balloon", None)?);
    }
    total_requests += n;
    results.insert("get_balloon_keepalive", latency_figures(&mut samples));

    samples.clear();
    for _ in 0..n {
        let mut fresh = None;
        samples.push(timed(&mut fresh, client, "GET", "/balloon", None)?);
    }
    total_requests += n;
    results.insert("get_balloon_new_connection", latency_figures(&mut samples));

    if let Some(b) = &info.balloon {
        // Re-setting the current target: real work on the VMM side (the guest is told
        // the configuration changed) without changing the guest.
        let body = serde_json::to_vec(&json!({"amount_mib": b.target_mib()})).unwrap_or_default();
        samples.clear();
        for _ in 0..n {
            samples.push(timed(&mut conn, client, "PATCH", "/balloon", Some(&body))?);
        }
        total_requests += n;
        results.insert("patch_balloon_keepalive", latency_figures(&mut samples));
    } else {
        let _ = writeln!(
            err,
            "ebb-ctl: the VM has no balloon; PATCH /balloon skipped"
        );
    }
    let busy_elapsed = started.elapsed().as_secs_f64();
    let after = cpu("the VMM")?;
    drop(conn);

    let mut idle = None;
    if args.idle_seconds > 0 {
        let _open = client.connect()?;
        let t0 = cpu("the VMM")?;
        let start = Instant::now();
        std::thread::sleep(Duration::from_secs(args.idle_seconds));
        let t1 = cpu("the VMM")?;
        let secs = start.elapsed().as_secs_f64();
        idle = Some((
            secs,
            100.0 * (t1.vmm_s - t0.vmm_s) / secs,
            100.0 * (t1.vcpu_s - t0.vcpu_s) / secs,
        ));
    }
    let vmm_cpu_ms_per_request = 1000.0 * (after.vmm_s - before.vmm_s) / total_requests as f64;
    if json_out {
        let mut doc = json!({
            "pid": pid,
            "requests_per_measurement": n,
            "latency": results,
            "busy": {
                "seconds": busy_elapsed,
                "vmm_cpu_ms_per_request": vmm_cpu_ms_per_request,
            },
        });
        if let Some((secs, vmm, vcpu)) = idle {
            doc["idle"] = json!({
                "seconds": secs,
                "vmm_threads_cpu_percent": vmm,
                "vcpu_threads_cpu_percent": vcpu,
            });
        }
        return Ok(doc.to_string());
    }
    let mut t = String::new();
    let _ = writeln!(t, "ebb pid {pid}, {n} requests per measurement");
    let _ = writeln!(
        t,
        "{:<28} {:>10} {:>10} {:>10} {:>10}",
        "request", "p50 us", "p99 us", "mean us", "max us"
    );
    for (name, f) in &results {
        let _ = writeln!(
            t,
            "{name:<28} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            f.p50_us, f.p99_us, f.mean_us, f.max_us
        );
    }
    let _ = writeln!(
        t,
        "VMM threads (event loop + API) CPU: {vmm_cpu_ms_per_request:.3} ms per request \
         over {total_requests} requests in {busy_elapsed:.1} s"
    );
    if let Some((secs, vmm, vcpu)) = idle {
        let _ = writeln!(
            t,
            "idle with an API connection open for {secs:.0} s: VMM threads {vmm:.2}% of a \
             core, vCPU threads {vcpu:.2}%"
        );
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_to_mib_and_say_so() {
        assert_eq!(size_to_mib("512M").unwrap(), (512, None));
        assert_eq!(size_to_mib("1G").unwrap(), (1024, None));
        let (mib, note) = size_to_mib("1.5M").unwrap();
        assert_eq!(mib, 2);
        assert!(note.unwrap().contains("not a whole number of MiB"));
        assert_eq!(size_to_mib("1048575").unwrap().0, 1);
        assert_eq!(size_to_mib("100K").unwrap().0, 0);
        assert!(size_to_mib("lots").unwrap_err().contains("invalid size"));
        assert!(size_to_mib("-1G").is_err());
        assert!(size_to_mib("9000T").unwrap_err().contains("too large"));
    }

    #[test]
    fn argument_parsing() {
        let c = parse_args(["ebb-ctl", "--api-socket", "/s", "balloon", "set", "1G"]).unwrap();
        assert_eq!(c.api_socket, Some(PathBuf::from("/s")));
        assert!(matches!(
            c.command,
            Command::Balloon { action: BalloonAction::Set { ref size } } if size == "1G"
        ));
        // Global options work after the subcommand too.
        let c = parse_args(["ebb-ctl", "vm", "info", "--json", "--api-socket", "/s"]).unwrap();
        assert!(c.json);
        assert!(matches!(
            c.command,
            Command::Vm {
                action: VmAction::Info
            }
        ));
        let c = parse_args(["ebb-ctl", "--api-socket", "/s", "bench", "--requests", "5"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Bench(BenchArgs {
                requests: 5,
                idle_seconds: 30
            })
        ));
        for bad in [
            vec!["ebb-ctl"],
            vec!["ebb-ctl", "--api-socket", "/s", "balloon"],
            vec!["ebb-ctl", "--api-socket", "/s", "balloon", "set"],
            vec!["ebb-ctl", "--api-socket", "/s", "balloon", "interval", "-1"],
            vec![
                "ebb-ctl",
                "--api-socket",
                "/s",
                "balloon",
                "interval",
                "70000",
            ],
            vec!["ebb-ctl", "--api-socket", "/s", "vm", "reboot"],
        ] {
            assert!(parse_args(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn missing_socket_option_is_a_usage_error() {
        let c = parse_args(["ebb-ctl", "vm", "info"]).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert_eq!(run(&c, &mut out, &mut err), EXIT_USAGE);
        assert!(String::from_utf8(err).unwrap().contains("--api-socket"));
    }

    #[test]
    fn percentiles() {
        let mut s: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let f = latency_figures(&mut s);
        assert_eq!((f.p50_us, f.p99_us, f.max_us), (50.0, 99.0, 100.0));
        assert!((f.mean_us - 50.5).abs() < 1e-9);
        assert_eq!(latency_figures(&mut []).requests, 0);
    }

    #[test]
    fn cpu_times_of_this_process() {
        let t = cpu_times(std::process::id()).unwrap();
        assert!(t.vmm_s >= 0.0 && t.vcpu_s == 0.0);
    }
}
