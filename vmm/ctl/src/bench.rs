//! `ebb-ctl bench`: API latency (keep-alive and fresh connections, reads and writes) and
//! the VMM's CPU use per request and while idle with a connection open. A benchmark, not
//! a test: the end-to-end benchmarks run it against a VM with a busy guest.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

use crate::client::{Client, Connection};
use crate::failure::{broken, decode, expect_ok, Failure};
use ebb_api_model::VmInfo;

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
            Err(_) if attempt == 0 => *conn = None,
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("the loop returns on its second attempt")
}

/// Runs `ebb-ctl bench`: the report as text, or as one JSON document with `json_out`.
pub fn bench(
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
