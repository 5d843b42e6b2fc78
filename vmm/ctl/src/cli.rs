//! `ebb-ctl`'s command line: the arguments, running a command, its output and exit status.
//!
//! Output is text for people by default. With `--json`, stdout carries exactly one JSON
//! document per run: the server's answer, `{"ok":true,...}` for actions without one, or
//! `{"ok":false,"status":N,"fault_message":"..."}` on failure (status 0 when no HTTP
//! answer arrived). Errors also go to stderr as one line.
//!
//! Exit status: 0 success, 1 the API refused the request, 2 usage error, 3 no answer
//! (no socket, connection refused, timeout, broken response).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::bench::{bench, BenchArgs};
use crate::client::{Client, Response};
use crate::failure::{broken, decode, expect_ok, Failure};
pub use crate::failure::{EXIT_API_ERROR, EXIT_NO_ANSWER, EXIT_USAGE};
use crate::render::{render_balloon, render_hint, render_policy, render_stats, render_vm};
use ebb_api_model::units::{format_size, parse_size, MIB};
use ebb_api_model::{HintStatus, PolicyUpdate};

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
    /// Ask the guest for its free memory now (free page hinting, enabled at boot with
    /// --balloon ...,free_page_hinting=on) and wait until it has handed it over.
    Hint(HintArgs),
    /// Show free page hinting's command ids and the last run.
    HintStatus,
    /// Tell the guest the host is done with its hinted memory (after `hint --no-ack`).
    HintStop,
    /// Show the automatic balloon policy, or change it with the options.
    Policy(PolicyArgs),
}

/// `ebb-ctl balloon policy`: with no option it shows the policy.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// Turn the policy on (it sets the balloon target from the guest's statistics).
    #[arg(long, conflicts_with = "off")]
    pub on: bool,
    /// Turn the policy off (the target stays where it is).
    #[arg(long)]
    pub off: bool,
    /// Memory the guest keeps available beyond the balloon (SIZE, whole MiB).
    #[arg(long, value_name = "SIZE")]
    pub headroom: Option<String>,
    /// Smallest balloon the policy sets (SIZE).
    #[arg(long, value_name = "SIZE")]
    pub min: Option<String>,
    /// Largest balloon the policy sets (SIZE).
    #[arg(long, value_name = "SIZE")]
    pub max: Option<String>,
    /// Largest inflate per decision (SIZE).
    #[arg(long, value_name = "SIZE")]
    pub step: Option<String>,
    /// Major faults per second above which the guest counts as short of memory.
    #[arg(long, value_name = "N")]
    pub fault_rate: Option<u64>,
    /// Seconds inflating waits after a deflate (at most 3600).
    #[arg(long, value_name = "SECS")]
    pub cooldown: Option<u64>,
    /// Trim a quiet guest's cache (on) or leave it (off).
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub trim: Option<bool>,
}

/// `on` or `off` (also yes/no, true/false, 1/0), as on Ebb's command line.
fn parse_on_off(text: &str) -> Result<bool, String> {
    ebb_api_model::options::parse_switch("--trim", text).map_err(|e| e.0)
}

/// `ebb-ctl balloon hint`.
#[derive(Debug, Args)]
pub struct HintArgs {
    /// Return once the run is requested instead of waiting for the guest to finish.
    #[arg(long)]
    pub no_wait: bool,
    /// Leave the guest holding its hinted blocks until `hint-stop` (Firecracker's
    /// acknowledge_on_stop=false).
    #[arg(long)]
    pub no_ack: bool,
    /// Seconds to wait for the guest to finish.
    #[arg(long, default_value_t = 60.0)]
    pub wait: f64,
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

/// The server's JSON body as it came (one line, fields in the server's order), after
/// checking that it is JSON.
fn compact(r: &Response) -> Result<String, Failure> {
    let _: serde_json::Value = decode(r)?;
    Ok(r.text().trim().to_string())
}

/// A SIZE argument in whole MiB; a usage error when it is not a size, a note on `err`
/// when rounding changed it.
fn mib_arg(text: &str, err: &mut dyn Write) -> Result<u32, Failure> {
    let (mib, note) = size_to_mib(text).map_err(|m| Failure {
        status: 0,
        message: m,
        exit: EXIT_USAGE,
    })?;
    if let Some(note) = note {
        let _ = writeln!(err, "ebb-ctl: note: {note}");
    }
    Ok(mib)
}

/// `ebb-ctl balloon policy`: shows the policy, or sends the changes the options ask for.
fn policy(
    client: &Client,
    args: &PolicyArgs,
    json: bool,
    err: &mut dyn Write,
) -> Result<String, Failure> {
    let mut mib = |size: &Option<String>| -> Result<Option<u64>, Failure> {
        size.as_deref()
            .map(|text| mib_arg(text, err).map(u64::from))
            .transpose()
    };
    let update = PolicyUpdate {
        enabled: match (args.on, args.off) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        headroom_mib: mib(&args.headroom)?,
        min_mib: mib(&args.min)?,
        max_mib: mib(&args.max)?,
        step_mib: mib(&args.step)?,
        fault_rate_per_s: args.fault_rate,
        cooldown_s: args.cooldown,
        trim: args.trim,
    };
    if update != PolicyUpdate::default() {
        expect_ok(client.send_json("PATCH", "/balloon/policy", &json!(update))?)?;
    }
    let r = expect_ok(client.get("/balloon/policy")?)?;
    if json {
        compact(&r)
    } else {
        Ok(render_policy(&decode(&r)?))
    }
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
                let mib = mib_arg(size, err)?;
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
            BalloonAction::Hint(args) => hint(client, args, ctl.json),
            BalloonAction::HintStatus => {
                let r = expect_ok(client.get("/balloon/hinting/status")?)?;
                if ctl.json {
                    compact(&r)
                } else {
                    Ok(render_hint(&decode(&r)?))
                }
            }
            BalloonAction::Policy(args) => policy(client, args, ctl.json, err),
            BalloonAction::HintStop => {
                expect_ok(client.request("PATCH", "/balloon/hinting/stop", None)?)?;
                Ok(if ctl.json {
                    json!({"ok": true}).to_string()
                } else {
                    "told the guest the host is done with its hinted memory".to_string()
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

/// Starts a hinting run and, unless told not to, polls its status until the guest has
/// finished (stopped or done) or `args.wait` runs out.
fn hint(client: &Client, args: &HintArgs, json_out: bool) -> Result<String, Failure> {
    if !(args.wait.is_finite() && args.wait > 0.0) {
        return Err(Failure {
            status: 0,
            message: "--wait must be a positive number of seconds".into(),
            exit: EXIT_USAGE,
        });
    }
    let started = std::time::Instant::now();
    expect_ok(client.send_json(
        "PATCH",
        "/balloon/hinting/start",
        &json!({"acknowledge_on_stop": !args.no_ack}),
    )?)?;
    let mut status: HintStatus = decode(&expect_ok(client.get("/balloon/hinting/status")?)?)?;
    let run = status.run_cmd;
    let finished =
        |s: &HintStatus| s.run_cmd != run || matches!(s.state.as_str(), "stopped" | "done");
    if !args.no_wait {
        let deadline = started + Duration::from_secs_f64(args.wait);
        while !finished(&status) {
            if std::time::Instant::now() >= deadline {
                return Err(Failure {
                    status: 0,
                    message: format!(
                        "the guest did not finish hinting run {run} within {} s (state {})",
                        args.wait, status.state
                    ),
                    exit: 1,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
            status = decode(&expect_ok(client.get("/balloon/hinting/status")?)?)?;
        }
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(if json_out {
        let mut v = serde_json::to_value(&status).map_err(|e| broken(e.to_string()))?;
        v["elapsed_ms"] = json!(elapsed_ms);
        v.to_string()
    } else if args.no_wait {
        format!("hinting run {run} requested")
    } else {
        format!(
            "hinting run {run} {} in {elapsed_ms} ms: {}",
            status.state,
            render_hint(&status).trim_end()
        )
    })
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
}
